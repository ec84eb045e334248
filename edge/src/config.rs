//! The Worker's settings, from `wrangler.toml` `[vars]` (and the `CONTROL_PLANE_KEY`
//! secret). Parsed by a plain function so defaults and bad values are tested natively.

pub use crate::revocations::OnFailure;

/// What the Worker needs to run; see `wrangler.toml` for the documented defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where allowed requests go, e.g. `https://api.example.com` (no trailing slash).
    pub origin_url: String,
    /// The control plane's base URL.
    pub control_plane_url: String,
    /// How long to wait for the control plane before failing closed (503).
    pub control_plane_timeout_ms: u64,
    /// KV `expirationTtl` for records written after a control-plane lookup (≥ 60 s).
    pub kv_ttl_seconds: u64,
    /// KV read `cacheTtl` (≥ 30 s).
    pub kv_cache_ttl_seconds: u64,
    /// In-isolate cache: how long a valid key is trusted without KV (500 ms by default
    /// so a revoked key stops working fast).
    pub isolate_hit_ms: u64,
    /// In-isolate cache: how long an unknown key is remembered.
    pub isolate_miss_ms: u64,
    /// In-isolate cache size (entries).
    pub isolate_capacity: usize,
    /// Forward the client's `Authorization` header to the origin (default: strip it).
    pub forward_authorization: bool,
    /// Add `X-Metlo-Edge-Source` to responses (kv / isolate / control-plane / none), for
    /// tests and debugging. Reveals nothing about keys.
    pub decision_header: bool,
    /// `Retry-After` seconds on 503.
    pub retry_after_seconds: u64,
    /// How often an isolate reports key use to the control plane (`lastUsed`); 0: never.
    pub usage_report_ms: u64,
    /// Most control-plane lookups one isolate has in flight; past it, 503 at once.
    pub max_concurrent_lookups: u32,
    /// `Retry-After` seconds on 429 for a client past its budget of unknown keys: the
    /// `MISS_LIMITER` binding's period.
    pub miss_retry_after_seconds: u64,
    /// `ORIGIN_SECRET` (a Worker secret): sent to the origin on every proxied request as
    /// `X-Metlo-Origin-Secret`, so it can refuse traffic that did not come through here.
    pub origin_secret: Option<String>,
    /// The revocation feed: a key from the isolate cache or KV is admitted only on a view
    /// of the feed younger than this (refreshed after the response past it, before the
    /// response past twice it). 0: the feed is not read (KV's staleness bounds revocation).
    pub revocation_feed_interval_ms: u64,
    /// When the feed cannot be read: keep admitting from KV, or refuse.
    pub revocation_feed_on_failure: OnFailure,
    /// With `closed`: the oldest view a request may still be decided on.
    pub revocation_feed_max_staleness_ms: u64,
    /// The signed assertion to the origin (`X-Metlo-Assertion`); `None`: not sent.
    pub assertion: Option<AssertionConfig>,
}

/// The signed assertion's settings: the `ASSERTION_SIGNING_KEY` secret (a private ES256
/// JWK, as `POST /api/v1/assertion-keys` gives it) and its claims' `iss`, `aud`, lifetime.
#[derive(Clone, PartialEq)]
pub struct AssertionConfig {
    pub signing_key: String,
    /// `ASSERTION_ISSUER`; default: `CONTROL_PLANE_URL`.
    pub issuer: String,
    /// `ASSERTION_AUDIENCE`; default: `ORIGIN_URL`.
    pub audience: String,
    /// `ASSERTION_TTL_SECONDS`: 2 to 60 (default 60).
    pub ttl_seconds: u64,
}

/// Never prints the private key.
impl std::fmt::Debug for AssertionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssertionConfig")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("ttl_seconds", &self.ttl_seconds)
            .finish_non_exhaustive()
    }
}

/// The longest an assertion lives.
pub const MAX_ASSERTION_TTL_SECONDS: u64 = 60;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// KV refuses `expirationTtl` below 60 s and `cacheTtl` below 30 s.
pub const KV_MIN_EXPIRATION_TTL: u64 = 60;
pub const KV_MIN_CACHE_TTL: u64 = 30;

impl Config {
    /// Builds the config from a lookup of `[vars]` by name.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let url = |name: &str| -> Result<String, ConfigError> {
            let v = var(name)
                .map(|v| v.trim().trim_end_matches('/').to_owned())
                .unwrap_or_default();
            if !(v.starts_with("http://") || v.starts_with("https://")) {
                return Err(ConfigError(format!("{name} must be an http(s) URL")));
            }
            Ok(v)
        };
        let number = |name: &str, default: u64| -> Result<u64, ConfigError> {
            match var(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
            {
                None => Ok(default),
                Some(v) => v
                    .parse()
                    .map_err(|_| ConfigError(format!("{name} must be a whole number"))),
            }
        };
        let flag = |name: &str| {
            var(name).is_some_and(|v| {
                matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes")
            })
        };
        let config = Config {
            origin_url: url("ORIGIN_URL")?,
            control_plane_url: url("CONTROL_PLANE_URL")?,
            control_plane_timeout_ms: number("CONTROL_PLANE_TIMEOUT_MS", 3000)?,
            kv_ttl_seconds: number("KV_TTL_SECONDS", 300)?,
            kv_cache_ttl_seconds: number("KV_CACHE_TTL_SECONDS", 30)?,
            isolate_hit_ms: number("ISOLATE_HIT_MS", 500)?,
            isolate_miss_ms: number("ISOLATE_MISS_MS", 5000)?,
            isolate_capacity: number("ISOLATE_CAPACITY", 10_000)? as usize,
            forward_authorization: flag("FORWARD_AUTHORIZATION"),
            decision_header: flag("DECISION_HEADER"),
            retry_after_seconds: number("RETRY_AFTER_SECONDS", 5)?,
            usage_report_ms: number("USAGE_REPORT_MS", 30_000)?,
            max_concurrent_lookups: u32::try_from(number("MAX_CONCURRENT_LOOKUPS", 8)?)
                .unwrap_or(u32::MAX),
            miss_retry_after_seconds: number("MISS_RETRY_AFTER_SECONDS", 60)?,
            origin_secret: var("ORIGIN_SECRET").filter(|s| !s.is_empty()),
            revocation_feed_interval_ms: number("REVOCATION_FEED_INTERVAL_MS", 1000)?,
            revocation_feed_on_failure: match var("REVOCATION_FEED_ON_FAILURE")
                .map(|v| v.trim().to_ascii_lowercase())
                .as_deref()
            {
                None | Some("") | Some("open") => OnFailure::Open,
                Some("closed") => OnFailure::Closed,
                Some(_) => {
                    return Err(ConfigError(
                        "REVOCATION_FEED_ON_FAILURE must be open or closed".into(),
                    ))
                }
            },
            revocation_feed_max_staleness_ms: number("REVOCATION_FEED_MAX_STALENESS_MS", 10_000)?,
            assertion: None,
        };
        let mut config = config;
        if let Some(key) = var("ASSERTION_SIGNING_KEY").filter(|k| !k.trim().is_empty()) {
            if !(key.trim_start().starts_with('{') && key.contains("\"d\"")) {
                return Err(ConfigError(
                    "ASSERTION_SIGNING_KEY must be a private JWK (the privateJwk of POST /api/v1/assertion-keys)"
                        .into(),
                ));
            }
            let text = |name: &str, default: &str| {
                var(name)
                    .map(|v| v.trim().to_owned())
                    .filter(|v| !v.is_empty())
                    .unwrap_or_else(|| default.to_owned())
            };
            let ttl_seconds = number("ASSERTION_TTL_SECONDS", MAX_ASSERTION_TTL_SECONDS)?;
            if !(2..=MAX_ASSERTION_TTL_SECONDS).contains(&ttl_seconds) {
                return Err(ConfigError(
                    "ASSERTION_TTL_SECONDS must be from 2 to 60".into(),
                ));
            }
            config.assertion = Some(AssertionConfig {
                signing_key: key,
                issuer: text("ASSERTION_ISSUER", &config.control_plane_url),
                audience: text("ASSERTION_AUDIENCE", &config.origin_url),
                ttl_seconds,
            });
        }
        if config.control_plane_url.starts_with("http://")
            && !is_loopback_url(&config.control_plane_url)
        {
            // The Worker's own key and the records would cross the network in clear.
            return Err(ConfigError(
                "CONTROL_PLANE_URL must be https:// (plain http:// only to a loopback address)"
                    .into(),
            ));
        }
        if config.kv_ttl_seconds < KV_MIN_EXPIRATION_TTL {
            return Err(ConfigError(format!(
                "KV_TTL_SECONDS must be at least {KV_MIN_EXPIRATION_TTL}"
            )));
        }
        if config.kv_cache_ttl_seconds < KV_MIN_CACHE_TTL {
            return Err(ConfigError(format!(
                "KV_CACHE_TTL_SECONDS must be at least {KV_MIN_CACHE_TTL}"
            )));
        }
        if config.revocation_feed_interval_ms > 0
            && config.revocation_feed_max_staleness_ms
                < config.revocation_feed_interval_ms.saturating_mul(2)
        {
            // Closed would refuse requests a healthy feed is still allowed to serve.
            return Err(ConfigError(
                "REVOCATION_FEED_MAX_STALENESS_MS must be at least twice REVOCATION_FEED_INTERVAL_MS"
                    .into(),
            ));
        }
        if config.control_plane_timeout_ms == 0
            || config.isolate_capacity == 0
            || config.max_concurrent_lookups == 0
        {
            return Err(ConfigError(
                "CONTROL_PLANE_TIMEOUT_MS, ISOLATE_CAPACITY and MAX_CONCURRENT_LOOKUPS must be positive"
                    .into(),
            ));
        }
        Ok(config)
    }
}

/// Is the URL's host this machine (`localhost`, `127.x.x.x`, `[::1]`)? Errs towards
/// "no": a backslash ends the authority (as the runtime's URL parser reads `http:` URLs),
/// and a URL with user info is never taken for loopback — `http://evil.example\@127.0.0.1`
/// goes to `evil.example`.
pub fn is_loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '\\', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        return false;
    }
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        authority.split(':').next().unwrap_or("")
    };
    host.eq_ignore_ascii_case("localhost")
        || host == "::1"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    const BASE: [(&str, &str); 2] = [
        ("ORIGIN_URL", "https://origin.example/"),
        ("CONTROL_PLANE_URL", "http://127.0.0.1:8080"),
    ];

    #[test]
    fn defaults() {
        let c = Config::from_vars(vars(&BASE)).unwrap();
        assert_eq!(c.origin_url, "https://origin.example");
        assert_eq!(c.isolate_hit_ms, 500);
        assert_eq!(c.kv_ttl_seconds, 300);
        assert!(!c.forward_authorization);
        assert!(!c.decision_header);
        assert_eq!(c.usage_report_ms, 30_000);
        assert_eq!(c.max_concurrent_lookups, 8);
        assert_eq!(c.miss_retry_after_seconds, 60);
        assert_eq!(c.revocation_feed_interval_ms, 1000);
        assert_eq!(c.revocation_feed_on_failure, OnFailure::Open);
        assert_eq!(c.revocation_feed_max_staleness_ms, 10_000);
    }

    #[test]
    fn the_assertion_settings() {
        assert_eq!(Config::from_vars(vars(&BASE)).unwrap().assertion, None);
        let key = r#"{"kty":"EC","crv":"P-256","x":"x","y":"y","d":"secret-d","kid":"k"}"#;
        let mut with = BASE.to_vec();
        with.push(("ASSERTION_SIGNING_KEY", key));
        let a = Config::from_vars(vars(&with)).unwrap().assertion.unwrap();
        assert_eq!(
            a.audience, "https://origin.example",
            "the origin by default"
        );
        assert!(a.issuer.starts_with("http"), "the control plane by default");
        assert_eq!(a.ttl_seconds, 60);
        assert!(
            !format!("{a:?}").contains("secret-d"),
            "the key never prints"
        );
        with.extend([
            ("ASSERTION_AUDIENCE", "orders-api"),
            ("ASSERTION_TTL_SECONDS", "10"),
        ]);
        let a = Config::from_vars(vars(&with)).unwrap().assertion.unwrap();
        assert_eq!((a.audience.as_str(), a.ttl_seconds), ("orders-api", 10));
        for (name, bad) in [
            ("ASSERTION_TTL_SECONDS", "61"),
            ("ASSERTION_TTL_SECONDS", "1"),
            ("ASSERTION_SIGNING_KEY", "not a jwk"),
            ("ASSERTION_SIGNING_KEY", r#"{"kty":"EC","x":"public only"}"#),
        ] {
            let mut v = with.clone();
            v.retain(|(k, _)| *k != name);
            v.push((name, bad));
            assert!(Config::from_vars(vars(&v)).is_err(), "{name}={bad}");
        }
    }

    #[test]
    fn the_revocation_feed_settings() {
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut v = BASE.to_vec();
            v.extend_from_slice(extra);
            Config::from_vars(vars(&v))
        };
        let c = with(&[("REVOCATION_FEED_ON_FAILURE", " Closed ")]).unwrap();
        assert_eq!(c.revocation_feed_on_failure, OnFailure::Closed);
        assert!(with(&[("REVOCATION_FEED_ON_FAILURE", "maybe")]).is_err());
        let err = with(&[("REVOCATION_FEED_MAX_STALENESS_MS", "1999")]).unwrap_err();
        assert!(err.0.contains("twice"), "{err}");
        let off = with(&[
            ("REVOCATION_FEED_INTERVAL_MS", "0"),
            ("REVOCATION_FEED_MAX_STALENESS_MS", "0"),
        ]);
        assert_eq!(off.unwrap().revocation_feed_interval_ms, 0, "the feed off");
    }

    #[test]
    fn refuses_bad_values() {
        assert!(Config::from_vars(vars(&[("CONTROL_PLANE_URL", "http://x")])).is_err());
        let mut v = BASE.to_vec();
        v.push(("KV_TTL_SECONDS", "59"));
        assert!(Config::from_vars(vars(&v)).is_err());
        let mut v = BASE.to_vec();
        v.push(("ISOLATE_HIT_MS", "soon"));
        assert!(Config::from_vars(vars(&v)).is_err());
        let mut v = BASE.to_vec();
        v.push(("MAX_CONCURRENT_LOOKUPS", "0"));
        assert!(
            Config::from_vars(vars(&v)).is_err(),
            "no lookup could ever be made"
        );
        let mut v = BASE.to_vec();
        v[0] = ("ORIGIN_URL", "ftp://x");
        assert!(Config::from_vars(vars(&v)).is_err());
    }

    #[test]
    fn plain_http_to_the_control_plane_only_on_loopback() {
        for ok in [
            "http://127.0.0.1:8080",
            "http://localhost",
            "http://[::1]:80",
            "https://cp.example",
        ] {
            let v = [
                ("ORIGIN_URL", "https://o.example"),
                ("CONTROL_PLANE_URL", ok),
            ];
            assert!(Config::from_vars(vars(&v)).is_ok(), "{ok}");
        }
        for bad in [
            "http://cp.example",
            "http://10.0.0.1:8080",
            "http://127.0.0.1.evil.example",
            "http://localhost@evil.example",
            "http://evil.example\\@127.0.0.1",
            "http://evil.example\\.127.0.0.1",
            "http://user@127.0.0.1",
        ] {
            let v = [
                ("ORIGIN_URL", "https://o.example"),
                ("CONTROL_PLANE_URL", bad),
            ];
            let err = Config::from_vars(vars(&v)).unwrap_err();
            assert!(err.0.contains("https://"), "{bad}: {err}");
        }
    }

    #[test]
    fn origin_secret_is_optional() {
        assert_eq!(Config::from_vars(vars(&BASE)).unwrap().origin_secret, None);
        let mut v = BASE.to_vec();
        v.push(("ORIGIN_SECRET", "s3cret"));
        assert_eq!(
            Config::from_vars(vars(&v))
                .unwrap()
                .origin_secret
                .as_deref(),
            Some("s3cret")
        );
    }

    #[test]
    fn flags() {
        let mut v = BASE.to_vec();
        v.push(("FORWARD_AUTHORIZATION", "true"));
        v.push(("DECISION_HEADER", "1"));
        let c = Config::from_vars(vars(&v)).unwrap();
        assert!(c.forward_authorization && c.decision_header);
    }
}
