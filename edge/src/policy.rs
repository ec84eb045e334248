//! What the route policy (`metlo_shared::policy`) decides for one admitted request, before
//! the origin is called: forward (with the normalised path, so the origin gets what was
//! checked), or refuse — 403 `insufficient_scope`, 400/414 for a path the policy will not
//! match, 503 for a policy this Worker cannot read.

use metlo_shared::policy::{normalize_path, PathError, Verdict};

use crate::decision::PlainResponse;
use crate::revocations::PolicyState;

/// Why the policy refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyRefusal {
    /// The key lacks what the matching rule requires (its expression), or no rule matched
    /// and the default denies (`None`).
    Forbidden(Option<String>),
    /// A path the policy does not match (encoded separators, bad escapes, too long).
    Path(PathError),
    /// The policy was sent but this Worker cannot read it.
    Unreadable,
}

/// Does a policy decide requests (one that cannot be read does: it refuses them)?
pub fn in_force(policy: Option<&PolicyState>) -> bool {
    match policy {
        None => false,
        Some(PolicyState::Unreadable) => true,
        Some(PolicyState::Known(p)) => p.is_active(),
    }
}

/// The request headers by which a client asks an origin framework to run another method
/// than the request's (Express's method-override, Rails, Spring's HiddenHttpMethodFilter
/// read them): while a policy is in force, the methods they name must be allowed too.
pub const METHOD_OVERRIDE_HEADERS: [&str; 3] = [
    "X-HTTP-Method-Override",
    "X-HTTP-Method",
    "X-Method-Override",
];

/// The policy's decision for `method` on `request_url` (absolute) by a key with
/// `permissions`; `overrides`: the methods the client's override headers name
/// (comma-separated), each of which must be allowed too. Admitted: where to forward —
/// `None`: as it came (no policy in force), `Some(path and query)`: there — and the
/// credits the request costs (its rule's, 1 without one); or the refusal.
pub fn authorize(
    policy: Option<&PolicyState>,
    method: &str,
    overrides: Option<&str>,
    request_url: &str,
    permissions: &[String],
) -> Result<(Option<String>, u64), PolicyRefusal> {
    let policy = match policy {
        None => return Ok((None, 1)),
        Some(PolicyState::Unreadable) => return Err(PolicyRefusal::Unreadable),
        Some(PolicyState::Known(p)) if !p.is_active() => return Ok((None, 1)),
        Some(PolicyState::Known(p)) => p,
    };
    let (path, query) = path_and_query(request_url);
    let path = normalize_path(path).map_err(PolicyRefusal::Path)?;
    let mut verdict = policy.decide(method, &path, permissions);
    // The dearest of the method's rule and those of the methods its override headers
    // name: an override must not make a request cheaper.
    let mut cost = match verdict {
        Verdict::Allow(cost) => cost,
        Verdict::Deny(_) => 1,
    };
    for named in overrides.into_iter().flat_map(|o| o.split(',')) {
        if !matches!(verdict, Verdict::Allow(_)) {
            break;
        }
        verdict = policy.decide(&named.trim().to_ascii_uppercase(), &path, permissions);
        if let Verdict::Allow(c) = verdict {
            cost = cost.max(c);
        }
    }
    if let Verdict::Deny(required) = verdict {
        return Err(PolicyRefusal::Forbidden(required.map(|e| e.to_string())));
    }
    let target = match query {
        Some(q) => format!("{}?{q}", path.forward),
        None => path.forward,
    };
    Ok((Some(target), cost))
}

/// The path and the query of an absolute URL (the fragment never reaches a server).
fn path_and_query(url: &str) -> (&str, Option<&str>) {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[after_scheme..];
    let rest = rest.find('/').map_or("", |i| &rest[i..]);
    let rest = rest.split('#').next().unwrap_or("");
    match rest.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (rest, None),
    }
}

/// The response for a refusal (same JSON shape as every other refusal).
pub fn refusal_response(refusal: &PolicyRefusal) -> PlainResponse {
    let json = ("Content-Type", "application/json".to_owned());
    match refusal {
        PolicyRefusal::Forbidden(required) => PlainResponse {
            status: 403,
            headers: vec![
                json,
                (
                    "WWW-Authenticate",
                    match required {
                        // Expressions hold no quote or backslash: a valid quoted string.
                        Some(scope) => format!(
                            r#"Bearer realm="metlo", error="insufficient_scope", scope="{scope}""#
                        ),
                        None => r#"Bearer realm="metlo", error="insufficient_scope""#.to_owned(),
                    },
                ),
            ],
            body: r#"{"error":"forbidden","message":"this API key does not have the permissions this route requires"}"#,
        },
        PolicyRefusal::Path(PathError::TooLong) => PlainResponse {
            status: 414,
            headers: vec![json],
            body: r#"{"error":"uri_too_long","message":"the request path is longer than 2048 bytes"}"#,
        },
        PolicyRefusal::Path(_) => PlainResponse {
            status: 400,
            headers: vec![json],
            body: r#"{"error":"bad_request","message":"the request path holds an encoded / or \\, a NUL, a double or a malformed percent-encoding"}"#,
        },
        PolicyRefusal::Unreadable => PlainResponse {
            status: 503,
            headers: vec![json, ("Retry-After", "5".to_owned())],
            body: r#"{"error":"unavailable","message":"the route policy cannot be read by this edge Worker; try again shortly"}"#,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::rc::Rc;

    use super::*;
    use metlo_shared::policy::RoutePolicy;

    fn known(lines: &str) -> PolicyState {
        PolicyState::Known(Rc::new(RoutePolicy::from_lines(lines).unwrap()))
    }

    fn perms(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn no_policy_forwards_as_it_came() {
        for policy in [None, Some(known("0 allow\n")), Some(known("3 allow\n"))] {
            assert_eq!(
                authorize(policy.as_ref(), "GET", None, "https://e.dev/a//b?x", &[]),
                Ok((None, 1))
            );
        }
    }

    #[test]
    fn a_policy_forwards_the_normalised_path_with_the_query() {
        let p = known("2 deny\nGET /v1/orders/* orders:read\nPOST /v1/orders orders:write");
        let read = perms(&["orders:read"]);
        assert_eq!(
            authorize(
                Some(&p),
                "GET",
                None,
                "https://e.dev/v1/x/../orders/%31?q=a/../b#frag",
                &read
            ),
            Ok((Some("/v1/orders/1?q=a/../b".into()), 1))
        );
        // A rule's cost comes with it.
        let priced = known("2 allow\nGET /v1/search cost=7 search");
        assert_eq!(
            authorize(
                Some(&priced),
                "GET",
                None,
                "https://e.dev/v1/search",
                &perms(&["search"])
            ),
            Ok((Some("/v1/search".into()), 7))
        );
        let priced = known("2 allow\nGET /v1/x cost=0 a\nPOST /v1/x cost=100 a");
        assert_eq!(
            authorize(
                Some(&priced),
                "GET",
                Some("POST"),
                "https://e.dev/v1/x",
                &perms(&["a"])
            ),
            Ok((Some("/v1/x".into()), 100)),
            "an override pays the dearer method"
        );
        assert_eq!(
            authorize(Some(&p), "POST", None, "https://e.dev/v1/orders", &read),
            Err(PolicyRefusal::Forbidden(Some("orders:write".into())))
        );
        assert_eq!(
            authorize(Some(&p), "GET", None, "https://e.dev/", &read),
            Err(PolicyRefusal::Forbidden(None)),
            "default deny"
        );
        assert_eq!(
            authorize(Some(&p), "GET", None, "https://e.dev/v1/orders%2F1", &read),
            Err(PolicyRefusal::Path(PathError::EncodedSeparator))
        );
        assert_eq!(
            authorize(
                Some(&PolicyState::Unreadable),
                "GET",
                None,
                "https://e.dev/",
                &read
            ),
            Err(PolicyRefusal::Unreadable)
        );
        // A method override names a method the policy must allow too.
        let p = known("2 allow\nGET /v1/orders/* orders:read\nDELETE /v1/orders/* orders:delete");
        for overrides in ["DELETE", "delete", "GET, DELETE", " Delete "] {
            assert_eq!(
                authorize(
                    Some(&p),
                    "GET",
                    Some(overrides),
                    "https://e.dev/v1/orders/1",
                    &read
                ),
                Err(PolicyRefusal::Forbidden(Some("orders:delete".into()))),
                "{overrides}"
            );
        }
        assert_eq!(
            authorize(
                Some(&p),
                "GET",
                Some("PROPFIND"),
                "https://e.dev/v1/x",
                &read
            ),
            Err(PolicyRefusal::Forbidden(None)),
            "a method no rule names"
        );
        assert!(authorize(
            Some(&p),
            "GET",
            Some("GET"),
            "https://e.dev/v1/orders/1",
            &read
        )
        .is_ok());
        assert!(in_force(Some(&p)) && in_force(Some(&PolicyState::Unreadable)));
        assert!(!in_force(None) && !in_force(Some(&known("4 allow"))));
    }

    #[test]
    fn the_later_copy_of_a_policy_wins() {
        let (v1, v2) = (known("1 allow"), known("2 deny"));
        assert_eq!(v1.clone().later(Some(v2.clone())), v2);
        assert_eq!(v2.clone().later(Some(v1.clone())), v2);
        assert_eq!(v1.clone().later(None), v1);
        assert_eq!(
            v2.clone().later(Some(PolicyState::Unreadable)),
            PolicyState::Unreadable
        );
        assert_eq!(
            PolicyState::Unreadable.later(Some(v2)),
            PolicyState::Unreadable
        );
    }

    #[test]
    fn refusals_say_what_is_missing() {
        let r = refusal_response(&PolicyRefusal::Forbidden(Some("a AND (b OR c)".into())));
        assert_eq!(r.status, 403);
        assert!(r.headers.contains(&(
            "WWW-Authenticate",
            r#"Bearer realm="metlo", error="insufficient_scope", scope="a AND (b OR c)""#.into()
        )));
        let r = refusal_response(&PolicyRefusal::Forbidden(None));
        assert!(r.headers[1].1.ends_with(r#"error="insufficient_scope""#));
        for (refusal, status) in [
            (PolicyRefusal::Path(PathError::TooLong), 414),
            (PolicyRefusal::Path(PathError::BadEncoding), 400),
            (PolicyRefusal::Unreadable, 503),
        ] {
            let r = refusal_response(&refusal);
            assert_eq!(r.status, status);
            let body: serde_json::Value = serde_json::from_str(r.body).unwrap();
            assert!(body["error"].is_string() && body["message"].is_string());
        }
    }
}
