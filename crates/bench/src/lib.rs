//! `drover-bench`'s library: what its benchmark binaries share.
//!
//! The `drover-bench` binary (`src/main.rs`) has its own modules for the event-bus benchmarks
//! and uses [`harness`]'s start and `/proc` readers; the process-engine, agents and soak
//! benchmarks (`src/bin/`) share all of [`harness`]; [`chaos`] is the fault-injection run of
//! `drover-bench-chaos` and `.ci/chaos`; [`peer`] runs graphile-worker (Node) beside
//! `drover-bench-engine` on PostgreSQL; [`cluster`] starts several nodes on one PostgreSQL
//! database and the bench's own nats-server (cluster mode, issue 14).

pub mod chaos;
pub mod cluster;
pub mod harness;
pub mod peer;
