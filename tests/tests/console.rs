//! The admin console: its session, CSRF and header rules through HTTP on both stores, and
//! the whole console in real headless Chromium against the whole system (the created key
//! used through `wrangler dev`, deleted → 401 there, its usage on the chart).

use std::time::{Duration, Instant};

use metlo_tests::browser::Browser;
use metlo_tests::{on_both_backends, Backend, ControlPlane, Stack, StackBuilder, StatusCode};
use reqwest::header::{HeaderMap, COOKIE, SET_COOKIE};
use serde_json::{json, Value};

on_both_backends!(
    a_session_acts_as_its_admin_key_until_it_ends,
    changes_need_the_csrf_token_and_this_origin,
    failed_sign_ins_are_audited_and_limited,
);

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

async fn send(req: reqwest::RequestBuilder) -> Answer {
    let r = req.send().await.unwrap();
    let (status, headers) = (r.status(), r.headers().clone());
    let text = r.text().await.unwrap();
    Answer {
        status,
        headers,
        body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
    }
}

async fn sign_in(cp: &ControlPlane, key: &str) -> Answer {
    send(
        cp.client
            .post(format!("{}/console/sign-in", cp.url))
            .json(&json!({ "key": key })),
    )
    .await
}

/// A signed-in session: its cookie (`name=value`) and CSRF token.
struct Session {
    cookie: String,
    csrf: String,
}

fn session_of(a: &Answer) -> Session {
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let set = a.headers[SET_COOKIE].to_str().unwrap();
    Session {
        cookie: set.split(';').next().unwrap().to_owned(),
        csrf: a.body["csrfToken"].as_str().unwrap().to_owned(),
    }
}

async fn console_get(cp: &ControlPlane, s: &Session, path: &str) -> Answer {
    send(
        cp.client
            .get(format!("{}{path}", cp.url))
            .header(COOKIE, &s.cookie),
    )
    .await
}

async fn console_create(cp: &ControlPlane, s: &Session, name: &str, csrf: Option<&str>) -> Answer {
    let mut req = cp
        .client
        .post(format!("{}/console/api/v1/keys/create", cp.url))
        .header(COOKIE, &s.cookie)
        .json(&json!({ "name": name }));
    if let Some(csrf) = csrf {
        req = req.header("x-csrf-token", csrf);
    }
    send(req).await
}

async fn a_session_acts_as_its_admin_key_until_it_ends(backend: Backend) {
    let cp = ControlPlane::start_with(StackBuilder::new(backend).env("CONSOLE_IDLE_TIMEOUT", "3s"))
        .await;
    // Pages and files carry the policy: no inline script, no framing, nothing elsewhere.
    for path in [
        "/console",
        "/console/keys",
        "/console/sign-in",
        "/console/assets/app.js",
    ] {
        let a = send(cp.client.get(format!("{}{path}", cp.url))).await;
        assert_eq!(a.status, StatusCode::OK, "{path}");
        let csp = a.headers["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
            "{csp}"
        );
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert_eq!(a.headers["x-frame-options"], "DENY");
        assert_eq!(a.headers["x-content-type-options"], "nosniff");
    }
    let html = send(cp.client.get(format!("{}/console", cp.url))).await;
    let html = html.body.as_str().unwrap().to_owned();
    assert!(
        !html.contains("<script>") && !html.contains("style="),
        "nothing inline"
    );
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no other origin"
    );
    let missing = send(cp.client.get(format!("{}/console/assets/x.js", cp.url))).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);

    let signed = sign_in(&cp, &cp.admin_key).await;
    let cookie = signed.headers[SET_COOKIE].to_str().unwrap().to_owned();
    for part in ["Path=/console", "HttpOnly", "SameSite=Strict"] {
        assert!(cookie.contains(part), "{cookie}");
    }
    assert!(
        !cookie.contains("Secure"),
        "plain HTTP, no CONSOLE_SECURE_COOKIE: {cookie}"
    );
    assert!(!cookie.contains(&cp.admin_key), "the key is not the cookie");
    assert_eq!(signed.body["name"], "admin");
    assert_eq!(signed.body["idleTimeoutSeconds"], 3);
    let s = session_of(&signed);

    // The session reads and changes keys as its admin key; the audit log names it.
    let me = console_get(&cp, &s, "/console/session").await;
    assert_eq!(me.body["csrfToken"], s.csrf.as_str());
    let made = console_create(&cp, &s, "from-console", Some(&s.csrf)).await;
    assert_eq!(made.status, StatusCode::OK, "{}", made.body);
    let key = made.body["apiKey"].as_str().unwrap().to_owned();
    cp.secrets.lock().unwrap().push(key.clone());
    assert_eq!(cp.verify(&key).await, StatusCode::OK);
    let audit = console_get(
        &cp,
        &s,
        "/console/api/v1/audit?action=key.create&actor=admin",
    )
    .await;
    let entries = audit.body["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{}", audit.body);
    assert_eq!(entries[0]["target"], "from-console");
    let signed_in = console_get(&cp, &s, "/console/api/v1/audit?action=console.sign_in").await;
    assert_eq!(signed_in.body["entries"][0]["actor"], "admin");

    // The cookie is the console's only: the public API still wants a key.
    let api = send(
        cp.client
            .get(format!("{}/api/v1/keys/list", cp.url))
            .header(COOKIE, &s.cookie),
    )
    .await;
    assert_eq!(api.status, StatusCode::UNAUTHORIZED);

    // Idle past CONSOLE_IDLE_TIMEOUT (3 s): ended.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let idle = console_get(&cp, &s, "/console/api/v1/keys/list").await;
    assert_eq!(idle.status, StatusCode::UNAUTHORIZED, "{}", idle.body);

    // Sign-out ends the session for good and clears the cookie.
    let s = session_of(&sign_in(&cp, &cp.admin_key).await);
    let out = send(
        cp.client
            .post(format!("{}/console/sign-out", cp.url))
            .header(COOKIE, &s.cookie)
            .header("x-csrf-token", &s.csrf),
    )
    .await;
    assert_eq!(out.status, StatusCode::OK, "{}", out.body);
    assert!(out.headers[SET_COOKIE]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    let after = console_get(&cp, &s, "/console/session").await;
    assert_eq!(after.status, StatusCode::UNAUTHORIZED);

    // A session ends with its key: disabling the admin key it acts as signs it out.
    let (status, second) = cp
        .create(json!({"name": "second-admin", "role": "admin"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let second_key = second["apiKey"].as_str().unwrap().to_owned();
    let s = session_of(&sign_in(&cp, &second_key).await);
    assert_eq!(
        console_get(&cp, &s, "/console/session").await.status,
        StatusCode::OK
    );
    let (status, body) = cp.patch("second-admin", json!({"enabled": false})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let gone = console_get(&cp, &s, "/console/session").await;
    assert_eq!(gone.status, StatusCode::UNAUTHORIZED, "{}", gone.body);
    let again = sign_in(&cp, &second_key).await;
    assert_eq!(
        again.status,
        StatusCode::UNAUTHORIZED,
        "a disabled key cannot sign in"
    );
}

async fn changes_need_the_csrf_token_and_this_origin(backend: Backend) {
    let cp = ControlPlane::start(backend).await;
    let s = session_of(&sign_in(&cp, &cp.admin_key).await);
    for (csrf, what) in [(None, "no token"), (Some("wrong"), "a wrong token")] {
        let a = console_create(&cp, &s, "csrf-victim", csrf).await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{what}: {}", a.body);
    }
    // The right token, sent from another site (what a browser says of a cross-site post).
    let cross = send(
        cp.client
            .post(format!("{}/console/api/v1/keys/create", cp.url))
            .header(COOKIE, &s.cookie)
            .header("x-csrf-token", &s.csrf)
            .header("origin", "http://attacker.example")
            .json(&json!({"name": "csrf-victim"})),
    )
    .await;
    assert_eq!(cross.status, StatusCode::FORBIDDEN, "{}", cross.body);
    let same_site = send(
        cp.client
            .post(format!("{}/console/api/v1/keys/create", cp.url))
            .header(COOKIE, &s.cookie)
            .header("x-csrf-token", &s.csrf)
            .header("sec-fetch-site", "same-site")
            .json(&json!({"name": "csrf-victim"})),
    )
    .await;
    assert_eq!(
        same_site.status,
        StatusCode::FORBIDDEN,
        "{}",
        same_site.body
    );
    assert!(
        !cp.list().await.iter().any(|k| k["name"] == "csrf-victim"),
        "nothing was created"
    );
    // A sign-in from another site is refused too (no login CSRF).
    let cross_sign_in = send(
        cp.client
            .post(format!("{}/console/sign-in", cp.url))
            .header("origin", "http://attacker.example")
            .json(&json!({"key": cp.admin_key})),
    )
    .await;
    assert_eq!(cross_sign_in.status, StatusCode::FORBIDDEN);
    // Reads need no token; the right token from this origin changes.
    let origin = cp.url.clone();
    let ok = send(
        cp.client
            .post(format!("{}/console/api/v1/keys/create", cp.url))
            .header(COOKIE, &s.cookie)
            .header("x-csrf-token", &s.csrf)
            .header("origin", origin)
            .header("sec-fetch-site", "same-origin")
            .json(&json!({"name": "made-here"})),
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
    cp.secrets
        .lock()
        .unwrap()
        .push(ok.body["apiKey"].as_str().unwrap().to_owned());
    // A page served over TLS (its Origin says https) gets a Secure cookie.
    let host = cp.url.trim_start_matches("http://").to_owned();
    let tls_page = send(
        cp.client
            .post(format!("{}/console/sign-in", cp.url))
            .header("origin", format!("https://{host}"))
            .json(&json!({"key": cp.admin_key})),
    )
    .await;
    assert_eq!(tls_page.status, StatusCode::OK, "{}", tls_page.body);
    assert!(tls_page.headers[SET_COOKIE]
        .to_str()
        .unwrap()
        .contains("; Secure"));
    // A proxy's X-Forwarded-Host counts only from a trusted proxy.
    let forwarded = |cp: &ControlPlane| {
        cp.client
            .post(format!("{}/console/sign-in", cp.url))
            .header("origin", "https://keys.example.com")
            .header("x-forwarded-host", "keys.example.com")
            .json(&json!({"key": cp.admin_key}))
    };
    assert_eq!(send(forwarded(&cp)).await.status, StatusCode::FORBIDDEN);
    // Secure cookies: configured, or a trusted proxy saying the client came over TLS.
    drop(cp);
    let secure =
        ControlPlane::start_with(StackBuilder::new(backend).env("CONSOLE_SECURE_COOKIE", "true"))
            .await;
    let set = sign_in(&secure, &secure.admin_key).await;
    assert!(set.headers[SET_COOKIE]
        .to_str()
        .unwrap()
        .contains("; Secure"));
    let proxied =
        ControlPlane::start_with(StackBuilder::new(backend).env("TRUSTED_PROXIES", "127.0.0.1"))
            .await;
    let via_tls = send(
        proxied
            .client
            .post(format!("{}/console/sign-in", proxied.url))
            .header("x-forwarded-proto", "https")
            .json(&json!({"key": proxied.admin_key})),
    )
    .await;
    assert!(via_tls.headers[SET_COOKIE]
        .to_str()
        .unwrap()
        .contains("; Secure"));
    let behind_proxy = send(forwarded(&proxied)).await;
    assert_eq!(behind_proxy.status, StatusCode::OK, "{}", behind_proxy.body);
}

async fn failed_sign_ins_are_audited_and_limited(backend: Backend) {
    let cp =
        ControlPlane::start_with(StackBuilder::new(backend).env("AUTH_FAILURES_PER_MINUTE", "4"))
            .await;
    // The admin key is used once first: a key known valid keeps working from a source
    // past its failure budget (below, to read the audit log).
    let (status, _, _) = cp.get("/api/v1/audit", Some(&cp.admin_key)).await;
    assert_eq!(status, StatusCode::OK);
    // A client key is valid but may not sign in: 403, and counted.
    let client = sign_in(&cp, &cp.client_key).await;
    assert_eq!(client.status, StatusCode::FORBIDDEN, "{}", client.body);
    assert!(client.body["message"]
        .as_str()
        .unwrap()
        .contains("only an admin key"));
    assert!(!client.headers.contains_key(SET_COOKIE));
    let garbage = sign_in(&cp, "not a key").await;
    assert_eq!(garbage.status, StatusCode::UNAUTHORIZED, "{}", garbage.body);
    let made_up = metlo_shared::ApiKey::generate().unwrap();
    let unknown = sign_in(&cp, made_up.expose_secret()).await;
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
    let empty = sign_in(&cp, "").await;
    assert_eq!(empty.status, StatusCode::UNAUTHORIZED);
    // The budget (4 a minute) is spent: the next new key is not even looked up.
    let another = metlo_shared::ApiKey::generate().unwrap();
    let limited = sign_in(&cp, another.expose_secret()).await;
    assert_eq!(
        limited.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        limited.body
    );
    assert!(limited.headers.contains_key("retry-after"));
    // Each failure is in the audit log, with its reason and the sign-in route.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, body) = cp
            .get("/api/v1/audit?action=auth.failed", Some(&cp.admin_key))
            .await;
        assert_eq!(status, StatusCode::OK);
        let page: Value = serde_json::from_str(&body).unwrap();
        let reasons: Vec<String> = page["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["detail"]["route"] == "/console/sign-in")
            .filter_map(|e| e["detail"]["reason"].as_str().map(str::to_owned))
            .collect();
        let all = ["forbidden", "malformed", "invalid", "missing", "limited"];
        if all.iter().all(|r| reasons.iter().any(|x| x == r)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sign-in failures not audited: {page}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    cp.assert_log_has_no_secrets();
}

/// The console in real headless Chromium, against the whole system.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_chromium() {
    let s = StackBuilder::new(Backend::Sqlite)
        .kv()
        .edge(&[("USAGE_REPORT_MS", "300")])
        .env("LAST_USED_FLUSH_SECONDS", "1")
        .build()
        .await;
    let cp = &s.cp;
    let b = Browser::start().await;
    let base = &cp.url;

    // Not signed in: any console page shows the sign-in form.
    b.goto(&format!("{base}/console/keys")).await;
    b.find("input#key").await;
    b.until(
        "the sign-in page",
        "return location.pathname === '/console/sign-in';",
        Duration::from_secs(5),
    )
    .await;
    b.check_page("sign-in").await;

    // A client key is refused, in words next to the field.
    let key_input = b.find("input#key").await;
    key_input.send_keys(&cp.client_key).await.unwrap();
    key_input.send_keys("\u{E007}").await.unwrap(); // Enter: the keyboard alone signs in
    b.until(
        "the refusal",
        "return document.getElementById('key-error').textContent.includes('only an admin key');",
        Duration::from_secs(5),
    )
    .await;

    // The admin key signs in; the key is nowhere in the page's storage, the cookie is
    // out of the script's reach.
    key_input.clear().await.unwrap();
    key_input.send_keys(&cp.admin_key).await.unwrap();
    key_input.send_keys("\u{E007}").await.unwrap();
    b.find("form[aria-labelledby=create-title]").await;
    let stored = b
        .js(
            "return [document.cookie, JSON.stringify(localStorage), JSON.stringify(sessionStorage), \
             document.documentElement.outerHTML].join(' ');",
            vec![],
        )
        .await;
    let stored = stored.as_str().unwrap();
    assert!(
        !stored.contains(&cp.admin_key),
        "the admin key stays out of the page"
    );
    assert!(
        !stored.contains("metlo_console"),
        "the session cookie is HttpOnly"
    );

    // Create: the key is shown once, with a copy button.
    b.find("#new-name")
        .await
        .send_keys("browser-made")
        .await
        .unwrap();
    b.find("#create-form-error").await;
    b.client
        .find(fantoccini::Locator::Css(
            "form[aria-labelledby=create-title] button[type=submit]",
        ))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let shown = b.find("#secret input").await;
    let key = shown.prop("value").await.unwrap().unwrap();
    cp.secrets.lock().unwrap().push(key.clone());
    assert!(
        metlo_shared::ApiKey::parse(&key).is_ok(),
        "a whole key is shown"
    );
    b.find("#secret button").await.click().await.unwrap();
    b.until(
        "the copy",
        "const t = document.querySelector('#secret .success').textContent; return t.length > 0;",
        Duration::from_secs(5),
    )
    .await;
    let copied = b.text("#secret .success").await;
    let selected = b
        .js("return window.getSelection().toString() || (document.activeElement && document.activeElement.value && document.activeElement.value.substring(document.activeElement.selectionStart, document.activeElement.selectionEnd)) || '';", vec![])
        .await;
    assert!(
        copied.contains("Copied") || selected.as_str() == Some(key.as_str()),
        "copy put the key on the clipboard or selected it in the field: {copied:?}"
    );
    b.find("tr[data-key=browser-made]").await;
    b.check_page("keys-created").await;

    // Reload: gone for good.
    b.client.refresh().await.unwrap();
    b.find("tr[data-key=browser-made]").await;
    let page = b
        .js("return document.documentElement.outerHTML;", vec![])
        .await;
    assert!(
        !page.as_str().unwrap().contains(&key),
        "the key is shown only once"
    );
    assert!(b
        .client
        .find(fantoccini::Locator::Css("#secret"))
        .await
        .is_err());
    b.check_page("keys").await;

    // The created key works at the edge (wrangler dev), and on the control plane.
    cp.wait_outbox_drained(Duration::from_secs(10)).await;
    let (edge_n, cp_n) = (5, 3);
    for _ in 0..edge_n {
        let r = s
            .edge
            .get("/through-edge", Some(&key))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..cp_n {
        assert_eq!(cp.verify(&key).await, StatusCode::OK);
    }

    // A duplicate name: the API's 400 in words next to the name field.
    b.find("#new-name")
        .await
        .send_keys("browser-made")
        .await
        .unwrap();
    b.find("#new-name")
        .await
        .send_keys("\u{E007}")
        .await
        .unwrap();
    b.until(
        "the duplicate-name error",
        "return document.getElementById('new-name-error').textContent.includes('already exists');",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(
        b.js(
            "return document.getElementById('new-name').getAttribute('aria-invalid');",
            vec![]
        )
        .await,
        json!("true")
    );

    // The usage chart shows the requests just made (edge reports and verifications,
    // after the flush).
    tokio::time::sleep(Duration::from_millis(400)).await;
    let other = cp.create_key("nudge", "GENERIC").await; // the edge reports on its next request
    cp.wait_outbox_drained(Duration::from_secs(10)).await;
    let _ = s.edge.get("/", Some(&other)).send().await.unwrap();
    b.goto(&format!("{base}/console/keys/browser-made")).await;
    let want = edge_n + cp_n;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        b.find("#chart-summary").await;
        let total = b
            .js(
                "return document.getElementById('chart-summary').dataset.total || '';",
                vec![],
            )
            .await;
        if total == json!(want.to_string()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the chart shows {total}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        b.find("button[data-hours='24']")
            .await
            .click()
            .await
            .unwrap();
    }
    let bars = b
        .js(
            "return [...document.querySelectorAll('svg.usage rect.bar-rect')].map(r => Number(r.dataset.requests));",
            vec![],
        )
        .await;
    let bars: Vec<u64> = serde_json::from_value(bars).unwrap();
    assert_eq!(bars.len(), 24);
    assert_eq!(bars.iter().sum::<u64>(), want as u64, "the bars add up");
    b.check_page("key-usage").await;
    b.find("button[data-hours='168']")
        .await
        .click()
        .await
        .unwrap();
    b.until(
        "the 7-day chart",
        "return document.querySelectorAll('svg.usage rect.bar-rect').length === 168;",
        Duration::from_secs(5),
    )
    .await;

    // Disable, then enable: the edge follows.
    b.goto(&format!("{base}/console/keys")).await;
    b.find("button[aria-label='Disable browser-made']")
        .await
        .click()
        .await
        .unwrap();
    b.find("button[aria-label='Enable browser-made']").await;
    edge_becomes(&s, &key, StatusCode::UNAUTHORIZED).await;
    b.find("button[aria-label='Enable browser-made']")
        .await
        .click()
        .await
        .unwrap();
    b.find("button[aria-label='Disable browser-made']").await;
    // The redrawn row's button has the focus (the keyboard stays where it was).
    b.until(
        "the focus back on the row",
        "return document.activeElement.getAttribute('aria-label') === 'Disable browser-made';",
        Duration::from_secs(5),
    )
    .await;
    edge_becomes(&s, &key, StatusCode::OK).await;

    // The policy fields: bad metadata is refused next to its field; a rate limit and
    // metadata are stored and listed.
    b.find("#new-name")
        .await
        .send_keys("with-policy")
        .await
        .unwrap();
    b.find("#new-meta")
        .await
        .send_keys("{tenant: acme}")
        .await
        .unwrap();
    b.find("#new-meta")
        .await
        .send_keys("\u{E007}")
        .await
        .unwrap();
    b.until(
        "the metadata error",
        "return document.getElementById('new-meta-error').textContent.includes('not JSON');",
        Duration::from_secs(5),
    )
    .await;
    b.find("#new-meta").await.clear().await.unwrap();
    b.find("#new-meta")
        .await
        .send_keys("{\"tenant\":\"acme\"}")
        .await
        .unwrap();
    b.find("#new-requests")
        .await
        .send_keys("100")
        .await
        .unwrap();
    b.find("#new-meta")
        .await
        .send_keys("\u{E007}")
        .await
        .unwrap();
    let policy_key = b
        .find("#secret input")
        .await
        .prop("value")
        .await
        .unwrap()
        .unwrap();
    cp.secrets.lock().unwrap().push(policy_key);
    b.until(
        "the rate limit in the table",
        "const r = document.querySelector('tr[data-key=\"with-policy\"]'); return !!r && r.textContent.includes('100 / 60 s');",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(
        cp.listed("with-policy").await["meta"],
        json!({"tenant": "acme"})
    );
    // Filters (by the server): by a part of the name, and by type.
    b.find("#filter-name")
        .await
        .send_keys("POLICY")
        .await
        .unwrap();
    b.until(
        "the name filter",
        "return [...document.querySelectorAll('tbody tr')].map(r => r.dataset.key).join(',') === 'with-policy';",
        Duration::from_secs(5),
    )
    .await;
    b.find("#filter-name").await.clear().await.unwrap();
    b.find("#filter-type")
        .await
        .select_by_value("ONBOARDING")
        .await
        .unwrap();
    b.until(
        "the type filter",
        "return document.querySelectorAll('tbody tr').length === 0 && document.querySelector('section p.muted').textContent.startsWith('0 keys');",
        Duration::from_secs(5),
    )
    .await;
    b.find("#filter-type")
        .await
        .select_by_value("")
        .await
        .unwrap();
    b.until(
        "every key again",
        "return document.querySelectorAll('tbody tr').length > 3;",
        Duration::from_secs(5),
    )
    .await;
    b.find("#secret button.secondary")
        .await
        .click()
        .await
        .unwrap();

    // Roll: a new secret shown once; the old one (no overlap) stops.
    b.find("button[aria-label='Roll browser-made']")
        .await
        .click()
        .await
        .unwrap();
    let overlap = b.find("dialog #roll-overlap").await;
    overlap.send_keys("\u{E007}").await.unwrap();
    let rolled = b
        .find("#secret input")
        .await
        .prop("value")
        .await
        .unwrap()
        .unwrap();
    cp.secrets.lock().unwrap().push(rolled.clone());
    assert_ne!(rolled, key);
    assert_eq!(cp.verify(&key).await, StatusCode::UNAUTHORIZED);
    cp.wait_outbox_drained(Duration::from_secs(10)).await;
    edge_becomes(&s, &rolled, StatusCode::OK).await;

    // Delete with a typed confirmation → 401 at the edge.
    b.find("button[aria-label='Delete browser-made']")
        .await
        .click()
        .await
        .unwrap();
    let typed = b.find("dialog #delete-confirm").await;
    let confirm = b.find("dialog button.danger").await;
    typed.send_keys("browser-mad").await.unwrap();
    assert!(
        !confirm.is_enabled().await.unwrap(),
        "not until the name is typed"
    );
    typed.send_keys("e").await.unwrap();
    assert!(confirm.is_enabled().await.unwrap());
    b.check_page("delete-dialog").await;
    confirm.click().await.unwrap();
    b.until(
        "the row to go",
        "return !document.querySelector('dialog') && !document.querySelector('tr[data-key=\"browser-made\"]') && !!document.querySelector('tr[data-key=\"nudge\"]');",
        Duration::from_secs(5),
    )
    .await;
    edge_becomes(&s, &rolled, StatusCode::UNAUTHORIZED).await;

    // The audit log, paged: 50 more creates make two pages of `key.create`.
    for i in 0..50 {
        let (status, made) = cp.create(json!({"name": format!("bulk-{i}")})).await;
        assert_eq!(status, StatusCode::OK, "{made}");
    }
    b.goto(&format!("{base}/console/audit?action=key.create"))
        .await;
    b.until(
        "a full first page",
        "return document.querySelectorAll('tbody tr').length === 50 && !document.querySelector('button.older').hidden;",
        Duration::from_secs(5),
    )
    .await;
    let (_, _, all) = cp
        .get(
            "/api/v1/audit?action=key.create&limit=1000",
            Some(&cp.admin_key),
        )
        .await;
    let creates = serde_json::from_str::<Value>(&all).unwrap()["entries"]
        .as_array()
        .unwrap()
        .len();
    assert!(creates > 50 && creates < 100, "{creates}");
    b.find("button.older").await.click().await.unwrap();
    // The older page ends with the first key ever made (the harness's admin key).
    let older_page = format!(
        "const rows = [...document.querySelectorAll('tbody tr')]; return rows.length === {} \
         && rows[rows.length - 1].cells[3].textContent === 'admin' \
         && document.querySelector('button.older').hidden && !document.querySelector('button.newest').hidden;",
        creates - 50
    );
    b.until("the older page", &older_page, Duration::from_secs(5))
        .await;

    // The audit log, filtered by action.
    b.goto(&format!("{base}/console/audit")).await;
    let action = b.find("#audit-action").await;
    action.send_keys("key.delete").await.unwrap();
    action.send_keys("\u{E007}").await.unwrap();
    b.until(
        "the filtered audit log",
        "const rows = [...document.querySelectorAll('tbody tr')]; return rows.length === 1 && rows[0].textContent.includes('browser-made') && rows[0].textContent.includes('key.delete');",
        Duration::from_secs(5),
    )
    .await;
    b.check_page("audit").await;

    // A cross-site form post (from another origin on this host) is refused.
    let attacker = attacker_page(base).await;
    b.goto(&attacker).await;
    b.find("button#go").await.click().await.unwrap();
    b.until(
        "the refusal of the cross-site post",
        "return document.body.textContent.includes('forbidden');",
        Duration::from_secs(5),
    )
    .await;
    assert!(!cp.list().await.iter().any(|k| k["name"] == "csrf-made"));

    // Sign out: back to sign-in, the session gone.
    b.goto(&format!("{base}/console/keys")).await;
    b.find("#sign-out").await.click().await.unwrap();
    b.find("input#key").await;
    let status = b
        .client
        .execute_async(
            "const done = arguments[0]; fetch('/console/session').then(r => done(r.status));",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(status, json!(401));
    b.goto(&format!("{base}/console/audit")).await;
    b.until(
        "sign-in after sign-out",
        "return location.pathname === '/console/sign-in';",
        Duration::from_secs(5),
    )
    .await;
    b.client.clone().close().await.unwrap();
    cp.assert_log_has_no_secrets();
}

/// Waits (up to 5 s) until the edge answers `want` for `key`.
async fn edge_becomes(s: &Stack, key: &str, want: StatusCode) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = s.edge.get("/", Some(key)).send().await.unwrap().status();
        if status == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the edge still answers {status}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A page on another origin of this host (another port: same site, so a SameSite
/// cookie would go along) posting a key-create form to the console.
async fn attacker_page(console: &str) -> String {
    let action = format!("{console}/console/api/v1/keys/create");
    let html = format!(
        "<!doctype html><html lang=en><title>win a prize</title>\
         <form method=post action=\"{action}\" enctype=text/plain>\
         <input type=hidden name='{{\"name\":\"csrf-made\",\"x\":\"' value='\"}}'>\
         <button id=go>Claim</button></form></html>"
    );
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(move || {
            let html = html.clone();
            async move { axum::response::Html(html) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}
