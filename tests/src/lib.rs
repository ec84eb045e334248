//! Harness for end-to-end tests and benchmarks: starts the real control-plane binary,
//! throwaway Redis servers and databases, and talks to them over HTTP.
//!
//! PostgreSQL comes from `scripts/stack.sh` (it exports `METLO_TEST_PG_URL`); every test
//! gets its own database in it. Redis servers are started per test, so a test can stop
//! and restart its own.

pub mod bench;
pub mod browser;
pub mod client;
pub mod control_plane;
pub mod edge;
pub mod github;
pub mod process;
pub mod stack;
pub mod time;
pub mod tls;

pub use client::encode_path_segment;
pub use control_plane::{
    assert_no_keys_in, control_plane_bin, run_cli, spawn_server, wait_for_listening, ControlPlane,
};
pub use process::{
    free_port, fresh_postgres_database, memory_kib, unique_suffix, wait_for_port, workspace_root,
    PartitionProxy, Postgres, Redis,
};
pub use reqwest::StatusCode;
pub use stack::{Stack, StackBuilder};

/// Which key store a control plane runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs `f` for both backends (for use in `#[tokio::test]` functions).
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name($crate::Backend::Sqlite).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$name($crate::Backend::Postgres).await
                }
            }
        )*
    };
}
