//! drover's process engine: every API operation becomes a durable process that drives an agent.
//!
//! # Layout
//! - [`defs`]: process definitions as data (start states, transitioning state, done state,
//!   handler, delegate): one table drives state checks, the API's actions and the engine.
//! - [`engine`]: the claim loop (leases, one process per resource), handlers that call agents,
//!   retries with backoff, `max_attempts` / `max_age`, lease renewal.
//! - [`render`]: the plain JSON of a resource that agents receive and the API extends.
//!
//! **Invariant:** the engine knows nothing about HTTP or WebSockets: it talks to agents through
//! the [`Bus`] trait, which the server implements with its hub.

pub mod defs;
pub mod engine;
pub mod render;

use std::future::Future;
use std::time::Duration;

use drover_proto::Event;
use drover_store::Resource;

pub use engine::{Engine, EngineHandle};

/// How a call to an agent failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallFailure {
    /// No reply in time.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The agent replied with an error.
    #[error("{0}")]
    ErrorReply(String),
    /// The server is stopping.
    #[error("server shutting down")]
    Shutdown,
}

/// What the engine needs from the event bus.
pub trait Bus: Send + Sync + 'static {
    /// Sends a request and waits for the final reply; progress replies go to `on_progress`.
    fn call(
        &self,
        request: Event,
        timeout: Duration,
        on_progress: Box<dyn FnMut(&Event) + Send>,
    ) -> impl Future<Output = Result<Event, CallFailure>> + Send;

    /// A resource changed (state, transitioning, data): emit `state.change` and queue a
    /// `resource.change`.
    fn changed(&self, resource: &Resource, previous_state: Option<&str>);
}

/// The tunables the engine reads, each time it needs them.
pub trait Tunables: Send + Sync + 'static {
    /// An integer setting by name.
    fn int(&self, name: &str) -> i64;
}
