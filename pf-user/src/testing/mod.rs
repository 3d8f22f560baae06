//! Real parts for tests, beside pf's own code (Katran's `testing` flag): built for pf's unit
//! tests, and for the integration tests with the `testing` feature.

pub mod postgres;
