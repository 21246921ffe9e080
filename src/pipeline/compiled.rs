//! Compiled plans: a pipeline as loaded (parsed, templated, expanded, checked, in DAG order),
//! kept in `.repro/plans/` so that the next command skips the YAML, as ninja keeps its logs.
//!
//! A plan is reused only when everything the load read is unchanged: its first line is the
//! blake3 of the pipeline file's bytes, its name, the `-S` overrides, the load options and the
//! repro binary; inside it are the values of the variables the stages pass through from the
//! environment and where each workspace folder of a dep or out led through symlinks, both
//! checked again on reuse. Anything else is a miss: the file is parsed again and the plan
//! replaced. It is a cache: a lost or damaged plan only costs one parse.

use super::{LoadOptions, Pipeline};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Bumped when the layout of a plan changes.
const FORMAT: &str = "repro-plan-1";

/// Where the plan of `file` lives in the plans folder.
pub fn path(plans: &Path, file: &Path) -> PathBuf {
    let given = file.to_string_lossy();
    let name = super::normalize(&given).unwrap_or_else(|_| given.into_owned());
    plans.join(format!("{}.json", crate::workspace::file_safe(&name)))
}

/// The key of a load: everything it depends on but the environment and the file system.
pub fn key(source: &str, file: &Path, workspace: &Path, opts: &LoadOptions) -> String {
    let mut h = blake3::Hasher::new();
    let mut field = |bytes: &[u8]| {
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(FORMAT.as_bytes());
    field(binary_identity().as_bytes());
    field(file.as_os_str().as_encoded_bytes());
    field(workspace.as_os_str().as_encoded_bytes());
    field(opts.store.as_os_str().as_encoded_bytes());
    field(&(opts.max_expansions as u64).to_le_bytes());
    field(&(opts.overrides.len() as u64).to_le_bytes());
    for o in &opts.overrides {
        field(o.as_bytes());
    }
    field(source.as_bytes());
    h.finalize().to_hex().to_string()
}

/// The plan saved under `key`, if there is one and what it read is still so.
pub fn read(plan: &Path, key: &str) -> Option<Pipeline> {
    let bytes = std::fs::read(plan).ok()?;
    let body = bytes.strip_prefix(key.as_bytes())?.strip_prefix(b"\n")?;
    let pipeline: Pipeline = serde_json::from_slice(body).ok()?;
    let env_same = pipeline
        .read
        .env
        .iter()
        .all(|(k, v)| std::env::var(k).ok() == *v);
    let folders_same = pipeline
        .read
        .folders
        .iter()
        .all(|(dir, led)| pipeline.own.resolve_folder(dir) == *led);
    (env_same && folders_same).then_some(pipeline)
}

/// Saves `pipeline` as the plan for `key`; a failure only costs the next command a parse.
pub fn write(plan: &Path, key: &str, pipeline: &Pipeline) {
    let Some(dir) = plan.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let mut bytes = Vec::with_capacity(64 << 10);
    let _ = writeln!(bytes, "{key}");
    if serde_json::to_writer(&mut bytes, pipeline).is_ok() {
        let _ = crate::atomic::write(plan, &bytes, false);
    }
}

/// The repro binary: its version and the executable's size, time and inode, so that a rebuilt
/// or upgraded repro (whose kinds may check parameters differently) never reuses a plan.
fn binary_identity() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        use std::os::unix::fs::MetadataExt;
        let exe = std::env::current_exe().and_then(std::fs::metadata);
        match exe {
            Ok(m) => format!(
                "{} {} {}.{} {}",
                env!("CARGO_PKG_VERSION"),
                m.len(),
                m.mtime(),
                m.mtime_nsec(),
                m.ino()
            ),
            // Unknown binary: a key no later run shares, so never a stale plan.
            Err(_) => format!(
                "{} unknown {:?}",
                env!("CARGO_PKG_VERSION"),
                std::time::SystemTime::now()
            ),
        }
    })
}
