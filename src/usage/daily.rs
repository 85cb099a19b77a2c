//! A month's usage per day, and its latest errors, for `/admin/usage` and
//! the status page.
//!
//! Read-only, like [`super::report`], and one scan of the `requests` table:
//! rows are grouped by `substr(ts, 1, 10)` (the UTC date of their
//! RFC 3339 stamp) and by one column, so the series of every group and the
//! day totals come from the same pass. No index is added: the writer's
//! insert path pays for every index on every row, and a month of a million
//! rows is scanned in well under a second (see `bench/README.md`).
//!
//! `cost_usd` is read only when the file has that column (files written
//! before prices existed have none); otherwise costs are 0.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use rusqlite::Connection;
use serde::Serialize;

use super::report::GroupBy;
use super::store::{self, StoreError};

/// How many of the latest errors are kept.
pub const LATEST_ERRORS: usize = 20;

/// One day's figures, of everything or of one group.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Day {
    pub date: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub requests: u64,
    pub errors: u64,
    pub total_tokens: u64,
    pub cost_usd: f64,
}

impl Day {
    fn add(&mut self, o: &Day) {
        self.requests += o.requests;
        self.errors += o.errors;
        self.total_tokens += o.total_tokens;
        self.cost_usd += o.cost_usd;
    }
}

/// A request answered with a status of 400 or more.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorRow {
    pub ts: String,
    pub status: i64,
    pub client: Option<String>,
    pub model: Option<String>,
    pub error: Option<String>,
}

/// The per-day series of `files`: day totals, and per day one entry per
/// group of `by` (in date, then group order).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Series {
    pub days: Vec<Day>,
    pub days_by: Vec<Day>,
    pub latest_errors: Vec<ErrorRow>,
}

fn has_column(conn: &Connection, column: &str) -> rusqlite::Result<bool> {
    Ok(store::columns(conn)?.iter().any(|c| c == column))
}

/// Reads the series of `files` (several instances add up).
pub fn build(files: &[&Path], by: GroupBy) -> Result<Series, StoreError> {
    let mut cells: BTreeMap<String, HashMap<String, Day>> = BTreeMap::new();
    let mut errors: Vec<ErrorRow> = Vec::new();
    for path in files {
        let conn = store::open_for_read(path)?;
        let err = |source| StoreError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let cost = if has_column(&conn, "cost_usd").map_err(err)? {
            "cost_usd"
        } else {
            "NULL"
        };
        // Rows are summed here rather than by a GROUP BY, which would sort
        // a month of rows in a temporary b-tree first: this one pass is
        // about twice as fast on a million rows. Tokens count as `report`
        // counts them: total_tokens when the upstream gave it, else prompt
        // + completion; negatives as 0.
        let sql = format!(
            "SELECT substr(ts, 1, 10), {col}, status >= 400,
                    CASE WHEN total_tokens IS NULL
                         THEN MAX(COALESCE(prompt_tokens, 0), 0) + MAX(COALESCE(completion_tokens, 0), 0)
                         ELSE MAX(total_tokens, 0) END,
                    {cost}
             FROM requests",
            col = by.column(),
        );
        let mut stmt = conn.prepare(&sql).map_err(err)?;
        let mut rows = stmt.query([]).map_err(err)?;
        while let Some(r) = rows.next().map_err(err)? {
            let date = r
                .get_ref(0)
                .map_err(err)?
                .as_str_or_null()
                .map_err(|e| err(e.into()))?;
            let group = r
                .get_ref(1)
                .map_err(err)?
                .as_str_or_null()
                .map_err(|e| err(e.into()))?;
            let (date, group) = (date.unwrap_or(""), group.unwrap_or("(none)"));
            let cell = match cells.get_mut(date).and_then(|g| g.get_mut(group)) {
                Some(cell) => cell,
                None => cells
                    .entry(date.to_owned())
                    .or_default()
                    .entry(group.to_owned())
                    .or_default(),
            };
            cell.requests += 1;
            cell.errors += u64::from(r.get::<_, i64>(2).map_err(err)? != 0);
            cell.total_tokens += r.get::<_, i64>(3).map_err(err)?.max(0) as u64;
            cell.cost_usd += r.get::<_, Option<f64>>(4).map_err(err)?.unwrap_or(0.0);
        }
        let mut stmt = conn
            .prepare(
                "SELECT ts, status, client, model, error FROM requests
                 WHERE status >= 400 ORDER BY id DESC LIMIT ?1",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map([LATEST_ERRORS as i64], |r| {
                Ok(ErrorRow {
                    ts: r.get(0)?,
                    status: r.get(1)?,
                    client: r.get(2)?,
                    model: r.get(3)?,
                    error: r.get(4)?,
                })
            })
            .map_err(err)?;
        for row in rows {
            errors.push(row.map_err(err)?);
        }
    }
    let mut days = Vec::with_capacity(cells.len());
    let mut days_by = Vec::new();
    for (date, groups) in cells {
        let mut total = Day {
            date: date.clone(),
            ..Day::default()
        };
        let mut groups: Vec<_> = groups.into_iter().collect();
        groups.sort_by(|a, b| a.0.cmp(&b.0));
        for (group, mut cell) in groups {
            total.add(&cell);
            cell.date.clone_from(&date);
            cell.group = Some(group);
            days_by.push(cell);
        }
        days.push(total);
    }
    errors.sort_by(|a, b| b.ts.cmp(&a.ts));
    errors.truncate(LATEST_ERRORS);
    Ok(Series {
        days,
        days_by,
        latest_errors: errors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::store::UsageFile;
    use crate::usage::UsageRecord;
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    fn record(day: u64, client: &str, status: u16, tokens: Option<u64>) -> UsageRecord {
        // 2026-01-01T00:00:00Z plus `day` days and a few hours.
        let t =
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600 + day * 86_400 + 3 * 3600);
        UsageRecord {
            ts: Some(t),
            request_id: format!("r{day}{client}{status}"),
            endpoint: "chat/completions".into(),
            model: Some(Arc::from("m")),
            client: Some(Arc::from(client)),
            status,
            attempts: 1,
            prompt_tokens: Some(3),
            completion_tokens: Some(4),
            total_tokens: tokens,
            error: (status >= 400).then(|| format!("failed {status}")),
            ..UsageRecord::default()
        }
    }

    #[test]
    fn days_add_up_per_date_and_group_and_errors_come_latest_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage-2026-01.sqlite");
        let mut f = UsageFile::open(&path).unwrap();
        let rows = [
            record(0, "a", 200, Some(10)),
            record(0, "a", 500, None),
            record(0, "b", 200, Some(5)),
            record(2, "b", 429, Some(0)),
        ];
        f.insert_batch(&rows.iter().collect::<Vec<_>>()).unwrap();
        drop(f);
        let s = build(&[&path], GroupBy::Client).unwrap();
        let brief: Vec<_> = s
            .days
            .iter()
            .map(|d| (d.date.as_str(), d.requests, d.errors, d.total_tokens))
            .collect();
        assert_eq!(brief, [("2026-01-01", 3, 1, 22), ("2026-01-03", 1, 1, 0)]);
        let groups: Vec<_> = s
            .days_by
            .iter()
            .map(|d| (d.date.as_str(), d.group.as_deref(), d.requests))
            .collect();
        assert_eq!(
            groups,
            [
                ("2026-01-01", Some("a"), 2),
                ("2026-01-01", Some("b"), 1),
                ("2026-01-03", Some("b"), 1)
            ]
        );
        assert_eq!(s.days[0].cost_usd, 0.0, "no cost_usd column: no cost");
        let statuses: Vec<_> = s.latest_errors.iter().map(|e| e.status).collect();
        assert_eq!(statuses, [429, 500]);
        assert_eq!(s.latest_errors[1].error.as_deref(), Some("failed 500"));
    }

    #[test]
    fn cost_is_read_when_the_file_has_the_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage-2026-01.sqlite");
        let mut f = UsageFile::open(&path).unwrap();
        f.insert_batch(&[&record(0, "a", 200, Some(1))]).unwrap();
        drop(f);
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("UPDATE requests SET cost_usd = 0.25;")
            .unwrap();
        drop(conn);
        let s = build(&[&path], GroupBy::Model).unwrap();
        assert_eq!(s.days[0].cost_usd, 0.25);
        assert_eq!(s.days_by[0].group.as_deref(), Some("m"));
    }
}
