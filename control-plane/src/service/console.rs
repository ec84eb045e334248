//! Console sessions: an admin key exchanged, once, for a random session token (the
//! cookie) and a CSRF token (the page sends it back in a header on every change). Only
//! the token's SHA-256 is stored; the key itself is never kept, only its hash, so the
//! session acts as that key while it stays valid: deleting, disabling, expiring or
//! rolling it ends the session (checked on every request by the HTTP layer).

use std::time::Duration;

use base64::Engine;
use metlo_shared::KeyHash;
use subtle::ConstantTimeEq;

use super::Error;
use crate::db::rows::SessionRow;
use crate::db::Store;

/// No session outlives this, however busy.
pub const MAX_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// A session's last use is written at most this often (its idle clock's resolution).
const TOUCH_EVERY_MS: i64 = 15_000;

#[derive(Debug, Clone, Copy)]
pub struct SessionRules {
    /// Idle this long, a session ends (`CONSOLE_IDLE_TIMEOUT`).
    pub idle: Duration,
    /// Mark the cookie `Secure` whatever the request (`CONSOLE_SECURE_COOKIE`).
    pub secure_cookie: bool,
}

/// A session just opened: the cookie's token (only in the `Set-Cookie`) and the page's
/// CSRF token.
pub struct Opened {
    pub token: String,
    pub csrf_token: String,
}

/// A session in force.
#[derive(Debug)]
pub struct Session {
    /// The admin key it acts as.
    pub key_hash: KeyHash,
    pub csrf_token: String,
}

impl Session {
    /// Whether `sent` is this session's CSRF token (in constant time).
    pub fn csrf_matches(&self, sent: &str) -> bool {
        bool::from(sent.as_bytes().ct_eq(self.csrf_token.as_bytes()))
    }
}

fn random_token() -> Result<String, Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| Error::Internal(anyhow::anyhow!("no randomness: {e}")))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

fn token_hash(token: &str) -> String {
    KeyHash::of_text(token).to_hex()
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Opens a session acting as the (already verified, admin) key with this hash.
pub async fn open(
    store: &Store,
    rules: &SessionRules,
    key_hash: &KeyHash,
    now_ms: i64,
) -> Result<Opened, Error> {
    let opened = Opened {
        token: random_token()?,
        csrf_token: random_token()?,
    };
    let row = SessionRow {
        key_hash: key_hash.to_hex(),
        csrf_token: opened.csrf_token.clone(),
        created_ms: now_ms,
        last_seen_ms: now_ms,
    };
    store
        .open_session(
            &token_hash(&opened.token),
            &row,
            now_ms.saturating_sub(ms(rules.idle)),
            now_ms.saturating_sub(ms(MAX_LIFETIME)),
        )
        .await?;
    Ok(opened)
}

/// The session of this cookie token, if it is in force (its use recorded); an idle or
/// too old one is ended here.
pub async fn find(
    store: &Store,
    rules: &SessionRules,
    token: &str,
    now_ms: i64,
) -> Result<Option<Session>, Error> {
    let hash = token_hash(token);
    let Some(row) = store.session(&hash).await? else {
        return Ok(None);
    };
    let idle = now_ms.saturating_sub(row.last_seen_ms) > ms(rules.idle);
    let too_old = now_ms.saturating_sub(row.created_ms) > ms(MAX_LIFETIME);
    let key_hash = KeyHash::from_hex(&row.key_hash).ok();
    let (false, false, Some(key_hash)) = (idle, too_old, key_hash) else {
        store.end_session(&hash).await?;
        return Ok(None);
    };
    if now_ms.saturating_sub(row.last_seen_ms) >= TOUCH_EVERY_MS {
        store.touch_session(&hash, now_ms).await?;
    }
    Ok(Some(Session {
        key_hash,
        csrf_token: row.csrf_token,
    }))
}

/// Ends the session of this cookie token; whether there was one.
pub async fn end(store: &Store, token: &str) -> Result<bool, Error> {
    Ok(store.end_session(&token_hash(token)).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: SessionRules = SessionRules {
        idle: Duration::from_secs(60),
        secure_cookie: false,
    };

    #[tokio::test]
    async fn a_session_lasts_while_used_and_ends_idle_or_signed_out() {
        let store = Store::memory().await;
        let key = KeyHash::of_text("an admin key");
        let opened = open(&store, &RULES, &key, 1_000_000).await.unwrap();
        assert_ne!(opened.token, opened.csrf_token);
        assert_eq!(opened.token.len(), 43, "256 bits");
        let s = find(&store, &RULES, &opened.token, 1_050_000)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(s.key_hash, key);
        assert!(s.csrf_matches(&opened.csrf_token));
        assert!(!s.csrf_matches(""));
        assert!(!s.csrf_matches(&opened.token));
        // Used at 1 050 000: still in force 59 s later, not 61 s after that use.
        assert!(find(&store, &RULES, &opened.token, 1_109_000)
            .await
            .unwrap()
            .is_some());
        assert!(find(&store, &RULES, &opened.token, 1_170_001)
            .await
            .unwrap()
            .is_none());
        // Ended for good, even back in time.
        assert!(find(&store, &RULES, &opened.token, 1_100_000)
            .await
            .unwrap()
            .is_none());

        let other = open(&store, &RULES, &key, 2_000_000).await.unwrap();
        assert!(find(&store, &RULES, "not a token", 2_000_000)
            .await
            .unwrap()
            .is_none());
        assert!(end(&store, &other.token).await.unwrap());
        assert!(find(&store, &RULES, &other.token, 2_000_001)
            .await
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn no_session_outlives_its_lifetime_however_busy() {
        let store = Store::memory().await;
        let opened = open(&store, &RULES, &KeyHash::of_text("k"), 0)
            .await
            .unwrap();
        let mut now = 0;
        while now < ms(MAX_LIFETIME) {
            now += 30_000;
            let found = find(&store, &RULES, &opened.token, now).await.unwrap();
            assert_eq!(found.is_some(), now <= ms(MAX_LIFETIME), "at {now}");
            if found.is_none() {
                break;
            }
        }
        assert!(find(&store, &RULES, &opened.token, now + 1)
            .await
            .unwrap()
            .is_none());
    }
}
