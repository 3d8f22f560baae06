//! pf: the loader and control library behind the `pf` command, in layers; imports go one way,
//! from the top of this list to the bottom (see ARCHITECTURE.md, "Layers"):
//!
//! - [`service`]: `pf serve`: config and policy, the engine, the store, the audit log, HTTP.
//! - [`api`]: the API's client.
//! - [`kernel`]: everything that talks to the kernel: the object, the maps, attachments.
//! - [`domain`]: reservations and their specs, parsed and validated.

pub mod api;
pub mod domain;
pub mod kernel;
pub mod service;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use kernel::PfError;
