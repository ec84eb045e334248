//! Key authority through HTTP, on the real binary, on SQLite and PostgreSQL: every route
//! × every role (and no key, a garbage key), escalation rules, the last admin key, names
//! that could impersonate, and the ops routes kept off the API port.

use std::time::Duration;

use metlo_shared::ApiKey;
use metlo_tests::{on_both_backends, Backend, ControlPlane, StatusCode};
use reqwest::Method;
use serde_json::{json, Value};

on_both_backends!(
    every_route_for_every_role,
    only_admins_make_powerful_keys,
    the_last_admin_key_stays,
    names_that_could_impersonate_are_refused,
    ops_routes_are_off_the_api_port,
);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Caller {
    NoKey,
    Garbage,
    Client,
    Edge,
    Admin,
}

const CALLERS: [Caller; 5] = [
    Caller::NoKey,
    Caller::Garbage,
    Caller::Client,
    Caller::Edge,
    // Last: its calls succeed and change things (delete, roll).
    Caller::Admin,
];

fn key_of(cp: &ControlPlane, caller: Caller) -> Option<String> {
    match caller {
        Caller::NoKey => None,
        Caller::Garbage => Some("metlo.garbage".into()),
        Caller::Client => Some(cp.client_key.clone()),
        Caller::Edge => Some(cp.edge_key.clone()),
        Caller::Admin => Some(cp.admin_key.clone()),
    }
}

async fn send(
    cp: &ControlPlane,
    method: &Method,
    path: &str,
    body: Option<&Value>,
    key: Option<&str>,
) -> (StatusCode, reqwest::header::HeaderMap, String) {
    let mut rb = cp.request(method.clone(), path, key);
    if let Some(b) = body {
        rb = rb.json(b);
    }
    let r = rb.send().await.unwrap();
    let status = r.status();
    let headers = r.headers().clone();
    let text = r.text().await.unwrap();
    if let Ok(v) = serde_json::from_str::<Value>(&text) {
        if let Some(k) = v.get("apiKey").and_then(Value::as_str) {
            cp.secrets.lock().unwrap().push(k.to_owned());
        }
    }
    (status, headers, text)
}

async fn every_route_for_every_role(backend: Backend) {
    let cp = ControlPlane::start(backend).await;
    let victim = cp.create_key("victim", "GENERIC").await;
    let rolled = cp.create_key("rolled", "GENERIC").await;
    let client_hash = ApiKey::parse(&cp.client_key).unwrap().hash().to_hex();
    let _ = (&victim, &rolled);
    use Caller::*;
    // (method, path, body, the one role allowed)
    let routes: Vec<(Method, String, Option<Value>, Caller)> = vec![
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
    ];
    let mut refused = 0;
    for (method, path, body, allowed) in &routes {
        for caller in CALLERS {
            let key = key_of(&cp, caller);
            let (status, headers, text) =
                send(&cp, method, path, body.as_ref(), key.as_deref()).await;
            let what = format!("{caller:?} {method} {path}: {text}");
            match caller {
                NoKey | Garbage => {
                    assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}");
                    let v: Value = serde_json::from_str(&text).unwrap();
                    assert_eq!(v["error"], "unauthorized", "{what}");
                }
                c if c == *allowed => assert_eq!(status, StatusCode::OK, "{what}"),
                c => {
                    refused += 1;
                    assert_eq!(status, StatusCode::FORBIDDEN, "{what}");
                    assert!(headers["www-authenticate"]
                        .to_str()
                        .unwrap()
                        .contains("insufficient_scope"));
                    let v: Value = serde_json::from_str(&text).unwrap();
                    assert_eq!(v["error"], "forbidden", "{what}");
                    let message = v["message"].as_str().unwrap();
                    let role = format!("{c:?}").to_lowercase();
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
    let list = cp.list().await;
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
    assert_eq!(cp.listed("made").await["meta"], json!({"tenant": "t"}));
    assert_eq!(
        cp.verify(&rolled).await,
        StatusCode::UNAUTHORIZED,
        "rolled once, by the admin"
    );

    // Each refusal is in the audit log like a failed authentication: who, which route,
    // which role it had and which it needed.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, _, page) = cp
        .get("/api/v1/audit?limit=1000", Some(&cp.admin_key))
        .await;
    let page: Value = serde_json::from_str(&page).unwrap();
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
    assert_eq!(cp.listed("admin").await["role"], "admin");
    assert_eq!(cp.listed("edge-worker").await["role"], "edge");
    assert_eq!(cp.listed("made").await["role"], "client");
    // The edge is told nothing about admin or edge keys: by-hash answers 404 for them.
    for key in [&cp.admin_key, &cp.edge_key] {
        let hash = ApiKey::parse(key).unwrap().hash().to_hex();
        let (status, _, _) = cp
            .get(&format!("/api/v1/keys/by-hash/{hash}"), Some(&cp.edge_key))
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
    let (_, _, record) = cp
        .get(
            &format!("/api/v1/keys/by-hash/{client_hash}"),
            Some(&cp.edge_key),
        )
        .await;
    assert_eq!(
        serde_json::from_str::<Value>(&record).unwrap()["role"],
        "client"
    );
}

async fn only_admins_make_powerful_keys(backend: Backend) {
    let cp = ControlPlane::start(backend).await;
    // Metlo's body makes a client key.
    let (status, body) = cp
        .create(json!({"name": "metlo", "keyFor": "GENERIC"}))
        .await;
    assert_eq!(
        (status, body["role"].as_str()),
        (StatusCode::OK, Some("client"))
    );
    for role in ["admin", "edge", "client"] {
        let (status, body) = cp
            .create(json!({"name": format!("new-{role}"), "role": role}))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["role"], role);
    }
    // The new admin key administers; the new edge key looks keys up; neither is traffic.
    let (_, body) = cp.create(json!({"name": "admin-2", "role": "admin"})).await;
    let admin2 = body["apiKey"].as_str().unwrap().to_owned();
    assert_eq!(
        cp.get("/api/v1/keys/list", Some(&admin2)).await.0,
        StatusCode::OK
    );
    assert_eq!(cp.verify(&admin2).await, StatusCode::FORBIDDEN);
    for bad in [json!("legacy"), json!("root"), json!("Admin"), json!(1)] {
        let (status, body) = cp.create(json!({"name": "bad-role", "role": bad})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert_eq!(body["error"], "bad_request");
    }
    // A roll keeps the role.
    let (_, rolled) = cp.post("/api/v1/keys/admin-2/roll", None).await;
    assert_eq!(rolled["role"], "admin");
    let new_secret = rolled["apiKey"].as_str().unwrap();
    assert_eq!(
        cp.get("/api/v1/keys/list", Some(new_secret)).await.0,
        StatusCode::OK
    );
    // The create is audited with the role.
    let (_, _, page) = cp.get("/api/v1/audit?limit=100", Some(&cp.admin_key)).await;
    let page: Value = serde_json::from_str(&page).unwrap();
    let created = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "key.create" && e["target"] == "new-edge")
        .unwrap();
    assert_eq!(created["detail"]["role"], "edge");
    assert_eq!(created["actor"], "admin");
    // The CLI shows roles.
    let table = cp.cli(&["keys", "list"]).unwrap();
    let header = table.lines().next().unwrap();
    assert!(header.contains("ROLE"), "{table}");
    let row = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some("new-edge"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(row.split_whitespace().any(|w| w == "edge"), "{row}");
    assert!(cp
        .cli(&["keys", "create", "--name", "x", "--role", "legacy"])
        .is_err());
    let err = cp
        .cli(&["keys", "set-role", "new-edge", "admin"])
        .unwrap_err();
    assert!(err.contains("set once"), "{err}");
    // Plain http:// to another host: warned about (here the host does not even resolve).
    let env = vec![
        ("METLO_API_KEY".to_owned(), cp.admin_key.clone()),
        (
            "METLO_URL".to_owned(),
            "http://metlo-control-plane.invalid".to_owned(),
        ),
    ];
    let log = tempfile::NamedTempFile::new().unwrap();
    let err = metlo_tests::run_cli(&env, &["keys", "list"], log.path()).unwrap_err();
    assert!(
        err.contains("warning:") && err.contains("plain http://"),
        "{err}"
    );
    let env = vec![
        ("METLO_API_KEY".to_owned(), cp.admin_key.clone()),
        ("METLO_URL".to_owned(), cp.url.clone()),
    ];
    let out = metlo_tests::run_cli(&env, &["keys", "list"], log.path()).unwrap();
    assert!(out.contains("new-edge"));
    let stderr = std::fs::read_to_string(log.path()).unwrap();
    assert_eq!(
        stderr.matches("warning:").count(),
        1,
        "no warning for loopback: {stderr}"
    );
}

async fn the_last_admin_key_stays(backend: Backend) {
    let cp = ControlPlane::start(backend).await;
    let (status, body) = cp.delete("admin", Some(&cp.admin_key)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("last admin key"),
        "{body}"
    );
    assert_eq!(
        cp.get("/api/v1/keys/list", Some(&cp.admin_key)).await.0,
        StatusCode::OK
    );
    // With a second admin, the first can go — and then the second is the last.
    let (_, body) = cp.create(json!({"name": "admin-2", "role": "admin"})).await;
    let admin2 = body["apiKey"].as_str().unwrap().to_owned();
    assert_eq!(cp.delete("admin", Some(&admin2)).await.0, StatusCode::OK);
    assert_eq!(
        cp.delete("admin-2", Some(&admin2)).await.0,
        StatusCode::BAD_REQUEST
    );
    // Two admins deleting each other at once: one wins, one admin key is left.
    let (_, body) = cp
        .create_as(&admin2, json!({"name": "admin-3", "role": "admin"}))
        .await;
    let admin3 = body["apiKey"].as_str().unwrap().to_owned();
    let (a, b) = tokio::join!(
        cp.delete("admin-3", Some(&admin2)),
        cp.delete("admin-2", Some(&admin3))
    );
    let oks = [a.0, b.0].iter().filter(|s| **s == StatusCode::OK).count();
    assert_eq!(oks, 1, "{a:?} {b:?}");
    let admins = cp.cli(&["keys", "list"]).unwrap();
    assert_eq!(
        admins.lines().filter(|l| l.contains(" admin ")).count(),
        1,
        "{admins}"
    );
    // The CLI on the database may delete the last one.
    let last = if a.0 == StatusCode::OK {
        "admin-2"
    } else {
        "admin-3"
    };
    cp.cli(&["keys", "delete", last]).unwrap();
}

async fn names_that_could_impersonate_are_refused(backend: Backend) {
    let cp = ControlPlane::start(backend).await;
    for (name, why) in [
        ("admin\u{202e}", "format"),
        ("ad\u{200b}min", "format"),
        ("\u{feff}admin", "format"),
        ("\u{2066}x\u{2069}", "format"),
        (" admin", "whitespace"),
        ("admin ", "whitespace"),
        ("admin\u{a0}", "whitespace"),
        ("by-hash", "path"),
    ] {
        let (status, body) = cp.create(json!({"name": name})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{name:?}: {body}");
        assert!(
            body["message"].as_str().unwrap().contains(why),
            "{name:?}: {body}"
        );
    }
    // Names are stored in NFC: "é" typed decomposed is the same name as precomposed.
    let decomposed = "caf\u{65}\u{301}";
    let precomposed = "caf\u{e9}";
    let (status, body) = cp.create(json!({"name": decomposed})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["name"], precomposed);
    let (status, body) = cp.create(json!({"name": precomposed})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["message"].as_str().unwrap().contains("already exists"));
    // Deleting by either spelling finds it.
    assert_eq!(
        cp.delete(decomposed, Some(&cp.admin_key)).await.0,
        StatusCode::OK
    );
    assert_eq!(
        cp.delete(precomposed, Some(&cp.admin_key)).await.0,
        StatusCode::NOT_FOUND
    );
    // Names that are route words elsewhere still work end to end.
    for name in ["create", "list", "onboarding", "verify", "roll", "delete"] {
        cp.create_key(name, "GENERIC").await;
        let (status, body) = cp.delete(name, Some(&cp.admin_key)).await;
        assert_eq!(status, StatusCode::OK, "{name}: {body}");
    }
}

async fn ops_routes_are_off_the_api_port(backend: Backend) {
    let cp = ControlPlane::start(backend).await;
    assert_eq!(cp.get("/healthz", None).await.0, StatusCode::OK);
    for path in ["/readyz", "/metrics"] {
        assert_eq!(
            cp.get(path, None).await.0,
            StatusCode::NOT_FOUND,
            "{path} on the API port"
        );
        assert_eq!(
            cp.ops_get(path).await.0,
            StatusCode::OK,
            "{path} on the ops port"
        );
    }
    assert_eq!(cp.ops_get("/healthz").await.0, StatusCode::OK);
    assert!(cp.ops_url.starts_with("http://127.0.0.1:"));
    let (_, _, doc) = cp.get("/openapi.json", None).await;
    let doc: Value = serde_json::from_str(&doc).unwrap();
    assert!(doc["paths"].get("/readyz").is_none());
    assert_eq!(
        doc["paths"]["/api/v1/keys/create"]["post"]["security"][0]["api_key"],
        json!(["admin"])
    );
    assert_eq!(
        doc["paths"]["/api/v1/verify"]["get"]["security"][0]["api_key"],
        json!(["client"])
    );
    assert!(doc["components"]["schemas"]["Role"].is_object());
}
