//! The API's client side: what the CLI (and any other program) uses to talk to `pf serve`.

pub mod client;
