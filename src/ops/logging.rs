//! tracing setup: text or JSON on stderr, optional daily files.
//!
//! `RUST_LOG`, when set, overrides `logging.level`. Both writers are
//! non-blocking (a request never waits on a log write); keep the returned
//! guards alive to flush them on exit.

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::fmt;
use tracing_subscriber::prelude::*;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LoggingConfig};

pub fn init(cfg: &LoggingConfig) -> std::io::Result<Vec<WorkerGuard>> {
    let filter = || {
        std::env::var("RUST_LOG")
            .ok()
            .and_then(|v| EnvFilter::try_new(v).ok())
            .unwrap_or_else(|| EnvFilter::new(&cfg.level))
    };
    let mut guards = Vec::new();
    let file_writer = match &cfg.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            let appender = tracing_appender::rolling::daily(dir, "gptbalance.log");
            let (w, g) = tracing_appender::non_blocking(appender);
            guards.push(g);
            Some(w)
        }
        None => None,
    };
    let (stderr, g) = tracing_appender::non_blocking(std::io::stderr());
    guards.push(g);
    let json = cfg.format == LogFormat::Json;
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let stderr_text = (!json).then(|| {
        fmt::layer()
            .with_ansi(ansi)
            .with_writer(stderr.clone())
            .with_filter(filter())
    });
    let stderr_json = json.then(|| {
        fmt::layer()
            .json()
            .with_writer(stderr.clone())
            .with_filter(filter())
    });
    let file_text = file_writer.clone().filter(|_| !json).map(|w| {
        fmt::layer()
            .with_ansi(false)
            .with_writer(w)
            .with_filter(filter())
    });
    let file_json = file_writer
        .filter(|_| json)
        .map(|w| fmt::layer().json().with_writer(w).with_filter(filter()));
    let _ = tracing_subscriber::registry()
        .with(stderr_text)
        .with(stderr_json)
        .with(file_text)
        .with(file_json)
        .try_init();
    Ok(guards)
}
