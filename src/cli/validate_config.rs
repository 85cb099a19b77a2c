//! `gptbalance validate-config`: every problem of a config file, offline.

use std::process::ExitCode;

use super::ConfigArg;
use crate::config::{self, Diagnostic, LoadError, Severity};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
    Github,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Output format
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Treat warnings as errors
    #[arg(long)]
    pub strict: bool,
}

pub fn run(args: Args) -> ExitCode {
    let path = &args.config.config;
    let diags = match config::load(path) {
        Ok(loaded) => loaded.warnings,
        Err(LoadError::Io { path, source }) => {
            eprintln!(
                "error: cannot read config file {}: {source}",
                path.display()
            );
            return ExitCode::from(2);
        }
        Err(LoadError::Invalid(diags)) => diags,
    };
    let diags: Vec<Diagnostic> = diags
        .into_iter()
        .map(|mut d| {
            if args.strict {
                d.severity = Severity::Error;
            }
            d
        })
        .collect();
    let failed = diags.iter().any(|d| d.severity == Severity::Error);
    match args.format {
        Format::Text => {
            for d in &diags {
                if d.severity == Severity::Error {
                    println!("{d}");
                } else {
                    eprintln!("{d}");
                }
            }
            if !failed {
                println!("{}: ok", path.display());
            }
        }
        Format::Json => {
            let list: Vec<_> = diags
                .iter()
                .map(|d| {
                    serde_json::json!({
                        "path": d.file, "line": d.line, "col": d.col,
                        "severity": if d.severity == Severity::Error { "error" } else { "warning" },
                        "message": d.message,
                    })
                })
                .collect();
            println!("{}", serde_json::Value::Array(list));
        }
        Format::Github => {
            for d in &diags {
                let level = if d.severity == Severity::Error {
                    "error"
                } else {
                    "warning"
                };
                println!(
                    "::{level} file={},line={},col={}::{}",
                    d.file,
                    d.line,
                    d.col,
                    d.message
                        .replace('%', "%25")
                        .replace('\r', "%0D")
                        .replace('\n', "%0A")
                );
            }
        }
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
