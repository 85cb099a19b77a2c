//! The HTTP side: accept loop, request handling, upstream attempts, relay.
//!
//! Parses no YAML; reads the current `RoutingTable` once per request from
//! [`AppState::table`](crate::state::AppState::table) and keeps it for the request's life.

pub mod access;
pub mod admin_ui;
pub mod anthropic;
pub mod api_error;
pub mod attempt;
pub mod body;
pub mod cors;
mod drain;
pub mod endpoints;
// Header values httparse accepted, taken unchecked (wire_names::value).
#[allow(unsafe_code)]
pub mod fast;
// Reads straight into hyper's buffer cursor, with no copy.
#[allow(unsafe_code)]
pub mod framing;
pub mod handler;
mod idle;
mod peek_json;
// Reads into spare buffer capacity; header values taken unchecked.
pub mod multipart;
#[allow(unsafe_code)]
pub mod plain;
pub mod quota;
pub mod relay;
pub mod report;
pub mod request;
pub mod route;
pub mod server;
pub mod shadow;
pub mod sse;
pub mod tls;
pub mod transform;
pub mod upstream;
// `value`: a header value httparse accepted, not checked again.
#[allow(unsafe_code)]
mod wire_names;
