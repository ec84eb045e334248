//! A client for Cloudflare's Workers KV REST API — the subset the sync needs: bulk put
//! (with `expiration_ttl`, and the record's digest as metadata), bulk delete, and listing
//! keys with a cursor. Checks the response envelope's `success`, not
//! just the status; tells rate limiting and server errors apart so the caller can back off.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The API accepts at most this many keys per bulk request.
pub const MAX_BULK: usize = 10_000;
/// Workers KV refuses an `expiration_ttl` below 60 s.
pub const MIN_EXPIRATION_TTL: u64 = 60;

/// The `expiration_ttl` for a record: the configured one, cut so the entry never outlives
/// the key's expiry. A record expiring within KV's 60 s minimum stays that long, and the
/// edge refuses it meanwhile by its `expires`.
pub fn item_ttl(configured: Option<u64>, record_json: &str, now_unix_seconds: u64) -> Option<u64> {
    let expires = metlo_shared::KeyRecord::from_json(record_json.as_bytes())
        .ok()
        .and_then(|r| r.expires);
    match expires {
        None => configured,
        Some(e) => {
            let left = e.saturating_sub(now_unix_seconds).max(MIN_EXPIRATION_TTL);
            Some(configured.map_or(left, |c| c.min(left)))
        }
    }
}

/// The `expiration_ttl` of the entry `key`: [`item_ttl`] for a record; none for the route
/// policy's, which lives until replaced (a Worker that reads it takes a missing one for
/// "no policy").
pub fn entry_ttl(
    configured: Option<u64>,
    key: &str,
    value: &str,
    now_unix_seconds: u64,
) -> Option<u64> {
    if key == crate::db::policy::POLICY_KV_KEY {
        return None;
    }
    item_ttl(configured, value, now_unix_seconds)
}

#[derive(Debug, Clone)]
pub struct KvTarget {
    /// e.g. `https://api.cloudflare.com/client/v4` (configurable so tests and local dev
    /// can point it at a local target).
    pub api_url: String,
    pub account_id: String,
    pub namespace_id: String,
    pub api_token: String,
    /// `expiration_ttl` for pushed records; `None`: they live until deleted.
    pub expiration_ttl: Option<u64>,
    /// Per request: a slower answer counts as a failure (retried; puts and deletes are
    /// idempotent).
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("rate limited by the KV API (429)")]
    RateLimited { retry_after: Option<Duration> },
    #[error("KV API server error ({0})")]
    Server(u16),
    #[error("KV API refused the request ({status}): {message}")]
    Rejected { status: u16, message: String },
    #[error("KV API unreachable: {0}")]
    Network(String),
    #[error("KV API did not answer in time")]
    Timeout,
}

fn network_error(e: reqwest::Error) -> KvError {
    if e.is_timeout() {
        KvError::Timeout
    } else {
        KvError::Network(e.without_url().to_string())
    }
}

/// Most names one list call returns (Cloudflare's maximum).
pub const LIST_PAGE: usize = 1000;

#[derive(Serialize)]
struct BulkPutItem<'a> {
    key: &'a str,
    value: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    expiration_ttl: Option<u64>,
    metadata: Digest,
}

/// A KV entry's metadata: the digest of its record ([`metlo_shared::KeyRecord::digest`]),
/// written by the control plane and the edge alike.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    pub d: String,
}

/// One name from a list call.
#[derive(Deserialize, Debug, Clone)]
pub struct ListedKey {
    pub name: String,
    /// The record's digest, when the entry carries one.
    #[serde(default, deserialize_with = "digest_or_none")]
    pub metadata: Option<Digest>,
}

/// Metadata of another shape (written by hand, or by something else) reads as none: the
/// entry is then seen as stale and rewritten, never trusted.
fn digest_or_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Digest>, D::Error> {
    let value = serde_json::Value::deserialize(d)?;
    Ok(serde_json::from_value(value).ok())
}

/// One page of names, and the cursor of the next (`None` after the last).
#[derive(Debug)]
pub struct KeyListPage {
    pub keys: Vec<ListedKey>,
    pub cursor: Option<String>,
}

#[derive(Deserialize)]
struct Envelope<R> {
    success: bool,
    #[serde(default)]
    errors: Vec<ApiMessage>,
    #[serde(default = "Option::default")]
    result: Option<R>,
    #[serde(default)]
    result_info: Option<ResultInfo>,
}

#[derive(Deserialize, Default)]
struct ResultInfo {
    #[serde(default)]
    cursor: Option<String>,
}

/// A bulk write or delete can succeed as a whole while naming keys it did not apply.
#[derive(Deserialize, Default)]
struct BulkResult {
    #[serde(default)]
    unsuccessful_keys: Vec<String>,
}

#[derive(Deserialize)]
struct ApiMessage {
    #[serde(default)]
    code: i64,
    #[serde(default)]
    message: String,
}

#[derive(Clone)]
pub struct KvClient {
    http: reqwest::Client,
    target: KvTarget,
}

impl KvClient {
    pub fn new(target: KvTarget) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(target.timeout)
            .connect_timeout(target.timeout.min(Duration::from_secs(5)))
            .build()?;
        Ok(KvClient { http, target })
    }

    fn url(&self, suffix: &str) -> String {
        format!(
            "{}/accounts/{}/storage/kv/namespaces/{}/{suffix}",
            self.target.api_url.trim_end_matches('/'),
            self.target.account_id,
            self.target.namespace_id
        )
    }

    /// Writes `(key, record JSON)` pairs, in as many requests as the API's limit needs.
    /// Returns the keys the API says it did not write (to be sent again).
    pub async fn bulk_put(&self, items: &[(String, String)]) -> Result<Vec<String>, KvError> {
        let now = crate::clock::now_unix_seconds();
        let mut unsent = vec![];
        for chunk in items.chunks(MAX_BULK) {
            let body: Vec<BulkPutItem> = chunk
                .iter()
                .map(|(k, v)| BulkPutItem {
                    key: k,
                    value: v,
                    expiration_ttl: entry_ttl(self.target.expiration_ttl, k, v, now),
                    metadata: Digest {
                        d: metlo_shared::KeyRecord::digest(v),
                    },
                })
                .collect();
            let (result, _) = self
                .send::<BulkResult>(self.http.put(self.url("bulk")).json(&body))
                .await?;
            unsent.extend(result.unwrap_or_default().unsuccessful_keys);
        }
        Ok(unsent)
    }

    /// Deletes keys (deleting a missing key succeeds), in chunks of the API's limit.
    /// Returns the keys the API says it did not delete.
    pub async fn bulk_delete(&self, keys: &[String]) -> Result<Vec<String>, KvError> {
        let mut unsent = vec![];
        for chunk in keys.chunks(MAX_BULK) {
            let (result, _) = self
                .send::<BulkResult>(self.http.post(self.url("bulk/delete")).json(chunk))
                .await?;
            unsent.extend(result.unwrap_or_default().unsuccessful_keys);
        }
        Ok(unsent)
    }

    /// One page of the namespace's names, in byte order, after `cursor` (`None`: the
    /// first page).
    pub async fn list_keys(&self, cursor: Option<&str>) -> Result<KeyListPage, KvError> {
        let mut query = vec![("limit", LIST_PAGE.to_string())];
        if let Some(c) = cursor {
            query.push(("cursor", c.to_owned()));
        }
        let (keys, info) = self
            .send::<Vec<ListedKey>>(self.http.get(self.url("keys")).query(&query))
            .await?;
        let cursor = info.and_then(|i| i.cursor).filter(|c| !c.is_empty());
        Ok(KeyListPage {
            keys: keys.unwrap_or_default(),
            cursor,
        })
    }

    /// The value KV holds under `key` (`None`: no such key). One API call per key: for
    /// `kv-reconcile --verify-values` only.
    pub async fn value(&self, key: &str) -> Result<Option<String>, KvError> {
        let url = self.url(&format!("values/{}", percent_encode_key(key)));
        let response = self
            .http
            .get(url)
            .bearer_auth(&self.target.api_token)
            .send()
            .await
            .map_err(network_error)?;
        match response.status().as_u16() {
            // The value itself, not an envelope.
            200 => Ok(Some(response.text().await.map_err(network_error)?)),
            404 => Ok(None),
            429 => Err(KvError::RateLimited {
                retry_after: response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
                    .map(Duration::from_secs),
            }),
            s if s >= 500 => Err(KvError::Server(s)),
            status => Err(KvError::Rejected {
                status,
                message: "reading a value was refused".into(),
            }),
        }
    }

    /// One API call; its `result` (and `result_info`) when it succeeded.
    async fn send<R: serde::de::DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<(Option<R>, Option<ResultInfo>), KvError> {
        let response = request
            .bearer_auth(&self.target.api_token)
            .send()
            .await
            .map_err(network_error)?;
        let status = response.status().as_u16();
        if status == 429 {
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            return Err(KvError::RateLimited { retry_after });
        }
        if status >= 500 {
            return Err(KvError::Server(status));
        }
        let text = response.text().await.map_err(network_error)?;
        match serde_json::from_str::<Envelope<R>>(&text) {
            Ok(env) if env.success && (200..300).contains(&status) => {
                Ok((env.result, env.result_info))
            }
            Ok(env) => Err(KvError::Rejected {
                status,
                message: env
                    .errors
                    .iter()
                    .map(|e| format!("{} {}", e.code, e.message))
                    .collect::<Vec<_>>()
                    .join("; "),
            }),
            Err(_) => Err(KvError::Rejected {
                status,
                message: "response is not a Cloudflare API envelope".into(),
            }),
        }
    }
}

/// A KV key as one path segment (ours are hex hashes; anything else a stray may be).
fn percent_encode_key(key: &str) -> String {
    key.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_route_policy_never_expires_in_kv() {
        let policy = "3 deny\nGET /a a\n";
        assert_eq!(
            entry_ttl(Some(86_400), crate::db::policy::POLICY_KV_KEY, policy, 0),
            None
        );
        let hash = "ab".repeat(32);
        assert_eq!(
            entry_ttl(Some(86_400), &hash, &record(None), 0),
            Some(86_400)
        );
    }

    fn record(expires: Option<u64>) -> String {
        metlo_shared::KeyRecord {
            expires,
            ..metlo_shared::KeyRecord::sample()
        }
        .to_json()
    }

    #[test]
    fn kv_entries_never_outlive_the_key() {
        let now = 1_000_000;
        assert_eq!(item_ttl(Some(86_400), &record(None), now), Some(86_400));
        assert_eq!(item_ttl(None, &record(None), now), None);
        assert_eq!(
            item_ttl(Some(86_400), &record(Some(now + 600)), now),
            Some(600)
        );
        assert_eq!(item_ttl(None, &record(Some(now + 600)), now), Some(600));
        assert_eq!(
            item_ttl(Some(300), &record(Some(now + 600)), now),
            Some(300)
        );
        // KV's minimum; the edge refuses the record by its `expires` meanwhile.
        assert_eq!(
            item_ttl(Some(86_400), &record(Some(now + 5)), now),
            Some(60)
        );
        assert_eq!(
            item_ttl(Some(86_400), &record(Some(now - 5)), now),
            Some(60)
        );
    }
}
