//! A local stand-in for GitHub's secret-scanning side: the public-keys endpoint
//! (`GET /meta/public_keys/secret_scanning`), serving P-256 keys generated at run time, and
//! the signing of reports with them, as GitHub signs its partner-program requests.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use base64::Engine;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::{EncodePublicKey, LineEnding};
use serde_json::{json, Value};

/// One key pair; `id` is what `Github-Public-Key-Identifier` names.
pub struct GitHubKey {
    pub id: String,
    signing: SigningKey,
    pub is_current: bool,
}

impl GitHubKey {
    pub fn generate(id: &str, is_current: bool) -> Self {
        let mut seed = [0u8; 32];
        loop {
            getrandom::fill(&mut seed).expect("randomness");
            if let Ok(signing) = SigningKey::from_slice(&seed) {
                return GitHubKey {
                    id: id.to_owned(),
                    signing,
                    is_current,
                };
            }
        }
    }

    /// The `Github-Public-Key-Signature` value for `body`: base64 of the DER signature.
    pub fn sign(&self, body: &[u8]) -> String {
        let signature: Signature = self.signing.sign(body);
        base64::engine::general_purpose::STANDARD.encode(signature.to_der().as_bytes())
    }

    fn entry(&self) -> Value {
        json!({
            "key_identifier": self.id,
            "key": self.signing.verifying_key().to_public_key_pem(LineEnding::LF).unwrap(),
            "is_current": self.is_current,
        })
    }
}

#[derive(Default)]
struct Shared {
    keys: std::sync::Mutex<Vec<Value>>,
    down: AtomicBool,
    fetches: AtomicUsize,
}

/// The keys endpoint; `url` is what `GITHUB_KEYS_URL` should be set to.
pub struct GitHubKeysEndpoint {
    pub url: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl GitHubKeysEndpoint {
    pub async fn start(keys: &[&GitHubKey]) -> Self {
        let shared = Arc::new(Shared::default());
        *shared.keys.lock().unwrap() = keys.iter().map(|k| k.entry()).collect();
        let app = axum::Router::new()
            .route(
                "/meta/public_keys/secret_scanning",
                axum::routing::get(serve_keys),
            )
            .with_state(shared.clone());
        // Bound here and held: a port the kernel picks cannot be taken between a check
        // and the bind (`free_port` is for servers another process starts later; a CI
        // run once lost this bind to EADDRINUSE).
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap();
        let url = format!(
            "http://{}/meta/public_keys/secret_scanning",
            listener.local_addr().unwrap()
        );
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        GitHubKeysEndpoint { url, shared, task }
    }

    /// Answers 503 from now on (`true`), or the keys again (`false`).
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
    }

    /// Replaces the keys it lists.
    pub fn set_keys(&self, keys: &[&GitHubKey]) {
        *self.shared.keys.lock().unwrap() = keys.iter().map(|k| k.entry()).collect();
    }

    /// How many times the keys were asked for.
    pub fn fetches(&self) -> usize {
        self.shared.fetches.load(Ordering::SeqCst)
    }
}

impl Drop for GitHubKeysEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_keys(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    shared.fetches.fetch_add(1, Ordering::SeqCst);
    if shared.down.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"message": "down"})),
        );
    }
    let keys = shared.keys.lock().unwrap().clone();
    (StatusCode::OK, Json(json!({ "public_keys": keys })))
}

/// The token type the control plane registers with GitHub's partner program.
pub const TOKEN_TYPE: &str = "metlo_api_key";

/// A secret-scanning report (the body GitHub POSTs) naming `tokens`.
pub fn report(tokens: &[&str]) -> Vec<u8> {
    let alerts: Vec<Value> = tokens
        .iter()
        .map(|t| json!({"token": t, "type": TOKEN_TYPE, "url": "https://github.com/o/r/blob/main/x.env", "source": "content"}))
        .collect();
    serde_json::to_vec(&alerts).unwrap()
}
