//! The usage files' insert engine: rows in, SQLite pages out.
//!
//! Data moves one way: the writer thread packs a batch of usage records
//! into [`Row`]s (`rows.rs`: borrowed text, formatted stamps), the month's
//! `UsageFile` (`store.rs`) hands them to an [`Inserter`], which binds
//! them to two statements prepared once per file (groups of
//! [`ROWS_PER_INSERT`] rows, the rest one by one) and commits the batch as
//! one transaction. Which file, its
//! schema and its migration are `store.rs`'s business; this file never
//! opens one.
//!
//! Statements are prepared and bound through SQLite's C API so that text
//! is bound in place (`SQLITE_STATIC`), and a parameter that already holds
//! its value is not bound again: rusqlite's binding always copies text.
//! Every `unsafe` block has its `SAFETY` note; the handles never leave
//! this file, and [`Inserter`] owns the connection they point into.

use std::marker::PhantomData;
use std::os::raw::c_int;

use rusqlite::{ffi, Connection};
use smallvec::SmallVec;

use super::rows::Row;

pub(super) const COLUMNS: &str = "ts, request_id, caller, endpoint, model, routed_model, client, key_id, \
    status, stream, attempts, latency_ms, ttft_ms, prompt_tokens, completion_tokens, total_tokens, error, \
    cached_tokens, reasoning_tokens, cost_usd, reserved_usd, reserved_tokens, shadow";
pub(super) const PARAMS_PER_ROW: usize = 23;
/// Rows written by one INSERT statement: one statement per row spends
/// about a third of SQLite's work on executing the statement itself.
pub(super) const ROWS_PER_INSERT: usize = 16;
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

/// The connection of a usage file open for writing, with its two INSERT
/// statements prepared once: preparing them for every batch cost more
/// than the rows when batches are small (a few requests a second).
pub struct Inserter {
    // Finalized before the connection closes: fields drop in this order.
    group: Prepared,
    single: Prepared,
    conn: Connection,
}

impl Inserter {
    /// Prepares the statements on `conn`, a usage file of the current schema.
    pub fn new(conn: Connection) -> rusqlite::Result<Inserter> {
        let group = Prepared::new(&conn, &insert_sql(ROWS_PER_INSERT))?;
        let single = Prepared::new(&conn, &insert_sql(1))?;
        Ok(Inserter {
            group,
            single,
            conn,
        })
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
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
/// connection, which [`Inserter`]'s field order sees to.
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
