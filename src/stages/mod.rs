//! Built-in stage kinds (`uses:` in a pipeline). Each is a pure function from its parameters
//! and inputs to its outs, run in a child process (`repro __stage CONTEXT`) so that it is
//! isolated, logged and stopped exactly like a shell stage.

mod table;

use crate::exec::plan::KindVersion;
use crate::pipeline::Kinds;
use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::path::PathBuf;

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
            kinds: vec![&table::Table],
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
