//! The `Authorization` header: `Bearer <key>` or the bare key (Metlo's clients send it bare).

use crate::key::{ApiKey, ParseKeyError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthorizationError {
    #[error("missing API key in the Authorization header")]
    Missing,
    #[error(transparent)]
    Malformed(#[from] ParseKeyError),
}

/// Extracts the key from an `Authorization` header value (`None` when the header is
/// absent). Leading and trailing whitespace is ignored; the scheme is case-insensitive.
pub fn parse_authorization(header: Option<&str>) -> Result<ApiKey, AuthorizationError> {
    let value = header.map(str::trim).unwrap_or_default();
    if value.is_empty() {
        return Err(AuthorizationError::Missing);
    }
    if value.eq_ignore_ascii_case("bearer") {
        return Err(AuthorizationError::Missing);
    }
    let token = match value.split_once(char::is_whitespace) {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim_start(),
        _ => value,
    };
    if token.is_empty() {
        return Err(AuthorizationError::Missing);
    }
    Ok(ApiKey::parse(token)?)
}

#[cfg(test)]
mod tests {
    use super::*;

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
                key,
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
    }
}
