//! The background writer: a bounded buffer of packed rows, batches, one
//! transaction per batch and month file, a final flush on shutdown.
//!
//! Runs on its own OS thread because SQLite blocks. When it falls behind
//! (buffer full) or the disk refuses a batch, rows are counted as dropped
//! and serving goes on; the next batch tries again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::rows::{self, Row, RowBuf};
use super::store;
use super::UsageRecord;
use crate::metrics::Metrics;

/// Rows waiting for the writer before new ones are dropped.
const PENDING_CAPACITY: usize = 65_536;
/// Most rows in one transaction.
const MAX_BATCH: usize = 8192;
/// After the first row of a batch arrives, the writer waits this long for
/// more. While it waits it is not waiting on the buffer's condition, so
/// requests adding rows never have to wake a thread: one wake-up per
/// batch, not per row. Well inside the promise of a commit at least once a
/// second.
const BATCH_WINDOW: Duration = Duration::from_millis(100);

/// What requests and the writer share: the rows not yet taken, behind a
/// lock held for the copy of one row (or the swap of the whole buffer).
struct Shared {
    pending: Mutex<Pending>,
    /// Signalled when the first row of a batch arrives, and on shutdown.
    arrived: Condvar,
}

struct Pending {
    rows: RowBuf,
    /// Set by shutdown: the writer takes what is left, and rows arriving
    /// later are dropped.
    closing: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // Nothing panics while holding the lock but an allocation failure;
        // the rows already packed are whole either way.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The request side, cloned into every handler.
#[derive(Clone)]
pub struct UsageSink {
    shared: Option<Arc<Shared>>,
    metrics: Arc<Metrics>,
    dropped: Arc<AtomicU64>,
}

impl UsageSink {
    /// A sink that records nothing (`usage.enabled: false`).
    pub fn disabled(metrics: Arc<Metrics>) -> UsageSink {
        UsageSink {
            shared: None,
            metrics,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Packs `record` for the writer: a copy under a short lock, never a
    /// wait for SQLite.
    pub fn send(&self, record: &UsageRecord) {
        let Some(shared) = &self.shared else { return };
        let ts = rows::stamp(record);
        let mut pending = shared.lock();
        if pending.closing || pending.rows.len() >= PENDING_CAPACITY {
            drop(pending);
            self.metrics.usage_rows("dropped", 1);
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(
                    dropped_total = n,
                    "usage writer is behind or stopped; usage rows dropped"
                );
            }
            return;
        }
        let first = pending.rows.is_empty();
        pending.rows.push_stamped(record, &ts);
        drop(pending);
        if first {
            shared.arrived.notify_one();
        }
    }
}

/// The writer thread; [`UsageWriter::shutdown`] flushes every pending row.
pub struct UsageWriter {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// Held for the writer's life: no other instance writes this dir.
    _lock: DirLock,
}

impl UsageWriter {
    /// Creates `dir` if needed, checks it is writable, takes its lock (so
    /// that no other running instance writes it), and starts the writer.
    pub fn start(dir: &Path, metrics: Arc<Metrics>) -> std::io::Result<(UsageWriter, UsageSink)> {
        check_writable(dir)?;
        let lock = DirLock::take(dir)?;
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                rows: RowBuf::default(),
                closing: false,
            }),
            arrived: Condvar::new(),
        });
        let dir = dir.to_owned();
        let m = metrics.clone();
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("usage-writer".into())
            .spawn(move || write_loop(&s, dir, m))?;
        let sink = UsageSink {
            shared: Some(shared.clone()),
            metrics,
            dropped: Arc::new(AtomicU64::new(0)),
        };
        Ok((
            UsageWriter {
                shared,
                thread: Some(thread),
                _lock: lock,
            },
            sink,
        ))
    }

    /// Writes every row sent so far, then stops the thread.
    pub fn shutdown(mut self) {
        self.shared.lock().closing = true;
        self.shared.arrived.notify_one();
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

/// An exclusive `flock` on `usage.dir/.gptbalance.lock`, released when
/// dropped or when the process ends however it ends (the kernel drops
/// the lock with the file), so a crashed instance leaves nothing stale.
/// The file holds the owner's process id, for the message of the next.
struct DirLock {
    _file: std::fs::File,
}

/// The lock file's name inside `usage.dir`.
pub const LOCK_FILE: &str = ".gptbalance.lock";

impl DirLock {
    fn take(dir: &Path) -> std::io::Result<DirLock> {
        use std::io::Write;
        let path = dir.join(LOCK_FILE);
        let wrap = |e: std::io::Error| {
            std::io::Error::new(e.kind(), format!("usage.dir {}: {e}", dir.display()))
        };
        // Not truncated on open: that would erase the holder's id.
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(wrap)?;
        // fs4's flock, not std's `File::try_lock`: that needs Rust 1.89.
        match fs4::FileExt::try_lock(&file) {
            Ok(()) => {}
            Err(fs4::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = match holder.trim() {
                    "" => String::new(),
                    pid => format!(" (process {pid})"),
                };
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!(
                        "usage.dir {} is in use by another running gptbalance{holder}; \
                         give each instance its own usage.dir",
                        dir.display()
                    ),
                ));
            }
            Err(fs4::TryLockError::Error(e)) => return Err(wrap(e)),
        }
        file.set_len(0).map_err(wrap)?;
        writeln!(file, "{}", std::process::id()).map_err(wrap)?;
        Ok(DirLock { _file: file })
    }
}

fn write_loop(shared: &Shared, dir: PathBuf, metrics: Arc<Metrics>) {
    let mut files = MonthFiles::new(dir, metrics);
    // Swapped with the shared buffer each batch: both keep their memory.
    let mut batch = RowBuf::default();
    loop {
        let mut pending = shared.lock();
        while pending.rows.is_empty() && !pending.closing {
            pending = shared
                .arrived
                .wait(pending)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if !pending.closing {
            drop(pending);
            std::thread::sleep(BATCH_WINDOW);
            pending = shared.lock();
        }
        std::mem::swap(&mut pending.rows, &mut batch);
        // Once closing is seen here, no row can arrive after this batch.
        let closing = pending.closing;
        drop(pending);
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
    fn new(dir: PathBuf, metrics: Arc<Metrics>) -> MonthFiles {
        MonthFiles {
            dir,
            open: HashMap::new(),
            last_error_log: HashMap::new(),
            metrics,
        }
    }

    fn write(&mut self, batch: &RowBuf) {
        if let Some(month) = batch.only_month() {
            // The usual batch: one month, read once, front to back.
            let month = String::from_utf8_lossy(month).into_owned();
            let mut rows = batch.iter().map(|(_, row)| row);
            let mut left = batch.len();
            while left > 0 {
                let n = left.min(MAX_BATCH);
                let mut group = rows.by_ref().take(n);
                self.write_rows(&month, &mut group, n);
                group.for_each(drop);
                left -= n;
            }
        } else {
            // Rows across a month's end: the offsets of each month's rows,
            // in order.
            let mut by_month: Vec<(&[u8], Vec<usize>)> = Vec::new();
            let mut at = 0;
            for (offset, row) in batch.iter() {
                let month = row.month();
                if by_month.get(at).is_none_or(|(m, _)| *m != month) {
                    at = match by_month.iter().position(|(m, _)| *m == month) {
                        Some(i) => i,
                        None => {
                            by_month.push((month, Vec::with_capacity(batch.len())));
                            by_month.len() - 1
                        }
                    };
                }
                by_month[at].1.push(offset);
            }
            for (month, offsets) in by_month {
                let month = String::from_utf8_lossy(month);
                for group in offsets.chunks(MAX_BATCH) {
                    let rows = group.iter().filter_map(|&at| batch.row_at(at));
                    self.write_rows(&month, rows, group.len());
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

    /// Writes `rows` (`n` of them) to `month`'s file in one transaction,
    /// or counts them as dropped.
    fn write_rows<'a>(&mut self, month: &str, rows: impl Iterator<Item = Row<'a>>, n: usize) {
        match self.write_month(month, rows) {
            Ok(written) => self.metrics.usage_rows("written", written as u64),
            Err(e) => {
                self.metrics.usage_rows("dropped", n as u64);
                self.open.remove(month);
                let now = Instant::now();
                let recent = self
                    .last_error_log
                    .get(month)
                    .is_some_and(|t| now.duration_since(*t) < Duration::from_secs(10));
                if !recent {
                    self.last_error_log.insert(month.to_owned(), now);
                    tracing::error!(error = %e, rows = n, "usage rows dropped");
                }
            }
        }
    }

    fn write_month<'a>(
        &mut self,
        month: &str,
        rows: impl Iterator<Item = Row<'a>>,
    ) -> Result<usize, store::StoreError> {
        let path = store::path_for(&self.dir, month);
        if !self.open.contains_key(month) {
            let file = store::UsageFile::open(&path)?;
            tracing::info!(path = %path.display(), "usage file opened");
            self.open.insert(month.to_owned(), file);
        }
        let file = self.open.get_mut(month).expect("inserted above");
        file.insert_rows(rows)
            .map_err(|source| store::StoreError::Sqlite { path, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(ts: &str, id: &str) -> UsageRecord {
        UsageRecord {
            ts: Some(humantime::parse_rfc3339(ts).unwrap()),
            request_id: id.to_owned(),
            endpoint: "chat/completions".into(),
            status: 200,
            ..UsageRecord::default()
        }
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
        let mut files = MonthFiles::new(dir.path().to_owned(), Arc::new(Metrics::new()));
        let mut batch = RowBuf::default();
        for r in [
            row("2026-01-31T23:59:59.000Z", "a"),
            row("2026-01-31T23:59:59.500Z", "b"),
            row("2026-02-01T00:00:00.000Z", "c"),
            row("2026-01-31T12:00:00.000Z", "d"),
            row("2026-02-28T10:00:00.000Z", "e"),
            row("2026-03-01T00:00:00.001Z", "f"),
        ] {
            batch.push(&r);
        }
        files.write(&batch);
        let path = |m: &str| store::path_for(dir.path(), m);
        assert_eq!(ids(&path("2026-01")), ["a", "b", "d"]);
        assert_eq!(ids(&path("2026-02")), ["c", "e"]);
        assert_eq!(ids(&path("2026-03")), ["f"]);
    }

    /// A one-month batch larger than a transaction takes goes in whole
    /// transactions, every row once, in order.
    #[test]
    fn a_batch_beyond_one_transaction_lands_whole_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = MonthFiles::new(dir.path().to_owned(), Arc::new(Metrics::new()));
        let mut batch = RowBuf::default();
        let n = 2 * MAX_BATCH + 5;
        for i in 0..n {
            batch.push(&row("2026-07-15T08:00:00.000Z", &i.to_string()));
        }
        files.write(&batch);
        let want: Vec<String> = (0..n).map(|i| i.to_string()).collect();
        assert_eq!(ids(&store::path_for(dir.path(), "2026-07")), want);
    }

    /// Rows sent from several threads at once all land, each thread's in
    /// the order it sent them; shutdown writes the last ones, and a row
    /// sent after it is counted as dropped, not lost silently.
    #[test]
    fn every_row_sent_lands_and_shutdown_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let (writer, sink) = UsageWriter::start(dir.path(), Arc::new(Metrics::new())).unwrap();
        let senders: Vec<_> = (0..4)
            .map(|t| {
                let sink = sink.clone();
                std::thread::spawn(move || {
                    for i in 0..2500 {
                        sink.send(&row("2026-05-01T00:00:00.000Z", &format!("{t}-{i}")));
                        if i % 500 == 0 {
                            std::thread::sleep(Duration::from_millis(30));
                        }
                    }
                })
            })
            .collect();
        for s in senders {
            s.join().unwrap();
        }
        writer.shutdown();
        sink.send(&row("2026-05-01T00:00:00.000Z", "late"));
        let got = ids(&store::path_for(dir.path(), "2026-05"));
        assert_eq!(got.len(), 10_000);
        for t in 0..4 {
            let mine: Vec<&String> = got
                .iter()
                .filter(|id| id.starts_with(&format!("{t}-")))
                .collect();
            let want: Vec<String> = (0..2500).map(|i| format!("{t}-{i}")).collect();
            assert!(
                mine.iter().copied().eq(want.iter()),
                "thread {t} out of order"
            );
        }
        assert_eq!(sink.dropped.load(Ordering::Relaxed), 1);
    }
}
