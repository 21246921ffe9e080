//! Pipeline files: parse, template, expand matrices, and build a validated DAG of stages.
//!
//! Everything that can be wrong with a pipeline is found here, before anything runs, and
//! reported with the file, line and stage.

pub mod dag;
pub mod schema;
pub mod template;

use anyhow::{anyhow, bail, Context, Result};
use indexmap::IndexMap;
use schema::{EnvSpec, PipelineFile, StageSpec};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use template::{Scope, UsedParams};

pub use dag::Dag;

/// One node of the DAG: a stage after templating and matrix expansion.
#[derive(Debug, Clone)]
pub struct Stage {
    /// Unique name; `train@ffn=dense,budget=1e12` for a matrix expansion.
    pub name: String,
    /// The name in the file (`train`).
    pub base: String,
    pub line: usize,
    pub desc: Option<String>,
    pub action: Action,
    /// Normalised workspace-relative paths read by the stage (a kind's input paths included).
    pub deps: Vec<String>,
    /// Normalised workspace-relative paths it writes (the metrics file included).
    pub outs: Vec<String>,
    pub metrics: Option<String>,
    /// Stage names from `needs:` (a base name stands for all its expansions).
    pub needs: Vec<String>,
    pub resources: BTreeMap<String, u64>,
    pub env: Vec<(String, Option<String>)>,
    pub matrix: IndexMap<String, Value>,
    pub used_params: UsedParams,
}

#[derive(Debug, Clone)]
pub enum Action {
    /// `cmd`: the template as written (its identity as code) and the resolved command.
    Cmd { template: String, resolved: String },
    /// `uses`: a built-in kind and its resolved parameters.
    Uses {
        kind: String,
        with: Map<String, Value>,
    },
}

/// What the pipeline needs to know about built-in stage kinds, without depending on them.
pub trait Kinds {
    /// Checks a kind's parameters; returns the workspace paths among them that it reads.
    fn inputs(&self, kind: &str, with: &Map<String, Value>) -> Result<Vec<String>, String>;
}

#[derive(Debug)]
pub struct Pipeline {
    /// The file as the user named it, for messages.
    pub file: PathBuf,
    pub params: IndexMap<String, Value>,
    /// Stages in a topological order that follows the file where it can.
    pub stages: Vec<Stage>,
    pub dag: Dag,
}

impl Pipeline {
    /// Loads and validates `file`; `overrides` are `key=value` pairs from `-S`.
    pub fn load(
        file: &Path,
        workspace: &Path,
        overrides: &[String],
        kinds: &dyn Kinds,
    ) -> Result<Pipeline> {
        let source = std::fs::read_to_string(workspace.join(file))
            .with_context(|| format!("cannot read pipeline file {}", file.display()))?;
        Self::parse(&source, file, workspace, overrides, kinds)
    }

    pub fn parse(
        source: &str,
        file: &Path,
        workspace: &Path,
        overrides: &[String],
        kinds: &dyn Kinds,
    ) -> Result<Pipeline> {
        let shown = file.display().to_string();
        let parsed: PipelineFile =
            serde_yaml_ng::from_str(source).map_err(|e| yaml_error(&shown, source, &e))?;
        let lines = schema::stage_lines(source);
        let mut params = parsed.params;
        for item in overrides {
            apply_override(&mut params, item).map_err(|e| anyhow!("{shown}: -S {item}: {e}"))?;
        }

        let mut errors = Vec::new();
        let mut stages = Vec::new();
        for (base, spec) in &parsed.stages {
            let line = lines
                .get(base)
                .or_else(|| lines.get(""))
                .copied()
                .unwrap_or(1);
            let at = |msg: String| format!("{shown}:{line}: stage `{base}`: {msg}");
            match expand(base, spec, &params, kinds, line) {
                Ok(mut nodes) => stages.append(&mut nodes),
                Err(msg) => errors.push(at(msg)),
            }
        }
        if stages.is_empty() && errors.is_empty() {
            errors.push(format!("{shown}: no stages"));
        }
        if !errors.is_empty() {
            bail!(errors.join("\n"));
        }
        let (stages, dag) = dag::build(stages, workspace).map_err(|errs| {
            anyhow!(errs
                .iter()
                .map(|e| format!("{shown}:{e}"))
                .collect::<Vec<_>>()
                .join("\n"))
        })?;
        Ok(Pipeline {
            file: file.to_path_buf(),
            params,
            stages,
            dag,
        })
    }

    /// The length of the longest stage name, for aligned output.
    pub fn longest_name(&self) -> usize {
        self.stages.iter().map(|s| s.name.len()).max().unwrap_or(8)
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.name == name)
    }

    /// Stage indices named by `names`: an exact stage or every expansion of a base name.
    pub fn select(&self, names: &[String]) -> Result<Vec<usize>> {
        let mut out = Vec::new();
        for name in names {
            let hits: Vec<usize> = (0..self.stages.len())
                .filter(|&i| self.stages[i].name == *name || self.stages[i].base == *name)
                .collect();
            if hits.is_empty() {
                bail!("{}: no stage named `{name}`", self.file.display());
            }
            out.extend(hits);
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }
}

fn yaml_error(file: &str, source: &str, err: &serde_yaml_ng::Error) -> anyhow::Error {
    let msg = err.to_string();
    match err.location() {
        Some(loc) => {
            let msg = msg.split(" at line ").next().unwrap_or(&msg);
            // `${...}` inside `[ ]` or `{ }` reads as YAML flow syntax: the commonest slip.
            let line = source
                .lines()
                .nth(loc.line().saturating_sub(1))
                .unwrap_or("");
            let hint = if line.contains("${") && (line.contains('[') || line.contains(": {")) {
                " (quote values that hold ${...} inside [ ] or { }: \"${matrix.x}.txt\")"
            } else {
                ""
            };
            anyhow!("{file}:{}:{}: {msg}{hint}", loc.line(), loc.column())
        }
        None => anyhow!("{file}: {msg}"),
    }
}

/// `a.b=3`: sets an existing param (a typo is an error, not a new param).
fn apply_override(params: &mut IndexMap<String, Value>, item: &str) -> Result<(), String> {
    let (key, raw) = item.split_once('=').ok_or("expected key=value")?;
    let value: Value = serde_yaml_ng::from_str(raw).map_err(|e| format!("bad value: {e}"))?;
    let mut parts = key.trim().split('.');
    let first = parts.next().unwrap_or_default();
    let known = params_list(params);
    let mut slot = params
        .get_mut(first)
        .ok_or_else(|| format!("no param `{first}` ({known})"))?;
    for part in parts {
        slot = slot
            .as_object_mut()
            .and_then(|m| m.get_mut(part))
            .ok_or_else(|| format!("no param `{key}`"))?;
    }
    *slot = value;
    Ok(())
}

fn params_list(params: &IndexMap<String, Value>) -> String {
    if params.is_empty() {
        "the file has no params".into()
    } else {
        format!(
            "known: {}",
            params.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    }
}

fn expand(
    base: &str,
    spec: &StageSpec,
    params: &IndexMap<String, Value>,
    kinds: &dyn Kinds,
    line: usize,
) -> Result<Vec<Stage>, String> {
    if base.is_empty()
        || !base
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
    {
        return Err("a stage name may hold only letters, digits, `_`, `-` and `.`".into());
    }
    match (&spec.cmd, &spec.uses) {
        (Some(_), Some(_)) => return Err("has both `cmd` and `uses`; give one".into()),
        (None, None) => {
            return Err("needs `cmd` (a shell command) or `uses` (a built-in kind)".into())
        }
        (Some(_), None) if !spec.with.is_empty() => {
            return Err(
                "`with` belongs to `uses` stages; a `cmd` stage takes ${params.x} in its command"
                    .into(),
            )
        }
        _ => {}
    }
    let combos = match &spec.matrix {
        None => vec![IndexMap::new()],
        Some(matrix) => matrix_combinations(matrix, params)?,
    };
    combos
        .into_iter()
        .map(|combo| expand_one(base, spec, params, kinds, line, combo))
        .collect()
}

fn matrix_combinations(
    matrix: &IndexMap<String, Value>,
    params: &IndexMap<String, Value>,
) -> Result<Vec<IndexMap<String, Value>>, String> {
    if matrix.is_empty() {
        return Err("empty matrix".into());
    }
    let scope = Scope {
        params,
        matrix: None,
    };
    let mut combos = vec![IndexMap::new()];
    for (key, raw) in matrix {
        let values = template::resolve(raw, &scope, &mut UsedParams::new())
            .map_err(|e| format!("matrix.{key}: {e}"))?;
        let Value::Array(values) = values else {
            return Err(format!("matrix.{key} must be a list"));
        };
        if values.is_empty() {
            return Err(format!(
                "matrix.{key} is an empty list: the stage would expand to nothing"
            ));
        }
        if let Some(bad) = values
            .iter()
            .find(|v| v.is_array() || v.is_object() || v.is_null())
        {
            return Err(format!("matrix.{key}: values must be scalars, found {bad}"));
        }
        combos = combos
            .into_iter()
            .flat_map(|c| {
                values.iter().map(move |v| {
                    let mut c = c.clone();
                    c.insert(key.clone(), v.clone());
                    c
                })
            })
            .collect();
    }
    Ok(combos)
}

fn expand_one(
    base: &str,
    spec: &StageSpec,
    params: &IndexMap<String, Value>,
    kinds: &dyn Kinds,
    line: usize,
    combo: IndexMap<String, Value>,
) -> Result<Stage, String> {
    let name = if combo.is_empty() {
        base.to_string()
    } else {
        let parts: Vec<String> = combo
            .iter()
            .map(|(k, v)| format!("{k}={}", template::display(v)))
            .collect();
        format!("{base}@{}", parts.join(","))
    };
    let matrix = (spec.matrix.is_some()).then_some(&combo);
    let scope = Scope { params, matrix };
    let mut used = UsedParams::new();
    let ctx = |what: &str, e: String| {
        if combo.is_empty() {
            format!("{what}: {e}")
        } else {
            format!("{name}: {what}: {e}")
        }
    };

    let paths =
        |list: &[String], what: &str, used: &mut UsedParams| -> Result<Vec<String>, String> {
            list.iter()
                .map(|p| {
                    let p = template::resolve_text(p, &scope, used).map_err(|e| ctx(what, e))?;
                    normalize(&p).map_err(|e| ctx(what, e))
                })
                .collect()
        };
    let mut deps = paths(&spec.deps, "deps", &mut used)?;
    let mut outs = paths(&spec.outs, "outs", &mut used)?;
    let needs = spec
        .needs
        .iter()
        .map(|n| template::resolve_text(n, &scope, &mut used).map_err(|e| ctx("needs", e)))
        .collect::<Result<Vec<_>, _>>()?;
    let metrics = match &spec.metrics {
        Some(m) => Some(paths(std::slice::from_ref(m), "metrics", &mut used)?.remove(0)),
        None => None,
    };
    if let Some(m) = &metrics {
        if !outs.contains(m) {
            outs.push(m.clone());
        }
    }

    let action = if let Some(cmd) = &spec.cmd {
        let resolved = template::resolve_text(cmd, &scope, &mut used).map_err(|e| ctx("cmd", e))?;
        Action::Cmd {
            template: cmd.clone(),
            resolved,
        }
    } else {
        let kind = spec.uses.clone().unwrap_or_default();
        let mut with = Map::new();
        for (k, v) in &spec.with {
            with.insert(
                k.clone(),
                template::resolve(v, &scope, &mut used)
                    .map_err(|e| ctx(&format!("with.{k}"), e))?,
            );
        }
        for input in kinds
            .inputs(&kind, &with)
            .map_err(|e| ctx(&format!("uses: {kind}"), e))?
        {
            let input = normalize(&input).map_err(|e| ctx("with", e))?;
            if !deps.contains(&input) {
                deps.push(input);
            }
        }
        Action::Uses { kind, with }
    };

    let mut resources = BTreeMap::new();
    for (k, v) in &spec.resources {
        let v = template::resolve(v, &scope, &mut used)
            .map_err(|e| ctx(&format!("resources.{k}"), e))?;
        resources.insert(
            k.clone(),
            parse_quantity(k, &v).map_err(|e| ctx("resources", e))?,
        );
    }
    let env = match &spec.env {
        None => Vec::new(),
        Some(EnvSpec::Set(map)) => map
            .iter()
            .map(|(k, v)| {
                let v = template::resolve(v, &scope, &mut used)
                    .map_err(|e| ctx(&format!("env.{k}"), e))?;
                Ok((k.clone(), Some(template::display(&v))))
            })
            .collect::<Result<_, String>>()?,
        Some(EnvSpec::PassThrough(names)) => names
            .iter()
            .map(|k| (k.clone(), std::env::var(k).ok()))
            .collect(),
    };
    Ok(Stage {
        name,
        base: base.to_string(),
        line,
        desc: spec.desc.clone(),
        action,
        deps,
        outs,
        metrics,
        needs,
        resources,
        env,
        matrix: combo,
        used_params: used,
    })
}

/// Resource amounts: plain counts, or memory with a unit (`4G`, `512M`), kept in MiB.
pub fn parse_quantity(name: &str, value: &Value) -> Result<u64, String> {
    let bad = || format!("`{name}: {value}` is not a count or a size like 4G");
    match value {
        Value::Number(n) => n.as_u64().ok_or_else(bad),
        Value::String(s) => {
            let s = s.trim();
            let (num, unit) =
                s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
            let num: f64 = num.trim().parse().map_err(|_| bad())?;
            let scale = match unit
                .trim()
                .to_ascii_uppercase()
                .trim_end_matches("IB")
                .trim_end_matches('B')
            {
                "" | "M" => 1.0,
                "K" => 1.0 / 1024.0,
                "G" => 1024.0,
                "T" => 1024.0 * 1024.0,
                _ => return Err(bad()),
            };
            Ok((num * scale).ceil() as u64)
        }
        _ => Err(bad()),
    }
}

/// A workspace-relative path in one canonical spelling; `..` and absolute paths are refused.
pub fn normalize(path: &str) -> Result<String, String> {
    if path.trim().is_empty() {
        return Err("empty path".into());
    }
    let mut parts = Vec::new();
    for comp in Path::new(path).components() {
        match comp {
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::CurDir => {}
            Component::ParentDir => return Err(format!("`{path}` leaves the workspace (`..`)")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "`{path}` is absolute; paths are relative to the workspace"
                ))
            }
        }
    }
    if parts.is_empty() {
        return Err(format!("`{path}` is the workspace itself"));
    }
    Ok(parts.join("/"))
}
