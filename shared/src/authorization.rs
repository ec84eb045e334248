//! The `Authorization` header: `Bearer <key>` or the bare key (Metlo's clients send it bare).

use crate::key::{ApiKeyRef, ParseKeyError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthorizationError {
    #[error("missing API key in the Authorization header")]
    Missing,
    #[error(transparent)]
    Malformed(#[from] ParseKeyError),
}

/// Extracts the key from an `Authorization` header value (`None` when the header is
/// absent), borrowed from it. Leading and trailing whitespace is ignored; the scheme is
/// case-insensitive. Whitespace is ASCII's (HTTP's own is spaces and tabs).
pub fn parse_authorization(header: Option<&str>) -> Result<ApiKeyRef<'_>, AuthorizationError> {
    let value = header.map(str::trim_ascii).unwrap_or_default();
    if value.is_empty() || value.eq_ignore_ascii_case("bearer") {
        return Err(AuthorizationError::Missing);
    }
    let token = match value.bytes().position(|b| b.is_ascii_whitespace()) {
        // The split is at an ASCII byte: both sides are whole UTF-8.
        Some(at) if value[..at].eq_ignore_ascii_case("bearer") => value[at..].trim_ascii_start(),
        _ => value,
    };
    if token.is_empty() {
        return Err(AuthorizationError::Missing);
    }
    Ok(ApiKeyRef::parse(token)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::ApiKey;

    #[test]
    fn accepts_bare_and_bearer() {
        let key = ApiKey::generate().unwrap();
        let s = key.expose_secret();
        for header in [
            s.to_owned(),
            format!("Bearer {s}"),
            format!("bearer  {s} "),
            format!(" BEARER\t{s}"),
        ] {
            assert_eq!(
                parse_authorization(Some(&header)).unwrap(),
                key.borrowed(),
                "{header:?}"
            );
        }
    }

    #[test]
    fn refuses_missing_and_malformed() {
        assert_eq!(parse_authorization(None), Err(AuthorizationError::Missing));
        assert_eq!(
            parse_authorization(Some("")),
            Err(AuthorizationError::Missing)
        );
        assert_eq!(
            parse_authorization(Some("Bearer ")),
            Err(AuthorizationError::Missing)
        );
        assert_eq!(
            parse_authorization(Some("Bearer nope")),
            Err(AuthorizationError::Malformed(ParseKeyError::WrongPrefix))
        );
        let key = ApiKey::generate().unwrap();
        assert!(parse_authorization(Some(&format!("Basic {}", key.expose_secret()))).is_err());
        assert!(
            parse_authorization(Some(&format!("Bearer {} extra", key.expose_secret()))).is_err()
        );
        // HTTP's whitespace only: a no-break space does not separate a scheme.
        assert!(
            parse_authorization(Some(&format!("Bearer\u{a0}{}", key.expose_secret()))).is_err()
        );
    }
}
