//! `gptbalance`: parse the command line and run the subcommand; all the work
//! lives in the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    gptbalance::cli::run(gptbalance::cli::Cli::parse())
}
