//! What the Worker decides, as plain functions over plain data.

use metlo_shared::{parse_authorization, AuthorizationError, KeyHash, KeyRecord, META_HEADER};

use crate::config::KV_MIN_EXPIRATION_TTL;

/// Why a request is not let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No key: 401.
    Missing,
    /// Malformed, bad checksum, unknown, deleted or expired: 401, one answer for all so
    /// a response never reveals whether a key once existed.
    Invalid,
    /// The key could not be checked (control plane unreachable or failing): 503.
    Unavailable,
    /// The key is good but the origin could not be reached: 502.
    OriginUnreachable,
    /// The client spent its budget of lookups of keys KV does not know (the
    /// `MISS_LIMITER` binding, per `CF-Connecting-IP`): 429, and no lookup.
    TooManyMisses,
    /// This isolate already has its most control-plane lookups in flight: 503 at once,
    /// rather than a queue an attacker could fill.
    Busy,
}

/// A response the glue turns into a real one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlainResponse {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: &'static str,
}

/// Step 1: the key's hash, or a refusal decided from the header alone (no I/O).
pub fn check_header(header: Option<&str>) -> Result<KeyHash, Refusal> {
    match parse_authorization(header) {
        Ok(key) => Ok(key.hash()),
        Err(AuthorizationError::Missing) => Err(Refusal::Missing),
        Err(AuthorizationError::Malformed(_)) => Err(Refusal::Invalid),
    }
}

/// A KV value, or `None` when it cannot be trusted (unreadable or an unknown version):
/// then the control plane is asked, never a guess.
pub fn decode_kv(value: &str) -> Option<KeyRecord> {
    KeyRecord::from_json(value.as_bytes()).ok()
}

/// Allow a known key unless it has expired or is not a traffic key (an admin or edge
/// key never passes the edge, whatever a record says: the same 401 as an unknown key).
pub fn admit(record: &KeyRecord, now_unix_seconds: u64) -> Result<(), Refusal> {
    if record.is_expired(now_unix_seconds) || !record.role.serves_traffic() {
        Err(Refusal::Invalid)
    } else {
        Ok(())
    }
}

/// What the control plane said about a hash.
// One per lookup, moved once and never stored: boxing the record would cost an
// allocation for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The record, and how long the control plane allows the edge to keep it (KV and
    /// isolate cache), in seconds.
    Found {
        record: KeyRecord,
        /// The record as the control plane wrote it: what KV gets (so the Worker needs no
        /// JSON writer of its own).
        json: String,
        keep_seconds: u64,
    },
    NotFound,
    /// Anything else: timeouts, 5xx, 401 (the Worker's own key is wrong), garbage.
    Failed(String),
}

/// The response header in which the control plane says how long the edge may keep a
/// record: while its KV sync is on, long (it deletes what it revokes); while off, only its
/// own cache TTL, since nothing would ever delete a record the Worker wrote.
pub const KEEP_HEADER: &str = "X-Metlo-Kv-Ttl-Seconds";

/// Interprets the control plane's answer to `GET /api/v1/keys/by-hash/{hash}`; `keep` is
/// its [`KEEP_HEADER`]. Without one (or unreadable), the record is kept nowhere: safe
/// against a control plane that cannot say.
pub fn interpret_lookup(status: u16, body: String, keep: Option<&str>) -> Lookup {
    match status {
        200 => match KeyRecord::from_json(body.as_bytes()) {
            Ok(record) => Lookup::Found {
                record,
                json: body,
                keep_seconds: keep.and_then(|v| v.trim().parse().ok()).unwrap_or(0),
            },
            Err(e) => Lookup::Failed(format!("unreadable record from the control plane: {e}")),
        },
        404 => Lookup::NotFound,
        401 | 403 => Lookup::Failed(format!(
            "control plane refused the Worker's key ({status}): check CONTROL_PLANE_KEY"
        )),
        other => Lookup::Failed(format!("control plane answered {other}")),
    }
}

/// The KV `expirationTtl` for a record: the configured TTL, cut so the entry never
/// outlives the key's expiry. `None`: don't write (the key expires within KV's 60 s
/// minimum, or has expired).
pub fn kv_ttl(record: &KeyRecord, configured_ttl: u64, now_unix_seconds: u64) -> Option<u64> {
    let ttl = match record.expires {
        Some(expires) => configured_ttl.min(expires.saturating_sub(now_unix_seconds)),
        None => configured_ttl,
    };
    (ttl >= KV_MIN_EXPIRATION_TTL).then_some(ttl)
}

/// The URL to forward to: the origin plus the request's path and query.
pub fn origin_request_url(origin: &str, request_url: &str) -> String {
    // request_url is absolute (`https://host/path?q`); keep from the path on.
    let after_scheme = request_url.find("://").map(|i| i + 3).unwrap_or(0);
    let path_start = request_url[after_scheme..]
        .find('/')
        .map(|i| i + after_scheme);
    let path_and_query = path_start.map(|i| &request_url[i..]).unwrap_or("/");
    format!("{}{}", origin.trim_end_matches('/'), path_and_query)
}

/// How the client's headers change on the way to the origin. Applied to a copy of them
/// (one JS call) rather than rebuilt header by header, which costs a JS↔wasm round trip
/// per header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginHeaders {
    /// Removed: `Authorization` (unless forwarded) and `Host` (the origin's is set by fetch).
    pub remove: Vec<&'static str>,
    /// Set, replacing whatever the client sent under these names, so identity headers
    /// can never be forged by the client.
    pub set: Vec<(&'static str, String)>,
}

/// The header that carries `ORIGIN_SECRET` to the origin.
pub const ORIGIN_SECRET_HEADER: &str = "X-Metlo-Origin-Secret";

/// Headers only the Worker may set (`X-Metlo-*`, any case): a client's are dropped.
pub fn is_edge_header(name: &str) -> bool {
    name.len() >= 8 && name.as_bytes()[..8].eq_ignore_ascii_case(b"x-metlo-")
}

/// The request header that carries the `externalId` of the key's identity to the origin.
pub const IDENTITY_HEADER: &str = "X-Metlo-Identity";

/// What the origin request changes: the key's headers set (name, type, identifier, meta,
/// the identity's `externalId`), `Host` and (unless forwarded) `Authorization` removed.
pub fn origin_headers(record: &KeyRecord, forward_authorization: bool) -> OriginHeaders {
    let mut remove = vec!["Host"];
    if !forward_authorization {
        remove.push("Authorization");
    }
    let mut set = vec![
        ("X-Metlo-Key-Name", header_safe(&record.name)),
        ("X-Metlo-Key-Type", record.key_type.as_str().into()),
        ("X-Metlo-Key-Identifier", record.identifier.clone()),
    ];
    // Already encoded by the control plane; anything but base64url is not forwarded (a
    // value that is not a valid header would fail the whole request).
    if let Some(meta) = record.meta.as_deref().filter(|m| is_base64url(m)) {
        set.push((META_HEADER, meta.to_owned()));
    }
    if let Some(identity) = &record.identity {
        set.push((IDENTITY_HEADER, header_safe(identity)));
    }
    OriginHeaders { remove, set }
}

fn is_base64url(value: &str) -> bool {
    value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Header values must be visible ASCII: names may be unicode, so percent-encode those
/// bytes (and `%` itself), leaving plain names readable.
fn header_safe(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The response for a refusal. Same JSON shape as the control plane's errors; the bodies
/// are constants, so a refusal costs no formatting.
pub fn refusal_response(refusal: Refusal, retry_after_seconds: u64) -> PlainResponse {
    let (status, body) = refusal_status_and_body(refusal);
    PlainResponse {
        status,
        headers: refusal_headers(refusal, retry_after_seconds),
        body,
    }
}

/// A refusal's status and (constant) body: all a refused request needs once its headers
/// are cached, with no allocation.
pub fn refusal_status_and_body(refusal: Refusal) -> (u16, &'static str) {
    match refusal {
        Refusal::Missing => (
            401,
            r#"{"error":"unauthorized","message":"missing API key: send it in the Authorization header"}"#,
        ),
        Refusal::Invalid => (
            401,
            r#"{"error":"unauthorized","message":"invalid API key"}"#,
        ),
        Refusal::Unavailable => (
            503,
            r#"{"error":"unavailable","message":"the API key cannot be checked right now; try again shortly"}"#,
        ),
        Refusal::OriginUnreachable => (
            502,
            r#"{"error":"bad_gateway","message":"the origin could not be reached"}"#,
        ),
        Refusal::TooManyMisses => (
            429,
            r#"{"error":"too_many_requests","message":"too many unknown API keys from this address; retry later"}"#,
        ),
        Refusal::Busy => (
            503,
            r#"{"error":"unavailable","message":"too many key lookups in flight; try again shortly"}"#,
        ),
    }
}

/// A refusal's headers; the same for every refusal with the same status.
/// `retry_after_seconds`: the refusal's own (the miss limiter's period for a 429).
pub fn refusal_headers(refusal: Refusal, retry_after_seconds: u64) -> Vec<(&'static str, String)> {
    let mut headers = vec![("Content-Type", "application/json".to_owned())];
    match refusal {
        Refusal::Missing | Refusal::Invalid => headers.push((
            "WWW-Authenticate",
            r#"Bearer realm="metlo", error="invalid_token""#.to_owned(),
        )),
        Refusal::Unavailable | Refusal::Busy | Refusal::TooManyMisses => {
            headers.push(("Retry-After", retry_after_seconds.to_string()))
        }
        Refusal::OriginUnreachable => {}
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use metlo_shared::{ApiKey, KeyType, Role};

    fn record(expires: Option<u64>) -> KeyRecord {
        KeyRecord {
            name: "ingest ✓".into(),
            key_type: KeyType::Onboarding,
            expires,
            ..KeyRecord::sample()
        }
    }

    #[test]
    fn header_checks_need_no_io() {
        let key = ApiKey::generate().unwrap();
        assert_eq!(check_header(Some(key.expose_secret())), Ok(key.hash()));
        assert_eq!(
            check_header(Some(&format!("Bearer {}", key.expose_secret()))),
            Ok(key.hash())
        );
        assert_eq!(check_header(None), Err(Refusal::Missing));
        assert_eq!(check_header(Some("metlo.short")), Err(Refusal::Invalid));
        let mut bad = key.expose_secret().to_owned();
        let c = bad.pop().unwrap();
        bad.push(if c == '0' { '1' } else { '0' });
        assert_eq!(check_header(Some(&bad)), Err(Refusal::Invalid));
    }

    #[test]
    fn kv_values_are_trusted_only_when_readable() {
        assert_eq!(decode_kv(&record(None).to_json()), Some(record(None)));
        assert_eq!(decode_kv("{}"), None);
        assert_eq!(
            decode_kv(&record(None).to_json().replace("\"v\":1", "\"v\":9")),
            None
        );
    }

    #[test]
    fn expiry() {
        assert_eq!(admit(&record(None), u64::MAX), Ok(()));
        assert_eq!(admit(&record(Some(100)), 99), Ok(()));
        assert_eq!(admit(&record(Some(100)), 100), Err(Refusal::Invalid));
    }

    #[test]
    fn edge_headers_are_recognised_in_any_case() {
        for h in [
            "x-metlo-key-name",
            "X-Metlo-Edge-Source",
            "X-METLO-KEY-ROLE",
            "x-metlo-",
        ] {
            assert!(is_edge_header(h), "{h}");
        }
        for h in [
            "x-metlo",
            "x-metlox",
            "authorization",
            "x-forwarded-for",
            "é-metlo-x",
        ] {
            assert!(!is_edge_header(h), "{h}");
        }
    }

    #[test]
    fn only_traffic_roles_are_admitted() {
        for role in Role::ALL {
            let r = KeyRecord {
                role,
                ..record(None)
            };
            let expected = if role.serves_traffic() {
                Ok(())
            } else {
                Err(Refusal::Invalid)
            };
            assert_eq!(admit(&r, 0), expected, "{role}");
        }
    }

    #[test]
    fn lookups() {
        let r = record(None);
        assert_eq!(
            interpret_lookup(200, r.to_json(), Some("300")),
            Lookup::Found {
                record: r.clone(),
                json: r.to_json(),
                keep_seconds: 300
            }
        );
        for missing in [None, Some("soon"), Some("-1")] {
            assert_eq!(
                interpret_lookup(200, r.to_json(), missing),
                Lookup::Found {
                    record: r.clone(),
                    json: r.to_json(),
                    keep_seconds: 0
                },
                "{missing:?}: kept nowhere"
            );
        }
        assert_eq!(interpret_lookup(404, "{}".into(), None), Lookup::NotFound);
        assert!(matches!(
            interpret_lookup(200, "<html>".into(), None),
            Lookup::Failed(_)
        ));
        assert!(matches!(
            interpret_lookup(401, "".into(), None),
            Lookup::Failed(_)
        ));
        assert!(matches!(
            interpret_lookup(500, "".into(), None),
            Lookup::Failed(_)
        ));
        assert!(matches!(
            interpret_lookup(503, "".into(), None),
            Lookup::Failed(_)
        ));
    }

    #[test]
    fn kv_ttl_never_outlives_the_key() {
        assert_eq!(kv_ttl(&record(None), 300, 1000), Some(300));
        assert_eq!(kv_ttl(&record(Some(1100)), 300, 1000), Some(100));
        assert_eq!(
            kv_ttl(&record(Some(1059)), 300, 1000),
            None,
            "below KV's 60 s minimum"
        );
        assert_eq!(kv_ttl(&record(Some(10)), 300, 1000), None);
    }

    #[test]
    fn origin_urls() {
        assert_eq!(
            origin_request_url("http://o:1", "https://edge.dev/a/b?c=d&e"),
            "http://o:1/a/b?c=d&e"
        );
        assert_eq!(
            origin_request_url("http://o:1/", "https://edge.dev"),
            "http://o:1/"
        );
        assert_eq!(
            origin_request_url("http://o:1", "https://edge.dev/"),
            "http://o:1/"
        );
    }

    #[test]
    fn origin_headers_strip_and_set() {
        let h = origin_headers(&record(None), false);
        assert_eq!(h.remove, ["Host", "Authorization"]);
        let names: Vec<&str> = h.set.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "X-Metlo-Key-Name",
                "X-Metlo-Key-Type",
                "X-Metlo-Key-Identifier"
            ]
        );
        assert_eq!(h.set[0].1, "ingest %E2%9C%93");
        assert_eq!(h.set[1].1, "ONBOARDING");
        assert_eq!(origin_headers(&record(None), true).remove, ["Host"]);
        // The key's meta, as the control plane encoded it; never anything else.
        let with_meta = KeyRecord {
            meta: Some("eyJ0ZW5hbnQiOiJhIn0".into()),
            ..record(None)
        };
        let h = origin_headers(&with_meta, false);
        assert_eq!(
            h.set.last().unwrap(),
            &("X-Metlo-Key-Meta", "eyJ0ZW5hbnQiOiJhIn0".to_owned())
        );
        let bad = KeyRecord {
            meta: Some("a b\r\n".into()),
            ..record(None)
        };
        assert_eq!(origin_headers(&bad, false).set.len(), 3);
        let owned = KeyRecord {
            identity: Some("acme corp".into()),
            ..record(None)
        };
        assert_eq!(
            origin_headers(&owned, false).set.last().unwrap(),
            &("X-Metlo-Identity", "acme corp".to_owned())
        );
    }

    #[test]
    fn refusals() {
        let r = refusal_response(Refusal::Invalid, 5);
        assert_eq!(r.status, 401);
        assert!(r.headers.iter().any(|(n, _)| *n == "WWW-Authenticate"));
        assert!(r.body.contains("invalid API key"));
        for refusal in [
            Refusal::Missing,
            Refusal::Invalid,
            Refusal::Unavailable,
            Refusal::OriginUnreachable,
            Refusal::TooManyMisses,
            Refusal::Busy,
        ] {
            let body: serde_json::Value =
                serde_json::from_str(refusal_response(refusal, 1).body).unwrap();
            assert!(body["error"].is_string() && body["message"].is_string());
        }
        let r = refusal_response(Refusal::Unavailable, 7);
        assert_eq!(r.status, 503);
        assert!(r.headers.contains(&("Retry-After", "7".to_owned())));
        assert_eq!(refusal_response(Refusal::OriginUnreachable, 1).status, 502);
        let r = refusal_response(Refusal::TooManyMisses, 60);
        assert_eq!(r.status, 429);
        assert!(r.headers.contains(&("Retry-After", "60".to_owned())));
        let r = refusal_response(Refusal::Busy, 5);
        assert_eq!(r.status, 503);
        assert!(r.headers.contains(&("Retry-After", "5".to_owned())));
    }
}
