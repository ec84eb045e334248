//! The route policy's tests: matching, path tricks, documents and their lines.

use super::*;
use proptest::prelude::*;

fn policy(default: Fallback, rules: &[(&[&str], &str, &str)]) -> RoutePolicy {
    RoutePolicy::from_document(
        1,
        &PolicyDocument {
            default,
            rules: rules
                .iter()
                .map(|(m, p, r)| RuleDocument {
                    methods: Some(m.iter().map(|s| s.to_string()).collect()),
                    path: p.to_string(),
                    require: r.to_string(),
                    cost: None,
                })
                .collect(),
        },
    )
    .unwrap()
}

fn orders() -> RoutePolicy {
    policy(
        Fallback::Deny,
        &[
            (&["GET"], "/v1/orders/*", "orders:read"),
            (&["POST"], "/v1/orders", "orders:write"),
            (&["*"], "/admin/**", "admin"),
            (&["*"], "/public/**", "orders:read OR public"),
        ],
    )
}

fn decide(p: &RoutePolicy, method: &str, raw: &str, perms: &[&str]) -> Result<bool, PathError> {
    let perms: Vec<String> = perms.iter().map(|s| s.to_string()).collect();
    let path = normalize_path(raw)?;
    Ok(matches!(p.decide(method, &path, &perms), Verdict::Allow(_)))
}

#[test]
fn first_matching_rule_decides_then_the_default() {
    let p = orders();
    assert_eq!(
        decide(&p, "GET", "/v1/orders/1", &["orders:read"]),
        Ok(true)
    );
    assert_eq!(
        decide(&p, "HEAD", "/v1/orders/1", &["orders:read"]),
        Ok(true)
    );
    assert_eq!(
        decide(&p, "POST", "/v1/orders", &["orders:read"]),
        Ok(false)
    );
    assert_eq!(
        decide(&p, "POST", "/v1/orders", &["orders:write"]),
        Ok(true)
    );
    assert_eq!(
        decide(&p, "GET", "/v1/orders/1/items", &["orders:read"]),
        Ok(false),
        "* is one segment"
    );
    assert_eq!(
        decide(&p, "GET", "/admin", &["admin"]),
        Ok(true),
        "** matches none"
    );
    assert_eq!(decide(&p, "DELETE", "/admin/a/b/c", &["admin"]), Ok(true));
    assert_eq!(
        decide(&p, "GET", "/elsewhere", &["admin"]),
        Ok(false),
        "default deny"
    );
    let open = policy(
        Fallback::Allow,
        &[(&["GET"], "/v1/orders/*", "orders:read")],
    );
    assert_eq!(decide(&open, "GET", "/elsewhere", &[]), Ok(true));
    let v = orders();
    let path = normalize_path("/v1/orders").unwrap();
    match v.decide("POST", &path, &[]) {
        Verdict::Deny(Some(e)) => assert_eq!(e.to_string(), "orders:write"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        v.decide("GET", &normalize_path("/x").unwrap(), &[]),
        Verdict::Deny(None)
    );
    assert!(!RoutePolicy::default().is_active());
    assert!(v.is_active());
}

/// Every way of writing a forbidden route reaches that route's rule, or is refused.
#[test]
fn path_tricks_never_reach_a_route_the_key_may_not_call() {
    let p = policy(
        Fallback::Allow,
        &[
            (&["*"], "/admin/**", "admin"),
            (&["POST"], "/v1/orders", "orders:write"),
        ],
    );
    let key = ["orders:read"];
    let long = format!("/{}", "a/".repeat(1100));
    for raw in [
        "/admin",
        "/admin/",
        "/ADMIN/users",
        "/Admin",
        "/%61dmin",
        "/%41DMIN/x",
        "//admin",
        "/./admin",
        "/public/../admin",
        "/public/%2e%2e/admin",
        "/public/%2E%2E/admin",
        "/public/.%2e/admin",
        "/public/..;/admin",
        "/public;x/..;y/admin",
        "/admin;jsessionid=1",
        "/admin;/x",
        "/;x/admin",
        "/public\\..\\admin",
        "/../../admin",
        "/a/b/../../admin/x",
        "/%61%64%6D%69%6E",
    ] {
        assert_eq!(decide(&p, "GET", raw, &key), Ok(false), "{raw}");
        assert!(
            normalize_path(raw)
                .unwrap()
                .forward
                .to_ascii_lowercase()
                .starts_with("/admin"),
            "{raw}"
        );
    }
    for (raw, err) in [
        ("/public%2F..%2Fadmin", PathError::EncodedSeparator),
        ("/public%2f..%2fadmin", PathError::EncodedSeparator),
        ("/public%5C..%5Cadmin", PathError::EncodedSeparator),
        ("/public/%252e%252e/admin", PathError::BadEncoding),
        ("/public/%25%32%65%25%32%65/admin", PathError::BadEncoding),
        ("/public%25%32%46..%25%32%46admin", PathError::BadEncoding),
        ("/100%25", PathError::BadEncoding),
        ("/admin%00", PathError::BadEncoding),
        ("/admin%", PathError::BadEncoding),
        ("/admin%zz", PathError::BadEncoding),
        (long.as_str(), PathError::TooLong),
    ] {
        assert_eq!(decide(&p, "GET", raw, &key), Err(err), "{raw}");
    }
    for raw in [
        "/v1/orders",
        "/v1/orders/",
        "/v1//orders",
        "/V1/Orders",
        "/v1/x/../orders",
        "/v1/orders;a=b",
    ] {
        assert_eq!(decide(&p, "POST", raw, &key), Ok(false), "{raw}");
    }
    assert_eq!(
        decide(&p, "POST", "/v1/orders/1", &key),
        Ok(true),
        "another route"
    );
    assert_eq!(decide(&p, "GET", "/v1/orders", &key), Ok(true));
    // Characters a rule may name, escaped: the rule still applies.
    let colon = policy(
        Fallback::Allow,
        &[
            (&["POST"], "/v1/orders:cancel", "orders:write"),
            (&["*"], "/v1/users/@me/**", "me"),
        ],
    );
    for raw in [
        "/v1/orders%3Acancel",
        "/v1/orders%3acancel",
        "/v1/ORDERS%3ACANCEL",
    ] {
        assert_eq!(decide(&colon, "POST", raw, &key), Ok(false), "{raw}");
    }
    assert_eq!(decide(&colon, "GET", "/v1/users/%40me/x", &key), Ok(false));
    assert_eq!(
        normalize_path("/v1/orders%3Acancel").unwrap().forward,
        "/v1/orders:cancel"
    );
    // Methods no rule can name pass only a rule for any method.
    for method in ["PROPFIND", "QUERY", "get", "PURGE"] {
        assert_eq!(
            decide(&p, method, "/v1/orders", &key),
            Ok(false),
            "{method}"
        );
        assert_eq!(
            decide(&p, method, "/public", &key),
            Ok(false),
            "{method}: no default"
        );
    }
    let any = policy(Fallback::Deny, &[(&["*"], "/dav/**", "orders:read")]);
    assert_eq!(decide(&any, "PROPFIND", "/dav/x", &key), Ok(true));
}

#[test]
fn the_origin_gets_what_was_matched() {
    for (raw, forward) in [
        ("/", "/"),
        ("", "/"),
        ("/a/./b/../c", "/a/c"),
        ("/a//b/", "/a/b/"),
        ("/%61%7e%2D", "/a~-"),
        ("/caf%c3%a9", "/caf%C3%A9"),
        ("/a;p=1/b", "/a;p=1/b"),
        ("/../..", "/"),
        ("/A/B", "/A/B"),
    ] {
        assert_eq!(normalize_path(raw).unwrap().forward, forward, "{raw}");
    }
}

#[test]
fn bad_documents_name_the_rule() {
    let doc = |path: &str, methods: &[&str], require: &str| PolicyDocument {
        default: Fallback::Allow,
        rules: vec![
            RuleDocument {
                methods: None,
                path: "/ok".into(),
                require: "a".into(),
                cost: None,
            },
            RuleDocument {
                methods: Some(methods.iter().map(|s| s.to_string()).collect()),
                path: path.into(),
                require: require.into(),
                cost: None,
            },
        ],
    };
    for (path, methods, require) in [
        ("no-slash", &["GET"][..], "a"),
        ("/a//b", &["GET"], "a"),
        ("/a/**/b", &["GET"], "a"),
        ("/a/../b", &["GET"], "a"),
        ("/a%2Fb", &["GET"], "a"),
        ("/a*", &["GET"], "a"),
        ("/a", &["get"], "a"),
        ("/a", &["TRACE"], "a"),
        ("/a", &["GET"], "a AND"),
        ("/a", &["GET"], ""),
        ("/a", &[], "a"),
    ] {
        match RoutePolicy::from_document(1, &doc(path, methods, require)) {
            Err(PolicyError::Rule { rule: 1, message }) => assert!(!message.is_empty()),
            other => panic!("{path} {methods:?} {require:?}: {other:?}"),
        }
    }
    let many = PolicyDocument {
        default: Fallback::Deny,
        rules: vec![
            RuleDocument {
                methods: None,
                path: "/a".into(),
                require: "a".into(),
                cost: None,
            };
            201
        ],
    };
    assert_eq!(
        RoutePolicy::from_document(1, &many),
        Err(PolicyError::TooManyRules)
    );
}

#[test]
fn lines_round_trip() {
    let p = RoutePolicy {
        version: 7,
        ..orders()
    };
    let text = p.to_lines();
    assert!(
        text.starts_with("7 deny\nGET /v1/orders/* orders:read\n"),
        "{text}"
    );
    assert_eq!(RoutePolicy::from_lines(&text).unwrap(), p);
    assert_eq!(RoutePolicy::from_document(7, &p.to_document()).unwrap(), p);
    let empty = RoutePolicy::default();
    assert_eq!(RoutePolicy::from_lines(&empty.to_lines()).unwrap(), empty);
    for bad in [
        "",
        "x allow",
        "1 maybe",
        "1 allow\nGET /a",
        "1 allow\nGET /a a AND",
    ] {
        assert!(RoutePolicy::from_lines(bad).is_err(), "{bad:?}");
    }
}

proptest! {
    /// Whatever the path, the forwarded form is normalised: matching it again changes
    /// nothing, and it never holds a dot segment or an empty one.
    #[test]
    fn normalising_is_idempotent(raw in "[/a-f.;%0-9A-F\\\\]{0,40}") {
        if let Ok(once) = normalize_path(&raw) {
            let twice = normalize_path(&once.forward).unwrap();
            prop_assert_eq!(&twice.segments, &once.segments);
            prop_assert_eq!(&twice.forward, &once.forward);
            for s in once.forward.split('/').skip(1) {
                let bare = s.split(';').next().unwrap();
                prop_assert!(bare != "." && bare != "..");
            }
        }
    }
}

#[test]
fn rules_name_a_cost_that_travels_in_lines() {
    let doc: PolicyDocument = serde_json::from_str(
        r#"{"rules": [{"path": "/v1/search", "require": "a", "cost": 5},
                       {"path": "/v1/free", "require": "a", "cost": 0},
                       {"path": "/v1/**", "require": "a"}]}"#,
    )
    .unwrap();
    let p = RoutePolicy::from_document(3, &doc).unwrap();
    let perms = ["a".to_owned()];
    let at = |path: &str| p.decide("GET", &normalize_path(path).unwrap(), &perms);
    assert_eq!(at("/v1/search"), Verdict::Allow(5));
    assert_eq!(at("/v1/free"), Verdict::Allow(0));
    assert_eq!(at("/v1/other"), Verdict::Allow(1));
    assert_eq!(at("/elsewhere"), Verdict::Allow(1), "the default costs 1");
    let lines = p.to_lines();
    assert!(lines.contains("* /v1/search cost=5 a\n"), "{lines}");
    assert!(
        lines.contains("* /v1/** a\n"),
        "a cost of 1 is not written: {lines}"
    );
    assert_eq!(RoutePolicy::from_lines(&lines).unwrap(), p);
    assert_eq!(p.to_document(), doc);
    let too_dear: PolicyDocument =
        serde_json::from_str(r#"{"rules": [{"path": "/x", "require": "a", "cost": 1000001}]}"#)
            .unwrap();
    assert!(RoutePolicy::from_document(1, &too_dear).is_err());
    for bad in [
        "1 allow\n* /x cost=x a",
        "1 allow\n* /x cost=5",
        "1 allow\n* /x cost=1000001 a",
    ] {
        assert!(RoutePolicy::from_lines(bad).is_err(), "{bad}");
    }
}
