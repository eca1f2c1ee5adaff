//! drover's wire contract, shared by the server, the client library and the agent.
//!
//! # Layout
//! - [`event`]: the event JSON exactly as the original's Go and Python clients send and expect it,
//!   and reply construction.
//! - [`names`]: event-name validation, server-side qualification (`;agent=<id>`, `;account=<id>`)
//!   and the stripping of that suffix on delivery.
//! - [`ids`]: API ids in the original's style (`1i42`: a `1`, a per-type prefix, a number).
//! - [`api`]: the GDAPI error body.
//! - [`logs`]: container logs over the bus (`instance.logs`, its chunks, acks and cancel).
//!
//! **Invariant:** this crate does no I/O and depends on serde only; it is the one place where
//! the wire format is defined.

pub mod api;
pub mod event;
pub mod ids;
pub mod logs;
pub mod names;

pub use event::{Event, Transitioning};
