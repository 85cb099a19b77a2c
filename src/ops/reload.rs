//! Hot reload: watch the config's directory (and those of the files it
//! reads), debounce, load, validate, swap.
//!
//! A valid file becomes a new `RoutingTable` swapped in whole; requests in
//! flight keep the table they started with. An invalid file keeps the
//! running table, and its errors are logged and shown in `/admin/status`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::systemd;
use crate::config::{self, LoadError};
use crate::routing::RoutingTable;
use crate::state::{AppState, ReloadStatus};

/// Quiet time after the last change before reloading: editors write in bursts.
const DEBOUNCE: Duration = Duration::from_millis(250);

/// Loads the config file again and swaps it in if valid. Serialized: one
/// reload at a time, whoever asked.
pub async fn reload_now(state: &Arc<AppState>, trigger: &str) -> ReloadStatus {
    let _one_at_a_time = state.reload_lock.lock().await;
    let Some(path) = state.config_path.clone() else {
        return state
            .last_reload
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
    };
    systemd::reloading();
    let loaded = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || config::load(&path)).await
    };
    let current = state.table.load_full();
    let status = match loaded {
        Ok(Ok(loaded)) => {
            for w in &loaded.warnings {
                tracing::warn!("{w}");
            }
            if loaded.config.server.listen != current.config.server.listen {
                tracing::warn!(
                    old = %current.config.server.listen, new = %loaded.config.server.listen,
                    "server.listen changed; it takes effect after a restart"
                );
            }
            if loaded.config.shared_state != current.config.shared_state {
                tracing::warn!("shared_state changed; it takes effect after a restart");
            }
            let mut config = loaded.config;
            keep_listener_kind(&mut config, &current.config);
            let table = RoutingTable::build(config, Some(&current));
            let generation = table.generation;
            state.table.store(Arc::new(table));
            state.metrics.reload(true, generation);
            tracing::info!(trigger, generation, "config reloaded");
            super::discovery::refresh(state);
            ReloadStatus {
                ok: true,
                at: SystemTime::now(),
                errors: Vec::new(),
            }
        }
        Ok(Err(e)) => {
            let errors = match e {
                LoadError::Invalid(diags) => diags
                    .into_iter()
                    .filter(|d| d.severity == config::Severity::Error)
                    .map(|d| d.to_string())
                    .collect(),
                LoadError::Io { path, source } => vec![format!(
                    "{}:1:1: cannot read the config file: {source}",
                    path.display()
                )],
            };
            for e in &errors {
                tracing::error!(
                    trigger,
                    "config reload rejected, keeping the running config: {e}"
                );
            }
            state.metrics.reload(false, current.generation);
            ReloadStatus {
                ok: false,
                at: SystemTime::now(),
                errors,
            }
        }
        Err(join) => {
            state.metrics.reload(false, current.generation);
            ReloadStatus {
                ok: false,
                at: SystemTime::now(),
                errors: vec![format!("{}:1:1: reload failed: {join}", path.display())],
            }
        }
    };
    *state.last_reload.lock().unwrap_or_else(|e| e.into_inner()) = status.clone();
    systemd::ready();
    status
}

/// The listener stays what it started as: TLS or plain. A reload that
/// removes `server.tls` keeps the running certificate (the listener still
/// speaks TLS until a restart); one that adds it is not applied (the
/// listener still speaks plain HTTP). The file's certificate and key were
/// read and checked all the same, so a restart will take them.
fn keep_listener_kind(new: &mut config::Config, running: &config::Config) {
    match (&new.server.tls, &running.server.tls) {
        (None, Some(kept)) => {
            tracing::warn!(
                cert = %kept.cert.display(),
                "server.tls was removed; the listener keeps speaking TLS with its certificate until a restart"
            );
            new.server.tls = Some(kept.clone());
        }
        (Some(_), None) => {
            tracing::warn!(
                "server.tls was added; the listener keeps speaking plain HTTP until a restart"
            );
            new.server.tls = None;
        }
        _ => {}
    }
}

/// What reloading the config file now would change, as `gptbalance diff`
/// reports it; nothing is applied. An invalid file answers its errors.
pub async fn dry_run(state: &Arc<AppState>) -> serde_json::Value {
    let Some(path) = state.config_path.clone() else {
        return serde_json::json!({ "valid": false, "errors": ["the daemon was not started from a file"] });
    };
    let current = state.table.load_full();
    let loaded = tokio::task::spawn_blocking(move || {
        let loaded = config::load(&path);
        let seen = crate::usage::report::models_since(
            &[current.config.usage.dir.as_path()],
            SystemTime::now() - Duration::from_secs(30 * 86_400),
        );
        (loaded, seen, current)
    })
    .await;
    let (loaded, seen, current) = match loaded {
        Ok(x) => x,
        Err(e) => return serde_json::json!({ "valid": false, "errors": [e.to_string()] }),
    };
    match loaded {
        Ok(l) => {
            let d = crate::routing::diff::diff(
                &config::effective::to_json(&current.config),
                &config::effective::to_json(&l.config),
                &seen,
            );
            let mut v = serde_json::to_value(&d).unwrap_or_default();
            v["valid"] = serde_json::Value::Bool(true);
            v
        }
        Err(LoadError::Invalid(diags)) => serde_json::json!({
            "valid": false,
            "errors": diags
                .iter()
                .filter(|d| d.severity == config::Severity::Error)
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
        }),
        Err(e) => serde_json::json!({ "valid": false, "errors": [e.to_string()] }),
    }
}

/// The files a reload follows and the directories watched for them.
#[derive(Default)]
struct Followed {
    files: HashSet<PathBuf>,
    dirs: HashSet<PathBuf>,
}

impl Followed {
    /// Whether a change at `path` concerns a followed file: the file
    /// itself, or a `..name` entry in a watched directory (the symlink flip
    /// by which Kubernetes and others swap a whole directory of secrets).
    fn concerns(&self, path: &Path) -> bool {
        self.files.contains(path)
            || path.parent().is_some_and(|d| self.dirs.contains(d))
                && path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(".."))
    }
}

/// Keeps the file watch alive; dropping it stops the watching.
pub struct ConfigWatch {
    _watcher: Arc<Mutex<notify::RecommendedWatcher>>,
}

/// Watches the config file and every file it read (secret files,
/// `server.tls` cert and key: `Config::read_files`) through their
/// directories, so rename-saves and symlink flips are seen, and reloads
/// after each burst of changes. Files a reload newly reads are followed
/// from then on.
pub fn watch(state: Arc<AppState>, path: &Path) -> notify::Result<ConfigWatch> {
    let followed = Arc::new(Mutex::new(Followed::default()));
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let seen = followed.clone();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        let relevant = {
            let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
            event.paths.iter().any(|p| seen.concerns(p))
        };
        if relevant {
            let _ = tx.send(());
        }
    })?;
    let watcher = Arc::new(Mutex::new(watcher));
    let config_file = absolute(path);
    follow(&watcher, &followed, std::slice::from_ref(&config_file))?;
    let read = state.table.load().config.read_files.clone();
    if let Err(e) = follow(&watcher, &followed, &read) {
        tracing::warn!(error = %e, "cannot watch a file the config reads; reload with SIGHUP after changing it");
    }
    let weak = Arc::downgrade(&watcher);
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Wait for the burst to end: DEBOUNCE with no further change.
            loop {
                match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            reload_now(&state, "file change").await;
            let Some(watcher) = weak.upgrade() else {
                return;
            };
            let read = state.table.load().config.read_files.clone();
            if let Err(e) = follow(&watcher, &followed, &read) {
                tracing::warn!(error = %e, "cannot watch a file the config reads; reload with SIGHUP after changing it");
            }
        }
    });
    Ok(ConfigWatch { _watcher: watcher })
}

/// Adds `files` to those followed, watching each one's directory once.
fn follow(
    watcher: &Mutex<notify::RecommendedWatcher>,
    followed: &Mutex<Followed>,
    files: &[PathBuf],
) -> notify::Result<()> {
    let mut followed = followed.lock().unwrap_or_else(|e| e.into_inner());
    let mut watcher = watcher.lock().unwrap_or_else(|e| e.into_inner());
    for file in files {
        let file = absolute(file);
        let dir = file
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        followed.files.insert(file);
        if !followed.dirs.contains(&dir) {
            watcher.watch(&dir, RecursiveMode::NonRecursive)?;
            followed.dirs.insert(dir);
        }
    }
    Ok(())
}

/// Reloads on every SIGHUP.
pub fn on_sighup(state: Arc<AppState>) -> std::io::Result<()> {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            reload_now(&state, "SIGHUP").await;
        }
    });
    Ok(())
}

/// The absolute form of the config path, so a later `chdir` changes nothing.
pub fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}
