//! The HTTP side: accept loop, request handling, upstream attempts, relay.
//!
//! Parses no YAML; reads the current `RoutingTable` once per request from
//! [`AppState::table`] and keeps it for the request's life.

pub mod anthropic;
pub mod api_error;
pub mod attempt;
pub mod body;
pub mod endpoints;
pub mod fast;
pub mod framing;
pub mod handler;
mod peek_json;
pub mod plain;
pub mod relay;
pub mod report;
pub mod server;
pub mod sse;
pub mod transform;
pub mod upstream;
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
        }
    }

    pub fn with_clock(mut self, clock: Clock) -> AppState {
        self.clock = clock;
        self
    }
}
