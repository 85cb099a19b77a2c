//! `gptbalance replay`: every recorded request re-decided under a new
//! config, in time order, with its callers' limits simulated on the rows'
//! own timestamps (a virtual clock: nothing sleeps, nothing is sent).
//!
//! A row is a request that was made: its tokens and duration are known,
//! so its reservation is what it used, held from its start until its end.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;

use super::ConfigArg;
use crate::config::prices::{usd, Tokens};
use crate::limits::{CallerState, Cost, Refusal, Ticket};
use crate::routing::RoutingTable;
use crate::usage::replay::{for_each_row, Recorded};
use crate::usage::{report, store};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The new config the recorded requests are re-decided under
    #[command(flatten)]
    pub config: ConfigArg,
    /// Usage directory to read (repeat for several instances); default: usage.dir of the config
    #[arg(long = "dir")]
    pub dirs: Vec<PathBuf>,
    /// Month to replay, YYYY-MM (UTC); default: this month
    #[arg(long, conflicts_with = "since", value_parser = super::usage::parse_month)]
    pub month: Option<String>,
    /// Replay every row from this day on (YYYY-MM-DD, UTC)
    #[arg(long, value_parser = parse_day)]
    pub since: Option<String>,
    /// Output format
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

fn parse_day(s: &str) -> Result<String, String> {
    humantime::parse_rfc3339(&format!("{s}T00:00:00Z"))
        .map(|_| s.to_owned())
        .map_err(|_| format!("`{s}` is not a day such as 2026-01-31"))
}

#[derive(Debug, Default, Serialize)]
pub struct Before {
    pub clients: BTreeMap<String, u64>,
}

#[derive(Debug, Default, Serialize)]
pub struct After {
    pub clients: BTreeMap<String, u64>,
    pub unroutable: BTreeMap<String, u64>,
    /// Caller → reason → requests.
    pub refused: BTreeMap<String, BTreeMap<String, u64>>,
    pub fallback_depth: BTreeMap<String, u64>,
}

#[derive(Debug, Default, Serialize)]
pub struct CostUsd {
    pub recorded: f64,
    pub projected: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct SkippedFile {
    pub path: String,
    pub why: String,
}

/// What replay found.
#[derive(Debug, Default, Serialize)]
pub struct Outcome {
    pub rows: u64,
    pub before: Before,
    pub after: After,
    pub cost_usd: CostUsd,
    /// Rows whose caller the new config does not know (routed without limits).
    pub unknown_callers: u64,
    pub skipped_files: Vec<SkippedFile>,
}

pub fn run(args: Args) -> ExitCode {
    let cfg = match super::load_or_exit(&args.config.config) {
        Ok(l) => l.config,
        Err(_) => return ExitCode::from(2),
    };
    let dirs = if args.dirs.is_empty() {
        vec![cfg.usage.dir.clone()]
    } else {
        args.dirs.clone()
    };
    for d in &dirs {
        if !d.is_dir() {
            eprintln!("error: usage directory {} does not exist", d.display());
            return ExitCode::from(2);
        }
    }
    let now = SystemTime::now();
    let (months, since) = match (&args.month, &args.since) {
        (Some(m), _) => (vec![m.clone()], String::new()),
        (None, Some(day)) => {
            let start = humantime::parse_rfc3339(&format!("{day}T00:00:00Z")).unwrap_or(now);
            (
                report::months_between(start, now),
                format!("{day}T00:00:00.000Z"),
            )
        }
        (None, None) => (vec![store::month_of(now)], String::new()),
    };
    let table = RoutingTable::build(cfg, None);
    let dirs: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
    let progress = std::io::stderr().is_terminal();
    let out = replay(&table, &dirs, &months, &since, progress);
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default()),
        Format::Table => print!("{}", table_text(&out)),
    }
    ExitCode::SUCCESS
}

/// A request in flight in the simulation: it holds its reservation until
/// its recorded end.
struct InFlight {
    end_ms: u64,
    seq: u64,
    state: Arc<CallerState>,
    ticket: Ticket,
}

impl PartialEq for InFlight {
    fn eq(&self, o: &Self) -> bool {
        (self.end_ms, self.seq) == (o.end_ms, o.seq)
    }
}
impl Eq for InFlight {}
impl PartialOrd for InFlight {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for InFlight {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.end_ms, self.seq).cmp(&(o.end_ms, o.seq))
    }
}

/// Re-decides every row of `months` in `dirs` under `table`.
pub fn replay(
    table: &RoutingTable,
    dirs: &[&Path],
    months: &[String],
    since: &str,
    progress: bool,
) -> Outcome {
    let mut out = Outcome::default();
    let mut in_flight: BinaryHeap<Reverse<InFlight>> = BinaryHeap::new();
    let mut seq = 0u64;
    let max_depth = table.config.routing.max_fallback_depth as usize;
    let skipped = for_each_row(dirs, months, since, |row| {
        if row.shadow {
            return;
        }
        out.rows += 1;
        if progress && out.rows % 100_000 == 0 {
            eprint!("\rreplayed {} rows", out.rows);
        }
        let Ok(at) = humantime::parse_rfc3339(&row.ts) else {
            return;
        };
        let at_ms = at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        // Requests that ended by now give their reservations back.
        while in_flight.peek().is_some_and(|Reverse(f)| f.end_ms <= at_ms) {
            if let Some(Reverse(f)) = in_flight.pop() {
                f.state.settle(f.ticket, f.ticket.reserved);
            }
        }
        *out.before
            .clients
            .entry(row.client.clone().unwrap_or_else(|| "(none)".to_owned()))
            .or_default() += 1;
        out.cost_usd.recorded += row.cost_usd.unwrap_or(0.0);
        decide(table, &row, at, at_ms, max_depth, &mut out, &mut |f| {
            seq += 1;
            in_flight.push(Reverse(InFlight { seq, ..f }));
        });
    });
    if progress && out.rows >= 100_000 {
        eprintln!("\rreplayed {} rows", out.rows);
    }
    out.skipped_files = skipped
        .into_iter()
        .map(|s| SkippedFile {
            path: s.path.display().to_string(),
            why: s.why,
        })
        .collect();
    out
}

fn decide(
    table: &RoutingTable,
    row: &Recorded,
    at: SystemTime,
    at_ms: u64,
    max_depth: usize,
    out: &mut Outcome,
    hold: &mut dyn FnMut(InFlight),
) {
    let model = row.model.as_deref().unwrap_or("");
    let caller = match &row.caller {
        Some(name) => {
            let found = table.caller(name);
            if found.is_none() && !table.callers.is_empty() {
                out.unknown_callers += 1;
            }
            found
        }
        None => None,
    };
    let refuse = |out: &mut Outcome, reason: &str| {
        let who = row.caller.clone().unwrap_or_else(|| "(none)".to_owned());
        *out.after
            .refused
            .entry(who)
            .or_default()
            .entry(reason.to_owned())
            .or_default() += 1;
    };
    if let Some(c) = caller {
        if !c.cfg.allows(model) {
            return refuse(out, "model_not_allowed");
        }
    }
    // `/v1/messages` rows go to Anthropic clients, the rest to OpenAI ones.
    let api = crate::proxy::anthropic::api_of(&row.endpoint);
    let candidates = table.candidates_of(api, model);
    if candidates.is_empty() {
        *out.after.unroutable.entry(model.to_owned()).or_default() += 1;
        return;
    }
    // A request that fell back when it was made falls back the same way
    // now, if the new chain still leads to the model it ended on.
    let (depth, served) = match row.routed_model.as_deref() {
        Some(r) if r != model => {
            let clients: Vec<_> = table.clients.iter().map(|c| c.cfg.clone()).collect();
            let (_, chain) = crate::routing::diff::route_of(&clients, api, model, max_depth);
            match chain.iter().position(|m| m == r) {
                Some(i) if !table.candidates_of(api, r).is_empty() => (i + 1, r),
                _ => (0, model),
            }
        }
        _ => (0, model),
    };
    let order = table.candidates_of(api, served).order();
    let Some(&ci) = order.first() else {
        *out.after.unroutable.entry(model.to_owned()).or_default() += 1;
        return;
    };
    let n = |v: Option<i64>| v.unwrap_or(0).max(0) as u64;
    let tokens = Tokens {
        prompt: n(row.prompt_tokens),
        cached: n(row.cached_tokens),
        completion: n(row.completion_tokens),
    };
    let price = table.price(ci, served);
    let cost = Cost {
        tokens: tokens.prompt + tokens.completion,
        nanos: price.map_or(0, |p| p.cost_nanos(tokens)),
    };
    if let Some(c) = caller {
        if c.cfg.limits.budget_usd.is_some() && price.is_none() {
            return refuse(out, "model_not_allowed");
        }
        if !c.cfg.limits.is_empty() {
            match c.state.admit(&c.cfg.limits, cost, at) {
                Ok((ticket, _)) => hold(InFlight {
                    end_ms: at_ms + n(Some(row.latency_ms)),
                    seq: 0,
                    state: c.state.clone(),
                    ticket,
                }),
                Err(Refusal::BudgetUsd { .. } | Refusal::BudgetTokens { .. }) => {
                    return refuse(out, "insufficient_quota")
                }
                Err(_) => return refuse(out, "rate_limit_exceeded"),
            }
        }
    }
    *out.after
        .clients
        .entry(table.clients[ci].cfg.name.clone())
        .or_default() += 1;
    *out.after
        .fallback_depth
        .entry(depth.to_string())
        .or_default() += 1;
    out.cost_usd.projected += usd(cost.nanos);
}

fn table_text(o: &Outcome) -> String {
    let mut out = format!("{} requests replayed\n", o.rows);
    let share = |n: u64| {
        if o.rows == 0 {
            0.0
        } else {
            100.0 * n as f64 / o.rows as f64
        }
    };
    let names: std::collections::BTreeSet<&String> = o
        .before
        .clients
        .keys()
        .chain(o.after.clients.keys())
        .collect();
    let rows: Vec<Vec<String>> = names
        .into_iter()
        .map(|name| {
            let (b, a) = (
                o.before.clients.get(name).copied().unwrap_or(0),
                o.after.clients.get(name).copied().unwrap_or(0),
            );
            vec![
                name.clone(),
                format!("{b} ({:.1}%)", share(b)),
                format!("{a} ({:.1}%)", share(a)),
            ]
        })
        .collect();
    out.push_str(&super::table(&["CLIENT", "BEFORE", "AFTER"], &rows));
    for (model, n) in &o.after.unroutable {
        out.push_str(&format!("unroutable: {model}: {n}\n"));
    }
    for (caller, reasons) in &o.after.refused {
        for (reason, n) in reasons {
            out.push_str(&format!("refused: {caller}: {reason}: {n}\n"));
        }
    }
    for (depth, n) in &o.after.fallback_depth {
        out.push_str(&format!("fallback depth {depth}: {n}\n"));
    }
    out.push_str(&format!(
        "cost: recorded ${:.4}, projected ${:.4}\n",
        o.cost_usd.recorded, o.cost_usd.projected
    ));
    if o.unknown_callers > 0 {
        out.push_str(&format!(
            "{} requests of callers the new config does not know (routed without limits)\n",
            o.unknown_callers
        ));
    }
    for s in &o.skipped_files {
        out.push_str(&format!("skipped {}: {}\n", s.path, s.why));
    }
    out
}
