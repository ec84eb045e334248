//! Reading keys: one by name, Metlo's plain array (bounded), or pages by an opaque cursor.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use metlo_shared::KeyType;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::keys::KeyInfo;
use super::Error;
use crate::db::Store;

/// Most keys in one page of a list.
pub const MAX_LIST_PAGE: i64 = 1000;
/// A page's size when `limit` is not given.
pub const DEFAULT_LIST_PAGE: i64 = 100;

/// One page of a list, newest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyPage {
    pub keys: Vec<KeyInfo>,
    /// Pass it as `cursor` for the next page; null: this page is the last.
    #[serde(rename = "nextCursor")]
    pub next_cursor: Option<String>,
}

/// Every key (or every one of a type), newest first, as Metlo's plain array — if there
/// are at most `max`; past that, a 400 that points to paging (never a response of
/// unbounded size).
pub async fn list_unpaged(
    store: &Store,
    only: Option<KeyType>,
    max: u64,
) -> Result<Vec<KeyInfo>, Error> {
    let fetch = i64::try_from(max).unwrap_or(i64::MAX - 1) + 1;
    let keys = store.list_keys_page(only, None, None, fetch).await?;
    if keys.len() as u64 > max {
        return Err(Error::invalid(format!(
            "there are more than {max} keys to list in one response: ask for them a page \
             at a time with ?limit=<1-{MAX_LIST_PAGE}>, then ?limit=…&cursor=<nextCursor>"
        )));
    }
    Ok(keys.into_iter().map(KeyInfo::from).collect())
}

/// At most `limit` keys, newest first, after `cursor` (a previous page's `nextCursor`),
/// of one type and with `name_part` in their name when given. Keys made or deleted
/// during a walk never make another key be skipped or repeated.
pub async fn list_page(
    store: &Store,
    only: Option<KeyType>,
    name_part: Option<&str>,
    limit: i64,
    cursor: Option<&str>,
) -> Result<KeyPage, Error> {
    if !(1..=MAX_LIST_PAGE).contains(&limit) {
        return Err(Error::invalid(format!(
            "limit must be a whole number from 1 to {MAX_LIST_PAGE}"
        )));
    }
    let after = cursor.map(decode_cursor).transpose()?;
    let mut keys = store
        .list_keys_page(only, name_part, after, limit + 1)
        .await?;
    let more = keys.len() as i64 > limit;
    keys.truncate(limit as usize);
    let next_cursor = keys
        .last()
        .filter(|_| more)
        .map(|k| encode_cursor(k.created_at_ms, k.id));
    Ok(KeyPage {
        keys: keys.into_iter().map(KeyInfo::from).collect(),
        next_cursor,
    })
}

/// Opaque to clients: base64url of the last key's place in the order.
fn encode_cursor(created_at_ms: i64, id: i64) -> String {
    URL_SAFE_NO_PAD.encode(format!("k1:{created_at_ms}:{id}"))
}

fn decode_cursor(cursor: &str) -> Result<(i64, i64), Error> {
    let invalid = || Error::invalid("invalid cursor: pass a page's nextCursor as it is");
    let raw = URL_SAFE_NO_PAD
        .decode(cursor.trim())
        .map_err(|_| invalid())?;
    let raw = String::from_utf8(raw).map_err(|_| invalid())?;
    let mut parts = raw.strip_prefix("k1:").ok_or_else(invalid)?.split(':');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(created), Some(id), None) => Ok((
            created.parse().map_err(|_| invalid())?,
            id.parse().map_err(|_| invalid())?,
        )),
        _ => Err(invalid()),
    }
}

/// One key's metadata, by name.
pub async fn key_info(store: &Store, name: &str) -> Result<KeyInfo, Error> {
    store
        .key_by_name(&super::keys::normalize_name(name))
        .await?
        .map(KeyInfo::from)
        .ok_or(Error::NotFound("no API key with this name"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_a_400() {
        let c = encode_cursor(1_800_000_000_123, 42);
        assert_eq!(decode_cursor(&c).unwrap(), (1_800_000_000_123, 42));
        for bad in [
            "",
            "!!",
            "azE6",
            &URL_SAFE_NO_PAD.encode("k1:1"),
            &URL_SAFE_NO_PAD.encode("k1:1:2:3"),
            &URL_SAFE_NO_PAD.encode("k1:x:2"),
        ] {
            assert!(
                matches!(decode_cursor(bad), Err(Error::Invalid(_))),
                "{bad}"
            );
        }
    }
}
