//! Totals read from usage files, for `gptbalance usage`.
//!
//! Opens files read-only, so it works while a daemon writes them; several
//! files (instances behind a load balancer) add up into one report.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use super::store::{self, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GroupBy {
    Client,
    Model,
    Key,
    Caller,
}

impl GroupBy {
    pub(crate) fn column(self) -> &'static str {
        match self {
            GroupBy::Client => "client",
            GroupBy::Model => "model",
            GroupBy::Key => "key_id",
            GroupBy::Caller => "caller",
        }
    }
}

/// Totals of one group (or of everything).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    pub group: String,
    pub requests: u64,
    /// Requests answered with a status of 400 or more (499: the caller left).
    pub errors: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub latency_p50_ms: u64,
    pub latency_p95_ms: u64,
    pub latency_p99_ms: u64,
    #[serde(skip)]
    latencies: Vec<u64>,
}

impl Totals {
    fn add(&mut self, status: i64, latency: i64, p: Option<i64>, c: Option<i64>, t: Option<i64>) {
        self.requests += 1;
        self.errors += u64::from(status >= 400);
        let n = |v: Option<i64>| v.unwrap_or(0).max(0) as u64;
        self.prompt_tokens += n(p);
        self.completion_tokens += n(c);
        self.total_tokens += t.map_or(n(p) + n(c), |t| t.max(0) as u64);
        self.latencies.push(latency.max(0) as u64);
    }

    fn merge(&mut self, o: &Totals) {
        self.requests += o.requests;
        self.errors += o.errors;
        self.prompt_tokens += o.prompt_tokens;
        self.completion_tokens += o.completion_tokens;
        self.total_tokens += o.total_tokens;
        self.latencies.extend_from_slice(&o.latencies);
    }

    fn finish(&mut self) {
        self.latencies.sort_unstable();
        let pct = |q: f64| -> u64 {
            if self.latencies.is_empty() {
                return 0;
            }
            let i = ((self.latencies.len() as f64) * q).ceil() as usize;
            self.latencies[i.clamp(1, self.latencies.len()) - 1]
        };
        self.latency_p50_ms = pct(0.50);
        self.latency_p95_ms = pct(0.95);
        self.latency_p99_ms = pct(0.99);
    }
}

/// A report: one row per group, and the total.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub month: String,
    pub by: String,
    pub files: Vec<String>,
    pub groups: Vec<Totals>,
    pub total: Totals,
}

/// Adds up the `requests` tables of `files`.
pub fn build(files: &[&Path], month: &str, by: GroupBy) -> Result<Report, StoreError> {
    let mut groups: BTreeMap<String, Totals> = BTreeMap::new();
    for path in files {
        let conn = store::open_for_read(path)?;
        let sql = format!(
            "SELECT {}, status, latency_ms, prompt_tokens, completion_tokens, total_tokens FROM requests",
            by.column()
        );
        let err = |source| StoreError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let mut stmt = conn.prepare(&sql).map_err(err)?;
        let mut rows = stmt.query([]).map_err(err)?;
        while let Some(r) = rows.next().map_err(err)? {
            let group: Option<String> = r.get(0).map_err(err)?;
            let group = group.unwrap_or_else(|| "(none)".to_owned());
            groups
                .entry(group.clone())
                .or_insert_with(|| Totals {
                    group,
                    ..Totals::default()
                })
                .add(
                    r.get(1).map_err(err)?,
                    r.get(2).map_err(err)?,
                    r.get(3).map_err(err)?,
                    r.get(4).map_err(err)?,
                    r.get(5).map_err(err)?,
                );
        }
    }
    let mut total = Totals {
        group: "TOTAL".to_owned(),
        ..Totals::default()
    };
    let mut groups: Vec<Totals> = groups.into_values().collect();
    for g in &mut groups {
        total.merge(g);
        g.finish();
    }
    total.finish();
    groups.sort_by(|a, b| {
        b.requests
            .cmp(&a.requests)
            .then_with(|| a.group.cmp(&b.group))
    });
    Ok(Report {
        month: month.to_owned(),
        by: by.column().to_owned(),
        files: files.iter().map(|p| p.display().to_string()).collect(),
        groups,
        total,
    })
}
