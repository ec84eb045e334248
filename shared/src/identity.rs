//! Identities: a customer (an `externalId` the user chooses) that owns any number of keys
//! and may carry credits and named rate limits shared by all of them. The edge meets an
//! identity only inside its keys' records: the `externalId` to forward, the identity's
//! credit grant and its limits ([`NamedLimits`], in text so the Worker reads them without
//! a deserializer of its own).

use serde::{Deserialize, Serialize};

use crate::rate_limit::RateLimit;

/// The longest `externalId`, in bytes.
pub const MAX_EXTERNAL_ID_LEN: usize = 255;
/// The most named limits an identity carries.
pub const MAX_NAMED_LIMITS: usize = 5;
/// The longest limit name.
pub const MAX_LIMIT_NAME_LEN: usize = 32;

/// Why an `externalId` or a named limit is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("externalId must be 1 to 255 bytes of visible characters (no control characters, no leading or trailing space)")]
    ExternalId,
    #[error("a limit's name is 1 to 32 of a-z 0-9 _ - (lower case, starting with a letter or digit), unique within the identity")]
    LimitName,
    #[error("an identity has at most 5 named limits")]
    TooManyLimits,
}

/// Checks an `externalId`: forwarded to the origin in a header, so visible characters
/// only (spaces inside are fine), and the edge names the identity's counters after it.
pub fn validate_external_id(id: &str) -> Result<(), IdentityError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_EXTERNAL_ID_LEN
        && id.trim() == id
        && id.bytes().all(|b| (0x20..0x7f).contains(&b));
    if ok {
        Ok(())
    } else {
        Err(IdentityError::ExternalId)
    }
}

/// A named rate limit of an identity: every key of the identity counts against it. As
/// JSON: `{"name": "requests", "requests": 100, "periodSeconds": 60}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawNamedLimit", into = "RawNamedLimit")]
pub struct NamedLimit {
    pub name: String,
    pub limit: RateLimit,
}

#[derive(Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "utoipa", schema(as = NamedLimit))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RawNamedLimit {
    /// 1–32 of `a-z 0-9 _ -`, starting with a letter or digit; unique in the identity.
    #[cfg_attr(feature = "utoipa", schema(example = "requests"))]
    name: String,
    /// Requests admitted per window: 1 to 1,000,000,000.
    #[serde(deserialize_with = "crate::whole::number")]
    requests: u32,
    /// The window, in seconds: 1 to 86,400.
    #[serde(deserialize_with = "crate::whole::number")]
    period_seconds: u32,
}

impl TryFrom<RawNamedLimit> for NamedLimit {
    type Error = crate::rate_limit::RateLimitError;

    fn try_from(raw: RawNamedLimit) -> Result<Self, Self::Error> {
        Ok(NamedLimit {
            name: raw.name,
            limit: RateLimit::new(raw.requests, raw.period_seconds)?,
        })
    }
}

impl From<NamedLimit> for RawNamedLimit {
    fn from(l: NamedLimit) -> Self {
        RawNamedLimit {
            name: l.name,
            requests: l.limit.requests,
            period_seconds: l.limit.period_seconds,
        }
    }
}

/// An identity's named limits, sorted by name; in records as
/// `name=requests/period,…`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamedLimits(pub Vec<NamedLimit>);

impl NamedLimits {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Validated and sorted by name.
    pub fn new(mut limits: Vec<NamedLimit>) -> Result<NamedLimits, IdentityError> {
        if limits.len() > MAX_NAMED_LIMITS {
            return Err(IdentityError::TooManyLimits);
        }
        limits.sort_by(|a, b| a.name.cmp(&b.name));
        let name_ok = |n: &str| {
            !n.is_empty()
                && n.len() <= MAX_LIMIT_NAME_LEN
                && n.bytes()
                    .next()
                    .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                && n.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        };
        if !limits.iter().all(|l| name_ok(&l.name))
            || limits.windows(2).any(|w| w[0].name == w[1].name)
        {
            return Err(IdentityError::LimitName);
        }
        Ok(NamedLimits(limits))
    }

    pub fn encode(&self) -> String {
        self.0
            .iter()
            .map(|l| format!("{}={}/{}", l.name, l.limit.requests, l.limit.period_seconds))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The limits in [`NamedLimits::encode`]'s text; `None` for text that is not limits
    /// (the names' rules are the control plane's: the edge only needs each limit and a
    /// name to count it under).
    pub fn decode(text: &str) -> Option<NamedLimits> {
        let limits = text
            .split(',')
            .filter(|p| !p.is_empty())
            .map(|part| {
                let (name, rest) = part.split_once('=')?;
                let (requests, period) = rest.split_once('/')?;
                Some(NamedLimit {
                    name: name.to_owned(),
                    limit: RateLimit::new(requests.parse().ok()?, period.parse().ok()?).ok()?,
                })
                .filter(|l| !l.name.is_empty())
            })
            .collect::<Option<Vec<_>>>()?;
        (limits.len() <= MAX_NAMED_LIMITS).then_some(NamedLimits(limits))
    }
}

impl Serialize for NamedLimits {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.encode())
    }
}

impl<'de> Deserialize<'de> for NamedLimits {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        NamedLimits::decode(&text).ok_or_else(|| serde::de::Error::custom("not named limits"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(name: &str, requests: u32, period: u32) -> NamedLimit {
        NamedLimit {
            name: name.into(),
            limit: RateLimit::new(requests, period).unwrap(),
        }
    }

    #[test]
    fn external_ids_are_visible_text() {
        for ok in ["acme", "user_42@example.com", "a b", &"x".repeat(255)] {
            assert_eq!(validate_external_id(ok), Ok(()), "{ok}");
        }
        for bad in ["", " a", "a ", "a\nb", "é", "a\u{7f}", &"x".repeat(256)] {
            assert!(validate_external_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn named_limits_are_checked_sorted_and_travel_as_text() {
        let limits =
            NamedLimits::new(vec![named("tokens", 1000, 60), named("requests", 10, 1)]).unwrap();
        assert_eq!(limits.encode(), "requests=10/1,tokens=1000/60");
        assert_eq!(NamedLimits::decode(&limits.encode()), Some(limits));
        assert_eq!(NamedLimits::decode(""), Some(NamedLimits::default()));
        for bad in [
            vec![named("a", 1, 1), named("a", 2, 2)],
            vec![named("", 1, 1)],
            vec![named("Upper", 1, 1)],
            vec![named("-lead", 1, 1)],
            vec![named(&"x".repeat(33), 1, 1)],
            (0..6).map(|i| named(&format!("l{i}"), 1, 1)).collect(),
        ] {
            assert!(NamedLimits::new(bad.clone()).is_err(), "{bad:?}");
        }
        for bad in [
            "a",
            "a=1",
            "a=0/1",
            "a=1/0",
            "=1/1",
            "a=1/1,b=1/1,c=1/1,d=1/1,e=1/1,f=1/1",
        ] {
            assert_eq!(NamedLimits::decode(bad), None, "{bad}");
        }
        let parsed: NamedLimit =
            serde_json::from_str(r#"{"name":"rps","requests":5,"periodSeconds":1}"#).unwrap();
        assert_eq!(parsed, named("rps", 5, 1));
    }
}
