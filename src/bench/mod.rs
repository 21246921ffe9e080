//! `repro bench`: measurements against the hardware and against peer tools. Figures are
//! ratios against a reference run side by side in the same command, never timed tests.

mod engine;

use anyhow::Result;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: Bench,
}

#[derive(clap::Subcommand)]
enum Bench {
    /// The pipeline engine: no-op runs, hashing, scheduling; DVC side by side if installed.
    Engine(engine::EngineArgs),
}

pub fn run(args: &BenchArgs) -> Result<ExitCode> {
    match &args.what {
        Bench::Engine(a) => engine::run(a)?,
    }
    Ok(ExitCode::SUCCESS)
}
