//! The Metlo-compatible API-key control plane.

pub mod admin_cli;
pub mod audit;
pub mod auth;
pub mod cache;
pub mod cli;
pub mod error;
pub mod keys;
pub mod kv_client;
pub mod kv_sync;
pub mod ops;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod usage;

use cache::VerifyCache;
use store::Store;

/// Shared by every request handler. Cloned for every request (axum hands each extractor
/// its own copy), so it is one `Arc`: a clone is one atomic increment, not one per field.
#[derive(Clone)]
pub struct AppState(std::sync::Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> Self {
        AppState(std::sync::Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What every request handler shares.
pub struct Shared {
    pub store: Store,
    pub cache: VerifyCache,
    pub max_api_keys: u64,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// The KV sync's status, when a KV target is configured.
    pub kv_sync: Option<std::sync::Arc<kv_sync::SyncStatus>>,
    /// Last-use times waiting to be written.
    pub usage: std::sync::Arc<usage::Usage>,
    /// Failed authentications waiting to be written to the audit log.
    pub auth_failures: std::sync::Arc<audit::AuthFailures>,
}
