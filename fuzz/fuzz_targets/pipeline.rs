//! Fuzz the pipeline loader: YAML parse, templates, matrix expansion, the DAG and its dot and
//! Mermaid output. Crashes are panics, and also (asserted here) an error line that names no
//! `repro.yaml:<line>` or dot/Mermaid output that is not well formed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use repro::pipeline::Pipeline;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A workspace made once per process: a few files the seeds name, and symlinks inside and out.
fn workspace() -> &'static Path {
    static WS: OnceLock<PathBuf> = OnceLock::new();
    WS.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("repro-fuzz-ws-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for f in [
            "exists.txt",
            "a.txt",
            "data/raw/x.txt",
            "pipelines/scripts/zipf.awk",
            "pipelines/scripts/stats.awk",
            "scripts/prepare.sh",
            "cache/objects/keep",
            ".repro/state/keep",
            "repro.yaml",
        ] {
            let p = root.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, "x").unwrap();
        }
        let _ = std::os::unix::fs::symlink(std::env::temp_dir(), root.join("outside"));
        let _ = std::os::unix::fs::symlink(root.join("data"), root.join("inside"));
        root
    })
}

/// Every line of an error names `repro.yaml:<n>` with n a line of the file (or one past it).
fn check_error(err: &str, source: &str) {
    let last = source.lines().count().max(1) + 1;
    for line in err.lines() {
        let located = line.match_indices("repro.yaml:").any(|(i, m)| {
            let digits: String = line[i + m.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits
                .parse::<usize>()
                .is_ok_and(|n| (1..=last).contains(&n))
        });
        assert!(located, "error line names no line of repro.yaml: {line:?}");
    }
}

/// dot: every statement is `"name";` or `"a" -> "b";` with balanced, escaped strings.
fn check_dot(dot: &str) {
    for line in dot.lines().skip(3) {
        let t = line.trim();
        if t == "}" {
            continue;
        }
        let mut quotes = 0;
        let mut escaped = false;
        for c in t.chars() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => quotes += 1,
                _ => escaped = false,
            }
        }
        assert!(
            quotes == 2 || quotes == 4,
            "dot statement with unbalanced quotes: {line:?}"
        );
    }
}

/// Mermaid: one node or edge per line, labels without `"` or line breaks.
fn check_mermaid(m: &str) {
    for line in m.lines().skip(1) {
        let t = line.trim();
        if let Some(open) = t.find("[\"") {
            let label = t[open + 2..].strip_suffix("\"]");
            assert!(
                label.is_some_and(|l| !l.contains('"')),
                "mermaid node with a broken label: {line:?}"
            );
        } else {
            assert!(
                t.contains(" --> "),
                "mermaid line is neither node nor edge: {line:?}"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    let kinds = repro::stages::Registry::default();
    match Pipeline::parse(source, Path::new("repro.yaml"), workspace(), &Default::default(), &kinds) {
        Ok(p) => {
            check_dot(&p.dag.to_dot(&p.stages));
            check_mermaid(&p.dag.to_mermaid(&p.stages));
            // `repro dag`'s text form (`cli::inspect::dag_text`) is private to the binary's
            // cli module, so it is not called here.
        }
        Err(e) => check_error(&format!("{e:#}"), source),
    }
});
