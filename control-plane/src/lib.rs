//! The Metlo-compatible API-key control plane.
//!
//! Layers, each depending only on those below it (see ARCHITECTURE.md):
//!
//! - [`app`]: the composition root (builds everything, spawns every background task)
//! - [`http`] and [`cli`]: the entry points; they translate, then call [`service`]
//! - [`service`]: what the control plane does (keys, audit log, last use)
//! - [`db`], [`cache`], [`kv_sync`]: the store, the verification cache, the KV sync
//! - [`config`], [`clock`], [`telemetry`]: settings, time, logs and metrics
//! - `test_util` (tests only): the service in process, with callers and replies

pub mod app;
pub mod cache;
pub mod cli;
pub mod clock;
pub mod config;
pub mod db;
pub mod http;
pub mod kv_sync;
pub mod service;
pub mod telemetry;
#[cfg(test)]
pub(crate) mod test_util;
