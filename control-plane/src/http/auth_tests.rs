//! Who may call what, in process on both backends (moved from `tests/tests/roles.rs`):
//! every route × every role (and no key, a garbage key), what a refusal says and audits,
//! which roles the edge is told about, and who may mint powerful keys; and how failed
//! authentications are filed in the audit log (moved from `tests/tests/abuse.rs`).

use axum::http::{Method, StatusCode};
use metlo_shared::ApiKey;
use serde_json::{json, Value};

use crate::db::Backend;
use crate::test_util::{on_both_backends, TestApp};

on_both_backends!(
    every_route_for_every_role,
    only_admins_make_powerful_keys,
    failed_authentications_are_filed_by_network_and_capped,
    every_api_route_refuses_bad_keys,
);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Who {
    NoKey,
    Garbage,
    Client,
    Edge,
    Admin,
}

const CALLERS: [Who; 5] = [
    Who::NoKey,
    Who::Garbage,
    Who::Client,
    Who::Edge,
    // Last: its calls succeed and change things (delete, roll).
    Who::Admin,
];

async fn every_route_for_every_role(backend: Backend) {
    let app = TestApp::on(backend).build().await;
    app.create_key("victim", "GENERIC").await;
    let rolled = app.create_key("rolled", "GENERIC").await;
    let client_hash = ApiKey::parse(&app.client_key).unwrap().hash().to_hex();
    use Who::*;
    // (method, path, body, the one role allowed)
    let routes: Vec<(Method, String, Option<Value>, Who)> = vec![
        (
            Method::POST,
            "/api/v1/keys/create".into(),
            Some(json!({"name": "made"})),
            Admin,
        ),
        (Method::GET, "/api/v1/keys/list".into(), None, Admin),
        (Method::GET, "/api/v1/keys/onboarding".into(), None, Admin),
        (
            Method::DELETE,
            "/api/v1/keys/victim/delete".into(),
            None,
            Admin,
        ),
        (
            Method::POST,
            "/api/v1/keys/rolled/roll".into(),
            Some(json!({})),
            Admin,
        ),
        (
            Method::PATCH,
            "/api/v1/keys/made".into(),
            Some(json!({"meta": {"tenant": "t"}})),
            Admin,
        ),
        (Method::GET, "/api/v1/keys/made".into(), None, Admin),
        (Method::GET, "/api/v1/keys/made/usage".into(), None, Admin),
        (
            Method::DELETE,
            "/api/v1/keys/made/sessions".into(),
            None,
            Admin,
        ),
        (Method::GET, "/api/v1/audit".into(), None, Admin),
        (Method::GET, "/api/v1/verify".into(), None, Client),
        (
            Method::GET,
            format!("/api/v1/keys/by-hash/{client_hash}"),
            None,
            Edge,
        ),
        (
            Method::POST,
            "/api/v1/usage".into(),
            Some(json!({"used": {}})),
            Edge,
        ),
        (Method::GET, "/api/v1/revocations".into(), None, Edge),
    ];
    app.flush().await; // the revocation feed is served once read
    let mut refused = 0;
    for (method, path, body, allowed) in &routes {
        for who in CALLERS {
            let caller = match who {
                NoKey => app.anonymous(),
                Garbage => app.with_key("metlo.garbage"),
                Client => app.as_client(),
                Edge => app.as_edge(),
                Admin => app.as_admin(),
            };
            let reply = caller.send(method.clone(), path, body.clone()).await;
            let what = format!("{who:?} {method} {path}: {}", reply.text);
            match who {
                NoKey | Garbage => {
                    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{what}");
                    assert_eq!(reply.json()["error"], "unauthorized", "{what}");
                }
                w if w == *allowed => assert_eq!(reply.status, StatusCode::OK, "{what}"),
                w => {
                    refused += 1;
                    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{what}");
                    assert!(reply
                        .header("www-authenticate")
                        .unwrap()
                        .contains("insufficient_scope"));
                    let v = reply.json();
                    assert_eq!(v["error"], "forbidden", "{what}");
                    let message = v["message"].as_str().unwrap();
                    let role = format!("{w:?}").to_lowercase();
                    let needed = format!("{allowed:?}").to_lowercase();
                    assert!(
                        message.contains(&format!("({role})")) && message.ends_with(&needed),
                        "{what}"
                    );
                }
            }
        }
    }
    // What the refused calls would have done did not happen; the admin's calls did.
    let list = app.list().await;
    let names: Vec<&str> = list.iter().map(|k| k["name"].as_str().unwrap()).collect();
    assert!(
        names.contains(&"made") && !names.contains(&"victim"),
        "{names:?}"
    );
    assert_eq!(
        list.iter().filter(|k| k["name"] == "made").count(),
        1,
        "only the admin's create went through"
    );
    assert_eq!(app.listed("made").await["meta"], json!({"tenant": "t"}));
    assert_eq!(
        app.with_key(&rolled).get("/api/v1/verify").await.status,
        StatusCode::UNAUTHORIZED,
        "rolled once, by the admin"
    );

    // Each refusal is in the audit log like a failed authentication: who, which route,
    // which role it had and which it needed.
    app.flush().await;
    let page = app.as_admin().get("/api/v1/audit?limit=1000").await.json();
    let forbidden: Vec<&Value> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "auth.failed" && e["detail"]["reason"] == "forbidden")
        .collect();
    let counted: u64 = forbidden
        .iter()
        .map(|e| e["detail"]["count"].as_u64().unwrap())
        .sum();
    assert_eq!(counted, refused, "{forbidden:#?}");
    let client_on_create = forbidden
        .iter()
        .find(|e| e["actor"] == "client" && e["detail"]["route"] == "/api/v1/keys/create")
        .expect("the client's create attempt is audited");
    assert_eq!(client_on_create["detail"]["role"], "client");
    assert_eq!(
        client_on_create["detail"]["required"],
        json!(["admin", "legacy"])
    );
    // Failures are filed by network, with the addresses seen.
    assert_eq!(client_on_create["ip"], "127.0.0.0/24");
    assert_eq!(
        client_on_create["detail"]["addresses"],
        json!(["127.0.0.1"])
    );

    // Roles are shown in lists.
    assert_eq!(app.listed("admin").await["role"], "admin");
    assert_eq!(app.listed("edge-worker").await["role"], "edge");
    assert_eq!(app.listed("made").await["role"], "client");
    // The edge is told nothing about admin or edge keys: by-hash answers 404 for them.
    for key in [&app.admin_key, &app.edge_key] {
        let hash = ApiKey::parse(key).unwrap().hash().to_hex();
        let reply = app
            .as_edge()
            .get(&format!("/api/v1/keys/by-hash/{hash}"))
            .await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND);
    }
    let record = app
        .as_edge()
        .get(&format!("/api/v1/keys/by-hash/{client_hash}"))
        .await;
    assert_eq!(record.json()["role"], "client");
}

async fn only_admins_make_powerful_keys(backend: Backend) {
    let app = TestApp::on(backend).build().await;
    let create = |body: Value| {
        let app = &app;
        async move { app.as_admin().post("/api/v1/keys/create", body).await }
    };
    // Metlo's body makes a client key.
    let reply = create(json!({"name": "metlo", "keyFor": "GENERIC"})).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["role"], "client");
    for role in ["admin", "edge", "client"] {
        let reply = create(json!({"name": format!("new-{role}"), "role": role})).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        assert_eq!(reply.json()["role"], role);
    }
    // The new admin key administers; the new edge key looks keys up; neither is traffic.
    let body = create(json!({"name": "admin-2", "role": "admin"}))
        .await
        .json();
    let admin2 = body["apiKey"].as_str().unwrap().to_owned();
    assert_eq!(
        app.with_key(&admin2).get("/api/v1/keys/list").await.status,
        StatusCode::OK
    );
    assert_eq!(
        app.with_key(&admin2).get("/api/v1/verify").await.status,
        StatusCode::FORBIDDEN
    );
    for bad in [json!("legacy"), json!("root"), json!("Admin"), json!(1)] {
        let reply = create(json!({"name": "bad-role", "role": bad})).await;
        reply.assert_error(StatusCode::BAD_REQUEST, "bad_request", &bad.to_string());
    }
    // A client key cannot create any key, an edge key neither.
    for caller in [app.as_client(), app.as_edge()] {
        let reply = caller
            .post(
                "/api/v1/keys/create",
                json!({"name": "by-non-admin", "role": "client"}),
            )
            .await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text);
    }
    // A roll keeps the role.
    let rolled = app
        .as_admin()
        .send(Method::POST, "/api/v1/keys/admin-2/roll", None)
        .await
        .json();
    assert_eq!(rolled["role"], "admin");
    let new_secret = rolled["apiKey"].as_str().unwrap();
    assert_eq!(
        app.with_key(new_secret)
            .get("/api/v1/keys/list")
            .await
            .status,
        StatusCode::OK
    );
    // The create is audited with the role.
    let page = app.as_admin().get("/api/v1/audit?limit=100").await.json();
    let created = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "key.create" && e["target"] == "new-edge")
        .unwrap()
        .clone();
    assert_eq!(created["detail"]["role"], "edge");
    assert_eq!(created["actor"], "admin");
}

fn made_up_key() -> String {
    ApiKey::generate().unwrap().expose_secret().to_owned()
}

/// Every `auth.failed` audit row, newest first.
async fn failures(app: &TestApp) -> Vec<Value> {
    let reply = app.as_admin().get("/api/v1/audit?limit=1000").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    reply.json()["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "auth.failed")
        .cloned()
        .collect()
}

/// Failed authentications are filed per network (IPv4 /24, IPv6 /64), so rotating
/// addresses makes no new rows; a minute gets at most its cap of rows and one more that
/// says what was folded — and no failure goes uncounted.
async fn failed_authentications_are_filed_by_network_and_capped(backend: Backend) {
    let app = TestApp::on(backend)
        .env("AUTH_FAILURES_PER_MINUTE", 0)
        .env("MAX_CONCURRENT_LOOKUPS", 1000)
        .env("TRUSTED_PROXIES", "127.0.0.1")
        .build()
        .await;
    // At the start of a minute, so that the test stays within one.
    app.advance_to((crate::clock::now_ms() / 60_000 + 1) * 60_000);
    let fail_from = |xff: String| {
        let app = &app;
        async move {
            let reply = app
                .with_key(&made_up_key())
                .header("X-Forwarded-For", &xff)
                .get("/api/v1/verify")
                .await;
            assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text);
        }
    };
    for xff in [
        "203.0.113.1",
        "203.0.113.2",
        "203.0.113.3",
        "2001:db8:1:2::1",
        "2001:db8:1:2:ffff::9",
    ] {
        fail_from(xff.to_owned()).await;
    }
    app.flush().await;
    let rows = failures(&app).await;
    let by_ip = |ip: &str| -> Vec<&Value> { rows.iter().filter(|r| r["ip"] == ip).collect() };
    let v4 = by_ip("203.0.113.0/24");
    assert_eq!(v4.len(), 1, "{rows:?}");
    assert_eq!(v4[0]["detail"]["count"], 3);
    assert_eq!(v4[0]["detail"]["addresses"].as_array().unwrap().len(), 3);
    let v6 = by_ip("2001:db8:1:2::/64");
    assert_eq!(v6.len(), 1, "{rows:?}");
    assert_eq!(v6[0]["detail"]["count"], 2);

    // 300 networks at once: the minute's cap of rows (60 by default, the busiest first;
    // 2 were written above), then one summary row once the minute is over; none lost.
    let before = rows.len();
    let flood: Vec<_> = (0..300)
        .map(|i| fail_from(format!("10.{}.{}.1", i / 256, i % 256)))
        .collect();
    futures_util::future::join_all(flood).await;
    app.flush().await;
    let itemised = failures(&app).await.len() - before;
    app.advance(std::time::Duration::from_secs(60));
    app.flush().await;
    let rows = failures(&app).await;
    let new = &rows[..rows.len() - before];
    let summaries: Vec<_> = new
        .iter()
        .filter(|r| r["detail"]["reason"] == "not itemised")
        .collect();
    assert_eq!(summaries.len(), 1, "one summary row: {new:?}");
    assert_eq!(summaries[0]["detail"]["overCap"], 300 - (itemised as u64));
    assert_eq!(new.len(), itemised + 1, "{new:?}");
    assert_eq!(itemised, 60 - 2, "the minute's cap");
    let counted: u64 = new
        .iter()
        .map(|r| r["detail"]["count"].as_u64().unwrap())
        .sum();
    assert_eq!(counted, 300, "every failure counted");
}

/// Moved from `tests/tests/control_plane.rs`: every way a key can be missing or wrong is a
/// JSON 401 with `WWW-Authenticate` on every key-guarded route, and changes nothing.
async fn every_api_route_refuses_bad_keys(backend: Backend) {
    use axum::body::Body;
    use axum::http::HeaderValue;
    let app = TestApp::on(backend).build().await;
    let deleted = app.create_key("to-delete", "GENERIC").await;
    assert_eq!(
        app.with_key(&deleted).get("/api/v1/verify").await.status,
        StatusCode::OK
    );
    let reply = app.as_admin().delete("/api/v1/keys/to-delete/delete").await;
    assert_eq!(reply.status, StatusCode::OK);

    let valid = ApiKey::generate().unwrap();
    let mut bad_checksum = valid.expose_secret().to_owned();
    let last = bad_checksum.pop().unwrap();
    bad_checksum.push(if last == 'a' { 'b' } else { 'a' });
    let unknown = made_up_key();
    let admin_key = &app.admin_key;
    let candidates: Vec<Option<String>> = vec![
        None,
        Some(String::new()),
        Some("Bearer".into()),
        Some("garbage".into()),
        Some(format!("Basic {admin_key}")),
        Some(bad_checksum),
        Some(unknown),
        Some(deleted),
        Some(format!("{} ", &admin_key[..admin_key.len() - 1])),
    ];
    let hash = "0".repeat(64);
    let routes = [
        (Method::POST, "/api/v1/keys/create".to_owned()),
        (Method::GET, "/api/v1/keys/list".to_owned()),
        (Method::GET, "/api/v1/keys/onboarding".to_owned()),
        (Method::DELETE, "/api/v1/keys/admin/delete".to_owned()),
        (Method::GET, "/api/v1/verify".to_owned()),
        (Method::GET, format!("/api/v1/keys/by-hash/{hash}")),
    ];
    for (method, path) in &routes {
        for key in &candidates {
            let caller = match key {
                Some(k) => app.with_key(k),
                None => app.anonymous(),
            };
            let request = caller
                .request(method.clone(), path)
                .body(Body::from(r#"{"name":"x"}"#))
                .unwrap();
            let reply = caller.send_request(request).await;
            assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{method} {path}");
            assert!(reply
                .header("www-authenticate")
                .unwrap()
                .starts_with("Bearer"));
            let body = reply.json();
            assert_eq!(body["error"], "unauthorized");
            assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
    }
    // A non-UTF-8 header value is refused, not a crash.
    let caller = app.anonymous();
    let mut request = caller
        .request(Method::GET, "/api/v1/verify")
        .body(Body::empty())
        .unwrap();
    request.headers_mut().insert(
        "authorization",
        HeaderValue::from_bytes(b"metlo.\xff\xfe").unwrap(),
    );
    assert_eq!(
        caller.send_request(request).await.status,
        StatusCode::UNAUTHORIZED
    );
    // Nothing was created or deleted by refused requests.
    let names: Vec<String> = app
        .list()
        .await
        .iter()
        .map(|k| k["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        names,
        ["client", "edge-worker", "admin"],
        "the first keys only"
    );
}
