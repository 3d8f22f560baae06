//! pf: the loader and control library behind the `pf` command.
//!
//! - [`spec`]: reservation arguments, parsed and validated.
//! - [`state`]: the pinned maps and the reservations kept in them.
//! - [`dataplane`]: loading the eBPF programs, attaching and detaching them.
//! - [`bpffs`]: the pin directory.
//! - [`bpfinfo`]: what the kernel says of pinned links and the maps their programs use.
//! - [`netdev`]: what the kernel says about devices (XDP redirect targets, Ethernet or not).
//! - [`store`]: the durable reservation records (SQLite), the source of truth.
//! - [`policy`]: `pf serve`'s configuration and the rules every reservation must pass.
//! - [`service`]: `pf serve`, the reservation service and its HTTP/JSON API.
//! - [`client`]: the CLI's side of that API.

mod batch;
pub mod bpffs;
pub mod bpfinfo;
pub mod client;
pub mod dataplane;
pub mod error;
pub mod netdev;
pub mod policy;
pub mod privilege;
pub mod service;
pub mod spec;
pub mod state;
pub mod store;

pub use error::PfError;
