//! The daemon's shared state: what every connection, the reload watcher
//! and the background tasks hold one `Arc` of.
//!
//! Built once by `cli::serve` (or a test) and never replaced; what changes
//! inside is swapped whole (`table`) or kept behind short locks. The proxy
//! reads it per request; `ops` writes it (reload, model lists, probes).
//! Holds no logic of its own beyond construction and the model-list cache.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use arc_swap::ArcSwap;

use crate::metrics::Metrics;
use crate::proxy::upstream::UpstreamClients;
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
    pub upstream: UpstreamClients,
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
    pub discovered: DiscoveredModels,
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
            upstream: UpstreamClients::default(),
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

/// The names each client's upstream listed, by client name.
#[derive(Default)]
pub struct DiscoveredModels {
    by_client: Mutex<HashMap<String, Listed>>,
}

pub(crate) struct Listed {
    /// The list belongs to this upstream; a client whose `base_url`
    /// changed shows nothing until its own list arrives.
    pub(crate) base_url: String,
    /// The config generation that asked: an older fetch that ends late
    /// never replaces a newer one's list.
    pub(crate) generation: u64,
    pub(crate) names: Arc<[String]>,
}

impl DiscoveredModels {
    /// The discovered names that route to each client of `table` (that
    /// still asks for them), as `(name, client)`, in client order.
    pub fn listed<'t>(&self, table: &'t RoutingTable) -> Vec<(String, &'t str)> {
        let by_client = self
            .by_client
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut out = Vec::new();
        for c in &table.clients {
            if !c.cfg.discover_models {
                continue;
            }
            let Some(listed) = by_client.get(&c.cfg.name) else {
                continue;
            };
            if listed.base_url != c.cfg.base_url {
                continue;
            }
            for name in listed.names.iter() {
                if c.cfg.model_match.matches(name) {
                    out.push((name.clone(), c.cfg.name.as_str()));
                }
            }
        }
        out
    }

    pub(crate) fn store(&self, client: &str, listed: Listed) {
        let mut by_client = self
            .by_client
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if by_client
            .get(client)
            .is_some_and(|old| old.generation > listed.generation)
        {
            return;
        }
        by_client.insert(client.to_owned(), listed);
    }
}
