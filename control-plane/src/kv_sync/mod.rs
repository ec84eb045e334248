//! Keeping Workers KV in step with the database: a client for Cloudflare's KV REST API,
//! the drainer that sends the transactional outbox through it, and, for what the outbox
//! cannot know about (a new or emptied namespace, a write lost outside its view), the
//! resync and the reconcile, which write through `writer`.

pub mod client;
pub mod drainer;
pub mod reconcile;
pub mod resync;
pub mod writer;
