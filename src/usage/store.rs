//! The monthly SQLite files: naming, schema, migrations, opening for
//! writing and for reading.
//!
//! A row's way to disk: the writer thread picks the month's file by the
//! row's stamp ([`month_of`], [`path_for`]), opens it once with
//! [`UsageFile::open`] (checked as ours, created or migrated to
//! [`SCHEMA_VERSION`]), and hands each batch to [`UsageFile::insert_rows`],
//! whose binding and statements live in `insert.rs`. Reports open files
//! with [`open_for_read`] and look at [`columns`] for what an older schema
//! lacks.
//!
//! A file that is not a gptbalance usage database is never modified: it is
//! recognised by SQLite's header and the `application_id` set at creation.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rusqlite::{Connection, OpenFlags};

use super::insert::Inserter;
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

/// A usage file open for writing: its connection and prepared inserts.
pub struct UsageFile {
    insert: Inserter,
}

impl UsageFile {
    /// Opens (creating or migrating) the usage file at `path`.
    pub fn open(path: &Path) -> Result<UsageFile, StoreError> {
        let conn = open_for_write(path)?;
        let insert = Inserter::new(conn).map_err(|source| StoreError::Sqlite {
            path: path.to_owned(),
            source,
        })?;
        Ok(UsageFile { insert })
    }

    pub fn connection(&self) -> &Connection {
        self.insert.connection()
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

    /// Inserts the rows in one transaction, in order; returns how many. On
    /// an error the transaction is rolled back whole.
    pub fn insert_rows<'a>(
        &mut self,
        rows: impl Iterator<Item = Row<'a>>,
    ) -> rusqlite::Result<usize> {
        self.insert.insert_rows(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::insert::{COLUMNS, PARAMS_PER_ROW, ROWS_PER_INSERT};
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
