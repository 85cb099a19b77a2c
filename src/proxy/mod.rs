//! The HTTP side: accept loop, request handling, upstream attempts, relay.
//!
//! Parses no YAML; reads the current `RoutingTable` once per request from
//! [`AppState::table`] and keeps it for the request's life.

pub mod access;
pub mod admin_ui;
pub mod anthropic;
pub mod api_error;
pub mod attempt;
pub mod body;
pub mod cors;
pub mod endpoints;
// Header values httparse accepted, taken unchecked (wire_names::value).
#[allow(unsafe_code)]
pub mod fast;
// Reads straight into hyper's buffer cursor, with no copy.
#[allow(unsafe_code)]
pub mod framing;
pub mod handler;
mod peek_json;
// Reads into spare buffer capacity; header values taken unchecked.
pub mod multipart;
#[allow(unsafe_code)]
pub mod plain;
pub mod quota;
pub mod relay;
pub mod report;
pub mod server;
pub mod shadow;
pub mod sse;
pub mod tls;
pub mod transform;
pub mod upstream;
// `value`: a header value httparse accepted, not checked again.
#[allow(unsafe_code)]
mod wire_names;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;

use crate::ops::metrics::Metrics;
use crate::routing::RoutingTable;
use crate::usage::UsageSink;

/// Wall-clock source; tests replace it to cross a month boundary.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// The result of the last reload, shown by `/admin/status`.
#[derive(Debug, Clone)]
pub struct ReloadStatus {
    pub ok: bool,
    pub at: SystemTime,
    /// `PATH:LINE:COL: message` per error.
    pub errors: Vec<String>,
}

/// Everything a request handler needs, shared by all connections.
pub struct AppState {
    pub table: ArcSwap<RoutingTable>,
    pub upstream: upstream::UpstreamClients,
    pub usage: UsageSink,
    pub metrics: Arc<Metrics>,
    pub clock: Clock,
    /// The config file, for `/admin/reload`; `None` when built from text.
    pub config_path: Option<PathBuf>,
    pub last_reload: Mutex<ReloadStatus>,
    /// Serializes reloads from the watcher, SIGHUP and `/admin/reload`.
    pub reload_lock: tokio::sync::Mutex<()>,
    /// `server.max_connections`, shared by every worker's accept loop.
    pub connection_slots: Arc<tokio::sync::Semaphore>,
    /// Upstreams' own model lists (`discover_models`), for `/v1/models`.
    pub discovered: crate::ops::discovery::DiscoveredModels,
    /// Callers' limits and key cooldowns shared with other instances;
    /// `None` without `shared_state`.
    pub shared: Option<Arc<crate::limits::shared::SharedState>>,
    /// The TLS acceptor every worker shares, made by the first to start
    /// when the config has `server.tls` (`tls::acceptor`).
    pub listener_tls: std::sync::OnceLock<tokio_rustls::TlsAcceptor>,
}

impl AppState {
    pub fn new(
        table: RoutingTable,
        usage: UsageSink,
        metrics: Arc<Metrics>,
        config_path: Option<PathBuf>,
    ) -> AppState {
        metrics.set_generation(table.generation);
        let slots = Arc::new(tokio::sync::Semaphore::new(
            table.config.server.max_connections,
        ));
        AppState {
            table: ArcSwap::from_pointee(table),
            upstream: upstream::UpstreamClients::default(),
            usage,
            metrics,
            clock: Arc::new(SystemTime::now),
            config_path,
            last_reload: Mutex::new(ReloadStatus {
                ok: true,
                at: SystemTime::now(),
                errors: Vec::new(),
            }),
            reload_lock: tokio::sync::Mutex::new(()),
            connection_slots: slots,
            discovered: Default::default(),
            shared: None,
            listener_tls: std::sync::OnceLock::new(),
        }
    }

    pub fn with_clock(mut self, clock: Clock) -> AppState {
        self.clock = clock;
        self
    }
}
