//! pf's tests, by role (as aya keeps its integration tests apart from their helpers):
//!
//! - [`model`]: the reference model, the data plane's specification: what pf's programs must
//!   do to any frame. The differential tests hold the loaded programs to it.
//! - [`kit`]: namespaces, topology, packets, a `pf serve` runner, scratch directories; used by
//!   the tests, the benchmark (`examples/bench`) and the demo (xtask).
//! - `fixtures/`: the data plane's fixture tables (packet in, action, packet out, counter) as
//!   data; `integration/fixtures.rs` is their runner.
//! - `integration/`: the privileged tests, by behaviour, as this crate's unit tests (one test
//!   binary, run by `cargo xtask test` with `--test-threads=1`).

pub mod kit;
pub mod model;

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod integration;
