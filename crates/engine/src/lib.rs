//! drover's process engine: every API operation becomes a durable process that drives an agent.
//!
//! # Layout
//! - [`defs`]: process definitions as data (start states, transitioning state, done state,
//!   handler, delegate): one table drives state checks, the API's actions and the engine.
//! - [`engine`]: the claim loop (leases, one process per resource), handlers that call agents,
//!   retries with backoff, `max_attempts` / `max_age`, lease renewal.
//! - [`external`]: external handlers, the extensions that take part in processes
//!   (`<process>;handler=<name>`), and the [`Registry`] of the active ones.
//! - [`render`]: the plain JSON of a resource that agents receive and the API extends.
//! - [`stats`]: the engine's counters and histograms by process name (atomics made at start).
//!
//! **Invariant:** the engine knows nothing about HTTP or WebSockets: it talks to agents through
//! the [`Bus`] trait, which the server implements with its hub.

pub mod defs;
pub mod engine;
pub mod external;
pub mod render;
pub mod stats;

use std::future::Future;
use std::time::Duration;

use drover_proto::Event;
use drover_store::Resource;

pub use arc_swap::ArcSwap;
pub use engine::{Engine, EngineHandle};
pub use external::Registry;

/// The engine's clock, in milliseconds since the epoch: the wall clock shifted by how far
/// tokio's time has moved apart from real time since the clock was made. In real time the two
/// agree and this is the wall clock; in a test with paused tokio time it stands still until the
/// test advances time, and then moves with it (backoff, max age and leases follow it, and so
/// does the store's claim, which is given the engine's now).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    tokio: tokio::time::Instant,
    real: std::time::Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

impl Clock {
    /// A clock that starts at the wall clock's now.
    pub fn new() -> Clock {
        Clock {
            tokio: tokio::time::Instant::now(),
            real: std::time::Instant::now(),
        }
    }

    /// Now.
    pub fn now_millis(&self) -> i64 {
        self.millis_at(tokio::time::Instant::now())
    }

    /// The time of a tokio instant on this clock.
    pub fn millis_at(&self, instant: tokio::time::Instant) -> i64 {
        let wall = drover_proto::event::now_millis();
        let moved = match instant.checked_duration_since(self.tokio) {
            Some(ahead) => ahead.as_nanos() as i128,
            None => -(self.tokio.duration_since(instant).as_nanos() as i128),
        };
        let real = self.real.elapsed().as_nanos() as i128;
        wall + ((moved - real) / 1_000_000) as i64
    }
}

/// How a call to an agent failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallFailure {
    /// No reply in time.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The agent replied with an error; the process tries again after a backoff.
    #[error("{0}")]
    ErrorReply(String),
    /// The agent replied with an error it marked permanent (the request can never succeed,
    /// e.g. the executable does not exist): the process fails at once.
    #[error("{0}")]
    Permanent(String),
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

/// The settings the engine reads, as one typed snapshot. The server swaps in a new snapshot
/// when a setting changes; a reader loads the current one (no parsing, no lock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tunables {
    /// `process.workers`: attempts running at once.
    pub workers: usize,
    /// `process.claim.batch`: the most processes one claim takes.
    pub claim_batch: usize,
    /// `process.lease.millis`.
    pub lease_millis: i64,
    /// `process.poll.millis`: the longest sleep when nothing is ready.
    pub poll_millis: i64,
    /// `process.max_attempts`.
    pub max_attempts: i64,
    /// `process.max_age.seconds`, in milliseconds.
    pub max_age_millis: i64,
    /// `process.retry_max_wait.millis`.
    pub retry_max_wait_millis: i64,
    /// `eventing.timeout.millis`: how long an agent call waits for its reply.
    pub call_timeout_millis: i64,
    /// `agent.activate.ping.timeout.millis`.
    pub activate_ping_timeout_millis: i64,
}

impl Default for Tunables {
    fn default() -> Self {
        Tunables {
            workers: 512,
            claim_batch: 64,
            lease_millis: 5000,
            poll_millis: 1000,
            max_attempts: 10,
            max_age_millis: 1_800_000,
            retry_max_wait_millis: 120_000,
            call_timeout_millis: 45_000,
            activate_ping_timeout_millis: 2000,
        }
    }
}

/// The engine's tunables, shared with whoever changes them.
pub type SharedTunables = std::sync::Arc<arc_swap::ArcSwap<Tunables>>;
