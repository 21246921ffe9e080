//! Built-in stage kinds (`uses:` in a pipeline). Each is a pure function from its parameters
//! and inputs to its outs, run in a child process (`repro __stage CONTEXT`) so that it is
//! isolated, logged and stopped exactly like a shell stage.

mod corpus;
mod evaluate;
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
}

/// Rejects `with` keys a kind does not know.
pub fn check_keys(with: &Map<String, Value>, known: &[&str]) -> Result<(), String> {
    match with.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(format!(
            "unknown parameter `with.{k}` (known: {})",
            known.join(", ")
        )),
        None => Ok(()),
    }
}

/// Parses a kind's `with` into its typed parameters; the error names the bad field.
pub fn parse_with<T: serde::de::DeserializeOwned>(with: &Map<String, Value>) -> Result<T, String> {
    serde_json::from_value(Value::Object(with.clone())).map_err(|e| format!("with: {e}"))
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
