//! tracing setup: text or JSON on stderr, optional daily files.
//!
//! `RUST_LOG`, when set, overrides `logging.level`. Both writers are
//! non-blocking (a request never waits on a log write); keep the returned
//! guards alive to flush them on exit.

use tracing_appender::non_blocking::{NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::fmt;
use tracing_subscriber::prelude::*;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LoggingConfig};

/// Lines queued for a writer before further ones are dropped (and counted
/// by tracing-appender). The default, 128,000, preallocates 4 MiB per
/// writer; 16,384 lines is over half a second of one line per request at
/// 30,000 requests a second.
const BUFFERED_LINES: usize = 16_384;

fn non_blocking<W: std::io::Write + Send + 'static>(w: W) -> (NonBlocking, WorkerGuard) {
    NonBlockingBuilder::default()
        .buffered_lines_limit(BUFFERED_LINES)
        .lossy(true)
        .finish(w)
}

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
            let (w, g) = non_blocking(appender);
            guards.push(g);
            Some(w)
        }
        None => None,
    };
    let (stderr, g) = non_blocking(std::io::stderr());
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
