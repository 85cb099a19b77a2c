//! `gptbalance serve`: load, bind, serve, reload on change, drain on SIGTERM.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use tokio::net::TcpListener;

use super::ConfigArg;
use crate::config::validate::parse_listen;
use crate::ops::metrics::Metrics;
use crate::ops::{logging, reload, systemd};
use crate::proxy::{server, AppState};
use crate::routing::RoutingTable;
use crate::usage::{UsageSink, UsageWriter};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Listen on this address instead of server.listen (e.g. 127.0.0.1:9000)
    #[arg(long, value_parser = parse_listen_arg)]
    pub listen: Option<SocketAddr>,
}

fn parse_listen_arg(s: &str) -> Result<SocketAddr, String> {
    parse_listen(s).ok_or_else(|| format!("`{s}` is not an address such as 127.0.0.1:8000"))
}

pub fn run(args: Args) -> ExitCode {
    let path = reload::absolute(&args.config.config);
    let loaded = match super::load_or_exit(&path) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let cfg = loaded.config;
    let _log_guard = match logging::init(&cfg.logging) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: cannot open logging.dir: {e}");
            return ExitCode::from(2);
        }
    };
    raise_open_files_limit();
    let runtime = match super::runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let code = runtime.block_on(serve(cfg, path, args.listen));
    // Connections still open past shutdown_grace are cut here.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    code
}

async fn serve(
    cfg: crate::config::Config,
    path: std::path::PathBuf,
    listen: Option<SocketAddr>,
) -> ExitCode {
    let metrics = Arc::new(Metrics::new());
    let (writer, sink) = if cfg.usage.enabled {
        match UsageWriter::start(&cfg.usage.dir, metrics.clone()) {
            Ok((w, s)) => (Some(w), s),
            Err(e) => {
                eprintln!("error: cannot write usage files: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        (None, UsageSink::disabled(metrics.clone()))
    };
    let addr = listen.unwrap_or(cfg.server.listen);
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: cannot listen on {addr}: {e}");
            return ExitCode::from(2);
        }
    };
    let bound = listener.local_addr().unwrap_or(addr);
    if cfg.server.auth_tokens.is_empty() && !bound.ip().is_loopback() {
        tracing::warn!(%bound, "auth is disabled and the listen address is not loopback");
    }
    let table = RoutingTable::build(cfg, None);
    let clients = table.clients.len();
    let state = Arc::new(AppState::new(table, sink, metrics, Some(path.clone())));
    let _watcher = match reload::watch(state.clone(), &path) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the config file; reload with SIGHUP or POST /admin/reload");
            None
        }
    };
    if let Err(e) = reload::on_sighup(state.clone()) {
        tracing::warn!(error = %e, "cannot handle SIGHUP");
    }
    tracing::info!(listen = %bound, clients, config = %path.display(), version = env!("CARGO_PKG_VERSION"), "gptbalance listening");
    systemd::ready();
    systemd::spawn_watchdog();
    server::run(listener, state.clone(), shutdown_signal()).await;
    if let Some(w) = writer {
        let _ = tokio::task::spawn_blocking(move || w.shutdown()).await;
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
    }
    systemd::stopping();
}

/// Raises the open-files soft limit to the hard limit: every connection
/// and upstream connection is a file descriptor.
fn raise_open_files_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed in.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let wanted = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) != 0 {
                tracing::debug!("could not raise the open-files limit");
            }
        }
    }
}
