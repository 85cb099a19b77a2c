//! The command line: one file per subcommand. Exit codes: 0 success, 1 the
//! checked thing is bad, 2 usage or I/O error.

pub mod check_keys;
pub mod diff;
pub mod health;
pub mod replay;
pub mod route;
// getrlimit/setrlimit to raise the open-files limit.
#[allow(unsafe_code)]
pub mod serve;
pub mod usage;
pub mod validate_config;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "gptbalance",
    version,
    about = "A declarative model router for OpenAI-compatible APIs",
    long_about = "gptbalance routes OpenAI-compatible requests by their `model` to the upstream \
clients of one YAML file: it rotates keys, retries, falls back to other models, streams without \
delay and records usage in monthly SQLite files.\n\n\
Start with `gptbalance validate-config --config config.yaml`, then `gptbalance serve`.",
    after_help = "Exit codes: 0 success, 1 the checked thing is bad, 2 usage or I/O error."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the router daemon
    Serve(serve::Args),
    /// Check a config file offline; print every problem as PATH:LINE:COL: message
    ValidateConfig(validate_config::Args),
    /// Probe every key of every client with GET {base_url}/models
    CheckKeys(check_keys::Args),
    /// Explain how a request for MODEL would be routed
    Route(route::Args),
    /// Totals of requests, errors and tokens from the usage files
    Usage(usage::Args),
    /// What a reload to the config would change, against a file or the running daemon
    Diff(diff::Args),
    /// Re-decide the recorded requests under a config: shares, refusals, cost
    Replay(replay::Args),
    /// Probe a running gateway's /readyz: exit 0 on 200, 1 otherwise (for container health checks)
    Health(health::Args),
}

/// `--config`, shared by every subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArg {
    /// Config file [default: $GPTBALANCE_CONFIG, then config/config.yaml]
    #[arg(
        long,
        short = 'c',
        env = "GPTBALANCE_CONFIG",
        default_value = "config/config.yaml",
        hide_env = true,
        hide_default_value = true
    )]
    pub config: PathBuf,
}

pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve(a) => serve::run(a),
        Command::ValidateConfig(a) => validate_config::run(a),
        Command::CheckKeys(a) => check_keys::run(a),
        Command::Route(a) => route::run(a),
        Command::Usage(a) => usage::run(a),
        Command::Diff(a) => diff::run(a),
        Command::Replay(a) => replay::run(a),
        Command::Health(a) => health::run(a),
    }
}

/// Loads the config for a subcommand that needs a valid one, printing
/// problems the way `validate-config` does; `Err` is the exit code.
pub fn load_or_exit(path: &std::path::Path) -> Result<crate::config::Loaded, ExitCode> {
    match crate::config::load(path) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                eprintln!("{w}");
            }
            Ok(loaded)
        }
        Err(crate::config::LoadError::Io { path, source }) => {
            eprintln!(
                "error: cannot read config file {}: {source}",
                path.display()
            );
            Err(ExitCode::from(2))
        }
        Err(crate::config::LoadError::Invalid(diags)) => {
            for d in &diags {
                eprintln!("{d}");
            }
            Err(ExitCode::from(1))
        }
    }
}

/// The multi-threaded runtime a subcommand runs on; `Err` is exit code 2.
pub fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the runtime: {e}");
            ExitCode::from(2)
        })
}

/// Aligned columns, two spaces apart, for terminal output.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}
