//! Kernel access: everything that talks to the kernel, below the service and above the
//! domain. It may use the domain, never the service, the API or the binary.
//!
//! - [`object`]: pf's embedded eBPF object, its maps pinned, its programs loaded.
//! - [`state`]: the pinned maps and the reservations kept in them.
//! - [`attach`]: attaching and detaching, the fast paths' device maps, and what the kernel says
//!   of an attachment.
//! - [`bpffs`]: the pin directory. [`bpfinfo`]: pinned links and their programs' maps.
//! - [`links`]: interfaces as they come and go (rtnetlink's link events).
//! - [`netdev`]: devices (XDP features, Ethernet or not); `tc`: the egress hook's netlink
//!   filters before TCX; `netlink`: the socket both use. [`nftset`]: the nftables set of
//!   reserved targets that the server's ruleset matches. [`privilege`]: the capability check.
//! - [`trace`]: `pf trace`'s switch and the ring of the programs' reports.
//! - [`trigger`]: port triggering's trigger ports and gates, and the ring of openings;
//!   [`trigger_hook`]: its program on a tunnel-side interface's TC ingress.
//! - [`limit`]: a reservation's limits (rates, source list) and its drops.
//! - [`error`]: [`PfError`], the one error type of this layer.

pub mod attach;
mod batch;
pub mod bpffs;
pub mod bpfinfo;
pub mod error;
pub mod host;
pub mod limit;
pub mod links;
pub mod netdev;
mod netlink;
pub mod nftset;
pub mod object;
pub mod privilege;
pub mod state;
mod tc;
pub mod trace;
pub mod trigger;
pub mod trigger_hook;

pub use error::PfError;
