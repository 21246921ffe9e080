//! The pipeline file as written: a strict serde schema, so that a misspelt key is an error with
//! file:line:column rather than a silently ignored setting.

use indexmap::IndexMap;
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    /// Defaults for `${params.x}`; `repro run -S x=v` overrides them.
    #[serde(default)]
    pub params: IndexMap<String, Value>,
    pub stages: IndexMap<String, StageSpec>,
    /// Where the stages run (`local` or `slurm`) and the cluster's settings.
    pub runner: Option<super::runner::RunnerSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSpec {
    /// A one-line description, shown by `repro dag` and `repro show`.
    pub desc: Option<String>,
    /// A shell command, run with `sh -c` from the workspace root.
    pub cmd: Option<String>,
    /// A built-in stage kind, run in place of `cmd`.
    pub uses: Option<String>,
    /// Parameters of a built-in kind.
    #[serde(default, rename = "with")]
    pub with: IndexMap<String, Value>,
    /// Files or folders read by the stage, hashed by content.
    #[serde(default)]
    pub deps: Vec<String>,
    /// Files or folders the stage writes; stored in the cache.
    #[serde(default)]
    pub outs: Vec<String>,
    /// Stages that must finish first (a base name means every expansion of a matrix stage).
    #[serde(default)]
    pub needs: Vec<String>,
    /// Cartesian product of values: one node per combination.
    pub matrix: Option<IndexMap<String, Value>>,
    /// Slots held while the stage runs, e.g. `{gpu: 1, memory: 4G}`.
    #[serde(default)]
    pub resources: IndexMap<String, Value>,
    /// Environment variables that enter the stage key: a map sets them, a list passes the
    /// caller's values through.
    pub env: Option<EnvSpec>,
    /// A JSON file the stage writes with its metrics (also an out).
    pub metrics: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum EnvSpec {
    Set(IndexMap<String, Value>),
    PassThrough(Vec<String>),
}
