//! pf's tests, by role (as aya keeps its integration tests apart from their helpers):
//!
//! - [`model`]: the reference model, the data plane's specification: what pf's programs must
//!   do to any frame. The differential tests hold the loaded programs to it.
//! - [`kit`]: namespaces, topology, packets, a `pf serve` runner, scratch directories; used by
//!   the tests, the benchmark (`examples/bench`) and the demo (xtask).
//! - `integration/`: the privileged tests, by behaviour, as this crate's unit tests (one test
//!   binary, run by `cargo xtask test` with `--test-threads=1`).

pub mod kit;
pub mod model;

#[cfg(test)]
mod integration;
