//! The command line: argument parsing and what each command prints. The work itself is done
//! by the library modules, which print nothing.

mod inspect;

use crate::exec::plan::{self, Decision};
use crate::exec::runner::{LocalRunner, Runner};
use crate::exec::slurm::{SlurmRunner, SlurmSettings};
use crate::exec::{report::Reporter, Executor, RunOptions};
use crate::pipeline::runner::RunnerKind;
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

/// Where stages run: these flags win over the pipeline's `runner:` section, and `--sbatch-flag`
/// adds to its `sbatch:` list.
#[derive(Args, Debug)]
struct ClusterArgs {
    /// `local`: processes on this machine; `slurm`: one batch job per stage (the workspace and
    /// the store must be on a filesystem the nodes share). Default: the pipeline's
    /// `runner.kind`, else local.
    #[arg(long, value_enum)]
    runner: Option<RunnerKind>,
    /// Slurm partition.
    #[arg(long)]
    partition: Option<String>,
    /// Slurm account.
    #[arg(long)]
    account: Option<String>,
    /// Slurm time limit of every job without its own `resources: {time: …}`: minutes, 30m,
    /// 2h, or D-HH:MM:SS.
    #[arg(long, value_name = "TIME")]
    time_limit: Option<String>,
    /// A further sbatch flag, e.g. --sbatch-flag=--qos=short (repeatable).
    #[arg(long, value_name = "FLAG", allow_hyphen_values = true)]
    sbatch_flag: Vec<String>,
    /// Jobs that a killed earlier run left in the queue: wait for them to end first, and keep
    /// the results of those that succeeded.
    #[arg(long, conflicts_with = "cancel_orphans")]
    adopt: bool,
    /// Jobs that a killed earlier run left in the queue: cancel them first.
    #[arg(long)]
    cancel_orphans: bool,
}

impl ClusterArgs {
    /// The runner and the cluster settings: the pipeline's, overridden by the flags.
    fn settings(&self, pipeline: &Pipeline) -> Result<(RunnerKind, SlurmSettings)> {
        use crate::pipeline::runner::{check_sbatch_flag, minutes};
        let file = &pipeline.runner;
        let mut slurm = file.slurm.clone();
        let kind = self.runner.unwrap_or(file.kind);
        slurm.partition = self.partition.clone().or(slurm.partition);
        slurm.account = self.account.clone().or(slurm.account);
        if let Some(t) = &self.time_limit {
            let t = minutes(&serde_json::Value::String(t.clone()))
                .map_err(|e| anyhow::anyhow!("--time-limit: {e}"))?;
            slurm.time = Some(t);
        }
        for flag in &self.sbatch_flag {
            check_sbatch_flag(flag).map_err(|e| anyhow::anyhow!("--sbatch-flag: {e}"))?;
            slurm.extra.push(flag.clone());
        }
        Ok((kind, slurm))
    }
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
/// them and keep what those that succeeded wrote (`--adopt`), cancel them (`--cancel-orphans`),
/// or stop and say which. Either way none of them runs any more when this run starts. Returns
/// the adopted stages (stage → key).
fn settle_orphans(
    ws: &Workspace,
    c: &ClusterArgs,
    reporter: &Reporter,
) -> Result<std::collections::HashMap<String, String>> {
    use crate::exec::slurm::{list_queue, orphans, scancel, settle};
    let listing = list_queue().context("the runner is slurm and Slurm does not answer here (`--runner local` runs the stages on this machine)")?;
    let found = orphans(&ws.root, &listing);
    let named: Vec<String> = found
        .iter()
        .map(|(id, name, state)| format!("{id} ({name}, {state})"))
        .collect();
    let ids: Vec<u64> = found.iter().map(|o| o.0).collect();
    let named = named.join(", ");
    if found.is_empty() {
        // Nothing to wait for; `settle` still clears the job files of jobs that ended.
    } else if c.cancel_orphans {
        scancel(&ids)?;
        reporter.note(&format!("cancelled jobs of an earlier run: {named}"));
    } else if c.adopt {
        reporter.note(&format!("waiting for jobs of an earlier run: {named}"));
    } else {
        bail!(
            "jobs of an earlier run in this workspace are still in the queue: {named}; pass --adopt to \
             wait for them and keep their results, or --cancel-orphans to cancel them"
        );
    }
    // Also after a cancel: a cancelled job may still be writing for a moment.
    let settled = settle(
        &ids,
        &ws.state_dir.join("slurm"),
        std::time::Duration::from_secs(1),
    )?;
    for note in &settled.notes {
        reporter.note(note);
    }
    Ok(settled.adopted)
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
    let (runner_kind, slurm_settings) = args.cluster.settings(pipeline)?;
    let slurm = runner_kind == RunnerKind::Slurm;
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
        let adopted = settle_orphans(ws, &args.cluster, &reporter)?;
        let name = crate::exec::slurm::run_name(&ws.root);
        let dir = ws.state_dir.join("slurm");
        cluster = SlurmRunner::new(name, slurm_settings, dir, adopted)?;
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
    // Stages with a Slurm job of a run under way (or of a killed one) say where it stands.
    let jobs = crate::exec::slurm::job_lines(&ws.state_dir.join("slurm"));
    print_plan(pipeline, &plan.decisions, &jobs)?;
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

fn print_plan(
    pipeline: &Pipeline,
    decisions: &[Decision],
    jobs: &std::collections::HashMap<String, String>,
) -> Result<()> {
    let width = pipeline.longest_name();
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
        let why = match jobs.get(&s.name) {
            Some(job) if why.is_empty() => job.clone(),
            Some(job) => format!("{why}; {job}"),
            None => why,
        };
        writeln!(out, "{:<width$}  {label:<10}  {why}", s.name)?;
    }
    writeln!(
        out,
        "{} up to date, {} to restore, {} to run, {} to run or skip after their upstreams",
        counts[0], counts[1], counts[2], counts[3]
    )?;
    emit(out.as_bytes())
}
