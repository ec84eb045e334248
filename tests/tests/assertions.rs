//! The signed assertion (issue 30), end to end: the Worker under real `wrangler dev` signs
//! an ES256 JWT per key (WebCrypto), the control plane publishes its keys as a JWKS, and
//! origins verify it with standard libraries, unchanged — `jsonwebtoken` (crates.io) here,
//! `jose` (npm) and `PyJWT` (PyPI) through tests/verifiers/ — each accepting a valid
//! assertion and refusing a wrong audience, an expired one, one signed by a retired key
//! and a tampered payload. A rotation under load (a client every 10 ms) fails no request.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use metlo_tests::edge::Origin;
use metlo_tests::{Backend, Stack, StackBuilder, StatusCode};
use serde_json::{json, Value};

const AUDIENCE: &str = "orders-api";

/// A new assertion key: its kid and private JWK (for the Worker's secret).
async fn assertion_key(s: &Stack) -> (String, String) {
    let (status, made) = s.cp.post("/api/v1/assertion-keys", None).await;
    assert_eq!(status, StatusCode::OK, "{made}");
    (
        made["kid"].as_str().unwrap().to_owned(),
        made["privateJwk"].to_string(),
    )
}

async fn jwks(s: &Stack) -> Value {
    let r =
        s.cp.request(reqwest::Method::GET, "/.well-known/jwks.json", None)
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    r.json().await.unwrap()
}

/// Verifies as an axum origin would with `jsonwebtoken`: ES256 only, the key by `kid`,
/// issuer and audience checked, no leeway.
fn verify(jwks: &Value, token: &str, issuer: &str, audience: &str) -> Result<Value, String> {
    let set: JwkSet = serde_json::from_value(jwks.clone()).map_err(|e| e.to_string())?;
    let kid = decode_header(token)
        .map_err(|e| e.to_string())?
        .kid
        .ok_or("no kid")?;
    let jwk = set.find(&kid).ok_or("no published key with this kid")?;
    let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
    let mut validation = Validation::new(Algorithm::ES256);
    validation.set_audience(&[audience]);
    validation.set_issuer(&[issuer]);
    validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
    validation.leeway = 0;
    decode::<Value>(token, &key, &validation)
        .map(|d| d.claims)
        .map_err(|e| e.to_string())
}

/// The assertion the origin got with its last request.
fn last_assertion(origin: &Origin) -> String {
    let seen = origin.requests();
    let last = seen.last().expect("a request reached the origin");
    last.headers["x-metlo-assertion"]
        .to_str()
        .unwrap()
        .to_owned()
}

/// `token` with its payload changed (`permissions` widened), its signature kept.
fn tampered(token: &str) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    claims["permissions"] = json!(["orders:read", "admin"]);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{}.{payload}.{}", parts[0], parts[2])
}

/// Runs the npm and PyPI verifiers on `cases` (name, token, audience, expect); panics with
/// their output unless each case came out as expected.
fn external_verifiers(jwks: &Value, issuer: &str, cases: &[(&str, &str, &str, &str)]) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("cases.json");
    let cases: Vec<Value> = cases
        .iter()
        .map(|(name, token, audience, expect)| {
            json!({"name": name, "token": token, "audience": audience, "expect": expect})
        })
        .collect();
    std::fs::write(
        &input,
        json!({"jwks": jwks, "issuer": issuer, "cases": cases}).to_string(),
    )
    .unwrap();
    let python = Command::new(root.join("scripts/install-verifiers.sh"))
        .output()
        .unwrap();
    assert!(
        python.status.success(),
        "{}",
        String::from_utf8_lossy(&python.stderr)
    );
    let python = String::from_utf8(python.stdout).unwrap().trim().to_owned();
    for (library, mut command) in [
        ("jose (npm)", {
            let mut c = Command::new("node");
            c.arg(root.join("tests/verifiers/verify.mjs"))
                .current_dir(&root);
            c
        }),
        ("PyJWT (PyPI)", {
            let mut c = Command::new(&python);
            c.arg(root.join("tests/verifiers/verify.py"));
            c
        }),
    ] {
        let out = command.arg(&input).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!("{library}:\n{text}");
        assert!(
            out.status.success(),
            "{library} did not decide as expected:\n{text}"
        );
        assert_eq!(
            text.lines().filter(|l| l.starts_with("ok ")).count(),
            cases.len(),
            "{library}: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_verify_the_edge_assertions_with_standard_libraries() {
    let mut s = StackBuilder::new(Backend::Sqlite).kv().build().await;
    let (old_kid, old_jwk) = assertion_key(&s).await;
    s.start_edge(&[
        ("ASSERTION_SIGNING_KEY", &old_jwk),
        ("ASSERTION_AUDIENCE", AUDIENCE),
    ])
    .await;
    let (status, made) =
        s.cp.create(
            json!({"name": "caller", "keyFor": "AWS", "permissions": ["orders:read"],
                       "meta": {"tenant": "acme ✓"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let key = made["apiKey"].as_str().unwrap().to_owned();
    let issuer = s.cp.url.clone();

    // The client can never set it: a forged one is replaced.
    let r = s
        .edge
        .get("/orders/1", Some(&key))
        .header("x-metlo-assertion", "forged")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let signed_by_old = last_assertion(&s.origin);
    assert_ne!(signed_by_old, "forged");
    let published = jwks(&s).await;
    let claims = verify(&published, &signed_by_old, &issuer, AUDIENCE).expect("a valid assertion");
    assert_eq!(claims["sub"], made["identifier"]);
    assert_eq!(claims["name"], "caller");
    assert_eq!(claims["type"], "AWS");
    assert_eq!(claims["role"], "client");
    assert_eq!(claims["permissions"], json!(["orders:read"]));
    assert_eq!(claims["meta"], json!({"tenant": "acme ✓"}));
    assert!(claims.get("identity").is_none(), "a key of no identity");
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        60
    );
    let header = decode_header(&signed_by_old).unwrap();
    assert_eq!(header.kid.as_deref(), Some(old_kid.as_str()));

    // Signed once per key per isolate per half-lifetime: the next requests carry the same.
    for _ in 0..3 {
        let r = s.edge.get("/orders/2", Some(&key)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(last_assertion(&s.origin), signed_by_old);
    }
    // A changed key is signed again (within the feed's bound): here it gains a
    // permission and joins an identity, which the assertion names.
    let (status, _) =
        s.cp.post(
            "/api/v1/identities",
            Some(json!({"externalId": "acme-corp"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        s.cp.patch(
            "caller",
            json!({"permissions": ["orders:read", "orders:write"], "identity": "acme-corp"})
        )
        .await
        .0,
        StatusCode::OK
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = s.edge.get("/orders/3", Some(&key)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let token = last_assertion(&s.origin);
        if token != signed_by_old {
            let claims = verify(&published, &token, &issuer, AUDIENCE).unwrap();
            assert_eq!(
                claims["permissions"],
                json!(["orders:read", "orders:write"])
            );
            assert_eq!(claims["identity"], "acme-corp");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the assertion did not follow the change"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Rotation: a new key, a Worker signing with it (short-lived assertions, to see one
    // expire), the old key retired.
    let (new_kid, new_jwk) = assertion_key(&s).await;
    s.start_edge(&[
        ("ASSERTION_SIGNING_KEY", &new_jwk),
        ("ASSERTION_AUDIENCE", AUDIENCE),
        ("ASSERTION_TTL_SECONDS", "8"),
    ])
    .await;
    let r = s.edge.get("/orders/4", Some(&key)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let signed_by_new = last_assertion(&s.origin);
    assert_eq!(
        decode_header(&signed_by_new).unwrap().kid.as_deref(),
        Some(new_kid.as_str())
    );
    let (status, body) =
        s.cp.post(&format!("/api/v1/assertion-keys/{old_kid}/retire"), None)
            .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // A replica reads the JWKS again within seconds; this one at once.
    let published = jwks(&s).await;
    assert_eq!(published["keys"].as_array().unwrap().len(), 1);

    let forged = tampered(&signed_by_new);
    let rust_cases = [
        ("valid", signed_by_new.as_str(), AUDIENCE, true),
        (
            "wrong audience",
            signed_by_new.as_str(),
            "another-api",
            false,
        ),
        (
            "signed by a retired key",
            signed_by_old.as_str(),
            AUDIENCE,
            false,
        ),
        ("tampered payload", forged.as_str(), AUDIENCE, false),
    ];
    for (name, token, audience, valid) in rust_cases {
        let got = verify(&published, token, &issuer, audience);
        assert_eq!(got.is_ok(), valid, "jsonwebtoken, {name}: {got:?}");
    }
    let as_cases = |cases: &[(&'static str, &str, &'static str, bool)]| -> Vec<(&'static str, String, &'static str, &'static str)> {
        cases
            .iter()
            .map(|(n, t, a, v)| (*n, t.to_string(), *a, if *v { "accept" } else { "reject" }))
            .collect()
    };
    let cases = as_cases(&rust_cases);
    let borrowed: Vec<(&str, &str, &str, &str)> = cases
        .iter()
        .map(|(n, t, a, e)| (*n, t.as_str(), *a, *e))
        .collect();
    external_verifiers(&published, &issuer, &borrowed);

    // Expired: the same valid assertion once its 8 s are over, refused by all three.
    let exp = verify(&published, &signed_by_new, &issuer, AUDIENCE).unwrap()["exp"]
        .as_u64()
        .unwrap();
    while std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        <= exp
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = verify(&published, &signed_by_new, &issuer, AUDIENCE);
    assert!(
        got.unwrap_err().contains("Expired"),
        "jsonwebtoken refuses an expired assertion"
    );
    external_verifiers(
        &published,
        &issuer,
        &[("expired", &signed_by_new, AUDIENCE, "reject")],
    );
}

/// An origin's verifier: the JWKS it holds, fetched again when a token names a kid it does
/// not know (what jose's `createRemoteJWKSet` and PyJWT's `PyJWKClient` do).
struct Verifier {
    jwks_url: String,
    issuer: String,
    held: Value,
    fetches: u32,
}

impl Verifier {
    async fn check(&mut self, token: &str) -> Result<(), String> {
        let kid = decode_header(token)
            .map_err(|e| e.to_string())?
            .kid
            .unwrap_or_default();
        let known = |held: &Value| {
            held["keys"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k["kid"] == kid.as_str()))
        };
        if !known(&self.held) {
            self.held = reqwest::get(&self.jwks_url)
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            self.fetches += 1;
        }
        verify(&self.held, token, &self.issuer, AUDIENCE).map(drop)
    }
}

fn as_refs(v: &[(String, String)]) -> Vec<(&str, &str)> {
    v.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_under_load_fails_no_request() {
    let mut s = StackBuilder::new(Backend::Sqlite).kv().build().await;
    let (old_kid, old_jwk) = assertion_key(&s).await;
    let vars = |jwk: &str| -> Vec<(String, String)> {
        vec![
            ("ASSERTION_SIGNING_KEY".into(), jwk.to_owned()),
            ("ASSERTION_AUDIENCE".into(), AUDIENCE.into()),
            ("ASSERTION_TTL_SECONDS".into(), "4".into()),
        ]
    };
    let old_vars = vars(&old_jwk);
    s.start_edge(&as_refs(&old_vars)).await;
    let key = s.cp.create_key("steady", "GENERIC").await;
    let mut verifier = Verifier {
        jwks_url: format!("{}/.well-known/jwks.json", s.cp.url),
        issuer: s.cp.url.clone(),
        held: json!({"keys": []}),
        fetches: 0,
    };

    // A client calling every 10 ms through whichever Worker serves it, each assertion
    // verified as it arrives.
    let (mut sent, mut failed) = (0u32, Vec::new());
    let call = |edge_url: String, origin: &Origin| {
        let key = key.clone();
        let seen_before = origin.requests().len();
        async move {
            let r = reqwest::Client::new()
                .get(format!("{edge_url}/orders"))
                .header("authorization", key)
                .send()
                .await
                .unwrap();
            (r.status(), seen_before)
        }
    };
    macro_rules! load {
        ($edge:expr, $origin:expr, $for:expr) => {{
            let until = Instant::now() + $for;
            while Instant::now() < until {
                let (status, seen_before) = call($edge.url.clone(), &$origin).await;
                sent += 1;
                let token =
                    ($origin.requests().len() > seen_before).then(|| last_assertion(&$origin));
                match (status, token) {
                    (StatusCode::OK, Some(token)) => {
                        if let Err(e) = verifier.check(&token).await {
                            failed.push(format!("refused by the origin: {e}"));
                        }
                    }
                    (status, _) => failed.push(format!("status {status}")),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }};
    }
    load!(s.edge, s.origin, Duration::from_secs(1));
    // 1. Generate: published at once.
    let (new_kid, new_jwk) = assertion_key(&s).await;
    load!(s.edge, s.origin, Duration::from_millis(500));
    // 2. Switch the Worker's secret: the new version starts while the old one serves, and
    //    for a while both serve (a deployment rolling out).
    let new_vars = vars(&new_jwk);
    let (new_origin, new_edge) = s.another_edge(&as_refs(&new_vars)).await;
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        load!(s.edge, s.origin, Duration::from_millis(1));
        load!(new_edge, new_origin, Duration::from_millis(1));
    }
    // 3. Only the new version serves; the old key's last assertion expires (4 s).
    let old_done = Instant::now();
    load!(
        new_edge,
        new_origin,
        Duration::from_secs(4) + Duration::from_millis(500)
    );
    assert!(old_done.elapsed() > Duration::from_secs(4));
    // 4. Retire the old key.
    let (status, body) =
        s.cp.post(&format!("/api/v1/assertion-keys/{old_kid}/retire"), None)
            .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    load!(new_edge, new_origin, Duration::from_secs(1));

    println!(
        "rotation: {sent} requests, {} failed, JWKS fetched {} times",
        failed.len(),
        verifier.fetches
    );
    assert!(sent > 200, "a steady client ({sent} requests)");
    assert!(
        failed.is_empty(),
        "{} of {sent} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(
        verifier.fetches >= 2,
        "the origin learned the new key when it first saw it"
    );
    let kids: Vec<String> = new_origin
        .requests()
        .iter()
        .map(|r| {
            decode_header(r.headers["x-metlo-assertion"].to_str().unwrap())
                .unwrap()
                .kid
                .unwrap()
        })
        .collect();
    assert!(kids.iter().all(|k| *k == new_kid));
}
