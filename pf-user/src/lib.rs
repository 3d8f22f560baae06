//! pf: the loader and control library behind the `pf` command.
//!
//! - [`spec`]: reservation arguments, parsed and validated.
//! - [`state`]: the pinned maps and the reservations kept in them.
//! - [`dataplane`]: loading the eBPF programs, attaching and detaching them.
//! - [`bpffs`]: the pin directory.
//! - [`netdev`]: what the kernel says about devices (XDP redirect targets, Ethernet or not).

mod batch;
pub mod bpffs;
pub mod dataplane;
pub mod error;
pub mod netdev;
pub mod privilege;
pub mod spec;
pub mod state;

pub use error::PfError;
