//! Wasm glue for the signed assertion: signs with WebCrypto (a few lines of JS) what
//! [`crate::assertion`] says is due, and keeps the tokens per isolate.

use std::cell::RefCell;

use metlo_shared::{KeyHash, KeyRecord};
use wasm_bindgen::prelude::wasm_bindgen;
use wasm_bindgen::JsValue;
use worker::wasm_bindgen_futures::JsFuture;

use crate::assertion::AssertionCache;
use crate::config::{AssertionConfig, Config};

thread_local! {
    // The assertions this isolate signed, per key.
    static ASSERTIONS: RefCell<Option<AssertionCache>> = const { RefCell::new(None) };
}

// Signs an assertion with WebCrypto (ECDSA P-256, SHA-256: a JWS `ES256` signature is the
// raw r‖s WebCrypto gives). The claims are built here, where `JSON.stringify` escapes them;
// the imported key is kept for the isolate's life (per secret text).
#[wasm_bindgen(inline_js = "\
let held = null; \
function b64u(bytes) { let s = ''; for (const b of bytes) s += String.fromCharCode(b); \
  return btoa(s).replace(/\\+/g, '-').replace(/\\//g, '_').replace(/=+$/, ''); } \
const text = (t) => b64u(new TextEncoder().encode(t)); \
export async function sign_assertion(jwk, iss, aud, ttl, sub, name, type, role, perms, meta, identity, now) { \
  if (!held || held.jwk !== jwk) { try { const k = JSON.parse(jwk); held = { jwk, kid: k.kid, \
    key: await crypto.subtle.importKey('jwk', k, { name: 'ECDSA', namedCurve: 'P-256' }, false, ['sign']) }; } \
    catch (e) { throw new Error('ASSERTION_SIGNING_KEY is not an ES256 private JWK (' + e.name + ')'); } } \
  const claims = { iss, aud, sub, iat: now, exp: now + ttl, name, type, role, \
    permissions: perms ? perms.split(' ') : [] }; \
  if (identity) claims.identity = identity; \
  if (meta) { try { claims.meta = JSON.parse(new TextDecoder().decode(Uint8Array.from( \
    atob(meta.replace(/-/g, '+').replace(/_/g, '/')), (c) => c.charCodeAt(0)))); } catch (e) {} } \
  const input = text(JSON.stringify({ alg: 'ES256', kid: held.kid, typ: 'JWT' })) + '.' + \
    text(JSON.stringify(claims)); \
  const sig = await crypto.subtle.sign({ name: 'ECDSA', hash: 'SHA-256' }, held.key, \
    new TextEncoder().encode(input)); \
  return input + '.' + b64u(new Uint8Array(sig)); }")]
extern "C" {
    #[allow(clippy::too_many_arguments)]
    #[wasm_bindgen(catch)]
    fn sign_assertion(
        jwk: &str,
        iss: &str,
        aud: &str,
        ttl: f64,
        sub: &str,
        name: &str,
        key_type: &str,
        role: &str,
        permissions: &str,
        meta: &str,
        identity: &str,
        now: f64,
    ) -> Result<js_sys::Promise, JsValue>;
}

/// The assertion for `record`'s key: held, or signed now and held for half its lifetime.
pub(crate) async fn assertion_for(
    hash: &KeyHash,
    record: &KeyRecord,
    settings: &AssertionConfig,
    config: &Config,
) -> Result<String, String> {
    let now = now_ms();
    let held = ASSERTIONS.with(|cell| {
        cell.borrow_mut()
            .get_or_insert_with(|| AssertionCache::new(config.isolate_capacity))
            .get(hash, record, now)
            .map(str::to_owned)
    });
    if let Some(token) = held {
        return Ok(token);
    }
    let signed = sign_assertion(
        &settings.signing_key,
        &settings.issuer,
        &settings.audience,
        settings.ttl_seconds as f64,
        &record.identifier,
        &record.name,
        record.key_type.as_str(),
        record.role.as_str(),
        &record.permissions.join(" "),
        record.meta.as_deref().unwrap_or(""),
        record.identity.as_deref().unwrap_or(""),
        (now / 1000) as f64,
    )
    .map_err(|e| format!("{e:?}"))?;
    let token = JsFuture::from(signed)
        .await
        .map_err(|e| format!("{e:?}"))?
        .as_string()
        .ok_or("the signature is not text")?;
    ASSERTIONS.with(|cell| {
        if let Some(cache) = cell.borrow_mut().as_mut() {
            cache.put(*hash, record, token.clone(), now, settings.ttl_seconds);
        }
    });
    Ok(token)
}

fn now_ms() -> u64 {
    js_sys::Date::now() as u64
}
