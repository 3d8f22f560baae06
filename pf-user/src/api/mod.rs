//! The API: its wire types, shared by `pf serve` and its clients, the client the CLI uses, and
//! `pf top`'s ranking of two readings.

pub mod client;
pub mod port_mapping;
pub mod top;
pub mod types;

/// The API's OpenAPI 3.0 description, served at `GET /v1/openapi.json`; a test holds it to
/// the routes `pf serve` serves.
pub const OPENAPI: &str = include_str!("openapi.json");
