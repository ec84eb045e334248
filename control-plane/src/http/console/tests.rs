//! The console's HTTP rules, in process on both backends (moved from
//! `tests/tests/console.rs`; the whole console in Chromium stays there): page headers,
//! the session cookie, a session acting as its admin key until idle, sign-out or its key
//! disabled, CSRF and origin checks, Secure cookies, failed sign-ins audited and limited;
//! a roll (overlap or not), delete or disable of its key ends a session for good; a new
//! admin or edge secret (created or rolled) from a session needs the session's key again.

use std::time::Duration;

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};

use crate::db::Backend;
use crate::test_util::{on_both_backends, Caller, Reply, TestApp};

on_both_backends!(
    a_session_acts_as_its_admin_key_until_it_ends,
    changes_need_the_csrf_token_and_this_origin,
    failed_sign_ins_are_audited_and_limited,
    a_session_ends_when_its_key_is_rolled_deleted_disabled_or_expires,
    unknown_cookies_spend_the_source_budget,
    signing_a_key_out_everywhere_ends_only_its_sessions,
    a_new_admin_or_edge_secret_from_a_session_needs_the_key_again,
);

/// The authority the requests are addressed to (`Host`), and this origin.
const HOST: &str = "127.0.0.1:8080";
const ORIGIN: &str = "http://127.0.0.1:8080";

/// A browser on this origin's pages: no key, the `Host` header.
fn browser(app: &TestApp) -> Caller<'_> {
    app.anonymous().header("host", HOST)
}

async fn sign_in(app: &TestApp, key: &str) -> Reply {
    browser(app)
        .post("/console/sign-in", json!({ "key": key }))
        .await
}

/// A signed-in session: its cookie (`name=value`) and CSRF token.
struct Session {
    cookie: String,
    csrf: String,
}

fn session_of(reply: &Reply) -> Session {
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let set = reply.header("set-cookie").unwrap();
    Session {
        cookie: set.split(';').next().unwrap().to_owned(),
        csrf: reply.json()["csrfToken"].as_str().unwrap().to_owned(),
    }
}

impl Session {
    fn caller<'a>(&self, app: &'a TestApp) -> Caller<'a> {
        browser(app).header("cookie", &self.cookie)
    }

    async fn get(&self, app: &TestApp, path: &str) -> Reply {
        self.caller(app).get(path).await
    }

    async fn create(&self, app: &TestApp, name: &str, csrf: Option<&str>) -> Reply {
        let mut caller = self.caller(app);
        if let Some(csrf) = csrf {
            caller = caller.header("x-csrf-token", csrf);
        }
        caller
            .post("/console/api/v1/keys/create", json!({ "name": name }))
            .await
    }
}

async fn a_session_acts_as_its_admin_key_until_it_ends(backend: Backend) {
    let app = TestApp::on(backend)
        .env("CONSOLE_IDLE_TIMEOUT", "3s")
        .build()
        .await;
    // Pages and files carry the policy: no inline script, no framing, nothing elsewhere.
    for path in [
        "/console",
        "/console/keys",
        "/console/sign-in",
        "/console/identities",
        "/console/identities/acme",
        "/console/assets/app.js",
        "/console/assets/identities.js",
    ] {
        let page = browser(&app).get(path).await;
        assert_eq!(page.status, StatusCode::OK, "{path}");
        let csp = page.header("content-security-policy").unwrap();
        assert!(
            csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
            "{csp}"
        );
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert_eq!(page.header("x-frame-options"), Some("DENY"));
        assert_eq!(page.header("x-content-type-options"), Some("nosniff"));
    }
    let html = browser(&app).get("/console").await.text;
    assert!(
        !html.contains("<script>") && !html.contains("style="),
        "nothing inline"
    );
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no other origin"
    );
    let missing = browser(&app).get("/console/assets/x.js").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);

    let signed = sign_in(&app, &app.admin_key).await;
    let cookie = signed.header("set-cookie").unwrap().to_owned();
    for part in ["Path=/console", "HttpOnly", "SameSite=Strict"] {
        assert!(cookie.contains(part), "{cookie}");
    }
    assert!(
        !cookie.contains("Secure"),
        "plain HTTP, no CONSOLE_SECURE_COOKIE: {cookie}"
    );
    assert!(
        !cookie.contains(&app.admin_key),
        "the key is not the cookie"
    );
    assert_eq!(signed.json()["name"], "admin");
    assert_eq!(signed.json()["idleTimeoutSeconds"], 3);
    let s = session_of(&signed);

    // The session reads and changes keys as its admin key; the audit log names it.
    let me = s.get(&app, "/console/session").await;
    assert_eq!(me.json()["csrfToken"], s.csrf.as_str());
    let made = s.create(&app, "from-console", Some(&s.csrf)).await;
    assert_eq!(made.status, StatusCode::OK, "{}", made.text);
    let key = made.json()["apiKey"].as_str().unwrap().to_owned();
    assert_eq!(
        app.with_key(&key).get("/api/v1/verify").await.status,
        StatusCode::OK
    );
    let audit = s
        .get(&app, "/console/api/v1/audit?action=key.create&actor=admin")
        .await
        .json();
    let entries = audit["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{audit}");
    assert_eq!(entries[0]["target"], "from-console");
    let signed_in = s
        .get(&app, "/console/api/v1/audit?action=console.sign_in")
        .await
        .json();
    assert_eq!(signed_in["entries"][0]["actor"], "admin");

    // The cookie is the console's only: the public API still wants a key.
    let api = s.caller(&app).get("/api/v1/keys/list").await;
    assert_eq!(api.status, StatusCode::UNAUTHORIZED);

    // Idle past CONSOLE_IDLE_TIMEOUT (3 s), on the moved clock: ended.
    app.advance(Duration::from_millis(3_500));
    let idle = s.get(&app, "/console/api/v1/keys/list").await;
    assert_eq!(idle.status, StatusCode::UNAUTHORIZED, "{}", idle.text);

    // Sign-out ends the session for good and clears the cookie.
    let s = session_of(&sign_in(&app, &app.admin_key).await);
    let out = s
        .caller(&app)
        .header("x-csrf-token", &s.csrf)
        .send(Method::POST, "/console/sign-out", None)
        .await;
    assert_eq!(out.status, StatusCode::OK, "{}", out.text);
    assert!(out.header("set-cookie").unwrap().contains("Max-Age=0"));
    let after = s.get(&app, "/console/session").await;
    assert_eq!(after.status, StatusCode::UNAUTHORIZED);

    // A session ends with its key: disabling the admin key it acts as signs it out.
    let second = app
        .as_admin()
        .post(
            "/api/v1/keys/create",
            json!({"name": "second-admin", "role": "admin"}),
        )
        .await;
    assert_eq!(second.status, StatusCode::OK);
    let second_key = second.json()["apiKey"].as_str().unwrap().to_owned();
    let s = session_of(&sign_in(&app, &second_key).await);
    assert_eq!(s.get(&app, "/console/session").await.status, StatusCode::OK);
    let reply = app
        .as_admin()
        .patch("/api/v1/keys/second-admin", json!({"enabled": false}))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let gone = s.get(&app, "/console/session").await;
    assert_eq!(gone.status, StatusCode::UNAUTHORIZED, "{}", gone.text);
    let again = sign_in(&app, &second_key).await;
    assert_eq!(
        again.status,
        StatusCode::UNAUTHORIZED,
        "a disabled key cannot sign in"
    );
}

async fn create_victim(caller: Caller<'_>) -> Reply {
    caller
        .post(
            "/console/api/v1/keys/create",
            json!({"name": "csrf-victim"}),
        )
        .await
}

/// A sign-in through a proxy that names another host (trusted or not).
async fn forwarded(app: &TestApp) -> Reply {
    browser(app)
        .header("origin", "https://keys.example.com")
        .header("x-forwarded-host", "keys.example.com")
        .post("/console/sign-in", json!({ "key": app.admin_key }))
        .await
}

async fn changes_need_the_csrf_token_and_this_origin(backend: Backend) {
    let app = TestApp::on(backend).build().await;
    let s = session_of(&sign_in(&app, &app.admin_key).await);
    for (csrf, what) in [(None, "no token"), (Some("wrong"), "a wrong token")] {
        let reply = s.create(&app, "csrf-victim", csrf).await;
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{what}: {}",
            reply.text
        );
    }
    // The right token, sent from another site (what a browser says of a cross-site post).
    let with_token = || s.caller(&app).header("x-csrf-token", &s.csrf);
    let cross = create_victim(with_token().header("origin", "http://attacker.example")).await;
    assert_eq!(cross.status, StatusCode::FORBIDDEN, "{}", cross.text);
    let same_site = create_victim(with_token().header("sec-fetch-site", "same-site")).await;
    assert_eq!(
        same_site.status,
        StatusCode::FORBIDDEN,
        "{}",
        same_site.text
    );
    assert!(
        !app.list().await.iter().any(|k| k["name"] == "csrf-victim"),
        "nothing was created"
    );
    // A sign-in from another site is refused too (no login CSRF).
    let cross_sign_in = browser(&app)
        .header("origin", "http://attacker.example")
        .post("/console/sign-in", json!({"key": app.admin_key}))
        .await;
    assert_eq!(cross_sign_in.status, StatusCode::FORBIDDEN);
    // Reads need no token; the right token from this origin changes.
    let ok = with_token()
        .header("origin", ORIGIN)
        .header("sec-fetch-site", "same-origin")
        .post("/console/api/v1/keys/create", json!({"name": "made-here"}))
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text);
    // A page served over TLS (its Origin says https) gets a Secure cookie.
    let tls_page = browser(&app)
        .header("origin", &format!("https://{HOST}"))
        .post("/console/sign-in", json!({"key": app.admin_key}))
        .await;
    assert_eq!(tls_page.status, StatusCode::OK, "{}", tls_page.text);
    assert!(tls_page.header("set-cookie").unwrap().contains("; Secure"));
    // A proxy's X-Forwarded-Host counts only from a trusted proxy.
    assert_eq!(forwarded(&app).await.status, StatusCode::FORBIDDEN);
    // Secure cookies: configured, or a trusted proxy saying the client came over TLS.
    let secure = TestApp::on(backend)
        .env("CONSOLE_SECURE_COOKIE", "true")
        .build()
        .await;
    let set = sign_in(&secure, &secure.admin_key).await;
    assert!(set.header("set-cookie").unwrap().contains("; Secure"));
    let proxied = TestApp::on(backend)
        .env("TRUSTED_PROXIES", "127.0.0.1")
        .build()
        .await;
    let via_tls = browser(&proxied)
        .header("x-forwarded-proto", "https")
        .post("/console/sign-in", json!({"key": proxied.admin_key}))
        .await;
    assert!(via_tls.header("set-cookie").unwrap().contains("; Secure"));
    let behind_proxy = forwarded(&proxied).await;
    assert_eq!(behind_proxy.status, StatusCode::OK, "{}", behind_proxy.text);
}

async fn failed_sign_ins_are_audited_and_limited(backend: Backend) {
    let app = TestApp::on(backend)
        .env("AUTH_FAILURES_PER_MINUTE", "4")
        .build()
        .await;
    // The admin key is used once first: a key known valid keeps working from a source
    // past its failure budget (below, to read the audit log).
    assert_eq!(
        app.as_admin().get("/api/v1/audit").await.status,
        StatusCode::OK
    );
    // A client key is valid but may not sign in: 403, and counted.
    let client = sign_in(&app, &app.client_key).await;
    assert_eq!(client.status, StatusCode::FORBIDDEN, "{}", client.text);
    assert!(client.json()["message"]
        .as_str()
        .unwrap()
        .contains("only an admin key"));
    assert!(client.header("set-cookie").is_none());
    let garbage = sign_in(&app, "not a key").await;
    assert_eq!(garbage.status, StatusCode::UNAUTHORIZED, "{}", garbage.text);
    let made_up = metlo_shared::ApiKey::generate().unwrap();
    let unknown = sign_in(&app, made_up.expose_secret()).await;
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
    let empty = sign_in(&app, "").await;
    assert_eq!(empty.status, StatusCode::UNAUTHORIZED);
    // The budget (4 a minute) is spent: the next new key is not even looked up.
    let another = metlo_shared::ApiKey::generate().unwrap();
    let limited = sign_in(&app, another.expose_secret()).await;
    assert_eq!(
        limited.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        limited.text
    );
    assert!(limited.header("retry-after").is_some());
    // Each failure is in the audit log, with its reason and the sign-in route.
    app.flush().await;
    let page = app
        .as_admin()
        .get("/api/v1/audit?action=auth.failed")
        .await
        .json();
    let reasons: Vec<String> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["detail"]["route"] == "/console/sign-in")
        .filter_map(|e| e["detail"]["reason"].as_str().map(str::to_owned))
        .collect();
    for reason in ["forbidden", "malformed", "invalid", "missing"] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "{reason} not audited: {page}"
        );
    }
    // The refusal past the budget has no row of its own: the minute's summary counts it.
    assert!(!reasons.iter().any(|r| r == "limited"), "{page}");
    app.advance(std::time::Duration::from_secs(60));
    app.flush().await;
    let page = app
        .as_admin()
        .get("/api/v1/audit?action=auth.failed")
        .await
        .json();
    let summary = &page["entries"][0]["detail"];
    assert_eq!(summary["reason"], "not itemised", "{page}");
    assert_eq!(summary["pastBudget"], 1, "{page}");
    let texts: Vec<&Value> = vec![&page];
    for t in texts {
        let t = t.to_string();
        assert!(!t.contains(made_up.expose_secret()) && !t.contains(another.expose_secret()));
    }
}

/// A session never outlives a change of its key's secret: a roll ends it even while the
/// old secret is still in its overlap (a stolen cookie must not outlive the roll that
/// answers the theft), a disable ends it even if the key is enabled again, and so does an
/// expiry even if the key is given a later one.
async fn a_session_ends_when_its_key_is_rolled_deleted_disabled_or_expires(backend: Backend) {
    let app = TestApp::on(backend).build().await;
    let admin = app.admin_key.clone();
    let signed_in = |name: &'static str| {
        let app = &app;
        async move {
            let (status, made) = app.create(json!({"name": name, "role": "admin"})).await;
            assert_eq!(status, StatusCode::OK, "{made}");
            let key = made["apiKey"].as_str().unwrap().to_owned();
            let s = session_of(&sign_in(app, &key).await);
            assert_eq!(s.get(app, "/console/session").await.status, StatusCode::OK);
            (key, s)
        }
    };

    let (old, s) = signed_in("rolled").await;
    let (status, body) = app
        .roll("rolled", Some(json!({"overlapSeconds": 3600})))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        app.with_key(&old).get("/api/v1/keys/list").await.status,
        StatusCode::OK,
        "the old secret is in its overlap"
    );
    let ended = s.get(&app, "/console/session").await;
    assert_eq!(ended.status, StatusCode::UNAUTHORIZED, "{}", ended.text);

    let (_, s) = signed_in("disabled").await;
    assert_eq!(
        app.patch("disabled", json!({"enabled": false})).await.0,
        StatusCode::OK
    );
    assert_eq!(
        app.patch("disabled", json!({"enabled": true})).await.0,
        StatusCode::OK
    );
    let ended = s.get(&app, "/console/session").await;
    assert_eq!(ended.status, StatusCode::UNAUTHORIZED, "{}", ended.text);

    let (_, s) = signed_in("deleted").await;
    assert_eq!(app.delete("deleted", Some(&admin)).await.0, StatusCode::OK);
    let ended = s.get(&app, "/console/session").await;
    assert_eq!(ended.status, StatusCode::UNAUTHORIZED, "{}", ended.text);

    // Expiry: the session ends with its key, and stays ended when the key is extended.
    let (_, s) = signed_in("expiring").await;
    let soon = crate::clock::iso8601((crate::clock::now_ms() / 1000 + 120) * 1000);
    let (status, body) = app.patch("expiring", json!({ "expiresAt": soon })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(s.get(&app, "/console/session").await.status, StatusCode::OK);
    // Not used while its key is expired: extending the key must not bring it back.
    app.advance(Duration::from_secs(121));
    let (status, body) = app.patch("expiring", json!({ "expiresAt": null })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let still = s.get(&app, "/console/session").await;
    assert_eq!(still.status, StatusCode::UNAUTHORIZED, "{}", still.text);
}

/// A made-up session cookie costs a lookup only within the source's failed-authentication
/// budget, like a made-up key: past it, 429 before any lookup; a session in use from the
/// same source goes on, and other sources are untouched.
async fn unknown_cookies_spend_the_source_budget(backend: Backend) {
    let app = TestApp::on(backend)
        .env("AUTH_FAILURES_PER_MINUTE", 3)
        .build()
        .await;
    let s = session_of(&sign_in(&app, &app.admin_key).await);
    assert_eq!(s.get(&app, "/console/session").await.status, StatusCode::OK);
    let junk = |i: usize| format!("metlo_console=made-up-{i}");
    for i in 0..3 {
        let reply = browser(&app)
            .header("cookie", &junk(i))
            .get("/console/session")
            .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text);
    }
    for i in [3, 0] {
        let reply = browser(&app)
            .header("cookie", &junk(i))
            .get("/console/session")
            .await;
        assert_eq!(
            reply.status,
            StatusCode::TOO_MANY_REQUESTS,
            "{}",
            reply.text
        );
    }
    assert_eq!(
        s.get(&app, "/console/session").await.status,
        StatusCode::OK,
        "a session in use is not locked out by its neighbours"
    );
    let other = browser(&app)
        .peer("198.51.100.7:5000")
        .header("cookie", &junk(9))
        .get("/console/session")
        .await;
    assert_eq!(other.status, StatusCode::UNAUTHORIZED);
    app.flush().await;
    let failures = app
        .as_admin()
        .get("/api/v1/audit?action=auth.failed")
        .await
        .json();
    assert!(
        !failures["entries"].as_array().unwrap().is_empty(),
        "audited: {failures}"
    );
}

/// "Sign out everywhere" for a key (`DELETE /api/v1/keys/{name}/sessions`, and the same
/// from the console): every session opened with it ends, others go on, the key itself
/// keeps working, and it is audited.
async fn signing_a_key_out_everywhere_ends_only_its_sessions(backend: Backend) {
    let app = TestApp::on(backend).build().await;
    let (status, made) = app.create(json!({"name": "ops", "role": "admin"})).await;
    assert_eq!(status, StatusCode::OK, "{made}");
    let ops = made["apiKey"].as_str().unwrap().to_owned();
    let first = session_of(&sign_in(&app, &ops).await);
    let second = session_of(&sign_in(&app, &ops).await);
    let other = session_of(&sign_in(&app, &app.admin_key).await);

    let reply = app.as_admin().delete("/api/v1/keys/ops/sessions").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.json()["ended"], 2);
    for s in [&first, &second] {
        let ended = s.get(&app, "/console/session").await;
        assert_eq!(ended.status, StatusCode::UNAUTHORIZED, "{}", ended.text);
    }
    assert_eq!(
        other.get(&app, "/console/session").await.status,
        StatusCode::OK
    );
    assert_eq!(
        app.with_key(&ops).get("/api/v1/keys/list").await.status,
        StatusCode::OK,
        "the key itself keeps working"
    );
    let audit = app
        .as_admin()
        .get("/api/v1/audit?action=key.sessions_end")
        .await
        .json();
    assert_eq!(audit["entries"][0]["target"], "ops", "{audit}");
    // From the console too (the admin routes are there with the session's CSRF token).
    let mine = other
        .caller(&app)
        .header("x-csrf-token", &other.csrf)
        .header("origin", ORIGIN)
        .delete("/console/api/v1/keys/admin/sessions")
        .await;
    assert_eq!(mine.status, StatusCode::OK, "{}", mine.text);
    assert_eq!(mine.json()["ended"], 1);
    let reply = app.as_admin().delete("/api/v1/keys/nope/sessions").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.text);
}

/// A stolen cookie alone must not mint a lasting secret with power: creating an admin or
/// edge key, or rolling one (the roll hands out its new secret), from a session needs the
/// session's own key again in `X-Metlo-Confirm-Key`. Client keys, and any request made
/// with an API key, do not.
async fn a_new_admin_or_edge_secret_from_a_session_needs_the_key_again(backend: Backend) {
    let app = TestApp::on(backend).build().await;
    let s = session_of(&sign_in(&app, &app.admin_key).await);
    let (status, made) = app
        .create(json!({"name": "second-admin", "role": "admin"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{made}");
    let another_admin = made["apiKey"].as_str().unwrap().to_owned();
    let refused = |reply: &Reply, what: &str| {
        reply.assert_error(StatusCode::FORBIDDEN, "forbidden", what);
        assert!(
            reply.text.contains("needs your admin key again"),
            "{}",
            reply.text
        );
    };
    let send = |method: Method, path: &str, body: Value, confirm: Option<&str>| {
        let mut caller = s
            .caller(&app)
            .header("x-csrf-token", &s.csrf)
            .header("origin", ORIGIN);
        if let Some(key) = confirm {
            caller = caller.header("x-metlo-confirm-key", key);
        }
        let path = path.to_owned();
        async move { caller.send(method, &path, Some(body)).await }
    };
    let create = |name: &str, role: &str| json!({ "name": name, "role": role });
    for role in ["admin", "edge"] {
        for confirm in [None, Some("garbage"), Some(another_admin.as_str())] {
            let reply = send(
                Method::POST,
                "/console/api/v1/keys/create",
                create("minted", role),
                confirm,
            )
            .await;
            refused(&reply, &format!("{role} with {confirm:?}"));
        }
        let reply = send(
            Method::POST,
            "/console/api/v1/keys/create",
            create(&format!("minted-{role}"), role),
            Some(&app.admin_key),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    }
    assert!(!app.list().await.iter().any(|k| k["name"] == "minted"));
    // A client key needs nothing more.
    let reply = send(
        Method::POST,
        "/console/api/v1/keys/create",
        create("a-client", "client"),
        None,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    // Rolls: an admin key's new secret needs the key again, a client key's does not.
    let roll = |name: &str| format!("/console/api/v1/keys/{name}/roll");
    let reply = send(Method::POST, &roll("second-admin"), json!({}), None).await;
    refused(&reply, "an admin key's roll");
    let reply = send(
        Method::POST,
        &roll("second-admin"),
        json!({}),
        Some(&app.admin_key),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let reply = send(Method::POST, &roll("a-client"), json!({}), None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    // The API, with an admin key, is unchanged.
    let (status, body) = app
        .create(json!({"name": "api-admin", "role": "admin"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}
