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
    /// The recorded `cost_usd` (or, with `--reprice`, recomputed).
    pub cost_usd: f64,
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
        self.cost_usd += o.cost_usd;
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

/// Prices a row again: `(client, routed model, prompt, cached,
/// completion)` to a cost in USD, `None` when unpriced.
pub type Repricer<'a> = &'a dyn Fn(Option<&str>, Option<&str>, u64, u64, u64) -> Option<f64>;

/// Adds up the `requests` tables of `files`; with `reprice`, the cost of
/// each row is recomputed from its tokens instead of read.
pub fn build(
    files: &[&Path],
    month: &str,
    by: GroupBy,
    reprice: Option<Repricer<'_>>,
) -> Result<Report, StoreError> {
    let mut groups: BTreeMap<String, Totals> = BTreeMap::new();
    for path in files {
        let conn = store::open_for_read(path)?;
        let err = |source| StoreError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        // Files of schema version 1 have no cost or cached tokens.
        let v2 = store::columns(&conn)
            .map_err(err)?
            .iter()
            .any(|c| c == "cost_usd");
        let (cost, cached) = if v2 {
            ("cost_usd", "cached_tokens")
        } else {
            ("NULL", "NULL")
        };
        let sql = format!(
            "SELECT {}, status, latency_ms, prompt_tokens, completion_tokens, total_tokens, \
             {cost}, client, routed_model, {cached} FROM requests",
            by.column()
        );
        let mut stmt = conn.prepare(&sql).map_err(err)?;
        let mut rows = stmt.query([]).map_err(err)?;
        while let Some(r) = rows.next().map_err(err)? {
            let group: Option<String> = r.get(0).map_err(err)?;
            let group = group.unwrap_or_else(|| "(none)".to_owned());
            let (p, c): (Option<i64>, Option<i64>) =
                (r.get(3).map_err(err)?, r.get(4).map_err(err)?);
            let cost: Option<f64> = match reprice {
                None => r.get(6).map_err(err)?,
                Some(price) => {
                    let client: Option<String> = r.get(7).map_err(err)?;
                    let model: Option<String> = r.get(8).map_err(err)?;
                    let cached: Option<i64> = r.get(9).map_err(err)?;
                    let n = |v: Option<i64>| v.unwrap_or(0).max(0) as u64;
                    (p.is_some() || c.is_some())
                        .then(|| price(client.as_deref(), model.as_deref(), n(p), n(cached), n(c)))
                        .flatten()
                }
            };
            let totals = groups.entry(group.clone()).or_insert_with(|| Totals {
                group,
                ..Totals::default()
            });
            totals.add(
                r.get(1).map_err(err)?,
                r.get(2).map_err(err)?,
                p,
                c,
                r.get(5).map_err(err)?,
            );
            totals.cost_usd += cost.unwrap_or(0.0);
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

/// What one caller spent, as settled: in the current UTC day and month.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spent {
    pub day_tokens: u64,
    pub day_nanos: i64,
    pub month_tokens: u64,
    pub month_nanos: i64,
}

/// Each caller's settled spend in the month file of `now` in `dir`: the
/// cost (else the reservation) and tokens (else the reservation) of its
/// 2xx rows that were not mirrored. One query over the file; an absent
/// file is no spend. Files of schema version 1 have no costs: only their
/// tokens count.
pub fn spent_by_caller(
    dir: &Path,
    now: std::time::SystemTime,
) -> Result<BTreeMap<String, Spent>, StoreError> {
    let month = store::month_of(now);
    let path = store::path_for(dir, &month);
    let mut out = BTreeMap::new();
    if !path.exists() {
        return Ok(out);
    }
    let conn = store::open_for_read(&path)?;
    let err = |source| StoreError::Sqlite {
        path: path.clone(),
        source,
    };
    let columns = store::columns(&conn).map_err(err)?;
    let has = |c: &str| columns.iter().any(|x| x == c);
    let (cost, tokens, shadow) = if has("cost_usd") {
        (
            "coalesce(cost_usd, reserved_usd, 0)",
            "coalesce(total_tokens, reserved_tokens, 0)",
            "AND shadow = 0",
        )
    } else {
        ("0", "coalesce(total_tokens, 0)", "")
    };
    let today = humantime::format_rfc3339_seconds(now).to_string()[..10].to_owned();
    let sql = format!(
        "SELECT caller, substr(ts, 1, 10) = ?1, sum({cost}), sum({tokens}) FROM requests \
         WHERE caller IS NOT NULL AND status BETWEEN 200 AND 299 {shadow} GROUP BY 1, 2"
    );
    let mut stmt = conn.prepare(&sql).map_err(err)?;
    let mut rows = stmt.query([&today]).map_err(err)?;
    while let Some(r) = rows.next().map_err(err)? {
        let caller: String = r.get(0).map_err(err)?;
        let is_today: bool = r.get(1).map_err(err)?;
        let usd: f64 = r.get(2).map_err(err)?;
        let tokens: i64 = r.get(3).map_err(err)?;
        let nanos = (usd * 1e9).round() as i64;
        let tokens = tokens.max(0) as u64;
        let s: &mut Spent = out.entry(caller).or_default();
        s.month_tokens += tokens;
        s.month_nanos += nanos;
        if is_today {
            s.day_tokens += tokens;
            s.day_nanos += nanos;
        }
    }
    Ok(out)
}

/// The months (`YYYY-MM`) from the one of `since` to the one of `until`.
pub fn months_between(since: std::time::SystemTime, until: std::time::SystemTime) -> Vec<String> {
    let (first, last) = (store::month_of(since), store::month_of(until));
    let mut out = Vec::new();
    let (mut y, mut m): (u32, u32) = (
        first[..4].parse().unwrap_or(1970),
        first[5..].parse().unwrap_or(1),
    );
    loop {
        let month = format!("{y:04}-{m:02}");
        let done = month >= last;
        out.push(month);
        if done || out.len() > 1200 {
            return out;
        }
        (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    }
}

/// Every model name requested since `since`, from the month files of
/// `dirs` (absent or unreadable files are skipped: this only widens what a
/// diff compares).
pub fn models_since(dirs: &[&Path], since: std::time::SystemTime) -> Vec<String> {
    let stamp = humantime::format_rfc3339_millis(since).to_string();
    let mut out = std::collections::BTreeSet::new();
    for month in months_between(since, std::time::SystemTime::now()) {
        for dir in dirs {
            let path = store::path_for(dir, &month);
            let Ok(conn) = store::open_for_read(&path) else {
                continue;
            };
            let Ok(mut stmt) = conn.prepare(
                "SELECT DISTINCT model FROM requests WHERE model IS NOT NULL AND ts >= ?1",
            ) else {
                continue;
            };
            let names: Vec<String> = match stmt.query_map([&stamp], |r| r.get(0)) {
                Ok(rows) => rows.flatten().collect(),
                Err(_) => continue,
            };
            out.extend(names);
        }
    }
    out.into_iter().collect()
}

/// Mirrored requests compared with their originals, per (original client,
/// shadow client).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ShadowPairs {
    pub client: String,
    pub shadow_client: String,
    pub pairs: u64,
    /// Pairs whose two statuses are equal.
    pub same_status: u64,
    pub client_errors: u64,
    pub shadow_errors: u64,
    pub client_latency_ms_avg: f64,
    pub shadow_latency_ms_avg: f64,
    pub client_tokens: u64,
    pub shadow_tokens: u64,
    pub client_cost_usd: f64,
    pub shadow_cost_usd: f64,
}

/// Pairs each mirrored row (`shadow = 1`) of `files` with its original
/// (same `request_id`) and adds them up by client pair.
pub fn shadow_pairs(files: &[&Path]) -> Result<Vec<ShadowPairs>, StoreError> {
    let mut out: BTreeMap<(String, String), ShadowPairs> = BTreeMap::new();
    for path in files {
        let conn = store::open_for_read(path)?;
        let err = |source| StoreError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        if !store::columns(&conn)
            .map_err(err)?
            .iter()
            .any(|c| c == "shadow")
        {
            continue;
        }
        let mut stmt = conn
            .prepare(
                "SELECT o.client, s.client, o.status, s.status, o.latency_ms, s.latency_ms, \
                 coalesce(o.total_tokens, 0), coalesce(s.total_tokens, 0), \
                 coalesce(o.cost_usd, 0), coalesce(s.cost_usd, 0) \
                 FROM requests s JOIN requests o ON o.request_id = s.request_id AND o.shadow = 0 \
                 WHERE s.shadow = 1",
            )
            .map_err(err)?;
        let mut rows = stmt.query([]).map_err(err)?;
        while let Some(r) = rows.next().map_err(err)? {
            let name = |i: usize| -> Result<String, StoreError> {
                let v: Option<String> = r.get(i).map_err(err)?;
                Ok(v.unwrap_or_else(|| "(none)".to_owned()))
            };
            let (a, b) = (name(0)?, name(1)?);
            let (sa, sb): (i64, i64) = (r.get(2).map_err(err)?, r.get(3).map_err(err)?);
            let (la, lb): (i64, i64) = (r.get(4).map_err(err)?, r.get(5).map_err(err)?);
            let (ta, tb): (i64, i64) = (r.get(6).map_err(err)?, r.get(7).map_err(err)?);
            let (ca, cb): (f64, f64) = (r.get(8).map_err(err)?, r.get(9).map_err(err)?);
            let p = out
                .entry((a.clone(), b.clone()))
                .or_insert_with(|| ShadowPairs {
                    client: a,
                    shadow_client: b,
                    ..ShadowPairs::default()
                });
            p.pairs += 1;
            p.same_status += u64::from(sa == sb);
            p.client_errors += u64::from(sa >= 400);
            p.shadow_errors += u64::from(sb >= 400);
            // Running sums; turned into averages below.
            p.client_latency_ms_avg += la as f64;
            p.shadow_latency_ms_avg += lb as f64;
            p.client_tokens += ta.max(0) as u64;
            p.shadow_tokens += tb.max(0) as u64;
            p.client_cost_usd += ca;
            p.shadow_cost_usd += cb;
        }
    }
    Ok(out
        .into_values()
        .map(|mut p| {
            p.client_latency_ms_avg /= p.pairs as f64;
            p.shadow_latency_ms_avg /= p.pairs as f64;
            p
        })
        .collect())
}
