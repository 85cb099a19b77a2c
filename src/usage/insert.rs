//! The usage files' insert engine: rows in, SQLite pages out.
//!
//! Data moves one way: the writer thread packs a batch of usage records
//! into [`Row`]s (`rows.rs`: borrowed text, formatted stamps), the month's
//! `UsageFile` (`store.rs`) hands them to an [`Inserter`], which binds
//! them to two statements kept in the connection's statement cache
//! (groups of [`ROWS_PER_INSERT`] rows, the rest one by one) and commits
//! the batch as one transaction. Which file, its schema and its migration
//! are `store.rs`'s business; this file never opens one.
//!
//! Binding goes through rusqlite's safe raw API
//! (`raw_bind_parameter`/`raw_execute`): text is bound as SQLite text
//! straight from the row's bytes, and a parameter that already holds its
//! value from the previous run is not bound again (bindings stay between
//! runs of a statement; they are cleared when it returns to the cache).

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{CachedStatement, Connection};
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
fn bind_row<'a>(stmt: &mut Binder<'_, '_, 'a>, first: usize, r: &Row<'a>) -> rusqlite::Result<()> {
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

/// The connection of a usage file open for writing. Its two INSERT
/// statements live in the connection's statement cache: preparing them
/// for every batch cost more than the rows when batches are small (a few
/// requests a second).
pub struct Inserter {
    conn: Connection,
    group_sql: String,
    single_sql: String,
}

impl Inserter {
    /// Prepares the statements on `conn`, a usage file of the current schema.
    pub fn new(conn: Connection) -> rusqlite::Result<Inserter> {
        let group_sql = insert_sql(ROWS_PER_INSERT);
        let single_sql = insert_sql(1);
        // Prepared now, so a schema mismatch shows when the file opens.
        conn.prepare_cached(&group_sql)?;
        conn.prepare_cached(&single_sql)?;
        Ok(Inserter {
            conn,
            group_sql,
            single_sql,
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
        let mut chunk: SmallVec<[Row<'a>; ROWS_PER_INSERT]> = SmallVec::new();
        let mut written = 0;
        {
            let mut stmt = tx.prepare_cached(&self.group_sql)?;
            let mut stmt = Binder::new(&mut stmt, ROWS_PER_INSERT * PARAMS_PER_ROW);
            for n in 1.. {
                chunk.clear();
                chunk.extend(rows.by_ref().take(ROWS_PER_INSERT));
                if chunk.len() < ROWS_PER_INSERT {
                    break;
                }
                for (i, r) in chunk.iter().enumerate() {
                    bind_row(&mut stmt, 1 + i * PARAMS_PER_ROW, r)?;
                }
                stmt.execute()?;
                written += ROWS_PER_INSERT;
                if n % YIELD_EVERY_GROUPS == 0 {
                    std::thread::yield_now();
                }
            }
        }
        if !chunk.is_empty() {
            let mut stmt = tx.prepare_cached(&self.single_sql)?;
            let mut stmt = Binder::new(&mut stmt, PARAMS_PER_ROW);
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

/// What a parameter holds. Text is compared by content: SQLite keeps its
/// own copy of bound text, so an equal value needs no new binding.
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

/// One batch's use of a cached INSERT. A parameter that already holds the
/// value is not bound again (the values stay bound between runs): NULLs,
/// status, model, client and key names, the millisecond's stamp and
/// repeated counts mostly are. The statement starts the batch with every
/// parameter NULL: the cache clears bindings when it takes it back.
struct Binder<'s, 'c, 'a> {
    stmt: &'s mut CachedStatement<'c>,
    bound: Vec<Bound<'a>>,
}

impl<'s, 'c, 'a> Binder<'s, 'c, 'a> {
    fn new(stmt: &'s mut CachedStatement<'c>, params: usize) -> Self {
        Binder {
            stmt,
            bound: vec![Bound::Null; params + 1],
        }
    }

    /// Whether parameter `at` needs `value` bound, remembering it if so.
    fn changes(&mut self, at: usize, value: Bound<'a>) -> bool {
        match self.bound.get_mut(at) {
            Some(slot) if *slot == value => false,
            Some(slot) => {
                *slot = value;
                true
            }
            None => true,
        }
    }

    fn bind(&mut self, at: usize, value: Bound<'a>, sql: ValueRef<'a>) -> rusqlite::Result<()> {
        if !self.changes(at, value) {
            return Ok(());
        }
        let bound = self.stmt.raw_bind_parameter(at, ToSqlOutput::Borrowed(sql));
        if bound.is_err() {
            // A failed bind leaves the value unknown: bound again next time.
            if let Some(slot) = self.bound.get_mut(at) {
                *slot = Bound::Unknown;
            }
        }
        bound
    }

    fn text(&mut self, at: usize, value: Option<&'a [u8]>) -> rusqlite::Result<()> {
        match value {
            Some(v) => self.bind(at, Bound::Text(v), ValueRef::Text(v)),
            None => self.bind(at, Bound::Null, ValueRef::Null),
        }
    }

    fn int(&mut self, at: usize, value: Option<i64>) -> rusqlite::Result<()> {
        match value {
            Some(v) => self.bind(at, Bound::Int(v), ValueRef::Integer(v)),
            None => self.bind(at, Bound::Null, ValueRef::Null),
        }
    }

    fn real(&mut self, at: usize, value: Option<f64>) -> rusqlite::Result<()> {
        match value {
            Some(v) => self.bind(at, Bound::Real(v.to_bits()), ValueRef::Real(v)),
            None => self.bind(at, Bound::Null, ValueRef::Null),
        }
    }

    /// Runs the statement once; rusqlite resets it for the next values.
    fn execute(&mut self) -> rusqlite::Result<()> {
        self.stmt.raw_execute().map(drop)
    }
}
