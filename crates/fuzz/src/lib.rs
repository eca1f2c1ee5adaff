//! Fuzz targets for drover's parsers of untrusted input.
//!
//! Each target is a plain function that takes arbitrary bytes and panics when a property does
//! not hold. Two drivers run them:
//! - `tests/corpus.rs` (part of `cargo test`) replays every file of `corpus/<target>/`;
//! - the `fuzz_<target>` binaries (feature `libfuzzer`) hand them to libFuzzer, coverage-guided,
//!   built on the stable toolchain by `.ci/fuzz`.
//!
//! | target | input | properties |
//! |---|---|---|
//! | [`event`] | any bytes | decoding never panics; what decodes re-encodes, decodes to its normal form and encodes to the same text again |
//! | [`names`] | qualifier id + name | validation never panics; a non-raw qualification ends in exactly the server's suffix, is idempotent and keeps the base |
//! | [`query`] | a query string | the collection and process filters never panic, refuse with a 4xx, accept only schema columns, and their `next` link parses to the same query |
//! | [`api::Api`] | `<key> <METHOD> <path>` + body | through the real router and a SQLite store: no 5xx, no panic, every 4xx has a GDAPI error body |

pub mod api;
mod event;
mod names;
mod query;

pub use event::event;
pub use names::names;
pub use query::query;
