//! The API: its wire types, shared by `pf serve` and its clients, and the client the CLI uses.

pub mod client;
pub mod types;
