//! `gptbalance diff`: what a reload to NEW would change, against another
//! file or the running daemon, before it is applied.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::ConfigArg;
use crate::config::effective;
use crate::routing::diff::{diff, Diff};
use crate::usage::report;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The new config file
    #[command(flatten)]
    pub config: ConfigArg,
    /// The config to compare against (a file)
    #[arg(long, conflicts_with = "admin")]
    pub against: Option<PathBuf>,
    /// The running daemon to compare against (its base URL, e.g. http://127.0.0.1:8000)
    #[arg(long)]
    pub admin: Option<String>,
    /// The admin token for --admin [default: $GPTBALANCE_ADMIN_TOKEN]
    #[arg(long, env = "GPTBALANCE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Output format
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

/// How far back the usage files are read for model names.
const SEEN_WITHIN: Duration = Duration::from_secs(30 * 86_400);

pub fn run(args: Args) -> ExitCode {
    let new = match super::load_or_exit(&args.config.config) {
        Ok(l) => l.config,
        // An invalid NEW is an error of this command, not a difference.
        Err(_) => return ExitCode::from(2),
    };
    let old: Value = match (&args.against, &args.admin) {
        (Some(path), _) => match super::load_or_exit(path) {
            Ok(l) => effective::to_json(&l.config),
            Err(_) => return ExitCode::from(2),
        },
        (None, Some(url)) => match fetch_running(url, args.admin_token.as_deref()) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
        (None, None) => {
            eprintln!("error: give --against OLD (a file) or --admin URL (the running daemon)");
            return ExitCode::from(2);
        }
    };
    let since = SystemTime::now() - SEEN_WITHIN;
    let seen = report::models_since(&[new.usage.dir.as_path()], since);
    let d = diff(&old, &effective::to_json(&new), &seen);
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&d).unwrap_or_default()),
        Format::Text => print!("{}", text(&d)),
    }
    if d.equal {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// The running daemon's effective config, from `GET /admin/config`.
fn fetch_running(url: &str, token: Option<&str>) -> Result<Value, String> {
    let token =
        token.ok_or("--admin needs the admin token: --admin-token or $GPTBALANCE_ADMIN_TOKEN")?;
    let target = format!("{}/admin/config", url.trim_end_matches('/'));
    let req = http::Request::get(&target)
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .body(bytes::Bytes::new())
        .map_err(|_| format!("`{url}` is not a URL such as http://127.0.0.1:8000"))?;
    let rt = super::runtime().map_err(|_| "cannot start the runtime".to_owned())?;
    rt.block_on(async move {
        use http_body_util::BodyExt;
        let clients = crate::upstream::UpstreamClients::default();
        let send = clients.send(Duration::from_secs(10), req.into());
        let resp = tokio::time::timeout(Duration::from_secs(30), send)
            .await
            .map_err(|_| format!("{target}: no answer within 30s"))?
            .map_err(|e| format!("{target}: {e}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{target}: {e}"))?
            .to_bytes();
        match status.as_u16() {
            200 => serde_json::from_slice(&body).map_err(|e| format!("{target}: not JSON: {e}")),
            401 => Err(format!("{target}: the admin token was refused (401)")),
            404 => Err(format!(
                "{target}: 404 (the daemon has no admin_token set, or is older than this command)"
            )),
            s => Err(format!("{target}: answered {s}")),
        }
    })
}

/// A summary line, one line per change, then the routes that move.
pub fn text(d: &Diff) -> String {
    if d.equal {
        return "no difference\n".to_owned();
    }
    let mut out = format!(
        "{} change(s), {} route(s) differ\n",
        d.changes.len(),
        d.routes.len()
    );
    for c in &d.changes {
        let what = match (c.before.is_null(), c.after.is_null()) {
            (true, _) => "added".to_owned(),
            (_, true) => "removed".to_owned(),
            _ => format!("{} -> {}", compact(&c.before), compact(&c.after)),
        };
        out.push_str(&format!("  {:<8} {:<28} {what}\n", c.kind, c.name));
    }
    if !d.routes.is_empty() {
        out.push_str("routes:\n");
        for r in &d.routes {
            let list = |v: &[String]| {
                if v.is_empty() {
                    "(none)".to_owned()
                } else {
                    v.join(", ")
                }
            };
            out.push_str(&format!(
                "  {}: {} -> {}\n",
                r.model,
                list(&r.before),
                list(&r.after)
            ));
            if r.fallback_before != r.fallback_after {
                out.push_str(&format!(
                    "  {}  fallback: {} -> {}\n",
                    " ".repeat(r.model.len()),
                    list(&r.fallback_before),
                    list(&r.fallback_after)
                ));
            }
        }
    }
    out
}

fn compact(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
