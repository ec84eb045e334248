//! The admin console: the whole console in real headless Chromium against the whole system (the created key
//! used through `wrangler dev`, deleted → 401 there, its usage on the chart).

use std::time::{Duration, Instant};

use metlo_tests::browser::Browser;
use metlo_tests::{Backend, Stack, StackBuilder, StatusCode};
use serde_json::{json, Value};

// The console's HTTP rules (headers, cookies, sessions, CSRF and origin checks, failed
// sign-ins) are tested in process: control-plane/src/http/console/tests.rs.

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

    // Permissions: edited on the key's page, the whole set replaced; a bad one is refused
    // next to the field, with nothing changed.
    save_permissions(&b, "orders:write, orders:read orders:read").await;
    b.until(
        "the saved permissions",
        "const d = document.querySelector('dd[data-term=Permissions]'); return d && d.textContent === 'orders:read, orders:write';",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(
        cp.listed("browser-made").await["permissions"],
        json!(["orders:read", "orders:write"])
    );
    save_permissions(&b, "orders read!").await;
    b.until(
        "the permission error",
        "return document.getElementById('edit-permissions-error').textContent.includes('invalid permission');",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(
        cp.listed("browser-made").await["permissions"],
        json!(["orders:read", "orders:write"]),
        "nothing changed"
    );

    // An identity's page: its credits, its keys (linked), and its keys' requests per hour
    // with those the edge refused (here: out of credits) stacked above.
    let (status, body) = cp
        .post(
            "/api/v1/identities",
            Some(json!({"externalId": "acme", "credits": {"remaining": 2},
                        "rateLimits": [{"name": "rpm", "requests": 600, "periodSeconds": 60}]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = cp
        .create(json!({"name": "acme-key", "identity": "acme"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let acme_key = body["apiKey"].as_str().unwrap().to_owned();
    cp.wait_outbox_drained(Duration::from_secs(10)).await;
    let statuses: Vec<u16> = futures::future::join_all((0..4).map(|_| async {
        s.edge
            .get("/", Some(&acme_key))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }))
    .await;
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        2,
        "{statuses:?}"
    );
    b.goto(&format!("{base}/console/keys/acme-key")).await;
    b.until(
        "the key's identity, linked",
        "const a = document.querySelector('dd[data-term=Identity] a'); return !!a && a.getAttribute('href') === '/console/identities/acme';",
        Duration::from_secs(5),
    )
    .await;
    b.find("dd[data-term=Identity] a")
        .await
        .click()
        .await
        .unwrap();
    b.until(
        "the identity's page",
        "return location.pathname === '/console/identities/acme' && !!document.querySelector('ul.identity-keys a[href=\"/console/keys/acme-key\"]') && (document.querySelector('dd[data-term=Credits]') || {}).textContent.startsWith('2 granted');",
        Duration::from_secs(5),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // The edge reports on the next request after its interval; the page reloads the
        // usage when a span is chosen.
        let _ = s.edge.get("/", Some(&other)).send().await.unwrap();
        b.find("button[data-hours='24']")
            .await
            .click()
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        let shown = b
            .js(
                "const s = document.getElementById('chart-summary'); return [s.dataset.total || '', s.dataset.refused || ''];",
                vec![],
            )
            .await;
        if shown == json!(["2", "2"]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the identity's chart shows {shown}"
        );
    }
    let refused = b
        .js(
            "return [...document.querySelectorAll('svg.usage rect.bar-refused')].reduce((n, r) => n + Number(r.dataset.refused), 0);",
            vec![],
        )
        .await;
    assert_eq!(refused, json!(2), "the refused bars add up");
    assert!(b
        .js(
            "return document.getElementById('chart-summary').textContent;",
            vec![]
        )
        .await
        .as_str()
        .unwrap()
        .contains("2 out of credits"));
    b.check_page("identity").await;

    console_edits_identities_and_credits(&s, &b).await;

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
    choose(&b, "#filter-type", "ONBOARDING").await;
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
    // The edge's promise for the old secret, from the answer's refusedEverywhereBy.
    b.until(
        "the roll's promise",
        "return document.getElementById('secret').textContent.includes('every edge location refuses it by');",
        Duration::from_secs(5),
    )
    .await;
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
    b.until(
        "the delete's promise",
        "const p = document.getElementById('promise'); return !!p && p.textContent.startsWith('Key “browser-made” deleted: refused at every edge location by ');",
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

    // The audit log, filtered by action: this delete, newest first, then globex-key's
    // (deleted with its identity).
    b.goto(&format!("{base}/console/audit")).await;
    let action = b.find("#audit-action").await;
    action.send_keys("key.delete").await.unwrap();
    action.send_keys("\u{E007}").await.unwrap();
    b.until(
        "the filtered audit log",
        "const rows = [...document.querySelectorAll('tbody tr')]; return rows.length === 2 && rows[0].textContent.includes('browser-made') && rows[0].textContent.includes('key.delete') && rows[1].textContent.includes('globex-key');",
        Duration::from_secs(5),
    )
    .await;
    b.check_page("audit").await;

    // A new admin key asks for the admin key again (a stolen cookie alone mints nothing
    // lasting): left empty, then another valid key (refused by the server), then right.
    b.goto(&format!("{base}/console/keys")).await;
    b.find("#new-name")
        .await
        .send_keys("console-admin")
        .await
        .unwrap();
    choose(&b, "#new-role", "admin").await;
    let confirm_key = b.find("#new-confirm").await;
    assert!(
        confirm_key.is_displayed().await.unwrap(),
        "asked for admin keys"
    );
    let submit = "form[aria-labelledby=create-title] button[type=submit]";
    b.find(submit).await.click().await.unwrap();
    b.until(
        "the empty confirmation refused",
        "return document.getElementById('new-confirm-error').textContent.includes('Enter the admin key');",
        Duration::from_secs(5),
    )
    .await;
    confirm_key.send_keys(&cp.client_key).await.unwrap();
    b.find(submit).await.click().await.unwrap();
    b.until(
        "another key refused by the server",
        "return document.getElementById('new-confirm-error').textContent.includes('needs your admin key again');",
        Duration::from_secs(5),
    )
    .await;
    assert!(!cp.list().await.iter().any(|k| k["name"] == "console-admin"));
    b.find("#new-confirm")
        .await
        .send_keys(&cp.admin_key)
        .await
        .unwrap();
    b.find(submit).await.click().await.unwrap();
    let minted = b
        .find("#secret input")
        .await
        .prop("value")
        .await
        .unwrap()
        .unwrap();
    cp.secrets.lock().unwrap().push(minted.clone());
    let (status, _, _) = cp.get("/api/v1/keys/list", Some(&minted)).await;
    assert_eq!(status, StatusCode::OK, "an admin key was made");
    assert!(
        !b.js("return document.documentElement.outerHTML;", vec![])
            .await
            .as_str()
            .unwrap()
            .contains(&cp.admin_key),
        "the confirming key is not kept in the page"
    );

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

    // Sign out everywhere, from the admin key's page: this console's session and one
    // opened elsewhere (through the API) both end.
    let key_input = b.find("input#key").await;
    key_input.send_keys(&cp.admin_key).await.unwrap();
    key_input.send_keys("\u{E007}").await.unwrap();
    b.until(
        "signed in again",
        "return location.pathname !== '/console/sign-in';",
        Duration::from_secs(5),
    )
    .await;
    let elsewhere = reqwest::Client::new()
        .post(format!("{base}/console/sign-in"))
        .json(&json!({"key": cp.admin_key}))
        .send()
        .await
        .unwrap();
    assert_eq!(elsewhere.status(), StatusCode::OK);
    let cookie = elsewhere.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let session_elsewhere = || async {
        reqwest::Client::new()
            .get(format!("{base}/console/session"))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(session_elsewhere().await, StatusCode::OK);
    b.goto(&format!("{base}/console/keys/admin")).await;
    b.find("#sign-out-everywhere").await.click().await.unwrap();
    b.check_page("sign-out-everywhere-dialog").await;
    b.find("dialog button.danger").await.click().await.unwrap();
    b.until(
        "back to sign-in",
        "return location.pathname === '/console/sign-in';",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(session_elsewhere().await, StatusCode::UNAUTHORIZED);
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

/// Identities and credits made and changed in the console: an identity created from the
/// identities page, topped up and its limits edited on its page; a key created with an
/// identity and credits (which the edge then enforces), its credits set and its identity
/// left on its page; the identity deleted with its keys.
async fn console_edits_identities_and_credits(s: &Stack, b: &Browser) {
    let cp = &s.cp;
    let base = &cp.url;
    let api = |path: String| async move {
        let (status, _, body) = cp.get(&path, Some(&cp.admin_key)).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        serde_json::from_str::<Value>(&body).unwrap()
    };

    b.goto(&format!("{base}/console/keys")).await;
    b.find("nav a[href='/console/identities']")
        .await
        .click()
        .await
        .unwrap();
    type_into(b, "#identity-external-id", "globex").await;
    type_into(b, "#identity-credits", "5").await;
    choose(b, "#identity-refill", "monthly").await;
    type_into(b, "#identity-refill-amount", "50").await;
    type_into(b, "#identity-refill-day", "15").await;
    // A limit that is not one is refused next to its field, nothing is sent.
    type_into(b, "#identity-limits", "rpm 100 per minute").await;
    click(
        b,
        "form[aria-labelledby=identity-create-title] button[type=submit]",
    )
    .await;
    b.until(
        "the limits' error",
        "return document.getElementById('identity-limits-error').textContent.includes('is not a limit');",
        Duration::from_secs(5),
    )
    .await;
    type_into(b, "#identity-limits", "rpm: 100/60").await;
    type_into(b, "#identity-meta", r#"{"plan":"pro"}"#).await;
    b.check_page("identities").await;
    click(
        b,
        "form[aria-labelledby=identity-create-title] button[type=submit]",
    )
    .await;
    b.until(
        "the new identity's page",
        "return location.pathname === '/console/identities/globex' && ((document.querySelector('dd[data-term=Credits]') || {}).textContent || '').startsWith('5 granted');",
        Duration::from_secs(5),
    )
    .await;
    let made = api("/api/v1/identities/globex".into()).await;
    assert_eq!(
        made["credits"],
        json!({"granted": 5, "added": 0, "refill": {"amount": 50, "interval": "monthly", "refillDay": 15}})
    );
    assert_eq!(
        made["rateLimits"],
        json!([{"name": "rpm", "requests": 100, "periodSeconds": 60}])
    );
    assert_eq!(made["meta"], json!({"plan": "pro"}));

    // Its page: a top-up (Enter in its field adds, and sets nothing), then its limits and
    // metadata replaced.
    type_into(b, "#identity-credits-add", "10\u{E007}").await;
    b.until(
        "the top-up",
        "return ((document.querySelector('dd[data-term=Credits]') || {}).textContent || '').startsWith('15 granted (10 added)');",
        Duration::from_secs(5),
    )
    .await;
    type_into(b, "#edit-limits", "rpm: 50/60, burst: 5/1").await;
    type_into(b, "#edit-meta", "").await;
    click(
        b,
        "form[aria-labelledby=identity-edit-title] button[type=submit]",
    )
    .await;
    b.until(
        "the saved limits",
        "return (document.querySelector('dd[data-term=\"Shared limits\"]') || {}).textContent === 'burst: 5/1, rpm: 50/60';",
        Duration::from_secs(5),
    )
    .await;
    let edited = api("/api/v1/identities/globex".into()).await;
    assert_eq!(edited["rateLimits"].as_array().unwrap().len(), 2);
    assert_eq!(edited["meta"], Value::Null, "emptied metadata is removed");
    b.check_page("identity-edit").await;

    // A key made in the console with the identity and one credit: the edge admits one
    // request and refuses the next.
    b.goto(&format!("{base}/console/keys")).await;
    type_into(b, "#new-name", "globex-key").await;
    type_into(b, "#new-identity", "globex").await;
    type_into(b, "#new-credits", "1").await;
    click(b, "form[aria-labelledby=create-title] button[type=submit]").await;
    let key = b
        .find("#secret input")
        .await
        .prop("value")
        .await
        .unwrap()
        .unwrap();
    cp.secrets.lock().unwrap().push(key.clone());
    let listed = cp.listed("globex-key").await;
    assert_eq!(listed["identity"], json!("globex"));
    assert_eq!(listed["credits"]["granted"], json!(1));
    cp.wait_outbox_drained(Duration::from_secs(10)).await;
    let first = s.edge.get("/", Some(&key)).send().await.unwrap().status();
    let second = s.edge.get("/", Some(&key)).send().await.unwrap().status();
    assert_eq!(
        (first.as_u16(), second.as_u16()),
        (200, 429),
        "one credit: one request"
    );

    // Its page: credits set (a balance with a refill every 60 s), the identity left.
    b.goto(&format!("{base}/console/keys/globex-key")).await;
    b.until(
        "the key's page",
        "return ((document.querySelector('dd[data-term=Credits]') || {}).textContent || '').startsWith('1 granted') && !document.querySelector('section[aria-labelledby=key-credits-title]').hidden;",
        Duration::from_secs(5),
    )
    .await;
    type_into(b, "#key-credits-credits", "7").await;
    choose(b, "#key-credits-refill", "seconds").await;
    type_into(b, "#key-credits-refill-amount", "7").await;
    type_into(b, "#key-credits-refill-seconds", "60").await;
    click(
        b,
        "section[aria-labelledby=key-credits-title] button[data-action=set]",
    )
    .await;
    b.until(
        "the credits set",
        "return ((document.querySelector('dd[data-term=Credits]') || {}).textContent || '').startsWith('7 granted, refilled to 7 every 60 s');",
        Duration::from_secs(5),
    )
    .await;
    type_into(b, "#edit-identity", "no-such-identity").await;
    click(
        b,
        "form[aria-labelledby=identity-title] button[type=submit]",
    )
    .await;
    b.until(
        "the unknown identity's error",
        "return document.getElementById('edit-identity-error').textContent.includes('no identity');",
        Duration::from_secs(5),
    )
    .await;
    b.check_page("key-credits").await;
    type_into(b, "#edit-identity", "").await;
    click(
        b,
        "form[aria-labelledby=identity-title] button[type=submit]",
    )
    .await;
    b.until(
        "the identity left",
        "return (document.querySelector('dd[data-term=Identity]') || {}).textContent === '—';",
        Duration::from_secs(5),
    )
    .await;
    let key_now = cp.listed("globex-key").await;
    assert_eq!(key_now["identity"], Value::Null);
    assert_eq!(
        key_now["credits"],
        json!({"granted": 7, "added": 0, "refill": {"amount": 7, "interval": "seconds", "periodSeconds": 60}})
    );

    // Back in the identity, then the identity deleted: refused while it has keys, done
    // with them when asked.
    let (status, body) = cp.patch("globex-key", json!({"identity": "globex"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    b.goto(&format!("{base}/console/identities/globex")).await;
    b.find("ul.identity-keys a[href='/console/keys/globex-key']")
        .await;
    let remove = "main > div.actions button.danger";
    click(b, remove).await;
    type_into(b, "dialog #delete-confirm", "globex").await;
    click(b, "dialog button[type=submit]").await;
    b.until(
        "the refusal while keys belong",
        "return document.getElementById('delete-confirm-error').textContent.includes('Delete its keys too');",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(cp.listed("globex-key").await["name"], json!("globex-key"));
    click(b, "dialog #delete-cascade").await;
    click(b, "dialog button[type=submit]").await;
    b.until(
        "the identities page again",
        "return location.pathname === '/console/identities' && !!document.querySelector('tr[data-identity=acme]') && !document.querySelector('tr[data-identity=globex]') && !document.querySelector('dialog');",
        Duration::from_secs(5),
    )
    .await;
    let (status, _, _) = cp
        .get("/api/v1/identities/globex", Some(&cp.admin_key))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = cp.get("/api/v1/keys/globex-key", Some(&cp.admin_key)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "its key went with it");
}

/// Replaces a field's text.
async fn type_into(b: &Browser, css: &str, text: &str) {
    let field = b.find(css).await;
    field.clear().await.unwrap();
    if !text.is_empty() {
        field.send_keys(text).await.unwrap();
    }
}

/// Picks the option `value` of a select.
async fn choose(b: &Browser, css: &str, value: &str) {
    b.find(css).await.select_by_value(value).await.unwrap();
}

async fn click(b: &Browser, css: &str) {
    b.find(css).await.click().await.unwrap();
}

/// Types `text` as the key page's permissions and saves them.
async fn save_permissions(b: &Browser, text: &str) {
    let field = b.find("#edit-permissions").await;
    field.clear().await.unwrap();
    field.send_keys(text).await.unwrap();
    b.find("form[aria-labelledby=permissions-title] button[type=submit]")
        .await
        .click()
        .await
        .unwrap();
}
