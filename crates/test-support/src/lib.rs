//! drover's test harness, shared by every crate's integration tests (a dev-dependency only).
//!
//! - [`TestServer`]: a real server on `127.0.0.1:0`, on SQLite in a temporary directory or on
//!   PostgreSQL in a fresh schema, with setting overrides and an admin client
//!   ([`ADMIN_ACCESS`]/[`ADMIN_SECRET`]). [`servers`] gives one per backend.
//! - [`postgres`]: the PostgreSQL fixture ([`postgres::url`], a fresh schema or database).
//!   When `DROVER_TEST_POSTGRES_URL` is unset a PostgreSQL test never passes silently: with
//!   `CI` set it panics, otherwise it prints a `SKIP` line to stderr.
//! - [`wait`]: [`wait_state`] and [`wait_change`] await `state.change`/`resource.change` events
//!   (no polling); [`wait_for`] and [`poll`] poll with a deadline for what has no event;
//!   [`within`] bounds any future. Every wait fails with what it last saw.
//! - [`agent::TestAgent`]: a WebSocket agent whose answers a test scripts.
//! - [`process::DroverProcess`]: the real `drover` binary as a child, killed when dropped.
//! - [`cluster::Cluster`]: N `drover server` children on one PostgreSQL database and one
//!   nats-server (`DROVER_TEST_NATS_URL`), to kill, pause and restart.
//!
//! ```no_run
//! # async fn example() {
//! use drover_test_support::{TestServer, wait_state};
//! let server = TestServer::builder().setting("process.poll.millis", "50").start().await;
//! let created = server.admin.post("hosts", &serde_json::json!({"name": "h"})).await.unwrap();
//! let path = format!("hosts/{}", created["id"].as_str().unwrap());
//! wait_state(&server.admin, &path, "active").await;
//! # }
//! ```

pub mod agent;
pub mod cluster;
pub mod postgres;
pub mod process;
mod server;
pub mod wait;

pub use server::{ADMIN_ACCESS, ADMIN_SECRET, Backend, Builder, FAST, TestServer, servers};
pub use wait::{WAIT, next_event, poll, wait_change, wait_for, wait_state, within};

/// Installs the TLS crypto provider the HTTP clients need (once per process; harmless after).
pub fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
