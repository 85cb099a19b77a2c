//! `gptbalance usage`: totals of requests, errors, tokens and latency.

use std::path::PathBuf;
use std::process::ExitCode;

use super::ConfigArg;
use crate::config::prices::{usd, Tokens};
use crate::config::validate::price_of;
use crate::usage::report::{self, GroupBy, Totals};
use crate::usage::store;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Csv,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Usage directory to read (repeat for several instances); default: usage.dir of the config
    #[arg(long = "dir")]
    pub dirs: Vec<PathBuf>,
    /// Month to report, YYYY-MM (UTC); default: this month
    #[arg(long, value_parser = parse_month)]
    pub month: Option<String>,
    /// Group totals by
    #[arg(long, value_enum, default_value_t = GroupBy::Client)]
    pub by: GroupBy,
    /// Output format
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Recompute each row's cost from its tokens with the config's current
    /// prices (the files are read only)
    #[arg(long)]
    pub reprice: bool,
    /// Compare mirrored requests (`shadow`) with their originals, per client pair
    #[arg(long, conflicts_with = "reprice")]
    pub shadow: bool,
}

pub fn parse_month(s: &str) -> Result<String, String> {
    let ok = s.len() == 7
        && s.as_bytes()[4] == b'-'
        && s[..4].chars().all(|c| c.is_ascii_digit())
        && s[5..].parse::<u8>().is_ok_and(|m| (1..=12).contains(&m));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!("`{s}` is not a month such as 2026-01"))
    }
}

pub fn run(args: Args) -> ExitCode {
    let config = if args.dirs.is_empty() || args.reprice {
        match super::load_or_exit(&args.config.config) {
            Ok(l) => Some(l.config),
            Err(code) => return code,
        }
    } else {
        None
    };
    let dirs = match (&config, args.dirs.is_empty()) {
        (Some(c), true) => vec![c.usage.dir.clone()],
        _ => args.dirs.clone(),
    };
    let month = args
        .month
        .clone()
        .unwrap_or_else(|| store::month_of(std::time::SystemTime::now()));
    let mut files = Vec::new();
    for dir in &dirs {
        if !dir.is_dir() {
            eprintln!("error: usage directory {} does not exist", dir.display());
            return ExitCode::from(2);
        }
        let f = store::path_for(dir, &month);
        if f.exists() {
            files.push(f);
        } else {
            eprintln!("note: no usage file for {month} in {}", dir.display());
        }
    }
    let paths: Vec<&std::path::Path> = files.iter().map(PathBuf::as_path).collect();
    if args.shadow {
        return shadow(&paths, args.format);
    }
    let reprice = |client: Option<&str>, model: Option<&str>, prompt, cached, completion| {
        let cfg = config.as_ref()?;
        let c = cfg
            .clients
            .iter()
            .find(|c| Some(c.name.as_str()) == client)?;
        let price = price_of(c, &cfg.prices, model?)?;
        Some(usd(price.cost_nanos(Tokens {
            prompt,
            cached,
            completion,
        })))
    };
    let repricer: Option<report::Repricer<'_>> = args.reprice.then_some(&reprice as _);
    let report = match report::build(&paths, &month, args.by, repricer) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match args.format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        ),
        Format::Csv => {
            println!("{},requests,errors,prompt_tokens,completion_tokens,total_tokens,cost_usd,latency_p50_ms,latency_p95_ms,latency_p99_ms", report.by);
            for t in report.groups.iter().chain(std::iter::once(&report.total)) {
                let c = cells(t);
                println!(
                    "{}",
                    c.iter().map(|v| csv_field(v)).collect::<Vec<_>>().join(",")
                );
            }
        }
        Format::Table => {
            println!(
                "usage for {month}, by {}, from {} file(s)",
                report.by,
                report.files.len()
            );
            let mut rows: Vec<Vec<String>> = report.groups.iter().map(cells).collect();
            rows.push(cells(&report.total));
            let head = [
                report.by.to_uppercase(),
                "REQUESTS".into(),
                "ERRORS".into(),
                "PROMPT".into(),
                "COMPLETION".into(),
                "TOTAL_TOKENS".into(),
                "COST_USD".into(),
                "P50_MS".into(),
                "P95_MS".into(),
                "P99_MS".into(),
            ];
            let head: Vec<&str> = head.iter().map(String::as_str).collect();
            print!("{}", super::table(&head, &rows));
        }
    }
    ExitCode::SUCCESS
}

/// `usage --shadow`: each client pair's mirrored requests against their
/// originals.
fn shadow(paths: &[&std::path::Path], format: Format) -> ExitCode {
    let pairs = match report::shadow_pairs(paths) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let rows: Vec<Vec<String>> = pairs
        .iter()
        .map(|p| {
            vec![
                p.client.clone(),
                p.shadow_client.clone(),
                p.pairs.to_string(),
                p.same_status.to_string(),
                format!("{}/{}", p.client_errors, p.shadow_errors),
                format!(
                    "{:.0}/{:.0}",
                    p.client_latency_ms_avg, p.shadow_latency_ms_avg
                ),
                format!("{}/{}", p.client_tokens, p.shadow_tokens),
                format!("{:.6}/{:.6}", p.client_cost_usd, p.shadow_cost_usd),
            ]
        })
        .collect();
    match format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&pairs).unwrap_or_default()
        ),
        Format::Csv => {
            println!(
                "client,shadow_client,pairs,same_status,errors,latency_ms_avg,tokens,cost_usd"
            );
            for r in &rows {
                println!(
                    "{}",
                    r.iter().map(|v| csv_field(v)).collect::<Vec<_>>().join(",")
                );
            }
        }
        Format::Table => {
            let head = [
                "CLIENT",
                "SHADOW",
                "PAIRS",
                "SAME_STATUS",
                "ERRORS",
                "LATENCY_MS_AVG",
                "TOKENS",
                "COST_USD",
            ];
            print!("{}", super::table(&head, &rows));
        }
    }
    ExitCode::SUCCESS
}

fn cells(t: &Totals) -> Vec<String> {
    vec![
        t.group.clone(),
        t.requests.to_string(),
        t.errors.to_string(),
        t.prompt_tokens.to_string(),
        t.completion_tokens.to_string(),
        t.total_tokens.to_string(),
        format!("{:.6}", t.cost_usd),
        t.latency_p50_ms.to_string(),
        t.latency_p95_ms.to_string(),
        t.latency_p99_ms.to_string(),
    ]
}

fn csv_field(v: &str) -> String {
    if v.contains([',', '"', '\n']) {
        format!("\"{}\"", v.replace('"', "\"\""))
    } else {
        v.to_owned()
    }
}
