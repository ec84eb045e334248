//! Keeping Workers KV in step with the database: a client for Cloudflare's KV REST API
//! and the drainer that sends the transactional outbox through it.

pub mod client;
pub mod drainer;
