//! `gptbalance check-keys`.

use std::process::ExitCode;

use super::ConfigArg;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub config: ConfigArg,
}

pub fn run(_args: Args) -> ExitCode {
    eprintln!("gptbalance check-keys: not yet");
    ExitCode::from(2)
}
