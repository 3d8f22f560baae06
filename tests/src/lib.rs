//! Fixtures for pf's privileged tests and its demo: network namespaces, the three-host
//! topology, commands run inside them, and cleanup that happens even when a test fails.
//!
//! The tests themselves are this crate's unit tests (one test binary, run by
//! `cargo xtask test` with `--test-threads=1`, as aya runs its integration tests).

pub mod netns;
pub mod packet;
pub mod topology;

#[cfg(test)]
mod tests;
