//! The command line: argument parsing and what each command prints. The work itself is done
//! by the library modules, which print nothing.

mod inspect;

use crate::exec::plan::{self, Decision};
use crate::exec::runner::{LocalRunner, Runner};
use crate::exec::slurm::{SlurmOptions, SlurmRunner};
use crate::exec::{report::Reporter, Executor, RunOptions};
use crate::pipeline::{LoadOptions, Pipeline};
use crate::stages::Registry;
use crate::workspace::{LoadedState, State, Workspace, STATE_LOST_CONSEQUENCE};
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "repro",
    version,
    about = "Declarative, content-addressed pipelines for reproducing ML papers"
)]
struct Cli {
    /// Run as if started in DIR (the workspace).
    #[arg(short = 'C', global = true, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// The cache store (default: $REPRO_CACHE, else cache/ in the workspace).
    #[arg(long, global = true, value_name = "DIR")]
    cache: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pipeline: skip what is up to date, restore what was run before, run the rest.
    Run(RunArgs),
    /// For every stage: would it run, be restored or be skipped, and why.
    Status(PipelineArgs),
    /// Print the stage graph (text, Graphviz dot, or Mermaid).
    Dag {
        #[command(flatten)]
        p: PipelineArgs,
        #[arg(long, conflicts_with = "mermaid")]
        dot: bool,
        #[arg(long)]
        mermaid: bool,
    },
    /// Show the latest log of a stage.
    Log {
        stage: String,
        #[command(flatten)]
        p: PipelineArgs,
    },
    /// Every stage's params and metrics: one table per stage of the pipeline file (a matrix
    /// stage's expansions share one), each with only the columns its stages have.
    Show {
        #[command(flatten)]
        p: PipelineArgs,
        /// Only these columns, in this order, in one table of the stages that have any of them
        /// (`stage` always comes first): --columns ffn,budget,heldout_loss.
        #[arg(long, value_name = "A,B,...", value_delimiter = ',')]
        columns: Vec<String>,
        /// CSV instead of aligned text: one table of every stage with the union of all columns
        /// (or those of --columns), for a spreadsheet or pandas.
        #[arg(long)]
        csv: bool,
    },
    /// Re-hash every object in the cache; set aside and name the corrupt ones.
    Verify,
    /// Delete cache objects that no kept record references.
    Gc {
        /// Keep only the records that some pipeline of this workspace currently uses
        /// (drops the run cache of older results).
        #[arg(long)]
        workspace_only: bool,
    },
    /// Measure repro against the hardware and against peers.
    Bench(crate::bench::BenchArgs),
    /// Run a built-in stage kind from its context file (used by `repro run`).
    #[command(name = "__stage", hide = true)]
    Stage { context: PathBuf },
}

#[derive(Args, Clone)]
struct PipelineArgs {
    /// The pipeline file (default: repro.yaml).
    pipeline: Option<PathBuf>,
    /// Override a param: -S seed=1 (repeatable).
    #[arg(short = 'S', value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Only these stages and what they depend on (repeatable).
    #[arg(long, value_name = "STAGE")]
    only: Vec<String>,
    /// Most stages one matrix may expand to (the whole pipeline: 20 times as many).
    #[arg(
        long,
        value_name = "N",
        default_value_t = crate::pipeline::DEFAULT_MAX_EXPANSIONS,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=crate::pipeline::MAX_STAGES as u64)
    )]
    max_expansions: usize,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    p: PipelineArgs,
    /// Stages run at once (default: the number of cores).
    #[arg(short, long)]
    jobs: Option<usize>,
    /// Capacity of a resource: --resources gpu=2 (repeatable).
    #[arg(long, value_name = "NAME=N")]
    resources: Vec<String>,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Say what would run, and why, without running anything.
    #[arg(short = 'n', long)]
    dry_run: bool,
    /// Run this stage even if up to date (repeatable; a base name forces every expansion).
    #[arg(long, value_name = "STAGE")]
    force: Vec<String>,
    /// Run every stage.
    #[arg(long)]
    force_all: bool,
    /// Keep running independent stages after a failure.
    #[arg(short, long)]
    keep_going: bool,
    /// Fail at once if another run holds the workspace, instead of waiting.
    #[arg(long)]
    no_wait: bool,
    /// Also list the stages that were up to date.
    #[arg(short, long)]
    verbose: bool,
    /// Lines of a failed stage's log to show under it (0: none).
    #[arg(long, value_name = "N", default_value_t = 20)]
    log_lines: usize,
}

/// Jobs a Slurm run keeps in the queue at once, unless `--jobs` says otherwise.
const SLURM_JOBS: usize = 100;

/// Where stages run.
#[derive(Args, Debug)]
struct ClusterArgs {
    /// `local`: processes on this machine; `slurm`: one batch job per stage (the workspace and
    /// the store must be on a filesystem the nodes share).
    #[arg(long, value_enum, default_value_t = RunnerKind::Local)]
    runner: RunnerKind,
    /// Slurm partition.
    #[arg(long)]
    partition: Option<String>,
    /// Slurm account.
    #[arg(long)]
    account: Option<String>,
    /// Slurm time limit of every job, e.g. 2:00:00.
    #[arg(long, value_name = "TIME")]
    time_limit: Option<String>,
    /// A further sbatch flag, e.g. --sbatch-flag=--qos=short (repeatable).
    #[arg(long, value_name = "FLAG", allow_hyphen_values = true)]
    sbatch_flag: Vec<String>,
    /// Jobs that a killed earlier run left in the queue: wait for them to end first.
    #[arg(long, conflicts_with = "cancel_orphans")]
    adopt: bool,
    /// Jobs that a killed earlier run left in the queue: cancel them first.
    #[arg(long)]
    cancel_orphans: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
enum RunnerKind {
    Local,
    Slurm,
}

/// Exit codes: 0 done, 1 a stage failed, 2 bad input, 130 interrupted.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    let root = || -> Result<PathBuf> {
        let dir = match &cli.dir {
            Some(d) => d.clone(),
            None => std::env::current_dir()?,
        };
        dir.canonicalize()
            .with_context(|| format!("no workspace folder {}", dir.display()))
    };
    let kinds = Registry::default();
    let open = |root: &Path| Workspace::open(root, cli.cache.as_deref());
    // The workspace a pipeline runs in, and the pipeline saved there as a compiled plan.
    let open_for = |root: &Path, pipeline: &Pipeline| -> Result<Workspace> {
        let ws = open(root)?;
        pipeline.save_plan();
        Ok(ws)
    };
    let store = |root: &Path| crate::workspace::store_location(root, cli.cache.as_deref());
    // The workspace if it has a store; opening it otherwise would create one for nothing.
    let existing = |root: &Path| -> Result<Option<Workspace>> {
        let dir = store(root)?;
        if dir.is_dir() {
            return open(root).map(Some);
        }
        emit(format!("no cache store at {}: nothing to do\n", dir.display()).as_bytes())?;
        Ok(None)
    };
    // The pipeline is loaded before the workspace is opened (which creates `.repro/` and the
    // store), so a missing or bad pipeline file leaves nothing behind.
    match &cli.command {
        Command::Stage { context } => {
            kinds.run_context_file(context)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(args) => {
            let root = root()?;
            let (pipeline, state) = load_with_state(&root, &store(&root)?, &kinds, &args.p)?;
            run(&open_for(&root, pipeline)?, &kinds, pipeline, state, args)
        }
        Command::Status(p) => {
            let root = root()?;
            let (pipeline, state) = load_with_state(&root, &store(&root)?, &kinds, p)?;
            status(&open_for(&root, pipeline)?, &kinds, pipeline, state, p)
        }
        Command::Dag { p, dot, mermaid } => {
            let pipeline = {
                let root = root()?;
                load(&root, &store(&root)?, &kinds, p)?
            };
            let text = if *dot {
                pipeline.dag.to_dot(&pipeline.stages)
            } else if *mermaid {
                pipeline.dag.to_mermaid(&pipeline.stages)
            } else {
                inspect::dag_text(&pipeline)
            };
            emit(text.as_bytes())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Log { stage, p } => {
            let root = root()?;
            let pipeline = load(&root, &store(&root)?, &kinds, p)?;
            inspect::log(&open_for(&root, &pipeline)?, &pipeline, stage)
        }
        Command::Show { p, columns, csv } => {
            let root = root()?;
            let pipeline = load(&root, &store(&root)?, &kinds, p)?;
            inspect::show(&open_for(&root, &pipeline)?, &pipeline, columns, *csv)
        }
        Command::Verify => match existing(&root()?)? {
            Some(ws) => inspect::verify(&ws),
            None => Ok(ExitCode::SUCCESS),
        },
        Command::Gc { workspace_only } => match existing(&root()?)? {
            Some(ws) => inspect::gc(&ws, *workspace_only),
            None => Ok(ExitCode::SUCCESS),
        },
        Command::Bench(args) => crate::bench::run(args),
    }
}

/// Writes to stdout. A closed pipe (`repro dag | head`) is not an error: the reader has all it
/// wanted, so the command ends quietly and successfully.
fn emit(bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("cannot write to stdout"),
    }
}

fn pipeline_path(root: &Path, given: &Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.clone());
    }
    if root.join("repro.yaml").is_file() {
        return Ok(PathBuf::from("repro.yaml"));
    }
    let mut found: Vec<String> = std::fs::read_dir(root.join("pipelines"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| format!("pipelines/{}", e.file_name().to_string_lossy()))
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .collect();
    found.sort();
    if found.is_empty() {
        bail!("no pipeline given and no repro.yaml here")
    }
    bail!(
        "no pipeline given and no repro.yaml here; name one of: {}",
        found.join(", ")
    )
}

fn load(root: &Path, store: &Path, kinds: &Registry, p: &PipelineArgs) -> Result<Pipeline> {
    let file = pipeline_path(root, &p.pipeline)?;
    let opts = LoadOptions {
        overrides: p.set.clone(),
        max_expansions: p.max_expansions,
        store: store.to_path_buf(),
        plans: Some(root.join(".repro/plans")),
    };
    Pipeline::load(&file, root, &opts, kinds)
}

/// Jobs a killed earlier run left in the queue would write the same outs as this run: wait for
/// them (`--adopt`), cancel them (`--cancel-orphans`), or stop and say which.
fn settle_orphans(ws: &Workspace, c: &ClusterArgs, reporter: &Reporter) -> Result<()> {
    use crate::exec::slurm::{list_queue, orphans};
    let found = orphans(&ws.root, &list_queue()?);
    if found.is_empty() {
        return Ok(());
    }
    let named: Vec<String> = found
        .iter()
        .map(|(id, name, state)| format!("{id} ({name}, {state})"))
        .collect();
    if c.cancel_orphans {
        let ids: Vec<u64> = found.iter().map(|o| o.0).collect();
        crate::exec::slurm::scancel(&ids)?;
        reporter.note(&format!(
            "cancelled jobs of an earlier run: {}",
            named.join(", ")
        ));
        return Ok(());
    }
    if !c.adopt {
        bail!(
            "jobs of an earlier run in this workspace are still in the queue: {}; pass --adopt to \
             wait for them or --cancel-orphans to cancel them",
            named.join(", ")
        );
    }
    reporter.note(&format!(
        "waiting for jobs of an earlier run: {}",
        named.join(", ")
    ));
    while !orphans(&ws.root, &list_queue()?).is_empty() {
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
    Ok(())
}

/// Loads the pipeline while another thread reads its state (both only read), and keeps both
/// until the process ends, which is right after the command: freeing 100,000 stages one by one
/// would cost 7.5% of a no-op run's instructions.
fn load_with_state(
    root: &Path,
    store: &Path,
    kinds: &Registry,
    p: &PipelineArgs,
) -> Result<(&'static Pipeline, &'static LoadedState)> {
    let file = pipeline_path(root, &p.pipeline)?;
    let (pipeline, state) = std::thread::scope(|s| {
        let state = s.spawn(|| crate::workspace::load_state(&root.join(".repro"), &file));
        let pipeline = load(root, store, kinds, p);
        (
            pipeline,
            state.join().expect("the state reader does not panic"),
        )
    });
    Ok((Box::leak(Box::new(pipeline?)), Box::leak(Box::new(state))))
}

fn selection(pipeline: &Pipeline, only: &[String]) -> Result<Vec<bool>> {
    if only.is_empty() {
        return Ok(vec![true; pipeline.stages.len()]);
    }
    Ok(pipeline.dag.with_ancestors(&pipeline.select(only)?))
}

fn run(
    ws: &Workspace,
    kinds: &Registry,
    pipeline: &Pipeline,
    loaded: &LoadedState,
    args: &RunArgs,
) -> Result<ExitCode> {
    let selected = selection(pipeline, &args.p.only)?;
    let mut forced = vec![args.force_all; pipeline.stages.len()];
    for i in pipeline.select(&args.force)? {
        forced[i] = true;
    }
    let mut resources = std::collections::BTreeMap::new();
    for item in &args.resources {
        let (k, v) = item
            .split_once('=')
            .with_context(|| format!("--resources {item}: expected NAME=N"))?;
        let amount = crate::pipeline::parse_quantity(k, &serde_json::Value::String(v.into()))
            .map_err(anyhow::Error::msg)?;
        resources.insert(k.trim().to_string(), amount);
    }
    let slurm = args.cluster.runner == RunnerKind::Slurm;
    if slurm {
        // The cluster sizes jobs; here a resource only limits what the user sized.
        for s in &pipeline.stages {
            for r in s.resources.keys() {
                resources.entry(r.clone()).or_insert(u64::MAX);
            }
        }
    }
    let jobs = args
        .jobs
        .unwrap_or_else(|| match slurm {
            true => SLURM_JOBS,
            false => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        })
        .max(1);
    let width = pipeline.longest_name();

    if args.dry_run {
        return show_plan(ws, kinds, pipeline, loaded, &selected, &forced);
    }
    let mut reporter = Reporter::new(width);
    let _lock = ws.lock(!args.no_wait, |holder| {
        reporter.note(&format!("waiting for the workspace lock: {holder}"))
    })?;
    // Read before the lock, alongside the pipeline: again if a run wrote it meanwhile.
    let reread;
    let loaded = if loaded.unchanged() {
        loaded
    } else {
        reread = ws.load_state(&pipeline.file);
        &reread
    };
    let exe = std::env::current_exe().context("cannot find the repro executable")?;
    let local = LocalRunner::default();
    let cluster;
    let runner: &dyn Runner = if slurm {
        let c = &args.cluster;
        let opts = SlurmOptions {
            partition: c.partition.clone(),
            account: c.account.clone(),
            time: c.time_limit.clone(),
            extra: c.sbatch_flag.clone(),
        };
        settle_orphans(ws, c, &reporter)?;
        let name = crate::exec::slurm::run_name(&ws.root);
        cluster = SlurmRunner::new(name, opts, ws.state_dir.join("slurm"))?;
        &cluster
    } else {
        &local
    };
    let executor = Executor {
        ws,
        pipeline,
        kinds,
        runner,
        stage_program: vec![exe.display().to_string(), "__stage".into()],
    };
    let opts = RunOptions {
        jobs,
        resources,
        keep_going: args.keep_going,
        selected,
        forced,
        verbose: args.verbose,
        log_lines: args.log_lines,
    };
    let s = executor.run(&opts, loaded, &mut reporter)?;
    let mut parts = vec![
        format!("{} ran", s.ran),
        format!("{} restored", s.restored),
        format!("{} up to date", s.skipped),
    ];
    if !s.failed.is_empty() {
        parts.push(format!("{} failed", s.failed.len()));
    }
    if s.blocked > 0 {
        parts.push(format!("{} blocked", s.blocked));
    }
    reporter.note(&parts.join(", "));
    Ok(if s.interrupted {
        ExitCode::from(130)
    } else if s.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn status(
    ws: &Workspace,
    kinds: &Registry,
    pipeline: &Pipeline,
    loaded: &LoadedState,
    p: &PipelineArgs,
) -> Result<ExitCode> {
    let selected = selection(pipeline, &p.only)?;
    let unforced = vec![false; pipeline.stages.len()];
    show_plan(ws, kinds, pipeline, loaded, &selected, &unforced)
}

/// Prints what a run would do with each stage, and why (`status`, `run --dry-run`).
fn show_plan(
    ws: &Workspace,
    kinds: &Registry,
    pipeline: &Pipeline,
    loaded: &LoadedState,
    selected: &[bool],
    forced: &[bool],
) -> Result<ExitCode> {
    let state = state_said(ws, loaded);
    let plan = plan::plan(ws, pipeline, state, kinds, selected, forced)?;
    let _ = ws.stats.save(&ws.state_dir.join("statcache"));
    print_plan(pipeline, &plan.decisions, pipeline.longest_name())?;
    Ok(ExitCode::SUCCESS)
}

/// The pipeline's state for a command that only reads it; a state file that cannot be used
/// is said on stderr (`repro run` sets it aside).
fn state_said<'a>(ws: &Workspace, loaded: &'a LoadedState) -> &'a State {
    if let Some(bad) = &loaded.problem {
        eprintln!(
            "warning: {}; {} (`repro run` moves the file aside)",
            bad.describe(ws),
            STATE_LOST_CONSEQUENCE
        );
    }
    &loaded.state
}

fn print_plan(pipeline: &Pipeline, decisions: &[Decision], width: usize) -> Result<()> {
    use std::fmt::Write;
    let mut out = String::new();
    let mut counts = [0usize; 4];
    for (s, d) in pipeline.stages.iter().zip(decisions) {
        let (label, why) = match d {
            Decision::Skip => ("up to date", String::new()),
            Decision::Restore(why) => ("restore", why.join("; ")),
            Decision::Run(why) => ("run", why.join("; ")),
            Decision::Wait(up) => (
                "run",
                format!(
                    "after upstream {}",
                    up.iter()
                        .map(|u| format!("`{u}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            Decision::Excluded => continue,
        };
        counts[match d {
            Decision::Skip => 0,
            Decision::Restore(_) => 1,
            Decision::Wait(_) => 3,
            _ => 2,
        }] += 1;
        writeln!(out, "{:<width$}  {label:<10}  {why}", s.name)?;
    }
    writeln!(
        out,
        "{} up to date, {} to restore, {} to run, {} to run or skip after their upstreams",
        counts[0], counts[1], counts[2], counts[3]
    )?;
    emit(out.as_bytes())
}
