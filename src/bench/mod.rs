//! `repro bench`: measurements against the hardware and against peer tools. Figures are
//! ratios against a reference run side by side in the same command, never timed tests.

mod engine;
mod floor;
mod kernels;
mod neighbours;
mod script;
mod traffic;
mod train;

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
    /// Each CPU kernel on every instruction set this CPU supports, side by side; with
    /// --device cuda-emu|cuda, the product-key layer's traffic or times against its floor.
    Kernels(kernels::KernelsArgs),
    /// Nearest neighbours between circuits: the inverted index against the dense scan.
    Neighbours(neighbours::NeighboursArgs),
    /// Training throughput and memory of every feedforward kind; PyTorch side by side.
    Train(train::TrainArgs),
    /// One training measurement in a process of its own (used by `bench train`).
    #[command(name = "train-one", hide = true)]
    TrainOne(train::TrainOneArgs),
}

pub fn run(args: &BenchArgs) -> Result<ExitCode> {
    match &args.what {
        Bench::Engine(a) => engine::run(a)?,
        Bench::Kernels(a) => kernels::run(a)?,
        Bench::Neighbours(a) => neighbours::run(a)?,
        Bench::Train(a) => train::run(a)?,
        Bench::TrainOne(a) => train::one(a)?,
    }
    Ok(ExitCode::SUCCESS)
}
