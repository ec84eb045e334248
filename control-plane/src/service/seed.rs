//! `keys seed`: many real keys at once, for benchmarks and load tests — named
//! `<prefix>-<n>`, stored in batches of [`BATCH`] (one transaction each), optionally
//! written to a file for a load generator. Never shown on a terminal.

use std::io::Write;

use metlo_shared::{ApiKey, KeyType, Role};
use serde_json::json;

use super::audit::Actor;
use super::keys::validate_name;
use super::Error;
use crate::clock::now_ms;
use crate::db::rows::StoredKey;
use crate::db::Store;

/// Keys per transaction.
pub const BATCH: usize = 10_000;

pub struct SeedRequest {
    pub prefix: String,
    pub count: u64,
    /// The first `n` in `<prefix>-<n>` (to add to an earlier seed).
    pub start: u64,
    pub key_type: KeyType,
}

/// Stores `request.count` new client keys; each full key goes to `keys_out` (one per line)
/// when given. `progress` is told the running total after each batch. On an error, the
/// batches before it stay stored.
pub async fn seed_keys(
    store: &Store,
    request: &SeedRequest,
    max_keys: u64,
    actor: &Actor,
    mut keys_out: Option<&mut dyn Write>,
    progress: &mut dyn FnMut(u64),
) -> Result<u64, Error> {
    let last = request
        .start
        .saturating_add(request.count.saturating_sub(1));
    validate_name(Some(&format!("{}-{last}", request.prefix)))?;
    let mut stored = 0;
    while stored < request.count {
        let n = (request.count - stored).min(BATCH as u64);
        let now = now_ms();
        let mut batch = Vec::with_capacity(n as usize);
        for i in 0..n {
            let secret = ApiKey::generate()
                .map_err(|e| Error::Internal(anyhow::anyhow!("no randomness: {e}")))?;
            if let Some(out) = keys_out.as_mut() {
                writeln!(out, "{}", secret.expose_secret())
                    .map_err(|e| Error::Internal(anyhow::anyhow!("writing the keys file: {e}")))?;
            }
            let name = format!("{}-{}", request.prefix, request.start + stored + i);
            batch.push(StoredKey::new(
                &secret,
                name,
                request.key_type,
                Role::Client,
                now,
            ));
        }
        let first = request.start + stored;
        let audit = actor.entry(
            "key.seed",
            &format!("{}-{first}", request.prefix),
            json!({"count": n, "last": format!("{}-{}", request.prefix, first + n - 1),
                   "type": request.key_type.as_str(), "role": "client"}),
        );
        store.insert_keys_bulk(&batch, max_keys, &audit).await?;
        stored += n;
        progress(stored);
    }
    if let Some(out) = keys_out.as_mut() {
        out.flush()
            .map_err(|e| Error::Internal(anyhow::anyhow!("writing the keys file: {e}")))?;
    }
    Ok(stored)
}
