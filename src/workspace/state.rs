//! A pipeline's state: the record of the last run of each of its stages, as an append-only log.
//!
//! `.repro/state/PIPELINE.jsonl` is a header line, then one record (JSON) per line; the last
//! line of a stage is its state. Finishing a stage appends one line (one `write`), so it costs
//! the same at 100 stages or 100,000, and a run that did nothing writes nothing. The log is
//! rewritten with one line per stage (through a temp file, fsynced, renamed) once it holds
//! more than twice as many lines as stages. A crash can leave only a torn last line, which is
//! ignored and cut off before the next append; records are in the store too (fsynced), so a
//! line lost in a power cut is matched by the run cache.
//!
//! Reading materialises only what deciding needs (each stage's key and outs); the rest of a
//! record is parsed when asked for.

use crate::cache::{OutRecord, Record};
use serde::Deserialize;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The first line of every state log.
const HEADER: &str = "{\"repro_state\":1}";
/// Lines past this many more than twice the stages make the log worth compacting.
const SLACK_LINES: usize = 1000;

/// The last record of each stage of one pipeline in this workspace.
#[derive(Debug, Default)]
pub struct State {
    /// The log's text; entries point into it.
    text: String,
    entries: HashMap<String, Entry>,
    /// Record lines in the log (the stages, and older lines of the same stages).
    lines: usize,
}

/// What deciding a stage needs of its last record.
#[derive(Debug)]
pub struct Entry {
    pub key: String,
    pub outs: Vec<OutId>,
    line: Range<usize>,
}

/// An out as a record names it: its path and its content hash.
#[derive(Debug, Clone, Deserialize)]
pub struct OutId {
    pub path: String,
    pub hash: String,
}

impl From<&OutRecord> for OutId {
    fn from(o: &OutRecord) -> OutId {
        OutId {
            path: o.path.clone(),
            hash: o.hash.clone(),
        }
    }
}

/// The part of a record line read up front.
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    stage: std::borrow::Cow<'a, str>,
    key: String,
    outs: Vec<OutId>,
}

impl State {
    pub fn get(&self, stage: &str) -> Option<&Entry> {
        self.entries.get(stage)
    }

    /// The whole last record of `stage`.
    pub fn record(&self, stage: &str) -> Option<Record> {
        let e = self.entries.get(stage)?;
        serde_json::from_str(&self.text[e.line.clone()]).ok()
    }

    /// Every stage's last key.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.values().map(|e| e.key.as_str())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A state holding `records` (later ones win), as the log would after appending them.
    pub fn from_records<'a>(records: impl IntoIterator<Item = &'a Record>) -> State {
        let mut text = format!("{HEADER}\n");
        for r in records {
            text += &record_line(r);
        }
        parse(text).expect("lines this module wrote")
    }

    /// Reads a log; a torn last line (a crash mid-append) is left out. Any other line that is
    /// not a record makes the whole file unusable: it has been damaged, not interrupted.
    pub fn read(path: &Path) -> Result<Option<State>, String> {
        let text = match std::fs::read(path) {
            Ok(bytes) => String::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("unreadable ({e})")),
        };
        parse(text).map(Some)
    }

    /// A state file of the layout before the log (one JSON object of every record).
    pub fn read_legacy(path: &Path) -> Result<Option<State>, String> {
        #[derive(Deserialize)]
        struct Legacy {
            stages: std::collections::BTreeMap<String, Record>,
        }
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice::<Legacy>(&bytes)
                .map(|l| Some(State::from_records(l.stages.values())))
                .map_err(|e| crate::cache::store::json_problem(&e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("unreadable ({e})")),
        }
    }

    /// The log as it would be compacted: the header and each stage's last line, in log order.
    fn compacted(&self) -> String {
        let mut lines: Vec<&Range<usize>> = self.entries.values().map(|e| &e.line).collect();
        lines.sort_unstable_by_key(|r| r.start);
        let mut out = String::with_capacity(self.text.len());
        out += HEADER;
        out.push('\n');
        for r in lines {
            out += &self.text[r.clone()];
            out.push('\n');
        }
        out
    }
}

fn record_line(r: &Record) -> String {
    let mut line = serde_json::to_string(r).expect("a record serialises");
    line.push('\n');
    line
}

fn parse(text: String) -> Result<State, String> {
    let mut lines = text.split_inclusive('\n');
    let first = lines.next().unwrap_or_default();
    if first.trim_end() != HEADER {
        return Err(if HEADER.starts_with(first.trim()) {
            "not valid JSON (truncated?)".into()
        } else {
            format!("not a repro state log (line 1 is not `{HEADER}`)")
        });
    }
    let mut entries = HashMap::new();
    let mut count = 0;
    let mut at = HEADER.len() + 1;
    for (n, line) in lines.enumerate() {
        let start = at;
        at += line.len();
        let Some(body) = line.strip_suffix('\n') else {
            break; // torn by a crash mid-append
        };
        let head: Head = serde_json::from_str(body).map_err(|e| {
            format!(
                "{} on line {}",
                crate::cache::store::json_problem(&e),
                n + 2
            )
        })?;
        count += 1;
        entries.insert(
            head.stage.into_owned(),
            Entry {
                key: head.key,
                outs: head.outs,
                line: start..start + body.len(),
            },
        );
    }
    Ok(State {
        text,
        entries,
        lines: count,
    })
}

/// The open log of a run: finished stages are appended as they finish.
pub struct StateLog {
    path: PathBuf,
    file: File,
    /// Lines in the log and distinct stages among them, to know when to compact.
    lines: usize,
    stages: usize,
    appended: bool,
}

impl StateLog {
    /// Opens `path` for appending to `state` (what it holds): writes it whole first if it is
    /// not there as a log yet (a new pipeline, a legacy file, a file set aside), and cuts off
    /// a torn last line.
    pub fn open(path: &Path, state: &State, fresh: bool) -> std::io::Result<StateLog> {
        if fresh {
            crate::atomic::write(path, state.compacted().as_bytes(), true)?;
        }
        // What a compaction cut short left (the log itself is whole either way).
        let _ = std::fs::remove_file(compacting(path));
        let mut file = OpenOptions::new().read(true).append(true).open(path)?;
        let whole = whole_lines(&mut file)?;
        if whole < file.metadata()?.len() {
            file.set_len(whole)?;
        }
        Ok(StateLog {
            path: path.to_path_buf(),
            file,
            lines: state.lines,
            stages: state.len(),
            appended: false,
        })
    }

    /// Records how `stage` finished (`new`: a stage the log did not hold before). A restored
    /// record may come from another stage of the same key: the line names this one.
    pub fn append(&mut self, stage: &str, record: &Record, new: bool) -> std::io::Result<()> {
        let line = if record.stage == stage {
            record_line(record)
        } else {
            record_line(&Record {
                stage: stage.to_string(),
                ..record.clone()
            })
        };
        crate::exec::failpoint_torn("state-append", &mut self.file, line.as_bytes());
        self.file.write_all(line.as_bytes())?;
        self.lines += 1;
        self.stages += usize::from(new);
        self.appended = true;
        Ok(())
    }

    /// Makes the appended lines durable, and compacts the log if it has grown past twice its
    /// stages.
    pub fn close(self) -> std::io::Result<()> {
        if !self.appended {
            return Ok(());
        }
        self.file.sync_data()?;
        if self.lines > 2 * self.stages + SLACK_LINES {
            let state = State::read(&self.path)
                .map_err(std::io::Error::other)?
                .unwrap_or_default();
            let text = state.compacted();
            crate::atomic::write_via(&compacting(&self.path), &self.path, true, |f| {
                f.write_all(text.as_bytes())?;
                crate::exec::failpoint("state-compacting");
                Ok(())
            })?;
        }
        Ok(())
    }
}

/// The length of `file` up to the end of its last whole line (read from the end backwards).
fn whole_lines(file: &mut File) -> std::io::Result<u64> {
    let mut end = file.metadata()?.len();
    let mut chunk = vec![0u8; 64 << 10];
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let buf = &mut chunk[..(end - start) as usize];
        file.seek(std::io::SeekFrom::Start(start))?;
        file.read_exact(buf)?;
        if let Some(at) = buf.iter().rposition(|&b| b == b'\n') {
            return Ok(start + at as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// The temp file a compaction writes before renaming it over the log.
fn compacting(log: &Path) -> PathBuf {
    log.with_extension("jsonl.compacting")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::store::OutKind;

    fn record(stage: &str, key: &str) -> Record {
        Record {
            key: key.into(),
            stage: stage.into(),
            parts: [("cmd".to_string(), format!("make {stage}"))].into(),
            outs: vec![OutRecord {
                path: format!("{stage}.txt"),
                hash: format!("h-{key}"),
                kind: OutKind::File {
                    size: 1,
                    exec: false,
                },
            }],
            metrics: Some(serde_json::json!({"loss": 1.5})),
            created: 7,
            duration_s: 0.5,
        }
    }

    #[test]
    fn the_last_line_of_a_stage_wins_and_a_torn_tail_is_cut_off_before_appending() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        let (a1, b1, a2) = (record("a", "1"), record("b", "1"), record("a", "2"));
        let mut log = StateLog::open(&path, &State::default(), true).unwrap();
        log.append("a", &a1, true).unwrap();
        log.append("b", &b1, true).unwrap();
        log.append("a", &a2, false).unwrap();
        log.close().unwrap();
        let state = State::read(&path).unwrap().unwrap();
        assert_eq!(state.len(), 2);
        assert_eq!(state.get("a").unwrap().key, "2");
        assert_eq!(state.get("a").unwrap().outs[0].hash, "h-2");
        let full = state.record("a").unwrap();
        assert_eq!(full.parts["cmd"], "make a");
        assert_eq!(full.metrics, a2.metrics);

        // Every cut of the log at a byte is a valid state holding the whole lines before it.
        let bytes = std::fs::read(&path).unwrap();
        let whole_lines = |cut: usize| bytes[..cut].iter().filter(|&&b| b == b'\n').count();
        for cut in HEADER.len() + 1..bytes.len() {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let state = State::read(&path).unwrap().unwrap();
            assert_eq!(state.lines, whole_lines(cut) - 1, "cut at {cut}");
            // Appending after the torn tail gives a log whose every line is whole.
            let mut log = StateLog::open(&path, &state, false).unwrap();
            log.append("c", &record("c", "9"), true).unwrap();
            log.close().unwrap();
            let after = State::read(&path).unwrap().unwrap();
            assert_eq!(after.get("c").unwrap().key, "9", "cut at {cut}");
            assert_eq!(after.lines, state.lines + 1, "cut at {cut}");
        }
    }

    #[test]
    fn damage_other_than_a_torn_tail_is_reported_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        let good = State::from_records([&record("a", "1"), &record("b", "1")]).compacted();
        for (text, says) in [
            (String::new(), "truncated"),
            ("{\"repro".to_string(), "truncated"),
            ("x".to_string(), "line 1 is not"),
            ("{}\n".to_string(), "line 1 is not"),
            (good.replacen("\"key\"", "\"kex\"", 1), "line 2"),
            (good.replacen("{\"key\"", "[\"key\"", 2), "line 2"),
            (good.replacen('\n', "\n\n", 2), "on line 2"),
        ] {
            std::fs::write(&path, &text).unwrap();
            let err = State::read(&path).unwrap_err();
            assert!(err.contains(says), "{text:?}: {err}");
        }
    }

    #[test]
    fn a_log_past_twice_its_stages_is_compacted_to_one_line_each() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        let mut log = StateLog::open(&path, &State::default(), true).unwrap();
        let rounds = SLACK_LINES / 3 + 10;
        for round in 0..rounds {
            for s in ["a", "b", "c"] {
                log.append(s, &record(s, &round.to_string()), round == 0)
                    .unwrap();
            }
        }
        log.close().unwrap();
        let state = State::read(&path).unwrap().unwrap();
        assert_eq!(state.lines, 3, "compacted");
        assert_eq!(state.get("b").unwrap().key, (rounds - 1).to_string());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }
}
