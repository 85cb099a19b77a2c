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
pub mod endpoints;
pub mod expect;
pub mod handler;
pub mod multipart;
mod peek_json;
pub mod quota;
pub mod ratelimit;
pub mod relay;
pub mod report;
pub mod route;
pub mod server;
pub mod shadow;
pub mod sse;
pub mod transform;
