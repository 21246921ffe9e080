//! Deciding, for every stage, whether it is up to date, can be restored from the cache, or
//! must run, and why. `repro status` prints this; `repro run` acts on it.

use crate::cache::key::canonical_json;
use crate::cache::{KeyParts, OutRecord};
use crate::pipeline::{Action, Pipeline, Stage};
use crate::workspace::{OutId, State, Workspace};
use anyhow::{anyhow, Result};
use rayon::prelude::*;
use std::borrow::Cow;
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Its key is unchanged and its outs are in place.
    Skip,
    /// Its key was seen before: the outs come from the cache without running.
    Restore(Vec<String>),
    Run(Vec<String>),
    /// Depends on stages that will run; decided when they finish.
    Wait(Vec<String>),
    /// Not selected by `--only`.
    Excluded,
}

/// The version of a built-in kind, which enters the key of every stage using it.
pub trait KindVersion {
    fn version(&self, kind: &str) -> String;
    /// `with` parameters of `kind` that cannot change its result, and so stay out of the key.
    fn not_in_key(&self, _kind: &str) -> &'static [&'static str] {
        &[]
    }
}

/// The key parts of a stage given the hashes of its deps and the [`outs_digest`] of each
/// upstream's result.
pub fn key_parts(
    pipeline: &Pipeline,
    index: usize,
    kinds: &dyn KindVersion,
    dep_hash: &dyn Fn(&str) -> Result<Option<String>>,
    upstream_digest: &dyn Fn(usize) -> Option<String>,
) -> Result<KeyParts> {
    let stage = &pipeline.stages[index];
    let mut parts = KeyParts::default();
    match &stage.action {
        Action::Cmd { template, .. } => parts.set("cmd", template.clone()),
        Action::Uses { kind, with } => {
            parts.set("kind", format!("{kind}@{}", kinds.version(kind)));
            let ignored = kinds.not_in_key(kind);
            for (k, v) in with.iter().filter(|(k, _)| !ignored.contains(&k.as_str())) {
                parts.set(format!("with.{k}"), canonical_json(v));
            }
        }
    }
    for (k, v) in &stage.used_params {
        parts.set(format!("param.{k}"), canonical_json(v));
    }
    for (k, v) in &stage.matrix {
        parts.set(format!("matrix.{k}"), canonical_json(v));
    }
    for (k, v) in &stage.env {
        parts.set(
            format!("env.{k}"),
            v.clone().unwrap_or_else(|| "<unset>".into()),
        );
    }
    parts.set("outs", stage.outs.join("\n"));
    for dep in &stage.deps {
        let hash = dep_hash(dep)?
            .ok_or_else(|| anyhow!("stage `{}`: dep `{dep}` is missing", stage.name))?;
        parts.set(format!("dep:{dep}"), hash);
    }
    for &u in &pipeline.dag.upstream[index] {
        let up = &pipeline.stages[u];
        if needs_names(stage, up) {
            let digest = upstream_digest(u).ok_or_else(|| {
                anyhow!(
                    "stage `{}`: upstream `{}` has no result",
                    stage.name,
                    up.name
                )
            })?;
            parts.set(format!("upstream:{}", up.name), digest);
        }
    }
    Ok(parts)
}

fn needs_names(stage: &Stage, up: &Stage) -> bool {
    stage.needs.iter().any(|n| *n == up.name || *n == up.base)
}

/// One hash for a stage's outputs: `(path, content hash)` of each.
pub fn outs_digest<'a>(outs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut h = blake3::Hasher::new();
    for (path, hash) in outs {
        h.update(path.as_bytes());
        h.update(&[0]);
        h.update(hash.as_bytes());
        h.update(b"\n");
    }
    h.finalize().to_hex().to_string()
}

/// An out of a record that the workspace no longer holds as recorded.
pub struct StaleOut<'a> {
    pub path: &'a str,
    /// Gone (or unreadable), rather than changed.
    pub missing: bool,
}

impl StaleOut<'_> {
    pub fn reason(&self) -> String {
        let what = if self.missing {
            "is missing"
        } else {
            "was modified"
        };
        format!("out `{}` {what}", self.path)
    }
}

/// Outs, as `(path, content hash)`, that are missing from the workspace or differ from what
/// was recorded.
pub fn stale_outs<'a>(
    ws: &Workspace,
    outs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Vec<StaleOut<'a>> {
    let hasher = ws.hasher();
    outs.into_iter()
        .filter_map(|(path, hash)| match hasher.hash(path) {
            Ok(Some(h)) if h.to_hex().as_str() == hash => None,
            Ok(Some(_)) => Some(StaleOut {
                path,
                missing: false,
            }),
            _ => Some(StaleOut {
                path,
                missing: true,
            }),
        })
        .collect()
}

/// The `(path, hash)` of each out a state entry lists.
pub fn ids(outs: &[OutId]) -> impl Iterator<Item = (&str, &str)> {
    outs.iter().map(|o| (o.path.as_str(), o.hash.as_str()))
}

/// The `(path, hash)` of each out a record lists.
pub fn record_ids(outs: &[OutRecord]) -> impl Iterator<Item = (&str, &str)> {
    outs.iter().map(|o| (o.path.as_str(), o.hash.as_str()))
}

pub struct Plan {
    pub decisions: Vec<Decision>,
}

/// Plans every stage in `selected`; `forced` stages run whatever their key.
pub fn plan(
    ws: &Workspace,
    pipeline: &Pipeline,
    state: &State,
    kinds: &dyn KindVersion,
    selected: &[bool],
    forced: &[bool],
) -> Result<Plan> {
    // Hash every dep once, in parallel; the stat cache makes unchanged files free. A dep that
    // is a stage's out gets its hash from that stage's record instead (or waits for it).
    let outs: std::collections::HashSet<&str> = pipeline
        .stages
        .iter()
        .flat_map(|s| s.outs.iter().map(String::as_str))
        .collect();
    let mut deps: Vec<&str> = pipeline
        .stages
        .iter()
        .enumerate()
        .filter(|(i, _)| selected[*i])
        .flat_map(|(_, s)| s.deps.iter().map(String::as_str))
        .filter(|d| !outs.contains(d))
        .collect();
    deps.sort_unstable();
    deps.dedup();
    let hasher = ws.hasher();
    let hashes: HashMap<&str, Option<String>> = deps
        .par_iter()
        .map(|d| {
            let h = hasher
                .hash(d)
                .map_err(|e| anyhow!("cannot hash `{d}`: {e}"))?;
            Ok((*d, h.map(|h| h.to_hex().to_string())))
        })
        .collect::<Result<_>>()?;

    let n = pipeline.stages.len();
    let mut decisions = vec![Decision::Excluded; n];
    // What each settled stage's outs will be: its last record's if skipped, the cached record's
    // if restored. Stages below a restore can then be decided now too.
    let mut expected: Vec<Option<Cow<[OutId]>>> = vec![None; n];
    for i in 0..n {
        if !selected[i] {
            continue;
        }
        let stage = &pipeline.stages[i];
        let ups = &pipeline.dag.upstream[i];
        let unsettled: Vec<String> = ups
            .iter()
            .filter(|&&u| selected[u] && expected[u].is_none())
            .map(|&u| pipeline.stages[u].name.clone())
            .collect();
        // A dep inside an upstream's out folder can only be hashed once that folder is there.
        let nested = stage.deps.iter().any(|d| {
            ups.iter().any(|&u| {
                matches!(decisions[u], Decision::Restore(_))
                    && pipeline.stages[u].outs.iter().any(|o| {
                        d != o
                            && (d.starts_with(&format!("{o}/")) || o.starts_with(&format!("{d}/")))
                    })
            })
        });
        if !unsettled.is_empty() || nested {
            let waiting = if unsettled.is_empty() {
                ups.iter()
                    .map(|&u| pipeline.stages[u].name.clone())
                    .collect()
            } else {
                unsettled
            };
            decisions[i] = if forced[i] {
                Decision::Run(vec!["forced".into()])
            } else {
                Decision::Wait(waiting)
            };
            continue;
        }
        let from_upstream = |d: &str| {
            ups.iter()
                .filter_map(|&u| expected[u].as_deref())
                .flatten()
                .find(|o| o.path == d)
                .map(|o| o.hash.clone())
        };
        let dep_hash = |d: &str| Ok(from_upstream(d).or_else(|| hashes.get(d).cloned().flatten()));
        let upstream = |u: usize| expected[u].as_deref().map(|outs| outs_digest(ids(outs)));
        let p = key_parts(pipeline, i, kinds, &dep_hash, &upstream)?;
        let key = p.key();
        decisions[i] = if forced[i] {
            Decision::Run(vec!["forced".into()])
        } else {
            decide(ws, &p, &key, state, &stage.name)
        };
        expected[i] = match &decisions[i] {
            Decision::Skip => state.get(&stage.name).map(|e| Cow::Borrowed(&e.outs[..])),
            Decision::Restore(_) => ws
                .store
                .record(&key)
                .map(|r| Cow::Owned(r.outs.iter().map(OutId::from).collect())),
            _ => None,
        };
    }
    Ok(Plan { decisions })
}

/// The decision for a stage whose key is known, given the state of its pipeline.
pub fn decide(ws: &Workspace, parts: &KeyParts, key: &str, state: &State, stage: &str) -> Decision {
    let last = state.get(stage);
    if let Some(last) = last.filter(|e| e.key == key) {
        let mut why: Vec<String> = stale_outs(ws, ids(&last.outs))
            .iter()
            .map(StaleOut::reason)
            .collect();
        if why.is_empty() {
            return Decision::Skip;
        }
        return match ws.store.read_record(key) {
            Ok(Some(_)) => Decision::Restore(why),
            Ok(None) => Decision::Run(why),
            Err(e) => {
                why.push(unreadable_record(&e));
                Decision::Run(why)
            }
        };
    }
    let mut why = match state.record(stage) {
        Some(last) => parts.changes_since(&last.parts),
        None if last.is_some() => vec!["its inputs changed (its last record is unreadable)".into()],
        None => vec!["never run in this workspace".into()],
    };
    match ws.store.read_record(key) {
        Ok(Some(_)) => {
            why.push("this exact input was run before".into());
            Decision::Restore(why)
        }
        Ok(None) => Decision::Run(why),
        Err(e) => {
            why.push(unreadable_record(&e));
            Decision::Run(why)
        }
    }
}

/// Why a stage whose record cannot be read runs, and what becomes of the record.
fn unreadable_record(e: &crate::cache::store::UnreadableRecord) -> String {
    format!(
        "this exact input was run before, but its record in the cache is {}: it runs again and \
         a new record replaces the bad one",
        e.problem
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::store::OutKind;
    use crate::cache::Record;
    use crate::pipeline::Kinds;
    use serde_json::{Map, Value};
    use std::path::Path;

    /// Accepts any kind, with any parameters and no input paths.
    struct AnyKind;

    impl Kinds for AnyKind {
        fn inputs(&self, _: &str, _: &Map<String, Value>) -> Result<Vec<String>, String> {
            Ok(Vec::new())
        }
    }

    /// Every built-in kind at one version.
    struct Version(&'static str);

    impl KindVersion for Version {
        fn version(&self, _: &str) -> String {
            self.0.to_string()
        }
    }

    const PIPELINE: &str = "stages:
  t:
    uses: fake
    with: {a: 1}
    outs: [t.csv]
  s:
    cmd: echo s > s.txt
    outs: [s.txt]
";

    #[test]
    fn the_kind_version_is_in_the_key_and_named_as_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let ws = Workspace::open(dir.path(), Some(&dir.path().join("cache"))).unwrap();
        let pipeline = Pipeline::parse(
            PIPELINE,
            Path::new("repro.yaml"),
            &ws.root,
            &Default::default(),
            &AnyKind,
        )
        .unwrap();
        let t = pipeline.index_of("t").unwrap();
        let s = pipeline.index_of("s").unwrap();
        let no_deps = |d: &str| -> Result<Option<String>> { panic!("no deps here, asked {d}") };
        let no_upstream = |u: usize| -> Option<String> { panic!("no upstream here, asked {u}") };
        let parts = |i: usize, v: &'static str| {
            key_parts(&pipeline, i, &Version(v), &no_deps, &no_upstream).unwrap()
        };

        let (v1, v2) = (parts(t, "1"), parts(t, "2"));
        assert_eq!(v1.0["kind"], "fake@1");
        assert_eq!(v2.0["kind"], "fake@2");
        assert_ne!(v1.key(), v2.key(), "a new kind version is a new key");
        assert_eq!(v2.changes_since(&v1.0), ["kind changed"]);
        let mut without = v2.clone();
        without.set("kind", "fake@1");
        assert_eq!(without.key(), v1.key(), "the version is all that differs");
        // A shell stage names no kind: its key does not move.
        assert!(!parts(s, "1").0.contains_key("kind"));
        assert_eq!(parts(s, "1").key(), parts(s, "2").key());

        // Through `plan`: t's last result came from version 1 and its out is in place.
        std::fs::write(ws.root.join("t.csv"), "a\n").unwrap();
        let hash = ws.hasher().hash("t.csv").unwrap().unwrap().to_hex();
        let record = |parts: &KeyParts| Record {
            key: parts.key(),
            stage: "t".into(),
            parts: parts.0.clone(),
            outs: vec![OutRecord {
                path: "t.csv".into(),
                hash: hash.to_string(),
                kind: OutKind::File {
                    size: 2,
                    exec: false,
                },
            }],
            metrics: None,
            created: 0,
            duration_s: 0.0,
        };
        let all = vec![true; pipeline.stages.len()];
        let unforced = vec![false; pipeline.stages.len()];
        let decide_t = |state: &State, v: &'static str| {
            plan(&ws, &pipeline, state, &Version(v), &all, &unforced)
                .unwrap()
                .decisions[t]
                .clone()
        };
        let state = State::from_records([&record(&v1)]);
        assert_eq!(decide_t(&state, "1"), Decision::Skip);
        assert_eq!(
            decide_t(&state, "2"),
            Decision::Run(vec!["kind changed".into()])
        );

        // Once version 2 has run, going back to version 1 restores its stored result.
        ws.store.put_record(&record(&v1)).unwrap();
        let state = State::from_records([&record(&v1), &record(&v2)]);
        assert_eq!(
            decide_t(&state, "1"),
            Decision::Restore(vec![
                "kind changed".into(),
                "this exact input was run before".into()
            ])
        );
    }

    /// Leaves `limit` out of every kind's key.
    struct LimitIgnored;

    impl KindVersion for LimitIgnored {
        fn version(&self, _: &str) -> String {
            "1".into()
        }
        fn not_in_key(&self, _: &str) -> &'static [&'static str] {
            &["limit"]
        }
    }

    #[test]
    fn parameters_a_kind_marks_result_neutral_stay_out_of_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let ws = Workspace::open(dir.path(), Some(&dir.path().join("cache"))).unwrap();
        let key = |with: &str| {
            let source = format!("stages:\n  t:\n    uses: fake\n    with: {with}\n");
            let p = Pipeline::parse(
                &source,
                Path::new("repro.yaml"),
                &ws.root,
                &Default::default(),
                &AnyKind,
            )
            .unwrap();
            let none = |_: &str| -> Result<Option<String>> { Ok(None) };
            let no_up = |_: usize| -> Option<String> { None };
            key_parts(&p, 0, &LimitIgnored, &none, &no_up)
                .unwrap()
                .key()
        };
        let base = key("{a: 1}");
        assert_eq!(key("{a: 1, limit: 8G}"), base);
        assert_eq!(key("{a: 1, limit: 1G}"), base);
        assert_ne!(
            key("{a: 2, limit: 1G}"),
            base,
            "other parameters still count"
        );
    }
}
