//! A first pass over a pipeline file's YAML events, before serde sees it: it bounds the work a
//! small file can cause (nesting, scalar size, alias expansion), refuses duplicate keys with
//! both lines, and records where every key and list item is, so that errors can name the line
//! of the very field that is wrong. serde keeps no spans, so this is the only place that knows.

use std::collections::HashMap;
use yaml_rust2::parser::{Event, Parser};

/// Nesting deeper than any pipeline needs; bounds the recursion of the deserialiser after us.
pub const MAX_DEPTH: usize = 64;
/// A command or value longer than this is not a pipeline setting.
pub const MAX_SCALAR_BYTES: usize = 1 << 20;
/// Nodes that aliases may add by expansion (a "billion laughs" file adds billions).
pub const MAX_ALIAS_NODES: u64 = 1_000_000;

/// Where each node of the file is, by path: `["stages", "train", "with", "lr"]`, or a list
/// index (`["stages", "a", "outs", "0"]`).
#[derive(Debug, Default)]
pub struct Spans {
    at: HashMap<String, (usize, usize)>,
}

/// An error at a place in the file: `line:column: message`.
#[derive(Debug)]
pub struct SpanError {
    pub line: usize,
    pub col: usize,
    pub msg: String,
}

impl std::fmt::Display for SpanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.col, self.msg)
    }
}

const SEP: char = '\u{1f}';

impl Spans {
    /// The line of `path`, or of its nearest ancestor that the file spells out.
    pub fn line(&self, path: &[&str]) -> Option<usize> {
        (1..=path.len()).rev().find_map(|n| {
            let key = path[..n].join(&SEP.to_string());
            self.at.get(&key).map(|&(line, _)| line)
        })
    }
}

enum Frame {
    /// A mapping: the key whose value comes next (None: a key comes next), and the keys seen.
    Map {
        key: Option<String>,
        seen: HashMap<String, usize>,
    },
    Seq {
        next: usize,
    },
}

/// Scans `source`; the spans of every key and list item, or the first problem found.
pub fn scan(source: &str) -> Result<Spans, SpanError> {
    let mut spans = Spans::default();
    let mut parser = Parser::new_from_str(source);
    // Open containers, each with the length `path` had before it was entered.
    let mut frames: Vec<(Frame, usize)> = Vec::new();
    // The path of the innermost open container, its segments joined by SEP.
    let mut path = String::new();
    // Anchored containers still open: (anchor id, node count when opened, nesting depth).
    let mut anchors_open: Vec<(usize, u64, usize)> = Vec::new();
    let mut anchor_size: HashMap<usize, u64> = HashMap::new();
    let (mut nodes, mut expanded, mut documents) = (0u64, 0u64, 0);
    loop {
        let (event, mark) = parser.next_token().map_err(|e| SpanError {
            line: e.marker().line(),
            col: e.marker().col() + 1,
            msg: match e.info() {
                "recursion limit exceeded" => format!("nested more than {MAX_DEPTH} levels deep"),
                info => info.to_string(),
            },
        })?;
        let err = |msg: String| SpanError {
            line: mark.line(),
            col: mark.col() + 1,
            msg,
        };
        let (anchor, opens) = match &event {
            Event::StreamEnd => break,
            Event::DocumentStart => {
                documents += 1;
                if documents > 1 {
                    return Err(err(
                        "a second YAML document (`---`); a pipeline file holds one".into(),
                    ));
                }
                continue;
            }
            Event::Scalar(text, _, anchor, _) => {
                if text.len() > MAX_SCALAR_BYTES {
                    return Err(err(format!(
                        "a value of {} bytes; values are limited to {} bytes",
                        text.len(),
                        MAX_SCALAR_BYTES
                    )));
                }
                (*anchor, false)
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => (*anchor, true),
            Event::Alias(id) => {
                let size = anchor_size.get(id).copied().unwrap_or(1);
                expanded += size;
                nodes += size;
                if expanded > MAX_ALIAS_NODES {
                    return Err(err(format!(
                        "aliases (`*name`) expand to more than {MAX_ALIAS_NODES} nodes"
                    )));
                }
                (0, false)
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((_, len)) = frames.pop() {
                    path.truncate(len);
                }
                if let Some(&(id, start, depth)) = anchors_open.last() {
                    if depth == frames.len() {
                        anchor_size.insert(id, nodes - start + 1);
                        anchors_open.pop();
                    }
                }
                value_done(&mut frames);
                continue;
            }
            _ => continue,
        };
        nodes += 1;

        // Where this node sits: a mapping key, a mapping value, a list item, or the root.
        let role = match frames.last_mut() {
            Some((Frame::Map { key: None, .. }, _)) => None,
            Some((Frame::Map { key: Some(k), .. }, _)) => Some(k.clone()),
            Some((Frame::Seq { next }, _)) => {
                *next += 1;
                Some((*next - 1).to_string())
            }
            None => Some(String::new()),
        };
        let here = |last: &str| {
            if frames.len() > 1 {
                format!("{path}{SEP}{last}")
            } else {
                last.to_string()
            }
        };
        let segment = match role {
            Some(segment) => {
                if matches!(frames.last(), Some((Frame::Seq { .. }, _))) {
                    let at = here(&segment);
                    spans.at.entry(at).or_insert((mark.line(), mark.col() + 1));
                }
                segment
            }
            None => {
                let Event::Scalar(text, ..) = &event else {
                    return Err(err(
                        "a mapping key must be plain text, not a list, mapping or alias".into(),
                    ));
                };
                let at = here(text);
                if let Some((Frame::Map { key, seen }, _)) = frames.last_mut() {
                    if let Some(first) = seen.insert(text.clone(), mark.line()) {
                        return Err(err(format!(
                            "duplicate key `{text}` (first given on line {first})"
                        )));
                    }
                    *key = Some(text.clone());
                }
                spans.at.insert(at, (mark.line(), mark.col() + 1));
                continue;
            }
        };
        if opens {
            if frames.len() >= MAX_DEPTH {
                return Err(err(format!("nested more than {MAX_DEPTH} levels deep")));
            }
            if anchor != 0 {
                anchors_open.push((anchor, nodes, frames.len()));
            }
            let frame = match event {
                Event::MappingStart(..) => Frame::Map {
                    key: None,
                    seen: HashMap::new(),
                },
                _ => Frame::Seq { next: 0 },
            };
            let len = path.len();
            if !frames.is_empty() {
                if frames.len() > 1 {
                    path.push(SEP);
                }
                path.push_str(&segment);
            }
            frames.push((frame, len));
        } else {
            if anchor != 0 {
                anchor_size.insert(anchor, 1);
            }
            value_done(&mut frames);
        }
    }
    Ok(spans)
}

/// A mapping value is complete: the mapping expects a key next.
fn value_done(frames: &mut [(Frame, usize)]) {
    if let Some((Frame::Map { key, .. }, _)) = frames.last_mut() {
        *key = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_name_keys_and_items() {
        let s = scan(
            "params: {a: 1}\nstages:\n  t:\n    outs:\n      - x\n      - y\n    with: {lr: 1}\n",
        )
        .unwrap();
        assert_eq!(s.line(&["stages", "t"]), Some(3));
        assert_eq!(s.line(&["stages", "t", "outs", "1"]), Some(6));
        assert_eq!(s.line(&["stages", "t", "with", "lr"]), Some(7));
        assert_eq!(s.line(&["stages", "t", "with", "nope"]), Some(7));
        assert_eq!(s.line(&["params", "a"]), Some(1));
    }

    #[test]
    fn duplicate_keys_name_both_lines() {
        for (src, line, first) in [
            ("stages:\n  a: {cmd: x}\n  a: {cmd: y}\n", 3, 2),
            ("stages:\n  a:\n    cmd: x\n    cmd: y\n", 4, 3),
            ("params: {s: 1, s: 2}\nstages: {}\n", 1, 1),
            ("stages: {}\nstages: {}\n", 2, 1),
        ] {
            let e = scan(src).unwrap_err();
            assert_eq!(e.line, line, "{src:?}: {e}");
            assert!(
                e.msg.contains(&format!("first given on line {first}")),
                "{e}"
            );
        }
        // The same key in two different mappings is fine.
        scan("stages:\n  a: {cmd: x}\n  b: {cmd: x}\n").unwrap();
    }

    #[test]
    fn bounds_fail_fast_with_a_line() {
        let deep = format!(
            "stages:\n  a: {{desc: {}{}}}\n",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let t = std::time::Instant::now();
        let e = scan(&deep).unwrap_err();
        assert!(e.msg.contains("nested more than"), "{e}");
        assert_eq!(e.line, 2);
        assert!(t.elapsed().as_secs() < 5, "hang detector");
        let deep_maps = format!("stages:\n  a:\n    cmd: {}\n", "{a: ".repeat(10_000));
        assert!(scan(&deep_maps).unwrap_err().msg.contains("nested"));

        let huge = format!(
            "stages:\n  a: {{cmd: \"{}\"}}\n",
            "x".repeat(MAX_SCALAR_BYTES + 1)
        );
        assert!(scan(&huge).unwrap_err().msg.contains("values are limited"));

        let mut bomb = String::from("params:\n  a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..9 {
            let refs = vec![format!("*a{}", i - 1); 10].join(", ");
            bomb.push_str(&format!("  a{i}: &a{i} [{refs}]\n"));
        }
        bomb.push_str("stages: {}\n");
        let e = scan(&bomb).unwrap_err();
        assert!(e.msg.contains("aliases"), "{e}");
        // A few aliases are fine.
        scan("params:\n  a: &x [1, 2]\n  b: *x\n  c: *x\nstages: {}\n").unwrap();
    }

    #[test]
    fn one_document_per_file() {
        let e = scan("stages: {a: {cmd: x}}\n---\nstages: {}\n").unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        scan("---\nstages: {a: {cmd: x}}\n").unwrap();
    }

    #[test]
    fn complex_keys_are_refused() {
        assert!(scan("? [a]\n: 1\n")
            .unwrap_err()
            .msg
            .contains("mapping key"));
    }
}
