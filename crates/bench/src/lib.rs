//! `drover-bench`'s library: what its benchmark binaries share.
//!
//! The `drover-bench` binary (`src/main.rs`) has its own modules for the event-bus benchmarks;
//! the process-engine and soak benchmarks (`src/bin/`) share [`harness`].

pub mod harness;
