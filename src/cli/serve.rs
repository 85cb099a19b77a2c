//! `gptbalance serve`: load, bind, serve, reload on change, drain on SIGTERM.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpSocket};

use super::ConfigArg;
use crate::config::validate::parse_listen;
use crate::limits::shared::{budget_periods, CallerEntry, SharedState};
use crate::metrics::Metrics;
use crate::ops::{discovery, logging, reload, systemd};
use crate::proxy::server;
use crate::routing::RoutingTable;
use crate::state::AppState;
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
    // Every listener runs on a single-threaded runtime of its own (this
    // thread's and one per extra core): a connection's tasks never hop
    // threads, and each thread keeps its own upstream pool.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
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
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let listeners = match bind_listeners(addr, workers) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: cannot listen on {addr}: {e}");
            return ExitCode::from(2);
        }
    };
    let bound = listeners[0].local_addr().unwrap_or(addr);
    if cfg.server.auth_tokens.is_empty() && !bound.ip().is_loopback() {
        tracing::warn!(%bound, "auth is disabled and the listen address is not loopback");
    }
    let usage_dir = cfg.usage.dir.clone();
    let table = RoutingTable::build(cfg, None);
    restore_spend(&table, &usage_dir);
    let clients = table.clients.len();
    let shared_cfg = table.config.shared_state.clone();
    let mut state = AppState::new(table, sink, metrics, Some(path.clone()));
    state.shared = shared_cfg.map(|c| Arc::new(SharedState::new(c)));
    let state = Arc::new(state);
    share_state(&state);
    discovery::refresh(&state);
    let _watcher = match reload::watch(state.clone(), &path) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the config file; reload with SIGHUP or POST /admin/reload");
            None
        }
    };
    crate::ops::probe::spawn(&state);
    if let Err(e) = reload::on_sighup(state.clone()) {
        tracing::warn!(error = %e, "cannot handle SIGHUP");
    }
    // Handlers go in before the line that tells the world we listen: a
    // SIGTERM right after it must drain, not kill.
    let shutdown = shutdown_signal();
    let tls = state.table.load().config.server.tls.is_some();
    tracing::info!(listen = %bound, tls, clients, config = %path.display(), version = env!("CARGO_PKG_VERSION"), "gptbalance listening");
    systemd::ready();
    systemd::spawn_watchdog();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let mut listeners = listeners.into_iter();
    let own = listeners
        .next()
        .expect("bind_listeners returns at least one");
    let mut threads = Vec::new();
    for (i, l) in listeners.enumerate() {
        let (state, rx) = (state.clone(), stop_rx.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("worker-{}", i + 1))
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(async move {
                        match TcpListener::from_std(l) {
                            Ok(l) => server::run(l, state, stopped(rx)).await,
                            Err(e) => tracing::error!(error = %e, "worker cannot use its listener"),
                        }
                    }),
                    Err(e) => tracing::error!(error = %e, "cannot start a worker runtime"),
                }
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => tracing::error!(error = %e, "cannot start a worker thread"),
        }
    }
    let stop_state = state.clone();
    tokio::spawn(async move {
        shutdown.await;
        // Once for the process; each worker says more at debug.
        let grace = stop_state.table.load().config.server.shutdown_grace;
        tracing::info!(?grace, "draining");
        let _ = stop_tx.send(true);
    });
    match TcpListener::from_std(own) {
        Ok(l) => server::run(l, state.clone(), stopped(stop_rx)).await,
        Err(e) => tracing::error!(error = %e, "cannot use the listener"),
    }
    let _ = tokio::task::spawn_blocking(move || {
        for t in threads {
            let _ = t.join();
        }
    })
    .await;
    if let Some(shared) = &state.shared {
        // Leases given back: what this instance did not use is free now.
        shared.release().await;
    }
    if let Some(w) = writer {
        let _ = tokio::task::spawn_blocking(move || w.shutdown()).await;
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// Callers' budgets count what they spent before this start: their
/// settled spend of the day and month, from this instance's usage file.
pub fn restore_spend(table: &RoutingTable, dir: &std::path::Path) {
    let limited = table.callers.iter().any(|c| !c.cfg.limits.is_empty());
    if !limited {
        return;
    }
    let now = std::time::SystemTime::now();
    match crate::usage::report::spent_by_caller(dir, now) {
        Ok(spent) => {
            table.restore_spend(&spent, now);
            tracing::info!(
                callers = spent.len(),
                "callers' spend restored from the usage file"
            );
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot read callers' spend from the usage file; budgets start from zero")
        }
    }
}

/// Starts the shared state's supervisor and cooldown follower, when
/// `shared_state` is set: the instance serves at once, in outage mode
/// until Redis answers.
pub fn share_state(state: &Arc<AppState>) {
    let Some(shared) = state.shared.clone() else {
        return;
    };
    tracing::info!(
        address = shared.address(),
        instance = shared.instance(),
        "shared state: connecting"
    );
    let weak = Arc::downgrade(state);
    tokio::spawn(shared.clone().run(Arc::new(move || {
        let Some(state) = weak.upgrade() else {
            return Vec::new();
        };
        let table = state.table.load();
        table
            .callers
            .iter()
            .filter(|c| !c.cfg.limits.is_empty())
            .map(|c| CallerEntry {
                name: c.name.clone(),
                state: c.state.clone(),
                budgets: budget_periods(&c.cfg.limits),
            })
            .collect()
    })));
    let weak = Arc::downgrade(state);
    tokio::spawn(shared.follow_cooldowns(move |client, key, until| {
        let Some(state) = weak.upgrade() else {
            return;
        };
        let table = state.table.load();
        if let Some(c) = table.client(client) {
            for k in c.keys.iter().filter(|k| k.id.as_str() == key) {
                k.health.cool_down_until(until);
            }
        }
    }));
}

/// `count` listeners on one address with SO_REUSEPORT, so the kernel
/// spreads new connections across the worker threads.
///
/// SO_REUSEPORT alone would also let this process share the port with
/// another gptbalance (or anything of the same user that set it), which
/// then takes half the traffic. So a plain socket binds first: with
/// SO_REUSEADDR but not SO_REUSEPORT, its bind fails while any other
/// socket listens on the address. It stays bound, never listening, until
/// the workers' sockets listen: it fixes port 0's port for them, and the
/// kernel lets sockets that set SO_REUSEADDR share a port with one that
/// does not listen.
fn bind_listeners(addr: SocketAddr, count: usize) -> Result<Vec<std::net::TcpListener>, BindError> {
    let new_socket = || {
        if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
    };
    let guard = new_socket().map_err(BindError::Io)?;
    guard.set_reuseaddr(true).map_err(BindError::Io)?;
    guard.bind(addr).map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => BindError::InUse,
        _ => BindError::Io(e),
    })?;
    let at = guard.local_addr().map_err(BindError::Io)?;
    let mut out: Vec<std::net::TcpListener> = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        let listener = (|| {
            let socket = new_socket()?;
            socket.set_reuseaddr(true)?;
            socket.set_reuseport(true)?;
            socket.bind(at)?;
            socket.listen(4096)?.into_std()
        })()
        .map_err(BindError::Io)?;
        out.push(listener);
    }
    drop(guard);
    Ok(out)
}

/// Why `serve` could not listen.
#[derive(Debug, thiserror::Error)]
enum BindError {
    #[error("address already in use (another process listens on it)")]
    InUse,
    #[error(transparent)]
    Io(std::io::Error),
}

/// Registers for SIGTERM and SIGINT at once; the future resolves on either.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        let (Ok(mut term), Ok(mut int)) = (term, int) else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
            _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
        }
        systemd::stopping();
    }
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
