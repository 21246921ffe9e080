//! Built-in stage kinds (`uses:` in a pipeline). Each is a pure function from its parameters
//! and inputs to its outs, run in a child process (`repro __stage CONTEXT`) so that it is
//! isolated, logged and stopped exactly like a shell stage.

mod charts;
mod corpus;
mod evaluate;
mod interp;
mod plot;
mod table;
mod tokenise;
pub mod train;

use crate::exec::plan::KindVersion;
use crate::pipeline::Kinds;
use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::time::Instant;

/// What a kind is given when it runs (written by the executor as JSON).
#[derive(Debug, Deserialize)]
pub struct StageContext {
    pub stage: String,
    pub kind: String,
    pub with: Map<String, Value>,
    pub deps: Vec<String>,
    pub outs: Vec<String>,
    pub metrics: Option<String>,
    pub workspace: PathBuf,
    /// Kept across interruptions of this stage (resume state), removed after it succeeds.
    pub scratch: PathBuf,
    pub upstream: Vec<Upstream>,
}

#[derive(Debug, Deserialize)]
pub struct Upstream {
    pub name: String,
    pub base: String,
    pub params: Map<String, Value>,
    pub metrics: Option<Value>,
    pub outs: Vec<String>,
}

pub trait StageKind: Sync {
    fn name(&self) -> &'static str;
    /// Bumped whenever the kind's results could change: it enters every stage key.
    fn version(&self) -> &'static str;
    /// `with` parameters that cannot change the result (a memory limit, how often to save a
    /// resume checkpoint): left out of the stage key, so changing them re-runs nothing.
    fn not_in_key(&self) -> &'static [&'static str] {
        &[]
    }
    /// Checks `with`; returns the workspace paths among it that the stage reads.
    fn inputs(&self, with: &Map<String, Value>) -> Result<Vec<String>, String>;
    fn run(&self, ctx: &StageContext) -> Result<()>;
}

/// Every built-in kind.
pub struct Registry {
    kinds: Vec<&'static dyn StageKind>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            kinds: vec![
                &corpus::Corpus,
                &tokenise::Tokenise,
                &train::Train,
                &evaluate::Evaluate,
                &table::Table,
                &plot::Plot,
                &interp::gating::GatingKind,
                &interp::neighbours::Neighbours,
                &interp::cluster::Cluster,
                &interp::recall::Patch,
                &interp::recall::Ablate,
            ],
        }
    }
}

impl Registry {
    pub fn get(&self, name: &str) -> Option<&'static dyn StageKind> {
        self.kinds.iter().copied().find(|k| k.name() == name)
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.kinds.iter().map(|k| k.name()).collect()
    }

    /// The `repro __stage` entry point.
    pub fn run_context_file(&self, path: &std::path::Path) -> Result<()> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read stage context {}", path.display()))?;
        let ctx: StageContext = serde_json::from_slice(&bytes).context("bad stage context")?;
        let kind = self
            .get(&ctx.kind)
            .with_context(|| format!("unknown stage kind `{}`", ctx.kind))?;
        kind.run(&ctx)
    }
}

impl Kinds for Registry {
    fn inputs(&self, kind: &str, with: &Map<String, Value>) -> Result<Vec<String>, String> {
        match self.get(kind) {
            Some(k) => k.inputs(with),
            None => Err(format!(
                "unknown stage kind (built-in kinds: {})",
                self.names().join(", ")
            )),
        }
    }
}

impl KindVersion for Registry {
    fn version(&self, kind: &str) -> String {
        self.get(kind)
            .map(|k| k.version().to_string())
            .unwrap_or_default()
    }

    fn not_in_key(&self, kind: &str) -> &'static [&'static str] {
        self.get(kind).map(|k| k.not_in_key()).unwrap_or_default()
    }
}

/// Rejects `with` keys a kind does not know.
pub fn check_keys(with: &Map<String, Value>, known: &[&str]) -> Result<(), String> {
    match with.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(format!(
            "with.{k}: unknown parameter (known: {})",
            known.join(", ")
        )),
        None => Ok(()),
    }
}

/// Parses a kind's `with` into its typed parameters; the error starts with the bad field
/// (`with.lr: invalid type: string "fast", expected f64`).
pub fn parse_with<T: serde::de::DeserializeOwned>(with: &Map<String, Value>) -> Result<T, String> {
    // serde reads null as an absent optional field, and YAML's `.nan` and `.inf` arrive as
    // null (JSON has neither): refuse it rather than silently drop the field.
    if let Some((k, _)) = with.iter().find(|(_, v)| v.is_null()) {
        return Err(format!(
            "with.{k} is null (YAML `~`, `.nan` and `.inf` are not values here): give a finite value, or leave the field out"
        ));
    }
    serde_json::from_value(Value::Object(with.clone()))
        .map_err(|e| blame_field::<T>(with).unwrap_or_else(|| format!("with: {e}")))
}

/// The field that makes `with` fail to parse, found by parsing each field alone (a field alone
/// fails only by its own value, or with `missing field` for the others), and what is wrong.
fn blame_field<T: serde::de::DeserializeOwned>(with: &Map<String, Value>) -> Option<String> {
    for (k, v) in with {
        let mut one = Map::new();
        one.insert(k.clone(), v.clone());
        let Err(e) = serde_json::from_value::<T>(Value::Object(one)) else {
            continue;
        };
        let msg = e.to_string();
        if msg.starts_with("missing field `") {
            continue;
        }
        let hint = match v {
            Value::Number(n) if n.is_f64() && msg.contains("expected u") => {
                " (give a whole number, such as 1000000 rather than 1e6)"
            }
            _ => "",
        };
        return Some(format!("with.{k}: {msg}{hint}"));
    }
    // Every field parses alone: a required field is absent.
    let msg = serde_json::from_value::<T>(Value::Object(with.clone()))
        .err()?
        .to_string();
    let field = msg.strip_prefix("missing field `")?.split('`').next()?;
    Some(format!("with.{field} is missing (it is required)"))
}

/// `with.NAME` must be a finite number above zero.
pub fn finite_positive(name: &str, v: f64) -> Result<(), String> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(format!("with.{name} must be finite and positive, got {v}"))
    }
}

/// `with.NAME` must lie in lo..=hi (`why` says where the upper bound comes from).
pub fn within(name: &str, v: u64, lo: u64, hi: u64, why: &str) -> Result<(), String> {
    if v < lo {
        Err(format!("with.{name} must be at least {lo}, got {v}"))
    } else if v > hi {
        Err(format!("with.{name} must be at most {hi} ({why}), got {v}"))
    } else {
        Ok(())
    }
}

/// `with.max_memory` in bytes: a size like `8G` or `512M` (a bare number is MiB).
pub fn parse_max_memory(v: Option<&Value>) -> Result<Option<f64>, String> {
    let Some(v) = v else { return Ok(None) };
    let mib = crate::pipeline::parse_quantity("max_memory", v)
        .map_err(|e| format!("with.max_memory: {e}"))?;
    if mib == 0 {
        return Err(format!(
            "with.max_memory must be a positive size like 8G or 512M, got {v}"
        ));
    }
    Ok(Some(mib as f64 * 1048576.0))
}

/// When memory is checked: at load against `with.max_memory` and the machine's total memory,
/// at run time against `with.max_memory` or, without it, the memory available now.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum MemoryCheck {
    Load,
    Run,
}

/// Refuses a run whose estimated peak memory is over the limit, saying what it needs and how
/// to lower it (`lower`: the fields to turn down).
pub fn check_memory(
    what: &str,
    est: &crate::nn::memory::MemoryEstimate,
    max_memory: Option<f64>,
    when: MemoryCheck,
    lower: &str,
) -> Result<(), String> {
    use crate::nn::memory::{gib, machine_memory};
    let need = est.total();
    // An estimate that is not a number is over every limit.
    if let Some(limit) = max_memory {
        if need.is_nan() || need > limit {
            return Err(format!(
                "with.max_memory: {what} needs {}, more than with.max_memory = {}; lower {lower}, or raise with.max_memory",
                est.describe(),
                gib(limit)
            ));
        }
        if when == MemoryCheck::Run {
            return Ok(());
        }
    }
    let Some((total, available)) = machine_memory() else {
        return Ok(());
    };
    let (limit, which) = match when {
        MemoryCheck::Load => (total, "of memory this machine has"),
        MemoryCheck::Run => (available, "of memory available now"),
    };
    if need.is_nan() || need > limit {
        return Err(format!(
            "{what} needs {}, more than the {} {which}; lower {lower}",
            est.describe(),
            gib(limit)
        ));
    }
    Ok(())
}

/// The stage's one out folder, created empty.
pub fn out_dir(ctx: &StageContext) -> Result<PathBuf> {
    let [out] = ctx.outs.as_slice() else {
        anyhow::bail!(
            "a `{}` stage writes one folder: give exactly one out",
            ctx.kind
        )
    };
    let dir = ctx.workspace.join(out);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// Progress reported to the scheduler through `$REPRO_PROGRESS`, at most a few times a second.
pub struct Progress {
    file: Option<PathBuf>,
    last: Option<Instant>,
}

impl Progress {
    pub fn from_env() -> Progress {
        Progress {
            file: std::env::var_os("REPRO_PROGRESS").map(PathBuf::from),
            last: None,
        }
    }

    pub fn update(&mut self, pos: u64, len: u64, msg: &str) {
        self.write(
            || serde_json::json!({"pos": pos, "len": len, "msg": msg}).to_string(),
            pos == len,
        );
    }

    pub fn message(&mut self, msg: &str) {
        self.write(|| serde_json::json!({"msg": msg}).to_string(), true);
    }

    fn write(&mut self, text: impl FnOnce() -> String, force: bool) {
        let Some(file) = &self.file else { return };
        if !force && self.last.is_some_and(|t| t.elapsed().as_millis() < 250) {
            return;
        }
        self.last = Some(Instant::now());
        let _ = std::fs::write(file, text());
    }
}

/// For tests of a kind's `inputs`: the error names `field` first (`with.FIELD` and a space or
/// colon), as the loader needs to report it at the field's line.
#[cfg(test)]
pub fn assert_names_field(err: &str, field: &str, case: &str) {
    let head = format!("with.{field}");
    assert!(
        err.starts_with(&head) && matches!(err[head.len()..].chars().next(), Some(' ' | ':')),
        "{case}: expected an error starting with `{head}`, got: {err}"
    );
}
