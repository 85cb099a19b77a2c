//! gptbalance: a declarative model router for OpenAI-compatible APIs.
//!
//! # Layout
//!
//! - [`cli`]: one file per subcommand (`serve`, `validate-config`, ...).
//! - [`config`]: read → expand `${VAR}` → parse → validate → `Config`, with
//!   every diagnostic as `PATH:LINE:COL: message` (`config::diags`), and the
//!   `model_match` rule (`config::matcher`) that validation and routing share.
//! - [`routing`]: the immutable `RoutingTable` (matching, priority tiers,
//!   weighted round robin, fallback, key health). Knows no HTTP.
//! - [`proxy`]: the accept loop and its drain signal (`server`, `drain`),
//!   the HTTP/1.1 fast path (`fast`) with hyper for the rest, what a head
//!   asks for (`route`: path and bearer token), request handling
//!   (`handler`), upstream attempts (`attempt` via `upstream`), the
//!   streaming relay, OpenAI-shaped errors, local endpoints. Parses no YAML.
//! - [`usage`]: the usage record, the background writer, the monthly
//!   SQLite files (`store`: naming, schema, migration, opening) and their
//!   insert engine (`insert`: prepared statements, binding in place),
//!   reports.
//! - [`state`]: the daemon's shared state (`AppState`, the last reload's
//!   status, the clock, the discovered model lists): read by the proxy per
//!   request, written by `ops`.
//! - [`ops`]: hot reload, systemd notify, logging, and the background
//!   upstream calls (key probes, model discovery) made through the proxy's
//!   upstream client.
//! - [`metrics`]: what is counted and the `/metrics` text. A leaf: callers
//!   hand it plain values (a finished request's counted fields, the
//!   routing table's key and budget gauges at a scrape).
//! - [`secret`]: keys and tokens, which only ever show as a redacted id.
//! - [`calendar`]: UTC days and months, and the usage rows' time stamps.
//!
//! A request flows one way: `proxy::server` (or `proxy::fast`) →
//! `proxy::route` → `proxy::handler` → `RoutingTable::candidates` →
//! `proxy::attempt` (via `proxy::upstream`) → `proxy::relay` →
//! `usage::UsageSink::send`. Config flows file → `config::load` →
//! `RoutingTable::build` → `ArcSwap::store` into `state::AppState::table`.
//! A finished request is counted by `metrics::Metrics::request_finished_by`
//! from `UsageRecord::counted`; a `/metrics` scrape renders
//! `RoutingTable::scrape`.
//!
//! The integration tests are one test binary, `tests/integration.rs`: each
//! file of `tests/` is a module of it, with the mock upstreams and gateway
//! in `tests/common`.

// `unsafe` only where a module says why, with a `SAFETY` note per block
// and a measured gain on the request path (see each module's docs).
#![deny(unsafe_code)]

pub mod calendar;
pub mod cli;
pub mod config;
pub mod limits;
pub mod metrics;
pub mod ops;
pub mod proxy;
pub mod routing;
pub mod secret;
pub mod state;
pub mod usage;
