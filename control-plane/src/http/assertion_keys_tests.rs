//! Assertion keys, in process on both backends: made by an administrator (the private
//! half shown once and usable: what it signs, the published half verifies), published in
//! the public JWKS until retired, the newest kept unless forced, at most five published,
//! audited, and never a private half in a list, the JWKS or the audit log.

use axum::http::{Method, StatusCode};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use p256::ecdsa::signature::{Signer, Verifier};
use serde_json::{json, Value};

use crate::db::Backend;
use crate::test_util::{on_both_backends, TestApp};

on_both_backends!(
    a_new_key_signs_what_the_jwks_verifies,
    retired_keys_leave_the_jwks_and_the_newest_stays_unless_forced,
    only_administrators_manage_keys_and_anyone_reads_the_jwks,
);

async fn make(app: &TestApp) -> Value {
    let reply = app
        .as_admin()
        .post("/api/v1/assertion-keys", json!(null))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.header("cache-control"), Some("no-store"));
    reply.json()
}

async fn jwks(app: &TestApp) -> Vec<Value> {
    let reply = app.anonymous().get("/.well-known/jwks.json").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.header("cache-control"), Some("public, max-age=300"));
    assert_eq!(
        reply.header("content-type"),
        Some("application/jwk-set+json")
    );
    reply.json()["keys"].as_array().unwrap().clone()
}

fn b64(v: &Value) -> Vec<u8> {
    URL_SAFE_NO_PAD.decode(v.as_str().unwrap()).unwrap()
}

async fn a_new_key_signs_what_the_jwks_verifies(backend: Backend) {
    let app = TestApp::on(backend).build().await;
    assert!(jwks(&app).await.is_empty());
    let made = make(&app).await;
    let kid = made["kid"].as_str().unwrap().to_owned();
    assert_eq!(made["alg"], "ES256");
    let private = &made["privateJwk"];
    assert_eq!(private["kid"], kid.as_str());
    let signer = p256::ecdsa::SigningKey::from_slice(&b64(&private["d"])).unwrap();
    let signature: p256::ecdsa::Signature = signer.sign(b"header.payload");

    let published = jwks(&app).await;
    assert_eq!(published.len(), 1);
    let jwk = &published[0];
    assert_eq!(
        (
            jwk["kid"].as_str(),
            jwk["alg"].as_str(),
            jwk["use"].as_str()
        ),
        (Some(kid.as_str()), Some("ES256"), Some("sig"))
    );
    assert!(jwk.get("d").is_none(), "never the private half");
    let mut sec1 = vec![4u8];
    sec1.extend(b64(&jwk["x"]));
    sec1.extend(b64(&jwk["y"]));
    let verifier = p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1).unwrap();
    assert!(verifier.verify(b"header.payload", &signature).is_ok());
    assert!(verifier.verify(b"header.tampered", &signature).is_err());

    let listed = app.as_admin().get("/api/v1/assertion-keys").await;
    assert_eq!(listed.json()[0]["kid"], kid.as_str());
    assert_eq!(listed.json()[0]["retiredAt"], Value::Null);
    let d = private["d"].as_str().unwrap();
    assert!(!listed.text.contains(d));
    let audit = app
        .as_admin()
        .get("/api/v1/audit?action=assertion_key.create")
        .await;
    assert_eq!(audit.json()["entries"][0]["target"], kid.as_str());
    assert!(!audit.text.contains(d), "the private half is never audited");
}

async fn retired_keys_leave_the_jwks_and_the_newest_stays_unless_forced(backend: Backend) {
    let app = TestApp::on(backend).build().await;
    let old = make(&app).await["kid"].as_str().unwrap().to_owned();
    let new = make(&app).await["kid"].as_str().unwrap().to_owned();
    let kids = |keys: Vec<Value>| {
        keys.iter()
            .map(|k| k["kid"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        kids(jwks(&app).await).len(),
        2,
        "current and previous both published"
    );

    let retire = |kid: String, body: Value| {
        let app = &app;
        async move {
            app.as_admin()
                .post(&format!("/api/v1/assertion-keys/{kid}/retire"), body)
                .await
        }
    };
    retire(new.clone(), json!(null)).await.assert_error(
        StatusCode::CONFLICT,
        "conflict",
        "the newest, unforced",
    );
    let reply = retire(old.clone(), json!(null)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert!(reply.json()["retiredAt"].is_string());
    assert_eq!(
        kids(jwks(&app).await),
        std::slice::from_ref(&new),
        "at once on this replica"
    );
    retire("2020-01-01-0000000000000000".into(), json!(null))
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found", "no such kid");
    retire(new.clone(), json!({"froce": true}))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "bad_request", "a misspelt field");
    assert_eq!(
        retire(new.clone(), json!({"force": true})).await.status,
        StatusCode::OK
    );
    assert!(jwks(&app).await.is_empty());
    let audit = app
        .as_admin()
        .get("/api/v1/audit?action=assertion_key.retire")
        .await
        .json();
    assert_eq!(audit["entries"].as_array().unwrap().len(), 2);

    // At most five published.
    for _ in 0..5 {
        make(&app).await;
    }
    app.as_admin()
        .post("/api/v1/assertion-keys", json!(null))
        .await
        .assert_error(StatusCode::CONFLICT, "conflict", "a sixth");
    assert_eq!(jwks(&app).await.len(), 5);
}

async fn only_administrators_manage_keys_and_anyone_reads_the_jwks(backend: Backend) {
    let app = TestApp::on(backend).build().await;
    for caller in [app.as_client(), app.as_edge()] {
        caller
            .post("/api/v1/assertion-keys", json!(null))
            .await
            .assert_error(StatusCode::FORBIDDEN, "forbidden", "make");
        caller.get("/api/v1/assertion-keys").await.assert_error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "list",
        );
    }
    app.anonymous()
        .send(Method::POST, "/api/v1/assertion-keys", None)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthorized", "no key");
    assert!(jwks(&app).await.is_empty(), "nothing was made");
    // The JWKS needs no key, and a wrong one does not stop it either.
    let reply = app
        .with_key("metlo.nope")
        .get("/.well-known/jwks.json")
        .await;
    assert_eq!(reply.status, StatusCode::OK);
}
