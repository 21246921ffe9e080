//! Pipeline files: parse, template, expand matrices, and build a validated DAG of stages.
//!
//! Everything that can be wrong with a pipeline is found here, before anything runs, and
//! reported with the file, line and stage.

pub mod compiled;
pub mod dag;
pub mod own_files;
pub mod runner;
pub mod schema;
pub mod spans;
pub mod template;

use anyhow::{anyhow, bail, Context, Result};
use indexmap::IndexMap;
use own_files::OwnFiles;
use schema::{EnvSpec, PipelineFile, StageSpec};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use template::{Budget, Scope, UsedParams};

pub use dag::Dag;

/// A pipeline file larger than this is not one a person wrote.
pub const MAX_FILE_BYTES: u64 = 64 << 20;
/// Default of `--max-expansions`: the stages one matrix may expand to.
pub const DEFAULT_MAX_EXPANSIONS: usize = 10_000;
/// The whole pipeline may have this many times `max_expansions` stages…
pub const PIPELINE_EXPANSIONS_FACTOR: usize = 20;
/// …and never more than this, whatever `--max-expansions` says (a stage costs about 1 KiB).
pub const MAX_STAGES: usize = 2_000_000;
/// The variables repro gives every stage; a pipeline may not set them.
pub const STAGE_ENV: [&str; 5] = [
    "REPRO_RUN",
    "REPRO_STAGE",
    "REPRO_SCRATCH",
    "REPRO_PROGRESS",
    "REPRO_WORKSPACE",
];
/// Longest stage name (a matrix expansion's name holds its values).
pub const MAX_NAME_BYTES: usize = 1024;

/// One node of the DAG: a stage after templating and matrix expansion.
#[derive(Debug, Clone, Serialize, Deserialize)]
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

#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// Checks a kind's parameters; returns the workspace paths among them that it reads. An
    /// error about one parameter starts with `with.NAME`, so that it is reported at its line.
    fn inputs(&self, kind: &str, with: &Map<String, Value>) -> Result<Vec<String>, String>;
}

/// How to load a pipeline: the `-S` overrides, and the limits and files that guard the user.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// `key=value` pairs from `-S`.
    pub overrides: Vec<String>,
    /// Expansions one matrix stage may have (`--max-expansions`).
    pub max_expansions: usize,
    /// The cache store, relative to the workspace or absolute: no stage may touch it.
    pub store: PathBuf,
    /// Where compiled plans are kept (`.repro/plans`), if they are.
    pub plans: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            overrides: Vec::new(),
            max_expansions: DEFAULT_MAX_EXPANSIONS,
            store: PathBuf::from("cache"),
            plans: None,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Pipeline {
    /// The file as the user named it, for messages.
    pub file: PathBuf,
    pub params: IndexMap<String, Value>,
    /// Stages in a topological order that follows the file where it can.
    pub stages: Vec<Stage>,
    pub dag: Dag,
    /// repro's own files, which no stage may write (checked again before outs are touched).
    pub own: OwnFiles,
    /// What loading read besides the file and the options.
    pub read: LoadFacts,
    /// The `runner:` section (where stages run, and the cluster settings).
    pub runner: runner::RunnerSettings,
    /// Where to save this pipeline as a compiled plan, and under what key, if it was parsed.
    #[serde(skip)]
    unsaved_plan: Option<(PathBuf, String)>,
}

/// What a load read from outside the pipeline file: a compiled plan is reused only while these
/// are unchanged.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct LoadFacts {
    /// Variables passed through from repro's environment (`env: [NAME]`), and their values.
    pub env: BTreeMap<String, Option<String>>,
    /// Workspace folders of deps and outs, and where their symlinks led.
    pub folders: Vec<(String, PathBuf)>,
}

/// A problem with one stage: the path of the field at fault inside the stage (`["outs", "1"]`,
/// `["with", "lr"]`; empty for the stage itself) and the message.
struct Issue {
    at: Vec<String>,
    msg: String,
}

impl From<String> for Issue {
    fn from(msg: String) -> Issue {
        Issue {
            at: Vec::new(),
            msg,
        }
    }
}

impl From<&str> for Issue {
    fn from(msg: &str) -> Issue {
        Issue::from(msg.to_string())
    }
}

fn issue_at(at: &[&str], msg: String) -> Issue {
    Issue {
        at: at.iter().map(|s| s.to_string()).collect(),
        msg,
    }
}

/// What expanding every stage shares.
struct Expander<'a> {
    params: &'a IndexMap<String, Value>,
    kinds: &'a dyn Kinds,
    own: &'a OwnFiles,
    budget: Budget,
    max_expansions: usize,
    folders: std::cell::RefCell<own_files::Folders>,
    env_read: std::cell::RefCell<BTreeMap<String, Option<String>>>,
}

impl Pipeline {
    /// Loads and validates `file`.
    pub fn load(
        file: &Path,
        workspace: &Path,
        opts: &LoadOptions,
        kinds: &dyn Kinds,
    ) -> Result<Pipeline> {
        let path = workspace.join(file);
        let shown = file.display();
        let f = std::fs::File::open(&path)
            .with_context(|| format!("cannot read pipeline file {shown}"))?;
        if f.metadata().map(|m| m.is_dir()).unwrap_or(false) {
            bail!("{shown} is a folder, not a pipeline file");
        }
        let mut bytes = Vec::new();
        f.take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .with_context(|| format!("cannot read pipeline file {shown}"))?;
        if bytes.len() as u64 > MAX_FILE_BYTES {
            bail!(
                "{shown}:1: larger than {} MiB; that is not a pipeline file",
                MAX_FILE_BYTES >> 20
            );
        }
        let source = String::from_utf8(bytes).map_err(|e| {
            let upto = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            let line = upto.iter().filter(|&&b| b == b'\n').count() + 1;
            anyhow!("{shown}:{line}: not UTF-8 text")
        })?;
        let Some(plans) = &opts.plans else {
            return Self::parse(&source, file, workspace, opts, kinds);
        };
        let plan = compiled::path(plans, file);
        let key = compiled::key(&source, file, workspace, opts);
        if let Some(pipeline) = compiled::read(&plan, &key) {
            return Ok(pipeline);
        }
        let mut pipeline = Self::parse(&source, file, workspace, opts, kinds)?;
        pipeline.unsaved_plan = Some((plan, key));
        Ok(pipeline)
    }

    /// Saves a pipeline that was parsed as the compiled plan the next load reuses; called once
    /// the workspace exists (a load alone never creates `.repro/`).
    pub fn save_plan(&self) {
        if let Some((plan, key)) = &self.unsaved_plan {
            compiled::write(plan, key, self);
        }
    }

    pub fn parse(
        source: &str,
        file: &Path,
        workspace: &Path,
        opts: &LoadOptions,
        kinds: &dyn Kinds,
    ) -> Result<Pipeline> {
        let shown = file.display().to_string();
        if source.len() as u64 > MAX_FILE_BYTES {
            bail!("{shown}:1: larger than {} MiB", MAX_FILE_BYTES >> 20);
        }
        if let Some(at) = source.find('\0') {
            let line = source[..at].matches('\n').count() + 1;
            bail!("{shown}:{line}: a NUL byte; a pipeline file is text");
        }
        let spans =
            spans::scan(source).map_err(|e| anyhow!("{shown}:{}", one_line(&e.to_string())))?;
        let parsed: PipelineFile =
            serde_yaml_ng::from_str(source).map_err(|e| yaml_error(&shown, source, &e))?;
        let mut params = parsed.params;
        for item in &opts.overrides {
            apply_override(&mut params, item).map_err(|e| {
                // At the param's line (or the nearest that exists): where the default is set.
                let key = item.split('=').next().unwrap_or_default().trim();
                let mut path = vec!["params"];
                path.extend(key.split('.'));
                let line = spans.line(&path).unwrap_or(1);
                let cut = item.floor_char_boundary(80);
                let more = if cut < item.len() { "…" } else { "" };
                anyhow!(
                    "{shown}:{line}: -S {}{more}: {e}",
                    item[..cut].escape_debug()
                )
            })?;
        }
        let stages_line = spans.line(&["stages"]).unwrap_or(1);
        let runner = match parsed.runner {
            None => runner::RunnerSettings::default(),
            Some(spec) => spec.check().map_err(|(at, e)| {
                let mut path = vec!["runner"];
                path.extend(at.iter().map(String::as_str));
                let line = spans.line(&path).unwrap_or(1);
                anyhow!("{shown}:{line}: runner.{}: {}", at.join("."), one_line(&e))
            })?,
        };

        let own = OwnFiles::new(workspace, &opts.store, file);
        let ex = Expander {
            params: &params,
            kinds,
            own: &own,
            budget: Budget::new(template::BUDGET_BYTES),
            max_expansions: opts.max_expansions.max(1),
            folders: Default::default(),
            env_read: Default::default(),
        };
        let total_limit = ex
            .max_expansions
            .saturating_mul(PIPELINE_EXPANSIONS_FACTOR)
            .min(MAX_STAGES);
        let mut errors = Vec::new();
        let mut stages = Vec::new();
        for (base, spec) in &parsed.stages {
            let line = spans.line(&["stages", base]).unwrap_or(stages_line);
            match ex.expand(
                base,
                spec,
                line,
                total_limit - stages.len().min(total_limit),
            ) {
                Ok(mut nodes) => stages.append(&mut nodes),
                Err(issue) => {
                    let mut path = vec!["stages", base.as_str()];
                    path.extend(issue.at.iter().map(String::as_str));
                    let at = spans.line(&path).unwrap_or(line);
                    errors.push(format!(
                        "{shown}:{at}: stage `{}`: {}",
                        base.escape_debug(),
                        one_line(&issue.msg)
                    ));
                    // Past the budget every later stage fails the same way: one line is enough.
                    if issue.msg.contains("templates expand to more than")
                        || issue.msg.contains("stages in all")
                    {
                        break;
                    }
                }
            }
        }
        if stages.is_empty() && errors.is_empty() {
            errors.push(format!("{shown}:{stages_line}: no stages"));
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
        let read = LoadFacts {
            env: ex.env_read.take(),
            folders: ex.folders.take().into_sorted(),
        };
        Ok(Pipeline {
            file: file.to_path_buf(),
            params,
            stages,
            dag,
            own,
            read,
            runner,
            unsaved_plan: None,
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

/// A message that quotes the file, kept to one line: control characters are escaped.
fn one_line(msg: &str) -> String {
    msg.chars()
        .map(|c| match c {
            c if c.is_control() => c.escape_debug().to_string(),
            c => c.to_string(),
        })
        .collect()
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
            anyhow!(
                "{file}:{}:{}: {}{hint}",
                loc.line(),
                loc.column(),
                one_line(msg)
            )
        }
        None => anyhow!("{file}:1: {}", one_line(&msg)),
    }
}

/// `a.b=3`: sets an existing param (a typo is an error, not a new param).
fn apply_override(params: &mut IndexMap<String, Value>, item: &str) -> Result<(), String> {
    let (key, raw) = item.split_once('=').ok_or("expected key=value")?;
    if raw.trim().is_empty() {
        return Err(format!(
            "no value after `=` (for an empty string write -S '{}=\"\"')",
            key.trim()
        ));
    }
    let value: Value = match serde_yaml_ng::from_str(raw) {
        // `#ff0000` or `---` read as YAML are null: what the user typed is the text.
        Ok(Value::Null) if !matches!(raw.trim(), "null" | "Null" | "NULL" | "~") => {
            Value::String(raw.to_string())
        }
        Ok(v) => v,
        Err(e) => return Err(format!("bad value: {e}")),
    };
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

/// Why `name` cannot be a stage's name in the file, if it cannot. Every per-stage file is
/// derived from the name (see `workspace::file_safe`), so this is about readable names and
/// command lines, not about paths.
fn bad_base_name(name: &str) -> Option<String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "_-.".contains(c);
    if name.is_empty() {
        Some("a stage needs a name".into())
    } else if name == "." || name == ".." {
        Some(format!("`{name}` cannot be a stage name"))
    } else if name.starts_with('-') {
        Some("a stage name may not start with `-` (it would read as an option)".into())
    } else if name.len() > MAX_NAME_BYTES {
        Some(format!("a stage name is limited to {MAX_NAME_BYTES} bytes"))
    } else if !name.chars().all(allowed) {
        Some(format!(
            "stage name `{}`: a name may hold only letters, digits, `_`, `-` and `.`",
            name.escape_debug()
        ))
    } else {
        None
    }
}

impl Expander<'_> {
    /// A stage of the file as one node, or one node per matrix combination.
    fn expand(
        &self,
        base: &str,
        spec: &StageSpec,
        line: usize,
        room: usize,
    ) -> Result<Vec<Stage>, Issue> {
        if let Some(msg) = bad_base_name(base) {
            return Err(msg.into());
        }
        match (&spec.cmd, &spec.uses) {
            (Some(_), Some(_)) => return Err("has both `cmd` and `uses`; give one".into()),
            (None, None) => {
                return Err("needs `cmd` (a shell command) or `uses` (a built-in kind)".into())
            }
            (Some(_), None) if !spec.with.is_empty() => return Err(issue_at(
                &["with"],
                "`with` belongs to `uses` stages; a `cmd` stage takes ${params.x} in its command"
                    .into(),
            )),
            _ => {}
        }
        let combos = match &spec.matrix {
            None => vec![IndexMap::new()],
            Some(matrix) => self.matrix_combinations(matrix, room)?,
        };
        combos
            .into_iter()
            .map(|combo| self.expand_one(base, spec, line, combo))
            .collect()
    }

    /// Every combination of the matrix values, after checking how many there will be.
    fn matrix_combinations(
        &self,
        matrix: &IndexMap<String, Value>,
        room: usize,
    ) -> Result<Vec<IndexMap<String, Value>>, Issue> {
        if matrix.is_empty() {
            return Err(issue_at(&["matrix"], "empty matrix".into()));
        }
        let scope = Scope {
            params: self.params,
            matrix: None,
            budget: &self.budget,
        };
        let mut lists = Vec::new();
        for (key, raw) in matrix {
            let at = |msg: String| issue_at(&["matrix", key], format!("matrix.{key}: {msg}"));
            if key.is_empty()
                || !key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(at(
                    "a matrix key may hold only letters, digits, `_` and `-`".into(),
                ));
            }
            let values = template::resolve(raw, &scope, &mut UsedParams::new()).map_err(&at)?;
            let Value::Array(values) = values else {
                return Err(at("must be a list".into()));
            };
            if values.is_empty() {
                return Err(at(
                    "is an empty list: the stage would expand to nothing".into()
                ));
            }
            if let Some(bad) = values
                .iter()
                .find(|v| v.is_array() || v.is_object() || v.is_null())
            {
                return Err(at(format!("values must be scalars, found {bad}")));
            }
            if let Some(bad) = values
                .iter()
                .map(template::display)
                .find(|v| v.chars().any(char::is_control))
            {
                return Err(at(format!(
                    "value `{}` holds a control character (it would be part of a stage name)",
                    bad.escape_debug()
                )));
            }
            lists.push((key, values));
        }
        // Counted before anything is built: a few short lists can multiply to billions.
        let count = lists
            .iter()
            .try_fold(1usize, |n, (_, v)| n.checked_mul(v.len()));
        let sizes: Vec<String> = lists
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.len()))
            .collect();
        let count_text = count.map_or_else(|| "more than 2^64".to_string(), |n| n.to_string());
        if count.is_none_or(|n| n > self.max_expansions) {
            return Err(issue_at(
                &["matrix"],
                format!(
                    "the matrix would expand to {count_text} stages ({}), more than the limit of {} (raise it with --max-expansions)",
                    sizes.join(" × "),
                    self.max_expansions
                ),
            ));
        }
        if count.is_none_or(|n| n > room) {
            return Err(issue_at(
                &["matrix"],
                format!(
                    "the matrix would expand to {count_text} stages, past the limit of {} stages in all ({PIPELINE_EXPANSIONS_FACTOR} × --max-expansions, at most {MAX_STAGES})",
                    self.max_expansions
                        .saturating_mul(PIPELINE_EXPANSIONS_FACTOR)
                        .min(MAX_STAGES)
                ),
            ));
        }
        let mut combos = vec![IndexMap::new()];
        for (key, values) in lists {
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
        &self,
        base: &str,
        spec: &StageSpec,
        line: usize,
        combo: IndexMap<String, Value>,
    ) -> Result<Stage, Issue> {
        let name = if combo.is_empty() {
            base.to_string()
        } else {
            let parts: Vec<String> = combo
                .iter()
                .map(|(k, v)| format!("{k}={}", template::display(v)))
                .collect();
            format!("{base}@{}", parts.join(","))
        };
        if name.len() > MAX_NAME_BYTES {
            return Err(issue_at(
                &["matrix"],
                format!(
                    "the expansion `{}…` has a name longer than {MAX_NAME_BYTES} bytes; use shorter matrix values",
                    &name[..name.floor_char_boundary(60)]
                ),
            ));
        }
        let matrix = (spec.matrix.is_some()).then_some(&combo);
        let scope = Scope {
            params: self.params,
            matrix,
            budget: &self.budget,
        };
        let mut used = UsedParams::new();
        let ctx = |at: &[&str], what: &str, e: String| {
            let msg = if combo.is_empty() {
                format!("{what}: {e}")
            } else {
                format!("{name}: {what}: {e}")
            };
            issue_at(at, msg)
        };

        let paths =
            |list: &[String], what: &str, used: &mut UsedParams| -> Result<Vec<String>, Issue> {
                list.iter()
                    .enumerate()
                    .map(|(i, p)| {
                        let i = i.to_string();
                        let at = [what, i.as_str()];
                        let p = template::resolve_text(p, &scope, used)
                            .map_err(|e| ctx(&at, what, e))?;
                        normalize(&p).map_err(|e| ctx(&at, what, e))
                    })
                    .collect()
            };
        let mut deps = paths(&spec.deps, "deps", &mut used)?;
        let mut outs = paths(&spec.outs, "outs", &mut used)?;
        let needs = spec
            .needs
            .iter()
            .map(|n| {
                template::resolve_text(n, &scope, &mut used)
                    .map_err(|e| ctx(&["needs"], "needs", e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let metrics = match &spec.metrics {
            Some(m) => {
                let p = template::resolve_text(m, &scope, &mut used)
                    .map_err(|e| ctx(&["metrics"], "metrics", e))?;
                Some(normalize(&p).map_err(|e| ctx(&["metrics"], "metrics", e))?)
            }
            None => None,
        };
        if let Some(m) = &metrics {
            if !outs.contains(m) {
                outs.push(m.clone());
            }
        }

        let action = if let Some(cmd) = &spec.cmd {
            let resolved = template::resolve_text(cmd, &scope, &mut used)
                .map_err(|e| ctx(&["cmd"], "cmd", e))?;
            if resolved.trim().is_empty() {
                return Err(ctx(&["cmd"], "cmd", "is empty".into()));
            }
            if resolved.contains('\0') {
                return Err(ctx(&["cmd"], "cmd", "holds a NUL byte".into()));
            }
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
                        .map_err(|e| ctx(&["with", k], &format!("with.{k}"), e))?,
                );
            }
            let inputs = self.kinds.inputs(&kind, &with).map_err(|e| {
                // `with.NAME …` names the parameter at fault: report it at its own line.
                let field: String = e
                    .strip_prefix("with.")
                    .map(|rest| {
                        rest.chars()
                            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                            .collect()
                    })
                    .unwrap_or_default();
                if e.starts_with("unknown stage kind") {
                    ctx(&["uses"], &format!("uses: {kind}"), e)
                } else if field.is_empty() {
                    ctx(&["with"], &format!("uses: {kind}"), e)
                } else {
                    ctx(&["with", &field], &format!("uses: {kind}"), e)
                }
            })?;
            for input in inputs {
                let input = normalize(&input).map_err(|e| ctx(&["with"], "with", e))?;
                if !deps.contains(&input) {
                    deps.push(input);
                }
            }
            Action::Uses { kind, with }
        };
        for (i, out) in outs.iter().enumerate() {
            if let Some(why) = self.own.refuse_out_in(out, &mut self.folders.borrow_mut()) {
                // Past the listed outs comes only the metrics file.
                let is_metrics = i >= spec.outs.len();
                let i = i.to_string();
                let at: &[&str] = if is_metrics {
                    &["metrics"]
                } else {
                    &["outs", &i]
                };
                return Err(ctx(at, "outs", format!("{why}; no stage may write it")));
            }
        }
        for (i, dep) in deps.iter().enumerate() {
            if let Some(why) = self.own.refuse_dep_in(dep, &mut self.folders.borrow_mut()) {
                let i = i.to_string();
                return Err(ctx(&["deps", &i], "deps", why));
            }
        }

        let mut resources = BTreeMap::new();
        for (k, v) in &spec.resources {
            let v = template::resolve(v, &scope, &mut used)
                .map_err(|e| ctx(&["resources", k], &format!("resources.{k}"), e))?;
            // `time` is a limit in minutes, not a slot: a Slurm job's `--time`.
            let amount = match k.as_str() {
                "time" => runner::minutes(&v),
                _ => parse_quantity(k, &v),
            };
            resources.insert(
                k.clone(),
                amount.map_err(|e| ctx(&["resources", k], "resources", e))?,
            );
        }
        let env = match &spec.env {
            None => Vec::new(),
            Some(EnvSpec::Set(map)) => map
                .iter()
                .map(|(k, v)| {
                    let v = template::resolve(v, &scope, &mut used)
                        .map_err(|e| ctx(&["env", k], &format!("env.{k}"), e))?;
                    Ok((k.clone(), Some(template::display(&v))))
                })
                .collect::<Result<_, Issue>>()?,
            Some(EnvSpec::PassThrough(names)) => names
                .iter()
                .map(|k| {
                    let v = std::env::var(k).ok();
                    self.env_read.borrow_mut().insert(k.clone(), v.clone());
                    (k.clone(), v)
                })
                .collect(),
        };
        for (k, v) in &env {
            if v.as_deref().is_some_and(|v| v.contains('\0')) {
                return Err(ctx(&["env", k], "env", format!("`{k}` holds a NUL byte")));
            }
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(ctx(
                    &["env", k],
                    "env",
                    format!("`{}` is not a variable name", k.escape_debug()),
                ));
            }
            if STAGE_ENV.contains(&k.as_str()) {
                return Err(ctx(
                    &["env", k],
                    "env",
                    format!("`{k}` is repro's: it tells a stage its run, scratch folder and progress file"),
                ));
            }
        }
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
            if !num.is_finite() || num < 0.0 {
                return Err(bad());
            }
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

/// A workspace-relative path in one canonical spelling: `./a`, `a/` and `sub/../a` are all `a`.
/// A path that leaves the workspace, is absolute, or holds a control character is refused.
pub fn normalize(path: &str) -> Result<String, String> {
    if path.trim().is_empty() {
        return Err("empty path".into());
    }
    if path.chars().any(char::is_control) {
        return Err(format!(
            "`{}` holds a control character",
            path.escape_debug()
        ));
    }
    let mut parts: Vec<String> = Vec::new();
    for comp in Path::new(path).components() {
        match comp {
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::CurDir => {}
            Component::ParentDir => {
                if parts.pop().is_none() {
                    return Err(format!("`{path}` leaves the workspace (`..`)"));
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_folds_every_spelling_to_one() {
        for (given, want) in [
            ("a", "a"),
            ("./a", "a"),
            ("a/", "a"),
            ("a//b", "a/b"),
            ("sub/../a", "a"),
            ("x/./y/../../a/b", "a/b"),
        ] {
            assert_eq!(normalize(given).as_deref(), Ok(want), "{given}");
        }
        for bad in [
            "..",
            "../a",
            "a/../..",
            "a/../../b",
            "/etc/passwd",
            ".",
            "a/..",
            "",
            "a\nb",
            "a\0b",
        ] {
            assert!(normalize(bad).is_err(), "`{bad}` accepted");
        }
    }

    #[test]
    fn base_names() {
        for bad in ["", ".", "..", "a/b", "-x", "a b", "a\tb", "é", "a@b"] {
            assert!(bad_base_name(bad).is_some(), "`{bad}` accepted");
        }
        for fine in ["a", "train", "a.b", "x_1-2", ".hidden"] {
            assert_eq!(bad_base_name(fine), None, "`{fine}` refused");
        }
    }
}
