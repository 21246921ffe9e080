//! What a run prints: one line per finished stage with its state and elapsed time, and on a
//! terminal a live view of running stages (with the progress a stage reports, such as a
//! training step and loss).
//!
//! A stage reports progress by writing `$REPRO_PROGRESS`: one line, either plain text or JSON
//! `{"pos": 120, "len": 2000, "msg": "loss 3.41"}`.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::HashMap;
use std::io::{IsTerminal, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub struct Reporter {
    live: Option<MultiProgress>,
    running: HashMap<String, (ProgressBar, PathBuf)>,
    width: usize,
}

impl Reporter {
    /// Live view when stderr is a terminal, plain lines otherwise.
    pub fn new(name_width: usize) -> Reporter {
        let live = std::io::stderr()
            .is_terminal()
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(8)));
        Reporter {
            live,
            running: HashMap::new(),
            width: name_width.clamp(8, 60),
        }
    }

    pub fn note(&self, msg: &str) {
        match &self.live {
            Some(m) => {
                let _ = m.println(msg);
            }
            None => {
                let _ = writeln!(std::io::stderr(), "{msg}");
            }
        }
    }

    pub fn started(&mut self, stage: &str, progress_file: PathBuf) {
        let Some(live) = &self.live else { return };
        let bar = live.add(ProgressBar::new_spinner());
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner:.cyan} {prefix:<w$} {elapsed:>5} {wide_msg}"
                    .replace("w$", &self.width.to_string())
                    .as_str(),
            )
            .expect("valid template"),
        );
        bar.set_prefix(stage.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        self.running.insert(stage.to_string(), (bar, progress_file));
    }

    /// Refreshes running stages from their progress files.
    pub fn tick(&mut self) {
        for (bar, file) in self.running.values() {
            if let Ok(text) = std::fs::read_to_string(file) {
                bar.set_message(progress_text(text.trim()));
            }
        }
    }

    /// The end of a failed stage's log, indented under its status line.
    pub fn log_tail(&self, log: &Path, lines: usize) {
        for line in log_tail(log, lines) {
            self.note(&format!("           │ {line}"));
        }
    }

    pub fn finished(&mut self, stage: &str, state: &str, elapsed: Option<Duration>, detail: &str) {
        if let Some((bar, _)) = self.running.remove(stage) {
            bar.finish_and_clear();
            if let Some(live) = &self.live {
                live.remove(&bar);
            }
        }
        let time = elapsed
            .map(|d| format!("{:.2}s", d.as_secs_f64()))
            .unwrap_or_default();
        let line = format!(
            "{state:>9}  {stage:<w$}  {time:>8}  {detail}",
            w = self.width
        );
        self.note(line.trim_end());
    }
}

/// The last `n` lines of a log, read from its end (a log may be gigabytes), each cut to a
/// screen's width, with control characters (terminal escapes) made visible.
pub fn log_tail(path: &Path, n: usize) -> Vec<String> {
    const WINDOW: u64 = 64 << 10;
    if n == 0 {
        return Vec::new();
    }
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(WINDOW);
    let mut bytes = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_err() || f.read_to_end(&mut bytes).is_err() {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let mut lines: Vec<&str> = text.lines().collect();
    if start > 0 && !lines.is_empty() {
        lines.remove(0); // cut mid-line
    }
    let from = lines.len().saturating_sub(n);
    lines[from..]
        .iter()
        .map(|l| {
            let clean = visible(l);
            match clean.char_indices().nth(200) {
                Some((cut, _)) => format!("{}…", &clean[..cut]),
                None => clean,
            }
        })
        .collect()
}

/// A line of text from a stage, safe to print: control characters (terminal escapes) but tabs
/// shown as `�`.
pub fn visible(line: &str) -> String {
    line.chars()
        .map(|c| {
            if c.is_control() && c != '\t' {
                '�'
            } else {
                c
            }
        })
        .collect()
}

fn progress_text(raw: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(raw) {
        Ok(v) if v.is_object() => {
            let msg = v.get("msg").and_then(|m| m.as_str()).unwrap_or("");
            match (
                v.get("pos").and_then(|p| p.as_u64()),
                v.get("len").and_then(|l| l.as_u64()),
            ) {
                (Some(p), Some(l)) if l > 0 => {
                    let filled = (20 * p.min(l) / l) as usize;
                    format!(
                        "[{}{}] {p}/{l} {msg}",
                        "#".repeat(filled),
                        "-".repeat(20 - filled)
                    )
                }
                _ => msg.to_string(),
            }
        }
        _ => raw.to_string(),
    }
}
