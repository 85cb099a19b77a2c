//! Recorded requests read back in time order, one at a time, for
//! `gptbalance replay`: constant memory whatever the month's size.
//!
//! Each month file is read with one statement ordered by `ts` (SQLite sorts
//! on disk when it must); the files of several instances for one month are
//! merged as they are read. Files of schema version 1 have no cost or
//! `shadow` columns: they read as NULL and 0.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, Rows};

use super::store;

/// One recorded request, as replay needs it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Recorded {
    pub ts: String,
    pub caller: Option<String>,
    pub endpoint: String,
    pub model: Option<String>,
    pub routed_model: Option<String>,
    pub client: Option<String>,
    pub status: i64,
    pub latency_ms: i64,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub cached_tokens: Option<i64>,
    pub cost_usd: Option<f64>,
    pub shadow: bool,
}

fn select(conn: &Connection) -> rusqlite::Result<String> {
    let v2 = store::columns(conn)?.iter().any(|c| c == "cost_usd");
    let (cached, cost, shadow) = if v2 {
        ("cached_tokens", "cost_usd", "shadow")
    } else {
        ("NULL", "NULL", "0")
    };
    Ok(format!(
        "SELECT ts, caller, endpoint, model, routed_model, client, status, latency_ms, \
         prompt_tokens, completion_tokens, {cached}, {cost}, {shadow} \
         FROM requests WHERE ts >= ?1 ORDER BY ts, id"
    ))
}

fn read(r: &rusqlite::Row<'_>) -> rusqlite::Result<Recorded> {
    Ok(Recorded {
        ts: r.get(0)?,
        caller: r.get(1)?,
        endpoint: r.get(2)?,
        model: r.get(3)?,
        routed_model: r.get(4)?,
        client: r.get(5)?,
        status: r.get(6)?,
        latency_ms: r.get(7)?,
        prompt_tokens: r.get(8)?,
        completion_tokens: r.get(9)?,
        cached_tokens: r.get(10)?,
        cost_usd: r.get(11)?,
        shadow: r.get::<_, i64>(12)? != 0,
    })
}

/// A file that could not be read, and why.
#[derive(Debug, Clone)]
pub struct Skipped {
    pub path: PathBuf,
    pub why: String,
}

/// Calls `each` with every row of `months` in `dirs` whose `ts` is at least
/// `since` (RFC 3339 text), in time order; returns the files skipped.
pub fn for_each_row(
    dirs: &[&Path],
    months: &[String],
    since: &str,
    mut each: impl FnMut(Recorded),
) -> Vec<Skipped> {
    let mut skipped = Vec::new();
    for month in months {
        let mut conns = Vec::new();
        for dir in dirs {
            let path = store::path_for(dir, month);
            if !path.exists() {
                continue;
            }
            match store::open_for_read(&path) {
                Ok(c) => conns.push((path, c)),
                Err(e) => skipped.push(Skipped {
                    why: e.to_string(),
                    path,
                }),
            }
        }
        let mut stmts = Vec::new();
        for (path, conn) in &conns {
            match select(conn).and_then(|sql| conn.prepare(&sql)) {
                Ok(s) => stmts.push((path, s)),
                Err(e) => skipped.push(Skipped {
                    path: path.clone(),
                    why: e.to_string(),
                }),
            }
        }
        let mut cursors: Vec<(&PathBuf, Rows<'_>)> = Vec::new();
        for (path, stmt) in &mut stmts {
            match stmt.query([since]) {
                Ok(rows) => cursors.push((path, rows)),
                Err(e) => skipped.push(Skipped {
                    path: (*path).clone(),
                    why: e.to_string(),
                }),
            }
        }
        // The next row of each file; the earliest goes first.
        let mut heads: Vec<Option<Recorded>> = Vec::with_capacity(cursors.len());
        for (path, rows) in &mut cursors {
            heads.push(next(path, rows, &mut skipped));
        }
        let earliest = |heads: &[Option<Recorded>]| {
            (0..heads.len())
                .filter(|&i| heads[i].is_some())
                .min_by(|&a, &b| {
                    let ts = |i: usize| heads[i].as_ref().map(|r| r.ts.as_str());
                    ts(a).cmp(&ts(b))
                })
        };
        while let Some(i) = earliest(&heads) {
            if let Some(row) = heads[i].take() {
                each(row);
            }
            let (path, rows) = &mut cursors[i];
            heads[i] = next(path, rows, &mut skipped);
        }
    }
    skipped
}

fn next(path: &Path, rows: &mut Rows<'_>, skipped: &mut Vec<Skipped>) -> Option<Recorded> {
    match rows.next() {
        Ok(Some(r)) => match read(r) {
            Ok(rec) => Some(rec),
            Err(e) => {
                skipped.push(Skipped {
                    path: path.to_owned(),
                    why: format!("stopped at a row it cannot read: {e}"),
                });
                None
            }
        },
        Ok(None) => None,
        Err(e) => {
            skipped.push(Skipped {
                path: path.to_owned(),
                why: e.to_string(),
            });
            None
        }
    }
}
