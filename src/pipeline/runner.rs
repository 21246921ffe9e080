//! The pipeline's `runner:` section: where its stages run, and the settings a Slurm run submits
//! them with. Checked at load like the rest of the file, so that a bad time limit or a flag
//! that would break how repro follows its jobs is an error at its line, not a failed `sbatch`
//! per stage.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where stages run (also `repro run --runner`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RunnerKind {
    /// Processes on this machine.
    #[default]
    Local,
    /// One Slurm batch job per stage.
    Slurm,
}

/// The `runner:` section as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunnerSpec {
    #[serde(default)]
    pub kind: RunnerKind,
    pub partition: Option<String>,
    pub account: Option<String>,
    /// Time limit of every job, unless a stage's `resources: {time: …}` says otherwise.
    pub time: Option<Value>,
    /// Further `sbatch` flags, passed as given.
    #[serde(default)]
    pub sbatch: Vec<String>,
}

/// Cluster settings, from the `runner:` section and the command line.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SlurmSettings {
    pub partition: Option<String>,
    pub account: Option<String>,
    /// Time limit of every job in minutes.
    pub time: Option<u64>,
    pub extra: Vec<String>,
}

/// The checked `runner:` section.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunnerSettings {
    pub kind: RunnerKind,
    pub slurm: SlurmSettings,
}

impl RunnerSpec {
    /// Checks the section; an error names the field at fault (`time`, `sbatch.2`, …) first.
    pub fn check(self) -> Result<RunnerSettings, (Vec<String>, String)> {
        let at = |path: &[&str], msg: String| (path.iter().map(|s| s.to_string()).collect(), msg);
        for (name, value) in [("partition", &self.partition), ("account", &self.account)] {
            if let Some(v) = value {
                if v.trim().is_empty() || v.chars().any(|c| c.is_control() || c.is_whitespace()) {
                    let msg = format!("`{}` is not a Slurm {name} name", v.escape_debug());
                    return Err(at(&[name], msg));
                }
            }
        }
        let time = match &self.time {
            None => None,
            Some(v) => Some(minutes(v).map_err(|e| at(&["time"], e))?),
        };
        for (i, flag) in self.sbatch.iter().enumerate() {
            check_sbatch_flag(flag).map_err(|e| at(&["sbatch", &i.to_string()], e))?;
        }
        Ok(RunnerSettings {
            kind: self.kind,
            slurm: SlurmSettings {
                partition: self.partition,
                account: self.account,
                time,
                extra: self.sbatch,
            },
        })
    }
}

/// A time limit in whole minutes (rounded up) from a number of minutes, as Slurm reads one,
/// or a string: Slurm's forms (`M`, `M:S`, `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S`) or a number
/// with a unit (`90s`, `30m`, `2h`, `1d`).
pub fn minutes(value: &Value) -> Result<u64, String> {
    let text = match value {
        Value::String(s) => s.trim().to_string(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    };
    let bad = || {
        format!(
            "`{}` is not a time limit: write minutes (90), a unit (90s, 30m, 2h, 1d) or Slurm's \
             D-HH:MM:SS",
            text.escape_debug()
        )
    };
    let seconds = seconds(&text).ok_or_else(bad)?;
    if seconds == 0 {
        return Err(format!("a time limit of `{text}` lets nothing run"));
    }
    const YEAR: u64 = 366 * 24 * 3600;
    if seconds > YEAR {
        return Err(format!("a time limit of `{text}` is over a year"));
    }
    Ok(seconds.div_ceil(60))
}

fn seconds(text: &str) -> Option<u64> {
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    if let Some(split) = text.find(|c: char| c.is_ascii_alphabetic()) {
        let (n, unit) = text.split_at(split);
        let scale = match unit {
            "s" => 1,
            "m" | "min" => 60,
            "h" => 3600,
            "d" => 86400,
            _ => return None,
        };
        return num(n.trim())?.checked_mul(scale);
    }
    let (days, rest) = match text.split_once('-') {
        Some((d, rest)) => (num(d)?, Some(rest)),
        None => (0, None),
    };
    let parts: Vec<u64> = rest
        .unwrap_or(text)
        .split(':')
        .map(num)
        .collect::<Option<_>>()?;
    // Without days: M, M:S, H:M:S; with them: D-H, D-H:M, D-H:M:S.
    let (h, m, s) = match (rest.is_some(), parts.as_slice()) {
        (false, [m]) => (0, *m, 0),
        (false, [m, s]) => (0, *m, *s),
        (false, [h, m, s]) | (true, [h, m, s]) => (*h, *m, *s),
        (true, [h]) => (*h, 0, 0),
        (true, [h, m]) => (*h, *m, 0),
        _ => return None,
    };
    days.checked_mul(24)?
        .checked_add(h)?
        .checked_mul(60)?
        .checked_add(m)?
        .checked_mul(60)?
        .checked_add(s)
}

/// Options repro sets on every job itself, or whose change would break how it follows them:
/// (long name, short letter).
const RESERVED: [(&str, Option<char>); 10] = [
    ("parsable", None),
    ("job-name", Some('J')),
    ("output", Some('o')),
    ("error", Some('e')),
    ("input", Some('i')),
    ("chdir", Some('D')),
    ("wrap", None),
    ("array", Some('a')),
    ("wait", Some('W')),
    ("test-only", None),
];

/// Refuses an sbatch flag that is not one, or that would change what repro relies on: the job
/// name it finds its jobs by, the log path (a log written into the store would corrupt it),
/// the folder, one job per stage, an `sbatch` that returns at once. Long options are refused
/// by any prefix, as `sbatch` accepts abbreviations.
pub fn check_sbatch_flag(flag: &str) -> Result<(), String> {
    let shown = flag.escape_debug();
    if flag.chars().any(char::is_control) {
        return Err(format!("sbatch flag `{shown}` holds a control character"));
    }
    let reserved = |what: &str| {
        Err(format!(
            "sbatch flag `{shown}` would set {what}, which repro sets itself for every job"
        ))
    };
    if let Some(long) = flag.strip_prefix("--") {
        let name = long.split('=').next().unwrap_or_default();
        if name.is_empty() {
            return Err(format!("`{shown}` is not an sbatch flag"));
        }
        if let Some((full, _)) = RESERVED.iter().find(|(full, _)| full.starts_with(name)) {
            return reserved(&format!("--{full}"));
        }
        return Ok(());
    }
    match flag.strip_prefix('-').and_then(|s| s.chars().next()) {
        None => Err(format!(
            "`{shown}` is not an sbatch flag (flags start with -)"
        )),
        Some(c) => match RESERVED.iter().find(|(_, short)| *short == Some(c)) {
            Some((full, _)) => reserved(&format!("--{full}")),
            None => Ok(()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn time_limits_read_in_every_slurm_form_and_with_units() {
        for (text, want) in [
            (json!(90), 90),
            (json!("90"), 90),
            (json!("5:30"), 6),
            (json!("1:00:00"), 60),
            (json!("2-0"), 2 * 1440),
            (json!("1-2:03"), 1440 + 123),
            (json!("1-0:0:1"), 1441),
            (json!("45s"), 1),
            (json!("30m"), 30),
            (json!("2h"), 120),
            (json!("1d"), 1440),
        ] {
            assert_eq!(minutes(&text), Ok(want), "{text}");
        }
        for bad in [
            json!("0"),
            json!("0:00"),
            json!(""),
            json!("1:2:3:4"),
            json!("-5"),
            json!("1.5h"),
            json!("2 weeks"),
            json!("1-"),
            json!("x:10"),
            json!("400d"),
            json!("99999999999999999999"),
            json!(-3),
            json!(true),
            json!([1]),
        ] {
            assert!(minutes(&bad).is_err(), "{bad} passed");
        }
    }

    #[test]
    fn flags_that_would_break_how_repro_follows_its_jobs_are_refused() {
        for ok in [
            "--qos=short",
            "--constraint=a100",
            "-N1",
            "--exclusive",
            "--gres=gpu:2",
        ] {
            assert_eq!(check_sbatch_flag(ok), Ok(()), "{ok}");
        }
        for bad in [
            "--output=cache/objects/x",
            "--outp=x",
            "-ocache/x",
            "-o",
            "--job-name=other",
            "--job=x",
            "-Jx",
            "--error=/tmp/e",
            "--chdir=/",
            "-D/",
            "--wrap=rm -rf .",
            "--array=1-100",
            "--wait",
            "--parsable",
            "--test-only",
            "--",
            "--=x",
            "qos=short",
            "",
            "-",
            "--qos=a\nb",
        ] {
            assert!(check_sbatch_flag(bad).is_err(), "{bad:?} passed");
        }
    }

    #[test]
    fn a_runner_section_is_checked_field_by_field() {
        let spec = |v: Value| serde_json::from_value::<RunnerSpec>(v).map_err(|e| e.to_string());
        let good = spec(json!({"kind": "slurm", "partition": "gpu", "time": "2h",
                               "sbatch": ["--qos=short"]}))
        .unwrap()
        .check()
        .unwrap();
        assert_eq!(good.kind, RunnerKind::Slurm);
        assert_eq!(good.slurm.time, Some(120));
        assert_eq!(good.slurm.extra, ["--qos=short"]);
        assert!(spec(json!({"kind": "pbs"})).is_err());
        assert!(spec(json!({"partiton": "gpu"})).is_err(), "a misspelt key");
        for (bad, field) in [
            (json!({"time": "soon"}), "time"),
            (json!({"partition": "a b"}), "partition"),
            (json!({"account": ""}), "account"),
            (json!({"sbatch": ["--qos=x", "--output=x"]}), "sbatch.1"),
        ] {
            let (at, _) = spec(bad.clone()).unwrap().check().unwrap_err();
            assert_eq!(at.join("."), field, "{bad}");
        }
    }
}
