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
//! - [`proxy`]: the accept loop and its drain (`server`, `server::drain`),
//!   its own HTTP/1.1 loop (`server::h1_loop`) with hyper for the rest
//!   (`server::handoff`), what a head
//!   asks for (`route`: path and bearer token), request handling
//!   (`handler`), upstream attempts (`attempt`), the streaming relay
//!   (`relay`, `sse`, checked against the expected format by `expect`),
//!   OpenAI-shaped errors, local endpoints. Parses no YAML.
//! - [`upstream`]: the client side: the upstream request and its header
//!   policy (`request`), per-thread connection pools, the hand-written
//!   HTTP/1 client for plain-HTTP upstreams (`h1_client`), hyper for TLS
//!   ones, and the response body. Below `state` (which holds the clients)
//!   and `ops` (whose key probes and model discovery use it), so nothing
//!   above has to reach into `proxy` for it.
//! - [`http1`]: the one HTTP/1.1 codec of the server loop (`proxy::server::h1_loop`),
//!   the CL+TE guard on connections handed to hyper, and the plain-HTTP
//!   client (`upstream::h1_client`): heads and their limits, header names,
//!   Content-Length, Transfer-Encoding and Connection rules, chunk sizes,
//!   numbers. A leaf below both sides, as pingora keeps its HTTP/1 rules
//!   in one file for server and client.
//! - [`usage`]: the usage record, the background writer, the monthly
//!   SQLite files (`store`: naming, schema, migration, opening) and their
//!   insert engine (`insert`: cached statements bound through rusqlite),
//!   reports.
//! - [`state`]: the daemon's shared state (`AppState`, the last reload's
//!   status, the clock, the discovered model lists): read by the proxy per
//!   request, written by `ops`.
//! - [`ops`]: hot reload, systemd notify, logging, and the background
//!   upstream calls (key probes, model discovery) made through
//!   [`upstream`].
//! - [`metrics`]: what is counted and the `/metrics` text. A leaf: callers
//!   hand it plain values (a finished request's counted fields, the
//!   routing table's key and budget gauges at a scrape).
//! - [`secret`]: keys and tokens, which only ever show as a redacted id.
//! - [`calendar`]: UTC days and months, and the usage rows' time stamps.
//!
//! A request flows one way: `proxy::server` (`h1_loop`, or hyper) →
//! `proxy::route` → `proxy::handler` → `RoutingTable::candidates` →
//! `proxy::attempt` (via `upstream`) → `proxy::relay` →
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
pub mod http1;
pub mod limits;
pub mod metrics;
pub mod ops;
pub mod proxy;
pub mod routing;
pub mod secret;
pub mod state;
pub mod upstream;
pub mod usage;
