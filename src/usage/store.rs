//! The monthly SQLite files: naming, schema, migrations, inserts.
//!
//! A file that is not a gptbalance usage database is never modified: it is
//! recognised by SQLite's header and the `application_id` set at creation.

use std::marker::PhantomData;
use std::os::raw::c_int;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rusqlite::{ffi, Connection, OpenFlags};
use smallvec::SmallVec;

use super::rows::{Row, RowBuf};
use super::UsageRecord;

/// `PRAGMA application_id` of every usage file ("gptb").
pub const APPLICATION_ID: i32 = 0x6770_7462;
/// `PRAGMA user_version` written by this build; older files are migrated.
pub const SCHEMA_VERSION: i32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path} is not a gptbalance usage database; it was left untouched")]
    Foreign { path: PathBuf },
    #[error("{path} has usage schema version {found}, newer than this build's {SCHEMA_VERSION}")]
    TooNew { path: PathBuf, found: i32 },
    #[error("{path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Page size of new files. Rows are only ever appended, in batches of up
/// to thousands: with 16 KiB pages (SQLite's default is 4 KiB) the writer
/// splits a quarter as many pages, and makes a quarter as many WAL writes
/// and checkpoint copies for the same rows, which cut its CPU time per
/// row by about 15 % at 40k rows/s. The price is at low traffic: each
/// commit rewrites the last, partly filled leaf page and its parents, so
/// a commit of one row writes about 32 KiB to the WAL instead of 8.
pub const PAGE_SIZE: i64 = 16_384;

/// `YYYY-MM` of `t` in UTC.
pub fn month_of(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()[..7].to_owned()
}

pub fn file_name(month: &str) -> String {
    format!("usage-{month}.sqlite")
}

pub fn path_for(dir: &Path, month: &str) -> PathBuf {
    dir.join(file_name(month))
}

/// One file holds one month, and reports add up a whole month, so the
/// table has no index beyond its rowid: rows arrive in about `ts` order and
/// are written far more often than read, and an index on `ts` was a fifth
/// of the writer's work per row. (Files made by earlier builds keep the
/// `requests_ts` index they have; both shapes are schema version 1.)
const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS requests (
    id                INTEGER PRIMARY KEY,
    ts                TEXT    NOT NULL,
    request_id        TEXT    NOT NULL,
    caller            TEXT,
    endpoint          TEXT    NOT NULL,
    model             TEXT,
    routed_model      TEXT,
    client            TEXT,
    key_id            TEXT,
    status            INTEGER NOT NULL,
    stream            INTEGER NOT NULL,
    attempts          INTEGER NOT NULL,
    latency_ms        INTEGER NOT NULL,
    ttft_ms           INTEGER,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    total_tokens      INTEGER,
    error             TEXT
);
";

/// Version 2: tokens by kind, cost and reservations, mirrored requests.
/// Rows of version 1 read these as NULL (and `shadow` as 0).
const SCHEMA_V2: &str = "
ALTER TABLE requests ADD COLUMN cached_tokens INTEGER;
ALTER TABLE requests ADD COLUMN reasoning_tokens INTEGER;
ALTER TABLE requests ADD COLUMN cost_usd REAL;
ALTER TABLE requests ADD COLUMN reserved_usd REAL;
ALTER TABLE requests ADD COLUMN reserved_tokens INTEGER;
ALTER TABLE requests ADD COLUMN shadow INTEGER NOT NULL DEFAULT 0;
";

/// Ok when the file at `path` may be opened for writing: absent, empty, or
/// a SQLite database carrying our application id. Never writes: the id is
/// read through a read-only connection, because in WAL mode it may still
/// live in the `-wal` file rather than in the main file's header.
fn check_ours(path: &Path) -> Result<(), StoreError> {
    let foreign = || StoreError::Foreign {
        path: path.to_owned(),
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(StoreError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    if !meta.is_file() {
        return Err(foreign());
    }
    if meta.len() == 0 {
        return Ok(());
    }
    let mut magic = [0u8; 16];
    {
        use std::io::Read;
        let io = |source| StoreError::Io {
            path: path.to_owned(),
            source,
        };
        let mut f = std::fs::File::open(path).map_err(io)?;
        if f.read_exact(&mut magic).is_err() {
            return Err(foreign());
        }
    }
    if &magic != b"SQLite format 3\0" {
        return Err(foreign());
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|_| foreign())?;
    let app_id: i32 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(|_| foreign())?;
    if app_id != APPLICATION_ID {
        return Err(foreign());
    }
    Ok(())
}

/// Opens (creating or migrating) the usage file at `path` for writing.
pub fn open_for_write(path: &Path) -> Result<Connection, StoreError> {
    check_ours(path)?;
    let sql = |source| StoreError::Sqlite {
        path: path.to_owned(),
        source,
    };
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(sql)?;
    let version: i32 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sql)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            path: path.to_owned(),
            found: version,
        });
    }
    // Takes effect only on a new file, before anything is written to it;
    // a file made with other pages keeps them.
    conn.pragma_update(None, "page_size", PAGE_SIZE)
        .map_err(sql)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(sql)?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(sql)?;
    if version < SCHEMA_VERSION {
        migrate(&conn, version).map_err(sql)?;
    }
    Ok(conn)
}

/// Brings a file from `from` to [`SCHEMA_VERSION`] in one transaction.
/// Each future version adds one arm here.
fn migrate(conn: &Connection, from: i32) -> rusqlite::Result<()> {
    let tx = conn.unchecked_transaction()?;
    if from < 1 {
        tx.execute_batch(SCHEMA_V1)?;
    }
    if from < 2 {
        tx.execute_batch(SCHEMA_V2)?;
    }
    tx.pragma_update(None, "application_id", APPLICATION_ID)?;
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()
}

/// Opens an existing usage file read-only, for reports.
pub fn open_for_read(path: &Path) -> Result<Connection, StoreError> {
    check_ours(path)?;
    Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| StoreError::Sqlite {
        path: path.to_owned(),
        source,
    })
}

/// The names of the `requests` table's columns: files of an earlier schema
/// version, opened read-only, lack the later ones.
pub fn columns(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info('requests')")?;
    let names = stmt.query_map([], |r| r.get(0))?;
    names.collect()
}

const COLUMNS: &str = "ts, request_id, caller, endpoint, model, routed_model, client, key_id, \
    status, stream, attempts, latency_ms, ttft_ms, prompt_tokens, completion_tokens, total_tokens, error, \
    cached_tokens, reasoning_tokens, cost_usd, reserved_usd, reserved_tokens, shadow";
const PARAMS_PER_ROW: usize = 23;
/// Rows written by one INSERT statement: one statement per row spends
/// about a third of SQLite's work on executing the statement itself.
const ROWS_PER_INSERT: usize = 16;
/// A batch of a busy 100 ms is a few thousand rows, milliseconds of work:
/// every 64 rows (a tenth of a millisecond or so) the writer lets a
/// request thread waiting for its core run, instead of holding the core
/// until the scheduler's time slice ends.
const YIELD_EVERY_GROUPS: u32 = 4;

/// `OR FAIL`: a statement that fails keeps the rows it wrote before the
/// failure, so SQLite keeps no statement journal (a copy of every page a
/// statement first touches) to undo them. Nothing needs undoing row by
/// row: a batch is one transaction, rolled back whole when any statement
/// of it fails.
fn insert_sql(rows: usize) -> String {
    let one = format!("({})", vec!["?"; PARAMS_PER_ROW].join(","));
    format!(
        "INSERT OR FAIL INTO requests ({COLUMNS}) VALUES {}",
        vec![one; rows].join(",")
    )
}

/// Binds `r` to the parameters from `first` (1-based) on.
fn bind_row<'a>(stmt: &mut RawInsert<'_, 'a>, first: c_int, r: &Row<'a>) -> rusqlite::Result<()> {
    let count = |v: Option<u64>| v.map(|v| i64::try_from(v).unwrap_or(i64::MAX));
    stmt.text(first, Some(r.ts.as_slice()))?;
    stmt.text(first + 1, Some(r.request_id))?;
    stmt.text(first + 2, r.caller)?;
    stmt.text(first + 3, Some(r.endpoint))?;
    stmt.text(first + 4, r.model)?;
    stmt.text(first + 5, r.routed_model)?;
    stmt.text(first + 6, r.client)?;
    stmt.text(first + 7, r.key_id)?;
    stmt.int(first + 8, Some(i64::from(r.status)))?;
    stmt.int(first + 9, Some(i64::from(r.stream)))?;
    stmt.int(first + 10, Some(i64::from(r.attempts)))?;
    stmt.int(first + 11, count(Some(r.latency_ms)))?;
    stmt.int(first + 12, count(r.ttft_ms))?;
    stmt.int(first + 13, count(r.prompt_tokens))?;
    stmt.int(first + 14, count(r.completion_tokens))?;
    stmt.int(first + 15, count(r.total_tokens))?;
    stmt.text(first + 16, r.error)?;
    stmt.int(first + 17, count(r.cached_tokens))?;
    stmt.int(first + 18, count(r.reasoning_tokens))?;
    stmt.real(first + 19, r.cost_usd)?;
    stmt.real(first + 20, r.reserved_usd)?;
    stmt.int(first + 21, count(r.reserved_tokens))?;
    stmt.int(first + 22, Some(i64::from(r.shadow)))?;
    Ok(())
}

/// A usage file open for writing, with its two INSERT statements prepared
/// once: preparing them for every batch cost more than the rows when
/// batches are small (a few requests a second).
pub struct UsageFile {
    // Finalized before the connection closes: fields drop in this order.
    group: Prepared,
    single: Prepared,
    conn: Connection,
}

impl UsageFile {
    /// Opens (creating or migrating) the usage file at `path`.
    pub fn open(path: &Path) -> Result<UsageFile, StoreError> {
        let conn = open_for_write(path)?;
        let sql = |source| StoreError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let group = Prepared::new(&conn, &insert_sql(ROWS_PER_INSERT)).map_err(sql)?;
        let single = Prepared::new(&conn, &insert_sql(1)).map_err(sql)?;
        Ok(UsageFile {
            group,
            single,
            conn,
        })
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Packs `rows` and inserts them with [`UsageFile::insert_rows`].
    pub fn insert_batch(&mut self, rows: &[&UsageRecord]) -> rusqlite::Result<()> {
        let mut packed = RowBuf::default();
        for r in rows {
            packed.push(r);
        }
        self.insert_rows(packed.iter().map(|(_, row)| row))
            .map(drop)
    }

    /// Inserts the rows in one transaction, in order: groups of
    /// [`ROWS_PER_INSERT`] per statement, the last few one by one. Returns
    /// how many; on an error the transaction is rolled back whole.
    pub fn insert_rows<'a>(
        &mut self,
        mut rows: impl Iterator<Item = Row<'a>>,
    ) -> rusqlite::Result<usize> {
        let tx = self.conn.transaction()?;
        let db = self.group.db;
        let per_row = PARAMS_PER_ROW as c_int;
        let mut chunk: SmallVec<[Row<'a>; ROWS_PER_INSERT]> = SmallVec::new();
        let mut written = 0;
        {
            let mut stmt = RawInsert::new(&mut self.group, db, ROWS_PER_INSERT * PARAMS_PER_ROW);
            for n in 1.. {
                chunk.clear();
                chunk.extend(rows.by_ref().take(ROWS_PER_INSERT));
                if chunk.len() < ROWS_PER_INSERT {
                    break;
                }
                for (i, r) in (0..).zip(&chunk) {
                    bind_row(&mut stmt, 1 + i * per_row, r)?;
                }
                stmt.execute()?;
                written += ROWS_PER_INSERT;
                if n % YIELD_EVERY_GROUPS == 0 {
                    std::thread::yield_now();
                }
            }
        }
        if !chunk.is_empty() {
            let mut stmt = RawInsert::new(&mut self.single, db, PARAMS_PER_ROW);
            for r in &chunk {
                bind_row(&mut stmt, 1, r)?;
                stmt.execute()?;
                written += 1;
            }
        }
        tx.commit()?;
        Ok(written)
    }
}

/// A statement prepared on the connection's own handle, so that text can
/// be bound in place (`SQLITE_STATIC`) instead of copied, as rusqlite's
/// binding always does. Finalized on drop; it must not outlive its
/// connection, which [`UsageFile`]'s field order sees to.
struct Prepared {
    db: *mut ffi::sqlite3,
    stmt: *mut ffi::sqlite3_stmt,
}

impl Prepared {
    fn new(conn: &Connection, sql: &str) -> rusqlite::Result<Prepared> {
        let len = c_int::try_from(sql.len()).map_err(|_| failure(ffi::SQLITE_TOOBIG, None))?;
        let mut stmt = std::ptr::null_mut();
        // SAFETY: the handle is valid while `conn` lives, which the
        // statement does not outlive (see the type's comment).
        let db = unsafe { conn.handle() };
        // SAFETY: a valid handle; `sql` is read for `len` bytes during the
        // call only.
        let rc = unsafe {
            ffi::sqlite3_prepare_v2(
                db,
                sql.as_ptr().cast(),
                len,
                &mut stmt,
                std::ptr::null_mut(),
            )
        };
        if rc != ffi::SQLITE_OK || stmt.is_null() {
            return Err(failure(rc, Some(db)));
        }
        Ok(Prepared { db, stmt })
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        // SAFETY: prepared by `new` and finalized only here.
        unsafe { ffi::sqlite3_finalize(self.stmt) };
    }
}

/// What a parameter holds. Text is compared by content: the text bound
/// earlier lives as long as the batch (`'a`), so SQLite reading it instead
/// of an equal later one reads the same bytes.
#[derive(Clone, Copy, PartialEq)]
enum Bound<'a> {
    Null,
    Int(i64),
    /// The value's bits: equal bits, equal value.
    Real(u64),
    Text(&'a [u8]),
    /// After a failed bind: equal to nothing.
    Unknown,
}

/// One batch's use of a prepared INSERT. `'a` covers every value bound:
/// SQLite may read a bound value until the statement is reset and its
/// parameters cleared, which `Drop` does. A parameter that already holds
/// the value is not bound again (the values stay bound between runs):
/// NULLs, status, model, client and key names, the millisecond's stamp
/// and repeated counts mostly are.
struct RawInsert<'s, 'a> {
    db: *mut ffi::sqlite3,
    stmt: *mut ffi::sqlite3_stmt,
    bound: Vec<Bound<'a>>,
    _borrows: PhantomData<(&'s mut Prepared, &'a ())>,
}

impl<'s, 'a> RawInsert<'s, 'a> {
    fn new(prepared: &'s mut Prepared, db: *mut ffi::sqlite3, params: usize) -> Self {
        RawInsert {
            db,
            stmt: prepared.stmt,
            // Parameters start NULL, and are cleared back to NULL on drop.
            bound: vec![Bound::Null; params + 1],
            _borrows: PhantomData,
        }
    }

    /// Whether parameter `at` needs `value` bound, remembering it if so.
    fn changes(&mut self, at: c_int, value: Bound<'a>) -> bool {
        match usize::try_from(at).ok().and_then(|i| self.bound.get_mut(i)) {
            Some(slot) if *slot == value => false,
            Some(slot) => {
                *slot = value;
                true
            }
            None => true,
        }
    }

    fn text(&mut self, at: c_int, value: Option<&'a [u8]>) -> rusqlite::Result<()> {
        let Some(v) = value else {
            return self.null(at);
        };
        let len = c_int::try_from(v.len()).map_err(|_| failure(ffi::SQLITE_TOOBIG, None))?;
        // An empty string's pointer dangles; SQLite gets a real one.
        let v: &[u8] = if v.is_empty() { b"" } else { v };
        if !self.changes(at, Bound::Text(v)) {
            return Ok(());
        }
        // SAFETY: `v` lives for `'a` (or is static), and the binding is
        // cleared when this guard drops, within `'a`.
        let rc = unsafe {
            ffi::sqlite3_bind_text(self.stmt, at, v.as_ptr().cast(), len, ffi::SQLITE_STATIC())
        };
        self.check(at, rc)
    }

    fn int(&mut self, at: c_int, value: Option<i64>) -> rusqlite::Result<()> {
        let Some(v) = value else {
            return self.null(at);
        };
        if !self.changes(at, Bound::Int(v)) {
            return Ok(());
        }
        // SAFETY: a valid statement; the value is copied.
        let rc = unsafe { ffi::sqlite3_bind_int64(self.stmt, at, v) };
        self.check(at, rc)
    }

    fn real(&mut self, at: c_int, value: Option<f64>) -> rusqlite::Result<()> {
        let Some(v) = value else {
            return self.null(at);
        };
        if !self.changes(at, Bound::Real(v.to_bits())) {
            return Ok(());
        }
        // SAFETY: a valid statement; the value is copied.
        let rc = unsafe { ffi::sqlite3_bind_double(self.stmt, at, v) };
        self.check(at, rc)
    }

    fn null(&mut self, at: c_int) -> rusqlite::Result<()> {
        if !self.changes(at, Bound::Null) {
            return Ok(());
        }
        // SAFETY: a valid statement.
        let rc = unsafe { ffi::sqlite3_bind_null(self.stmt, at) };
        self.check(at, rc)
    }

    /// Runs the statement once and resets it for the next values.
    fn execute(&mut self) -> rusqlite::Result<()> {
        // SAFETY: a valid statement with every parameter bound to values
        // that live for `'a`.
        let rc = unsafe { ffi::sqlite3_step(self.stmt) };
        let result = match rc {
            ffi::SQLITE_DONE => Ok(()),
            _ => Err(failure(rc, Some(self.db))),
        };
        // SAFETY: as above; the statement is left ready for its next run.
        unsafe { ffi::sqlite3_reset(self.stmt) };
        result
    }

    /// A failed bind leaves the parameter's value unknown: it is bound
    /// again next time whatever the value.
    fn check(&mut self, at: c_int, rc: c_int) -> rusqlite::Result<()> {
        if rc == ffi::SQLITE_OK {
            return Ok(());
        }
        if let Some(slot) = usize::try_from(at).ok().and_then(|i| self.bound.get_mut(i)) {
            *slot = Bound::Unknown;
        }
        Err(failure(rc, Some(self.db)))
    }
}

impl Drop for RawInsert<'_, '_> {
    fn drop(&mut self) {
        // SAFETY: a valid statement; afterwards it holds no pointer into
        // the batch's values.
        unsafe {
            ffi::sqlite3_reset(self.stmt);
            ffi::sqlite3_clear_bindings(self.stmt);
        }
    }
}

/// The error rusqlite would give for `rc`, with SQLite's message when the
/// connection has one.
fn failure(rc: c_int, db: Option<*mut ffi::sqlite3>) -> rusqlite::Error {
    let message = db.and_then(|db| {
        // SAFETY: a valid handle; the message is copied before any other
        // call on the connection.
        let m = unsafe { ffi::sqlite3_errmsg(db) };
        (!m.is_null()).then(|| {
            // SAFETY: SQLite returns a NUL-terminated UTF-8 string.
            unsafe { std::ffi::CStr::from_ptr(m) }
                .to_string_lossy()
                .into_owned()
        })
    });
    rusqlite::Error::SqliteFailure(ffi::Error::new(rc), message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    use std::time::UNIX_EPOCH;

    use crate::calendar::rfc3339_millis;

    #[test]
    fn months_are_utc() {
        let t = humantime::parse_rfc3339("2026-01-31T23:59:59.999Z").unwrap();
        assert_eq!(month_of(t), "2026-01");
        assert_eq!(file_name("2026-02"), "usage-2026-02.sqlite");
    }

    /// Every column of every row holds what its record had, NULLs included,
    /// through both statement shapes and with text bound in place.
    #[test]
    fn every_column_is_written_as_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = UsageFile::open(&dir.path().join("usage-2026-04.sqlite")).unwrap();
        let rows: Vec<UsageRecord> = (0..ROWS_PER_INSERT as u64 + 3)
            .map(|i| UsageRecord {
                ts: Some(UNIX_EPOCH + std::time::Duration::from_millis(1_775_000_000_000 + i)),
                request_id: format!("req_{i}"),
                caller: (i % 2 == 1).then(|| format!("caller {i} ✓").into()),
                endpoint: format!("e{i}").into(),
                model: (i % 3 != 0).then(|| format!("model-{i}").into()),
                routed_model: (i % 4 == 0).then(|| format!("routed-{i}").into()),
                client: (i % 5 != 0).then(|| format!("client{i}").into()),
                key_id: (i % 6 != 0).then(|| format!("key-{i}").into()),
                status: 100 + i as u16,
                stream: i % 2 == 0,
                attempts: i as u32,
                latency_ms: 1000 + i,
                ttft_ms: (i % 3 == 1).then_some(i),
                prompt_tokens: (i % 2 == 0).then_some(2 * i),
                completion_tokens: (i % 3 == 2).then_some(3 * i),
                total_tokens: (i % 4 != 3).then_some(5 * i),
                error: (i % 7 == 3).then(|| format!("error \"{i}\"")),
                cached_tokens: (i % 4 == 2).then_some(i),
                reasoning_tokens: (i % 5 == 1).then_some(2 * i),
                cost_usd: (i % 3 == 0).then_some(i as f64 / 7.0),
                reserved_usd: (i % 2 == 1).then_some(0.5),
                reserved_tokens: (i % 3 == 2).then_some(100 + i),
                shadow: i % 4 == 3,
            })
            .collect();
        let refs: Vec<&UsageRecord> = rows.iter().collect();
        file.insert_batch(&refs).unwrap();
        assert_eq!(read_back(&file), as_written(&rows));
    }

    /// Every column as SQLite holds it, in row order.
    fn read_back(file: &UsageFile) -> Vec<Vec<rusqlite::types::Value>> {
        file.connection()
            .prepare(&format!("SELECT {COLUMNS} FROM requests ORDER BY id"))
            .unwrap()
            .query_map([], |row| (0..PARAMS_PER_ROW).map(|i| row.get(i)).collect())
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// What [`read_back`] must give for `rows`.
    fn as_written(rows: &[UsageRecord]) -> Vec<Vec<rusqlite::types::Value>> {
        use rusqlite::types::Value;
        let text = |v: Option<&str>| v.map_or(Value::Null, |v| Value::Text(v.to_owned()));
        let int = |v: Option<u64>| v.map_or(Value::Null, |v| Value::Integer(v as i64));
        let real = |v: Option<f64>| v.map_or(Value::Null, Value::Real);
        rows.iter()
            .map(|r| {
                let ts = rfc3339_millis(r.ts.unwrap());
                vec![
                    text(Some(std::str::from_utf8(&ts).unwrap())),
                    text(Some(&r.request_id)),
                    text(r.caller.as_deref()),
                    text(Some(&r.endpoint)),
                    text(r.model.as_deref()),
                    text(r.routed_model.as_deref()),
                    text(r.client.as_deref()),
                    text(r.key_id.as_deref()),
                    int(Some(r.status.into())),
                    int(Some(r.stream.into())),
                    int(Some(r.attempts.into())),
                    int(Some(r.latency_ms)),
                    int(r.ttft_ms),
                    int(r.prompt_tokens),
                    int(r.completion_tokens),
                    int(r.total_tokens),
                    text(r.error.as_deref()),
                    int(r.cached_tokens),
                    int(r.reasoning_tokens),
                    real(r.cost_usd),
                    real(r.reserved_usd),
                    int(r.reserved_tokens),
                    int(Some(u64::from(r.shadow))),
                ]
            })
            .collect()
    }

    /// Parameters keep their values between rows and runs, and a value a
    /// parameter already holds is not bound again: rows drawn from small
    /// pools (shared names, repeated counts, NULL or not, the same
    /// millisecond), in batches of every size through the same prepared
    /// statements, still land exactly as recorded.
    #[test]
    fn repeated_values_and_reused_statements_write_every_row_as_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = UsageFile::open(&dir.path().join("usage-2026-06.sqlite")).unwrap();
        let mut rng = fastrand::Rng::with_seed(11);
        let clients: [Arc<str>; 2] = ["a".into(), "b".into()];
        let keys: [Arc<str>; 3] = ["k1".into(), "k2".into(), "".into()];
        let mut all = Vec::new();
        for batch in [1, 17, 16, 3, 40, 1, 33, 0, 64] {
            let rows: Vec<UsageRecord> = (0..batch)
                .map(|_| UsageRecord {
                    ts: Some(UNIX_EPOCH + Duration::from_millis(1_780_000_000_000 + rng.u64(0..3))),
                    request_id: format!("r{}", rng.u8(0..4)),
                    caller: rng.bool().then(|| "app".into()),
                    endpoint: "chat/completions".into(),
                    model: rng.bool().then(|| format!("m{}", rng.u8(0..2)).into()),
                    routed_model: None,
                    client: rng.bool().then(|| clients[rng.usize(0..2)].clone()),
                    key_id: rng.bool().then(|| keys[rng.usize(0..3)].clone()),
                    status: [200, 200, 429][rng.usize(0..3)],
                    stream: rng.bool(),
                    attempts: rng.u32(1..3),
                    latency_ms: rng.u64(0..3),
                    ttft_ms: rng.bool().then_some(5),
                    prompt_tokens: rng.bool().then_some(rng.u64(0..2)),
                    completion_tokens: rng.bool().then_some(7),
                    total_tokens: rng.bool().then_some(rng.u64(7..9)),
                    error: rng.bool().then(String::new),
                    cached_tokens: rng.bool().then_some(3),
                    reasoning_tokens: None,
                    cost_usd: rng.bool().then_some([0.25, 0.5][rng.usize(0..2)]),
                    reserved_usd: rng.bool().then_some(0.25),
                    reserved_tokens: rng.bool().then_some(rng.u64(0..2)),
                    shadow: rng.bool(),
                })
                .collect();
            let refs: Vec<&UsageRecord> = rows.iter().collect();
            file.insert_batch(&refs).unwrap();
            all.extend(rows);
        }
        assert_eq!(read_back(&file), as_written(&all));
    }

    /// A statement SQLite refuses comes back as SQLite's error, and the
    /// batch leaves nothing behind.
    #[test]
    fn a_refused_insert_is_an_error_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = UsageFile::open(&dir.path().join("usage-2026-05.sqlite")).unwrap();
        file.connection()
            .execute_batch(
                "CREATE TRIGGER no_500 BEFORE INSERT ON requests WHEN NEW.status = 500 \
             BEGIN SELECT RAISE(ABORT, 'status 500 refused'); END;",
            )
            .unwrap();
        let rows: Vec<UsageRecord> = (0..ROWS_PER_INSERT as u16 + 2)
            .map(|i| UsageRecord {
                request_id: format!("r{i}"),
                status: if i == ROWS_PER_INSERT as u16 + 1 {
                    500
                } else {
                    200
                },
                ..UsageRecord::default()
            })
            .collect();
        let refs: Vec<&UsageRecord> = rows.iter().collect();
        let err = file.insert_batch(&refs).unwrap_err();
        assert!(err.to_string().contains("status 500 refused"), "{err}");
        let n: i64 = file
            .connection()
            .query_row("SELECT count(*) FROM requests", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0);
        file.insert_batch(&refs[..ROWS_PER_INSERT + 1]).unwrap();
        let n: i64 = file
            .connection()
            .query_row("SELECT count(*) FROM requests", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, ROWS_PER_INSERT as i64 + 1);
    }

    /// Rows go in whole groups and then one by one; every value lands in
    /// its column, in order, whatever the batch size.
    #[test]
    fn grouped_inserts_keep_every_row_and_value_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage-2026-03.sqlite");
        let mut file = UsageFile::open(&path).unwrap();
        let rows: Vec<UsageRecord> = (0..(2 * ROWS_PER_INSERT + 5) as u64)
            .map(|i| UsageRecord {
                ts: Some(humantime::parse_rfc3339("2026-03-10T12:00:00.123Z").unwrap()),
                request_id: format!("r{i}"),
                caller: (i % 2 == 0).then(|| "batch".into()),
                endpoint: "chat/completions".into(),
                model: Some(format!("m{i}").into()),
                client: Some("c".into()),
                key_id: Some("key-1".into()),
                status: 200 + i as u16,
                stream: i % 3 == 0,
                attempts: 1,
                latency_ms: i * 10,
                ttft_ms: Some(i),
                prompt_tokens: Some(i + 1),
                completion_tokens: None,
                total_tokens: Some(i + 1),
                error: (i == 7).then(|| "e".to_owned()),
                ..UsageRecord::default()
            })
            .collect();
        for sizes in [&rows[..3], &rows[3..]] {
            let refs: Vec<&UsageRecord> = sizes.iter().collect();
            file.insert_batch(&refs).unwrap();
        }
        let conn = file.connection();
        let mut stmt = conn
            .prepare("SELECT ts, request_id, caller, model, status, stream, latency_ms, prompt_tokens, completion_tokens, error FROM requests ORDER BY id")
            .unwrap();
        #[allow(clippy::type_complexity)]
        let got: Vec<(
            String,
            String,
            Option<String>,
            String,
            u16,
            bool,
            u64,
            u64,
            Option<u64>,
            Option<String>,
        )> = stmt
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(8)?,
                    r.get(9)?,
                ))
            })
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(got.len(), rows.len());
        for (g, r) in got.iter().zip(&rows) {
            assert_eq!(g.0, "2026-03-10T12:00:00.123Z");
            assert_eq!(g.1, r.request_id);
            assert_eq!(g.2.as_deref(), r.caller.as_deref());
            assert_eq!(Some(g.3.as_str()), r.model.as_deref());
            assert_eq!((g.4, g.5, g.6), (r.status, r.stream, r.latency_ms));
            assert_eq!((Some(g.7), g.8), (r.prompt_tokens, r.completion_tokens));
            assert_eq!(g.9, r.error);
        }
    }

    /// New files get [`PAGE_SIZE`] pages; a file made with SQLite's
    /// default pages keeps them and takes rows as before.
    #[test]
    fn new_files_get_large_pages_and_old_files_keep_theirs() {
        let dir = tempfile::tempdir().unwrap();
        let page_size = |p: &Path| -> i64 {
            Connection::open(p)
                .unwrap()
                .query_row("PRAGMA page_size", [], |r| r.get(0))
                .unwrap()
        };
        let r = UsageRecord {
            request_id: "r1".into(),
            endpoint: "chat/completions".into(),
            status: 200,
            ..Default::default()
        };
        let new = dir.path().join("usage-2026-08.sqlite");
        UsageFile::open(&new).unwrap().insert_batch(&[&r]).unwrap();
        assert_eq!(page_size(&new), PAGE_SIZE);

        let old = dir.path().join("usage-2026-09.sqlite");
        {
            let c = Connection::open(&old).unwrap();
            c.pragma_update(None, "page_size", 4096).unwrap();
            c.pragma_update(None, "journal_mode", "WAL").unwrap();
            migrate(&c, 0).unwrap();
        }
        let mut f = UsageFile::open(&old).unwrap();
        f.insert_batch(&[&r, &r]).unwrap();
        drop(f);
        assert_eq!(page_size(&old), 4096);
        let n: i64 = Connection::open(&old)
            .unwrap()
            .query_row("SELECT count(*) FROM requests", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 2);
    }

    /// A file written by a build of schema version 1 (the release before
    /// costs) is read as it is, and migrated in place when opened for
    /// writing: its rows keep their values and read NULL in the new
    /// columns, new rows get them all.
    #[test]
    fn files_of_schema_version_1_are_read_and_migrated_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage-2026-10.sqlite");
        {
            let c = Connection::open(&path).unwrap();
            c.pragma_update(None, "journal_mode", "WAL").unwrap();
            c.execute_batch(SCHEMA_V1).unwrap();
            c.pragma_update(None, "application_id", APPLICATION_ID)
                .unwrap();
            c.pragma_update(None, "user_version", 1).unwrap();
            c.execute(
                "INSERT INTO requests (ts, request_id, caller, endpoint, status, stream, attempts, latency_ms, prompt_tokens, completion_tokens, total_tokens) \
                 VALUES ('2026-10-01T00:00:00.000Z', 'old', 'app', 'chat/completions', 200, 0, 1, 5, 10, 2, 12)",
                [],
            )
            .unwrap();
        }
        // Read-only reports work on the old shape.
        let report = crate::usage::report::build(
            &[path.as_path()],
            "2026-10",
            crate::usage::report::GroupBy::Caller,
            None,
        )
        .unwrap();
        assert_eq!(report.total.requests, 1);
        assert_eq!(report.total.cost_usd, 0.0);
        let mut f = UsageFile::open(&path).unwrap();
        let new = UsageRecord {
            request_id: "new".into(),
            endpoint: "chat/completions".into(),
            status: 200,
            cost_usd: Some(0.25),
            cached_tokens: Some(4),
            shadow: true,
            ..Default::default()
        };
        f.insert_batch(&[&new]).unwrap();
        let version: i32 = f
            .connection()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        type Migrated = (String, Option<i64>, Option<f64>, Option<i64>, i64);
        let got: Vec<Migrated> = f
            .connection()
            .prepare("SELECT request_id, total_tokens, cost_usd, cached_tokens, shadow FROM requests ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            got,
            [
                ("old".to_owned(), Some(12), None, None, 0),
                ("new".to_owned(), None, Some(0.25), Some(4), 1)
            ]
        );
    }

    #[test]
    fn creates_reopens_and_refuses_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("usage-2026-01.sqlite");
        let mut c = UsageFile::open(&p).unwrap();
        let r = UsageRecord {
            request_id: "r1".into(),
            endpoint: "chat/completions".into(),
            status: 200,
            ..Default::default()
        };
        c.insert_batch(&[&r]).unwrap();
        drop(c);
        let c = open_for_write(&p).unwrap();
        let n: i64 = c
            .query_row("SELECT count(*) FROM requests", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);

        let foreign = dir.path().join("usage-2026-02.sqlite");
        std::fs::write(&foreign, b"not a database").unwrap();
        assert!(matches!(
            open_for_write(&foreign),
            Err(StoreError::Foreign { .. })
        ));
        assert_eq!(std::fs::read(&foreign).unwrap(), b"not a database");

        let other_db = dir.path().join("usage-2026-03.sqlite");
        Connection::open(&other_db)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        let before = std::fs::read(&other_db).unwrap();
        assert!(matches!(
            open_for_write(&other_db),
            Err(StoreError::Foreign { .. })
        ));
        assert_eq!(std::fs::read(&other_db).unwrap(), before);
    }
}
