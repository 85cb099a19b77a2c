//! The background writer: a bounded channel, batches, one transaction per
//! batch and month file, a final flush on shutdown.
//!
//! Runs on its own OS thread because SQLite blocks. When it falls behind
//! (channel full) or the disk refuses a batch, rows are counted as dropped
//! and serving goes on; the next batch tries again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::store;
use super::UsageRecord;
use crate::ops::metrics::Metrics;

/// Rows waiting for the writer before new ones are dropped.
const CHANNEL_CAPACITY: usize = 65_536;
/// Most rows in one transaction.
const MAX_BATCH: usize = 8192;
/// After the first row of a batch arrives, the writer waits this long for
/// more. While it waits it is not blocked on the channel, so request tasks
/// sending rows never have to wake a thread: one wake-up per batch, not per
/// row. Well inside the promise of a commit at least once a second.
const BATCH_WINDOW: Duration = Duration::from_millis(100);

enum Msg {
    Row(Box<UsageRecord>),
    Close,
}

/// The request side: a non-blocking send, cloned into every handler.
#[derive(Clone)]
pub struct UsageSink {
    tx: Option<SyncSender<Msg>>,
    metrics: Arc<Metrics>,
    dropped: Arc<AtomicU64>,
}

impl UsageSink {
    /// A sink that records nothing (`usage.enabled: false`).
    pub fn disabled(metrics: Arc<Metrics>) -> UsageSink {
        UsageSink {
            tx: None,
            metrics,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn send(&self, record: Box<UsageRecord>) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(Msg::Row(record)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.metrics.usage_rows("dropped", 1);
                let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(
                        dropped_total = n,
                        "usage writer is behind or stopped; usage rows dropped"
                    );
                }
            }
        }
    }
}

/// The writer thread; [`UsageWriter::shutdown`] flushes every pending row.
pub struct UsageWriter {
    tx: SyncSender<Msg>,
    thread: Option<JoinHandle<()>>,
}

impl UsageWriter {
    /// Creates `dir` if needed, checks it is writable, and starts the writer.
    pub fn start(dir: &Path, metrics: Arc<Metrics>) -> std::io::Result<(UsageWriter, UsageSink)> {
        check_writable(dir)?;
        let (tx, rx) = mpsc::sync_channel(CHANNEL_CAPACITY);
        let dir = dir.to_owned();
        let m = metrics.clone();
        let thread = std::thread::Builder::new()
            .name("usage-writer".into())
            .spawn(move || write_loop(rx, dir, m))?;
        let sink = UsageSink {
            tx: Some(tx.clone()),
            metrics,
            dropped: Arc::new(AtomicU64::new(0)),
        };
        Ok((
            UsageWriter {
                tx,
                thread: Some(thread),
            },
            sink,
        ))
    }

    /// Writes every row sent so far, then stops the thread.
    pub fn shutdown(mut self) {
        let _ = self.tx.send(Msg::Close);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Creates the directory and proves a file can be written in it.
pub fn check_writable(dir: &Path) -> std::io::Result<()> {
    let wrap = |e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("usage.dir {}: {e}", dir.display()))
    };
    std::fs::create_dir_all(dir).map_err(wrap)?;
    let probe = dir.join(format!(".gptbalance-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(wrap)?;
    std::fs::remove_file(&probe).map_err(wrap)
}

fn write_loop(rx: Receiver<Msg>, dir: PathBuf, metrics: Arc<Metrics>) {
    let mut files = MonthFiles {
        dir,
        open: HashMap::new(),
        last_error_log: HashMap::new(),
        metrics,
    };
    let mut batch: Vec<Box<UsageRecord>> = Vec::new();
    loop {
        let mut closing = false;
        match rx.recv() {
            Ok(Msg::Row(r)) => batch.push(r),
            Ok(Msg::Close) | Err(_) => closing = true,
        }
        if !closing {
            std::thread::sleep(BATCH_WINDOW);
        }
        // Rows sent before Close are all in the channel ahead of it.
        loop {
            match rx.try_recv() {
                Ok(Msg::Row(r)) => {
                    batch.push(r);
                    if batch.len() >= MAX_BATCH {
                        files.write(&batch);
                        batch.clear();
                    }
                }
                Ok(Msg::Close) => closing = true,
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            files.write(&batch);
            batch.clear();
        }
        if closing {
            return;
        }
    }
}

struct MonthFiles {
    dir: PathBuf,
    open: HashMap<String, store::UsageFile>,
    last_error_log: HashMap<String, Instant>,
    metrics: Arc<Metrics>,
}

impl MonthFiles {
    fn write(&mut self, batch: &[Box<UsageRecord>]) {
        // Rows of one batch almost always share a month (and a day): the
        // month's name is worked out again only when the UTC day changes.
        let mut by_month: Vec<(String, Vec<&UsageRecord>)> = Vec::new();
        let mut last_day = None;
        let mut at = 0;
        for r in batch {
            let ts = r.ts.unwrap_or_else(std::time::SystemTime::now);
            let day = ts
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs() / 86_400);
            if day.is_none() || day != last_day || by_month.is_empty() {
                let month = store::month_of(ts);
                at = match by_month.iter().position(|(m, _)| *m == month) {
                    Some(i) => i,
                    None => {
                        by_month.push((month, Vec::with_capacity(batch.len())));
                        by_month.len() - 1
                    }
                };
                last_day = day;
            }
            by_month[at].1.push(r);
        }
        for (month, rows) in by_month {
            match self.write_month(&month, &rows) {
                Ok(()) => self.metrics.usage_rows("written", rows.len() as u64),
                Err(e) => {
                    self.metrics.usage_rows("dropped", rows.len() as u64);
                    self.open.remove(&month);
                    let now = Instant::now();
                    let recent = self
                        .last_error_log
                        .get(&month)
                        .is_some_and(|t| now.duration_since(*t) < Duration::from_secs(10));
                    if !recent {
                        self.last_error_log.insert(month.clone(), now);
                        tracing::error!(error = %e, rows = rows.len(), "usage rows dropped");
                    }
                }
            }
        }
        // Keep only the newest two months open.
        if self.open.len() > 2 {
            let mut months: Vec<String> = self.open.keys().cloned().collect();
            months.sort();
            for m in &months[..months.len() - 2] {
                self.open.remove(m);
            }
        }
    }

    fn write_month(&mut self, month: &str, rows: &[&UsageRecord]) -> Result<(), store::StoreError> {
        let path = store::path_for(&self.dir, month);
        if !self.open.contains_key(month) {
            let file = store::UsageFile::open(&path)?;
            tracing::info!(path = %path.display(), "usage file opened");
            self.open.insert(month.to_owned(), file);
        }
        let file = self.open.get_mut(month).expect("inserted above");
        file.insert_batch(rows)
            .map_err(|source| store::StoreError::Sqlite { path, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(ts: &str, id: &str) -> Box<UsageRecord> {
        Box::new(UsageRecord {
            ts: Some(humantime::parse_rfc3339(ts).unwrap()),
            request_id: id.to_owned(),
            endpoint: "chat/completions".into(),
            status: 200,
            ..UsageRecord::default()
        })
    }

    fn ids(path: &Path) -> Vec<String> {
        let conn = rusqlite::Connection::open(path).unwrap();
        let mut stmt = conn
            .prepare("SELECT request_id FROM requests ORDER BY id")
            .unwrap();
        let rows = stmt.query_map([], |r| r.get(0)).unwrap();
        rows.map(Result::unwrap).collect()
    }

    /// One batch whose rows cross a month boundary, on the same day number
    /// and back again, lands each row in its own month's file, in order.
    #[test]
    fn one_batch_across_months_splits_by_month() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = MonthFiles {
            dir: dir.path().to_owned(),
            open: HashMap::new(),
            last_error_log: HashMap::new(),
            metrics: Arc::new(Metrics::new()),
        };
        files.write(&[
            row("2026-01-31T23:59:59.000Z", "a"),
            row("2026-01-31T23:59:59.500Z", "b"),
            row("2026-02-01T00:00:00.000Z", "c"),
            row("2026-01-31T12:00:00.000Z", "d"),
            row("2026-02-28T10:00:00.000Z", "e"),
            row("2026-03-01T00:00:00.001Z", "f"),
        ]);
        let path = |m: &str| store::path_for(dir.path(), m);
        assert_eq!(ids(&path("2026-01")), ["a", "b", "d"]);
        assert_eq!(ids(&path("2026-02")), ["c", "e"]);
        assert_eq!(ids(&path("2026-03")), ["f"]);
    }
}
