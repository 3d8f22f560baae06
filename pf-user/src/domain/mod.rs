//! The domain: reservations and what an admin types for them, parsed and checked. No I/O, no
//! kernel, no JSON, no CLI: every other layer may use it, it uses none of them.

pub mod limits;
pub mod net;
pub mod spec;
