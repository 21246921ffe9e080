//! `repro bench`: measurements against the hardware and against peer tools.

use anyhow::{bail, Result};
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct BenchArgs {}

pub fn run(_args: &BenchArgs) -> Result<ExitCode> {
    bail!("not yet")
}
