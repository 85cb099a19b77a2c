//! `gptbalance check-keys`: probes every key with `GET {base_url}/models`.
//!
//! Costs no tokens. Probes run concurrently (bounded) with a timeout each,
//! and only redacted key ids are printed.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, Method};
use http_body_util::BodyExt;
use serde::Serialize;
use tokio::sync::Semaphore;

use super::ConfigArg;
use crate::routing::RoutingTable;
use crate::upstream::{self, UpstreamClients};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Only the keys of this client
    #[arg(long)]
    pub client: Option<String>,
    /// Output format
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Probes in flight at once
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub concurrency: u32,
    /// Timeout of one probe, e.g. 10s
    #[arg(long, default_value = "10s", value_parser = parse_timeout)]
    pub timeout: Duration,
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    crate::config::schema::parse_duration(s)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Ok,
    Invalid,
    RateLimited,
    UpstreamError,
    Unreachable,
}

impl Verdict {
    fn of_status(status: u16) -> Verdict {
        match status {
            200..=299 => Verdict::Ok,
            401 | 403 => Verdict::Invalid,
            429 => Verdict::RateLimited,
            _ => Verdict::UpstreamError,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Invalid => "invalid",
            Verdict::RateLimited => "rate_limited",
            Verdict::UpstreamError => "upstream_error",
            Verdict::Unreachable => "unreachable",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    pub client: String,
    pub key_id: String,
    pub verdict: Verdict,
    pub status: Option<u16>,
    pub latency_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub fn run(args: Args) -> ExitCode {
    let loaded = match super::load_or_exit(&args.config.config) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let shared_cfg = loaded.config.shared_state.clone();
    let table = RoutingTable::build(loaded.config, None);
    if let Some(name) = &args.client {
        if table.client(name).is_none() {
            eprintln!(
                "error: no client named `{name}` in {}",
                args.config.config.display()
            );
            return ExitCode::from(2);
        }
    }
    let runtime = match super::runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let probes = runtime.block_on(probe_all(
        Arc::new(table),
        args.client.as_deref(),
        args.concurrency as usize,
        args.timeout,
    ));
    match args.format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&probes).unwrap_or_default()
        ),
        Format::Table => {
            let rows: Vec<Vec<String>> = probes
                .iter()
                .map(|p| {
                    vec![
                        p.client.clone(),
                        p.key_id.clone(),
                        p.verdict.as_str().to_owned(),
                        p.status.map_or("-".to_owned(), |s| s.to_string()),
                        format!("{} ms", p.latency_ms),
                        p.error.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            print!(
                "{}",
                super::table(
                    &["CLIENT", "KEY", "VERDICT", "STATUS", "LATENCY", "DETAIL"],
                    &rows
                )
            );
            let ok = probes.iter().filter(|p| p.verdict == Verdict::Ok).count();
            println!("{ok} of {} keys ok", probes.len());
        }
    }
    // `shared_state <host:port> ok|unreachable <latency>`: the address
    // only, never the URL (it may hold a password). On stderr with
    // `--format json`, so that stdout stays one JSON document.
    let mut shared_ok = true;
    if let Some(cfg) = &shared_cfg {
        let line = match runtime.block_on(crate::limits::shared::probe(cfg)) {
            Ok(d) => format!("shared_state {} ok {} ms", cfg.address, d.as_millis()),
            Err(e) => {
                shared_ok = false;
                format!("shared_state {} unreachable - ({e})", cfg.address)
            }
        };
        match args.format {
            Format::Json => eprintln!("{line}"),
            Format::Table => println!("{line}"),
        }
    }
    if shared_ok && probes.iter().all(|p| p.verdict == Verdict::Ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Probes every key (of one client, if named), in config order.
pub async fn probe_all(
    table: Arc<RoutingTable>,
    only: Option<&str>,
    concurrency: usize,
    timeout: Duration,
) -> Vec<Probe> {
    let clients = Arc::new(UpstreamClients::default());
    let limit = Arc::new(Semaphore::new(concurrency));
    let mut tasks = Vec::new();
    for (ci, c) in table.clients.iter().enumerate() {
        if only.is_some_and(|n| n != c.cfg.name) {
            continue;
        }
        for ki in 0..c.keys.len() {
            let (table, clients, limit) = (table.clone(), clients.clone(), limit.clone());
            tasks.push(tokio::spawn(async move {
                let _slot = limit.acquire_owned().await;
                probe(&table, &clients, ci, ki, timeout).await
            }));
        }
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        if let Ok(p) = t.await {
            out.push(p);
        }
    }
    out
}

async fn probe(
    table: &RoutingTable,
    clients: &UpstreamClients,
    ci: usize,
    ki: usize,
    timeout: Duration,
) -> Probe {
    let client = &table.clients[ci];
    let key = &client.keys[ki];
    let connect_timeout = client.cfg.policy.connect_timeout.min(timeout);
    let started = Instant::now();
    let mut probe = Probe {
        client: client.cfg.name.clone(),
        key_id: key.id.to_string(),
        verdict: Verdict::Unreachable,
        status: None,
        latency_ms: 0,
        error: None,
    };
    let no_headers = HeaderMap::new();
    let req = match crate::upstream::request::build_request(
        client,
        key,
        &Method::GET,
        "models",
        None,
        &no_headers,
        Default::default(),
    ) {
        Ok(r) => r,
        Err(e) => {
            probe.error = Some(format!("cannot build the request: {e}"));
            return probe;
        }
    };
    let result = tokio::time::timeout(timeout, async {
        let resp = clients.send(connect_timeout, req).await?;
        let status = resp.status().as_u16();
        // Read the body so the latency covers the whole answer.
        let _ = resp.into_body().collect().await;
        Ok::<u16, upstream::SendError>(status)
    })
    .await;
    probe.latency_ms = started.elapsed().as_millis() as u64;
    match result {
        Err(_) => probe.error = Some(format!("no answer within {timeout:?}")),
        Ok(Err(e)) => probe.error = Some(crate::upstream::describe(&e)),
        Ok(Ok(status)) => {
            probe.status = Some(status);
            probe.verdict = Verdict::of_status(status);
        }
    }
    probe
}
