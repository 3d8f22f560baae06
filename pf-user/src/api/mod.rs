//! The API: its wire types, shared by `pf serve` and its clients, and the client the CLI uses.

pub mod client;
pub mod port_mapping;
pub mod types;

/// The API's OpenAPI 3.0 description, served at `GET /v1/openapi.json`; a test holds it to
/// the routes `pf serve` serves.
pub const OPENAPI: &str = include_str!("openapi.json");
