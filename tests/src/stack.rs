//! One way to start a stack, for every suite, the soak and the benches:
//!
//! ```ignore
//! let s = StackBuilder::new(Backend::Postgres)
//!     .kv()                          // the KV API stand-in, the control plane syncing to it
//!     .edge(&[("ISOLATE_HIT_MS", "0")]) // the Worker under `wrangler dev` (and an echo origin)
//!     .redis(redis.url())
//!     .env("MAX_API_KEYS", 1000)
//!     .build()
//!     .await;
//! ```
//!
//! Without `.kv()` and `.edge()` it is a control plane alone (`.start_control_plane()`, or
//! `ControlPlane::start_with(builder)`). The Worker reads the stack's local KV, the one
//! the stand-in writes, so records the control plane pushes are what the edge sees.

use std::ops::{Deref, DerefMut};

use crate::control_plane::ControlPlane;
use crate::edge::{Edge, KvApi, Origin};
use crate::Backend;

/// How to start a stack (and, alone, a control plane).
#[derive(Debug, Clone)]
pub struct StackBuilder {
    pub backend: Backend,
    pub redis_url: Option<String>,
    /// The control plane's settings (environment variables).
    pub env: Vec<(String, String)>,
    kv: bool,
    edge: Option<Vec<(String, String)>>,
}

impl StackBuilder {
    pub fn new(backend: Backend) -> Self {
        StackBuilder {
            backend,
            redis_url: None,
            env: Vec::new(),
            kv: false,
            edge: None,
        }
    }

    pub fn redis(mut self, url: String) -> Self {
        self.redis_url = Some(url);
        self
    }

    /// One control-plane setting.
    pub fn env(mut self, k: &str, v: impl ToString) -> Self {
        self.env.push((k.to_owned(), v.to_string()));
        self
    }

    /// The KV API stand-in, with the control plane's KV sync pointed at it.
    pub fn kv(mut self) -> Self {
        self.kv = true;
        self
    }

    /// The Worker under `wrangler dev` with these settings (its secrets given as
    /// secrets), in front of an echo origin, with the control plane's edge key.
    pub fn edge(mut self, vars: &[(&str, &str)]) -> Self {
        self.edge = Some(
            vars.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        self
    }

    /// The control plane alone (no KV, no edge, whatever was asked).
    pub async fn start_control_plane(self) -> ControlPlane {
        ControlPlane::start_with(self).await
    }

    pub async fn build(mut self) -> Stack {
        let state = tempfile::tempdir().unwrap();
        let kv = if self.kv {
            let kv = KvApi::start(state.path()).await;
            // The stand-in's settings first: a test's own may override them.
            let mut env: Vec<(String, String)> = kv
                .control_plane_env()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect();
            env.append(&mut self.env);
            self.env = env;
            Some(kv)
        } else {
            None
        };
        let edge_vars = self.edge.take();
        let cp = ControlPlane::start_with(self).await;
        let mut stack = Stack {
            kv: Part::new(kv, "kv()"),
            cp,
            origin: Part::new(None, "edge(..)"),
            edge: Part::new(None, "edge(..)"),
            state,
        };
        if let Some(vars) = edge_vars {
            let vars: Vec<(&str, &str)> =
                vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            stack.start_edge(&vars).await;
        }
        stack
    }
}

/// A part of a stack that the builder may have left out: used as the part itself
/// (`s.kv.stats()`, `&s.edge`), and a clear panic if it was not asked for.
pub struct Part<T> {
    part: Option<T>,
    asked_by: &'static str,
}

impl<T> Part<T> {
    fn new(part: Option<T>, asked_by: &'static str) -> Self {
        Part { part, asked_by }
    }

    pub fn is_running(&self) -> bool {
        self.part.is_some()
    }
}

impl<T> Deref for Part<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.part
            .as_ref()
            .unwrap_or_else(|| panic!("this stack was built without .{}", self.asked_by))
    }
}

impl<T> DerefMut for Part<T> {
    fn deref_mut(&mut self) -> &mut T {
        let asked_by = self.asked_by;
        self.part
            .as_mut()
            .unwrap_or_else(|| panic!("this stack was built without .{asked_by}"))
    }
}

/// A running stack: the control plane, and what the builder asked for besides.
pub struct Stack {
    pub kv: Part<KvApi>,
    pub cp: ControlPlane,
    pub origin: Part<Origin>,
    pub edge: Part<Edge>,
    state: tempfile::TempDir,
}

impl Stack {
    /// Starts (or restarts) the Worker with these settings, in front of a new echo
    /// origin, on the stack's local KV (with `.kv()`; a KV of its own without).
    pub async fn start_edge(&mut self, vars: &[(&str, &str)]) {
        let (origin, edge) = self.another_edge(vars).await;
        self.origin = Part::new(Some(origin), "edge(..)");
        self.edge = Part::new(Some(edge), "edge(..)");
    }

    /// A Worker of the test's own (with its own echo origin) on the stack's control plane
    /// and local KV (with `.kv()`; a KV of its own without), beside the stack's parts.
    pub async fn another_edge(&self, vars: &[(&str, &str)]) -> (Origin, Edge) {
        self.another_edge_via(&self.cp.url, vars).await
    }

    /// Like [`another_edge`](Self::another_edge), reaching the control plane at
    /// `control_plane_url` (through a [`crate::PartitionProxy`], say).
    pub async fn another_edge_via(
        &self,
        control_plane_url: &str,
        vars: &[(&str, &str)],
    ) -> (Origin, Edge) {
        let origin = Origin::start().await;
        let state = self.kv.is_running().then(|| self.state.path());
        let edge = Edge::start_on_state(
            state,
            control_plane_url,
            &self.cp.edge_key,
            &origin.url,
            vars,
        )
        .await;
        (origin, edge)
    }

    /// Where the stack's local KV lives.
    pub fn kv_state(&self) -> &std::path::Path {
        self.state.path()
    }
}
