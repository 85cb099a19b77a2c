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
// The HTTP/1 codec and the server loop against hyper and httparse.
#[cfg(test)]
mod differential;
mod drain;
pub mod endpoints;
pub mod expect;
// Header values httparse accepted, taken unchecked (http1::names::value).
#[allow(unsafe_code)]
pub mod fast;
pub mod handler;
mod idle;
pub mod multipart;
mod peek_json;
pub mod quota;
pub mod relay;
pub mod report;
pub mod route;
pub mod server;
pub mod shadow;
pub mod sse;
pub mod tls;
pub mod transform;
