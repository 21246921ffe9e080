//! A seeded mutation fuzzer for the pipeline loader, small enough to run in the normal suite.
//!
//! Seeds are the shipped `pipelines/*.yaml` and hand-written snippets; each mutant is parsed
//! in-process (through `load` below, the one place that knows the loader's signature) and must
//!
//! 1. not panic,
//! 2. on error, name a line on every line of the message (`repro.yaml:<n>`, 1 ≤ n ≤ lines + 1),
//! 3. on success, give `--dot` and `--mermaid` output that is well formed,
//! 4. finish: a watchdog aborts with the mutant if one parse takes very long, and the slowest
//!    parse is checked against a generous bound (a hang detector, not a speed test).
//!
//! `REPRO_FUZZ_ITERS=200000` runs more mutants, `REPRO_FUZZ_SEED=n` picks another master seed,
//! and `REPRO_FUZZ_CASE=0x…` replays the one mutant a failure report names.
//! Every failure is collected and reported (one example per kind), not just the first.

use repro::pipeline::Pipeline;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The loader under test. If its signature changes, this is the only place to adapt.
fn load(source: &str, workspace: &Path, overrides: &[String]) -> anyhow::Result<Pipeline> {
    Pipeline::parse(
        source,
        Path::new("repro.yaml"),
        workspace,
        &repro::pipeline::LoadOptions {
            overrides: overrides.to_vec(),
            ..Default::default()
        },
        &repro::stages::Registry::default(),
    )
}

const DEFAULT_ITERS: u64 = 3000;
const DEFAULT_SEED: u64 = 0x5eed_2024;
/// Mutants stay below this size.
const MAX_LEN: usize = 64 * 1024;
/// One parse longer than this is reported (hang detector only).
const SLOW: Duration = Duration::from_secs(10);
/// One parse longer than this aborts the whole test, naming the mutant.
const HUNG: Duration = Duration::from_secs(60);
/// The generator keeps matrices below this many expansions per stage.
const MAX_EXPANSIONS: usize = 5000;

// ---------------------------------------------------------------------------------------------
// Randomness: splitmix64, so a case seed alone reproduces a mutant.

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T: ?Sized>(&mut self, items: &[&'a T]) -> &'a T {
        items[self.below(items.len())]
    }
}

fn case_seed(master: u64, i: u64) -> u64 {
    Rng(master ^ i.wrapping_mul(0xd134_2543_de82_ef95)).next()
}

// ---------------------------------------------------------------------------------------------
// Seeds.

const SNIPPETS: &[&str] = &[
    "stages:\n  a: {cmd: 'true'}\n",
    "stages:\n  a:\n    cmd: echo hi > a.txt\n    outs: [a.txt]\n  b:\n    cmd: cat a.txt > b.txt\n    deps: [a.txt]\n    outs: [b.txt]\n",
    "params:\n  seed: 1\n  xs: [1, 2, 3]\n  nested: {a: {b: [x, y]}}\nstages:\n  gen:\n    matrix: {x: \"${params.xs}\", y: [p, q]}\n    cmd: echo ${matrix.x} ${matrix.y} ${params.seed} ${params.nested.a.b.1} > out-${matrix.x}-${matrix.y}.txt\n    outs: [\"out-${matrix.x}-${matrix.y}.txt\"]\n  use:\n    needs: [gen]\n    cmd: cat out-*.txt\n",
    "stages:\n  a: {cmd: 'true', deps: [c.txt], outs: [a.txt]}\n  b: {cmd: 'true', deps: [a.txt], outs: [b.txt]}\n  c: {cmd: 'true', deps: [b.txt], outs: [c.txt]}\n",
    "stages:\n  a: {cmd: 'true', needs: [a]}\n",
    "stages:\n  a: {cmd: 'true', outs: [o.txt]}\n  b: {cmd: 'true', outs: [./o.txt]}\n",
    "stages:\n  a: {cmd: 'true', outs: [../x]}\n  b: {cmd: 'true', outs: [/tmp/x]}\n  c: {cmd: 'true', outs: [outside/x]}\n",
    "stages:\n  a: {cmd: 'true', deps: [nowhere.txt]}\n",
    "params: {seed: 1}\nstages:\n  a: {cmd: 'echo ${params.sed}'}\n",
    "params: {xs: []}\nstages:\n  a:\n    matrix: {x: '${params.xs}'}\n    cmd: 'true'\n",
    "stages:\n  a:\n    cmd: 'true'\n    depz: [x]\n",
    "stages:\n  a:\n    uses: trian\n",
    "stages:\n  t:\n    uses: table\n    needs: [a]\n    with: {columns: [x, loss], sort: [x]}\n    outs: [results/t.csv]\n  a:\n    matrix: {x: [1, 2]}\n    cmd: echo '{\"loss\": ${matrix.x}}' > m-${matrix.x}.json\n    metrics: m-${matrix.x}.json\n",
    "stages:\n  p:\n    uses: plot\n    with: {input: exists.txt, x: a, y: b, series: c, logx: true, title: \"t\"}\n    outs: [p.svg]\n",
    "stages:\n  a:\n    cmd: 'true'\n    env: {A: 1, B: \"${params.x}\"}\nparams: {x: y}\n",
    "stages:\n  a:\n    cmd: 'true'\n    env: [HOME, PATH]\n    resources: {gpu: 1, memory: 8G, cores: \"2\"}\n",
    "stages: {a: {cmd: \"echo $${literal} ${HOME}\"}, b: {cmd: x, needs: [a]}}\n",
    "{stages: {a: {cmd: x}}}\n",
    "stages:\n  \"quoted name\": {cmd: x}\n  'single': {cmd: x}\n",
    "stages:\n  é: {cmd: x}\n  名前: {cmd: x}\n  a.b-c_d: {cmd: x}\n",
    "stages:\n  a:\n    matrix: {s: [\"a b\", \"c\\\"d\", \"é\", \"x/y\", \"..\"]}\n    cmd: echo ${matrix.s}\n",
    "stages:\n  a:\n    cmd: |\n      echo one\n      echo two ${params.x}\n    outs: [a]\nparams: {x: 1}\n",
    "stages:\n  a:\n    cmd: >\n      folded\n      text\n",
    "x: &a [1, 2]\nstages:\n  a: {cmd: x}\n",
    "params:\n  a: &x {k: 1}\n  b: *x\nstages:\n  s: {cmd: \"${params.b.k}\"}\n",
    "params: {a: 1, a: 2}\nstages:\n  a: {cmd: x}\n  a: {cmd: y}\n",
    "stages:\n  a: {cmd: x}\n",
    "stages: {}\n",
    "stages:\n",
    "params: {}\n",
    "",
    "---\nstages:\n  a: {cmd: x}\n---\nstages:\n  b: {cmd: y}\n",
    "stages:\n  a: {cmd: x, outs: [cache/x]}\n  b: {cmd: x, outs: [.repro/state]}\n  c: {cmd: x, outs: [repro.yaml]}\n",
    "stages:\n  a: {cmd: x, outs: [d]}\n  b: {cmd: x, outs: [d/e]}\n",
    "stages:\n  a: {cmd: x, deps: [o], outs: [o]}\n",
    "stages:\n  a:\n    matrix: {}\n    cmd: x\n",
    "stages:\n  a:\n    matrix: {x: [[1], {a: 1}, null]}\n    cmd: x\n",
    "stages:\n  a:\n    cmd: ${matrix.x}\n",
    "stages:\n  a:\n    cmd: \"${params\"\n",
    "stages:\n  a:\n    cmd: \"${}\"\n    outs: [\"${params.}\"]\n",
    "stages:\n  a:\n    uses: table\n    cmd: x\n  b:\n    cmd: x\n    with: {a: 1}\n  c: {}\n",
    "stages:\n  a:\n    cmd: !!binary aGVsbG8=\n",
    "stages:\n  ? a\n  : {cmd: x}\n",
    "stages:\n\ta: {cmd: x}\n",
    "stages:\n  a: {cmd: x}\n  # comment\n  b: {cmd: y, needs: [a]} # trailing\n",
    "stages:\n  a: {cmd: x, resources: {memory: 1.5T, gpu: -1}}\n",
    "stages:\n  a: {cmd: x, resources: {memory: lots}}\n",
    "stages:\n  a: {cmd: x, metrics: m.json, outs: [m.json]}\n",
    "stages:\n  a: {cmd: x, desc: \"line one\\nline two\"}\n",
];

fn seeds() -> Vec<String> {
    let mut seeds: Vec<String> = SNIPPETS.iter().map(|s| s.to_string()).collect();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("pipelines/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no pipelines/*.yaml");
    for f in files {
        seeds.push(std::fs::read_to_string(f).unwrap());
    }
    seeds
}

/// A workspace with a few files (the deps the shipped pipelines name among them), a folder,
/// and symlinks inside and outside.
fn workspace() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for f in [
        "exists.txt",
        "a.txt",
        "data/raw/x.txt",
        "pipelines/scripts/zipf.awk",
        "pipelines/scripts/stats.awk",
        "scripts/prepare.sh",
        "cache/objects/keep",
        ".repro/state/keep",
    ] {
        let p = root.join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, "x").unwrap();
    }
    std::fs::write(root.join("repro.yaml"), SNIPPETS[0]).unwrap();
    std::os::unix::fs::symlink(std::env::temp_dir(), root.join("outside")).unwrap();
    std::os::unix::fs::symlink(root.join("data"), root.join("inside")).unwrap();
    std::os::unix::fs::symlink(root.join("cache"), root.join("cachelink")).unwrap();
    dir
}

// ---------------------------------------------------------------------------------------------
// Mutations.

const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ": ",
    "- ",
    "&a ",
    "*a",
    "!!binary ",
    "? ",
    "|",
    ">",
    "\t",
    "#",
    ",",
    "'",
    "\"",
    "\\",
    "\n",
    "  ",
    "    ",
    "---\n",
    "...\n",
    "%YAML 1.1\n",
    "!!str ",
    "!!map ",
    "!tag ",
    "~",
    "null",
    "true",
    "0x1F",
    ".inf",
    "-.nan",
    "1e999",
    "18446744073709551616",
    "-1",
    "<<: ",
    "&b [*a, *a, *a]",
    "@",
    "=",
    ",",
    "\r\n",
    "\u{feff}",
];
const TEMPLATES: &[&str] = &[
    "${params.",
    "${params.x}",
    "${params.seed}",
    "${params.xs}",
    "${params.nested.a}",
    "${params.nested.a.b.0}",
    "${params.nested.a.b.99}",
    "${matrix.x}",
    "${matrix.}",
    "${matrix}",
    "${params}",
    "$${",
    "$$${params.seed}",
    "${",
    "}",
    "${HOME}",
    "${ params.seed }",
    "${params.seed}${params.seed}",
    "${${params.seed}}",
    "\"${params.xs}\"",
];
const PATHS: &[&str] = &[
    "..",
    "/",
    "./",
    "cache/",
    ".repro/",
    "cache",
    ".repro",
    "repro.yaml",
    "./repro.yaml",
    "sub/../cache/x",
    "outside/x",
    "cachelink/x",
    "inside/x",
    "data/raw",
    "exists.txt",
    "//",
    "a//b",
    "./.",
    "~",
    "C:\\x",
];
const UNICODE: &[&str] = &[
    "é",
    "名前",
    "🦀",
    "\u{202e}",
    "\u{200b}",
    "\u{0}",
    "\u{7}",
    "\u{1b}[31m",
    "\u{85}",
    "\u{2028}",
    "\u{fffd}",
    "Ω",
    "ﬁ",
    "\u{301}",
];
const KEYS: &[&str] = &[
    "params",
    "stages",
    "cmd",
    "uses",
    "with",
    "deps",
    "outs",
    "needs",
    "matrix",
    "resources",
    "env",
    "metrics",
    "desc",
    "table",
    "plot",
    "corpus",
    "tokenise",
    "train",
    "evaluate",
    "columns",
    "sort",
    "input",
    "from",
];

fn lines_of(s: &str) -> Vec<String> {
    s.split_inclusive('\n').map(str::to_string).collect()
}

fn mutate(rng: &mut Rng, text: &str, seeds: &[String]) -> String {
    let mut s = text.to_string();
    let rounds = if rng.chance(60) { 1 } else { 2 + rng.below(3) };
    for _ in 0..rounds {
        s = mutate_once(rng, s, seeds);
        if s.len() > MAX_LEN {
            let mut cut = MAX_LEN;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s.truncate(cut);
        }
    }
    s
}

fn char_pos(rng: &mut Rng, s: &str) -> usize {
    if s.is_empty() {
        return 0;
    }
    let mut p = rng.below(s.len() + 1);
    while !s.is_char_boundary(p) {
        p -= 1;
    }
    p
}

fn insert_at(rng: &mut Rng, mut s: String, piece: &str) -> String {
    // Half the time, at the end of a line (where YAML values live); else anywhere.
    let p = if rng.chance(50) {
        let ends: Vec<usize> = s.match_indices('\n').map(|(i, _)| i).collect();
        if ends.is_empty() {
            s.len()
        } else {
            ends[rng.below(ends.len())]
        }
    } else {
        char_pos(rng, &s)
    };
    s.insert_str(p, piece);
    s
}

fn mutate_once(rng: &mut Rng, s: String, seeds: &[String]) -> String {
    let mut lines = lines_of(&s);
    match rng.below(20) {
        // Byte flips, then repaired to valid UTF-8 (the loader takes &str).
        0 => {
            let mut b = s.into_bytes();
            for _ in 0..1 + rng.below(4) {
                if b.is_empty() {
                    break;
                }
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
            String::from_utf8_lossy(&b).into_owned()
        }
        1 if !lines.is_empty() => {
            lines.remove(rng.below(lines.len()));
            lines.concat()
        }
        2 if !lines.is_empty() => {
            let i = rng.below(lines.len());
            let l = lines[i].clone();
            lines.insert(i, l);
            lines.concat()
        }
        3 if lines.len() > 1 => {
            let (i, j) = (rng.below(lines.len()), rng.below(lines.len()));
            lines.swap(i, j);
            lines.concat()
        }
        4 => {
            let other = lines_of(&seeds[rng.below(seeds.len())]);
            if other.is_empty() {
                return s;
            }
            let take = other[rng.below(other.len())].clone();
            let at = rng.below(lines.len() + 1);
            lines.insert(at, take);
            lines.concat()
        }
        5 | 6 => {
            let t = rng.pick(TOKENS);
            insert_at(rng, s, t)
        }
        7 | 8 => {
            let t = rng.pick(TEMPLATES);
            insert_at(rng, s, t)
        }
        9 => {
            let t = rng.pick(PATHS);
            insert_at(rng, s, t)
        }
        10 => {
            let t = rng.pick(UNICODE);
            insert_at(rng, s, t)
        }
        11 => {
            let c = char::from(rng.below(32) as u8).to_string();
            insert_at(rng, s, &c)
        }
        // A long repeat of something YAML cares about.
        12 => {
            let unit = rng.pick(&["a", "${params.x}", "[", "- ", "  ", "é", "x: 1\n", "*a, "]);
            let n = 1 + rng.below(MAX_LEN / 2 / unit.len());
            insert_at(rng, s, &unit.repeat(n))
        }
        // Deep nesting.
        13 => {
            let depth = 1 + rng.below(4000);
            let (open, close) = *rng.pick(&[&("[", "]"), &("{a: ", "}"), &("- ", "")]);
            let nest = if close.is_empty() {
                (0..depth.min(500))
                    .map(|d| format!("{}- ", " ".repeat(d * 2)))
                    .collect::<Vec<_>>()
                    .join("\n")
                    + "x"
            } else {
                format!("{}x{}", open.repeat(depth), close.repeat(depth))
            };
            let at_value = format!(" {nest}");
            insert_at(rng, s, &at_value)
        }
        // Duplicate a key: a line whose key already appears.
        14 if !lines.is_empty() => {
            let i = rng.below(lines.len());
            let l = lines[i].clone();
            let j = rng.below(lines.len() + 1);
            lines.insert(j, l);
            lines.concat()
        }
        // Replace a word with a schema key or kind name.
        15 => {
            let words: Vec<(usize, &str)> = s
                .match_indices(|c: char| c.is_ascii_alphanumeric() || c == '_')
                .collect();
            if words.is_empty() {
                return s;
            }
            let (i, _) = words[rng.below(words.len())];
            let key = rng.pick(KEYS);
            let mut out = s.clone();
            out.insert_str(i, key);
            out
        }
        // Change indentation of a line.
        16 if !lines.is_empty() => {
            let i = rng.below(lines.len());
            let l = lines[i].trim_start().to_string();
            lines[i] = format!("{}{}", " ".repeat(rng.below(9)), l);
            lines.concat()
        }
        // Swap in a whole generated pipeline.
        17 => synth(rng),
        // Cut at a random point.
        18 => {
            let p = char_pos(rng, &s);
            s[..p].to_string()
        }
        _ => {
            let p = char_pos(rng, &s);
            let seed = &seeds[rng.below(seeds.len())];
            let q = char_pos(rng, seed);
            format!("{}{}", &s[..p], &seed[q..])
        }
    }
}

/// A pipeline assembled from parts, so mutants reach the matrix, template and DAG layers and
/// not just the YAML parser. A tame one is valid more often than not; a wild one mixes in
/// hostile names, values and paths.
fn synth(rng: &mut Rng) -> String {
    let wild = rng.chance(40);
    let mut out = String::new();
    // Length of `params.big` (absent: a matrix key naming it fails early, so count it as 1).
    let mut big = 1;
    if rng.chance(90) {
        out.push_str("params:\n  seed: 1\n  x: val\n  xs: [1, 2, 3]\n  nested: {a: {b: [p, q]}}\n");
        if rng.chance(20) {
            // A big list for a big matrix.
            big = 1 + rng.below(300);
            let items: Vec<String> = (0..big).map(|i| i.to_string()).collect();
            out.push_str(&format!("  big: [{}]\n", items.join(", ")));
        }
        if wild && rng.chance(4) {
            // An alias bomb: 9^k copies of `x` if aliases were expanded naively.
            out.push_str("  bomb: &l0 [x, x, x, x, x, x, x, x, x]\n");
            for k in 1..1 + rng.below(9) {
                let prev = format!("*l{}", k - 1);
                out.push_str(&format!("  b{k}: &l{k} [{}]\n", vec![prev; 9].join(", ")));
            }
        }
    }
    out.push_str("stages:\n");
    let n = 1 + rng.below(6);
    let mut names: Vec<String> = Vec::new();
    // Outs of earlier stages without a matrix, which later stages may name as deps.
    let mut plain_outs: Vec<String> = Vec::new();
    for i in 0..n {
        let name = match (wild, rng.below(10)) {
            (true, 0) => rng
                .pick(&[
                    ".", "..", "a/b", "a b", "\"q\"", "x@y", "a=b", "-", "_", "a\u{7}",
                ])
                .to_string(),
            (true, 1) => rng.pick(UNICODE).to_string(),
            (true, 2) if !names.is_empty() => names[rng.below(names.len())].clone(),
            (true, 3) => "s".repeat(1 + rng.below(300)),
            (_, 4) => format!("s{i}.v-{i}_x"),
            _ => format!("s{i}"),
        };
        let shown = if name.chars().all(|c| c.is_ascii_alphanumeric()) {
            name.clone()
        } else {
            format!("{name:?}")
        };
        out.push_str(&format!("  {shown}:\n"));
        names.push(name.clone());

        let mut keys = Vec::new();
        if rng.chance(40) {
            // The product stays below MAX_EXPANSIONS: a bigger one is a memory and time bomb
            // today (no cap, and `needs` is matched by a scan per expansion).
            let mut product = 1;
            for k in 0..1 + rng.below(3) {
                let mut pick = rng.below(8);
                if pick == 1 && product * big > MAX_EXPANSIONS {
                    pick = 7;
                }
                if pick == 1 {
                    product *= big;
                } else {
                    product *= 6;
                }
                let v = match (wild, pick) {
                    (_, 0) => "\"${params.xs}\"",
                    (_, 1) => "\"${params.big}\"",
                    (_, 2) => "[1, 2.5, true, 1e12, -0.5]",
                    (true, 3) => "[\"a/b\", \"..\", \"line\\nbreak\", \"q\\\"uote\", \" \", \"]\"]",
                    (true, 4) => "[cache, .repro, repro.yaml, \".\", \"\"]",
                    (true, 5) => "[]",
                    (true, 6) => "\"${params.x}\"",
                    (true, 7) => "[1, 1]",
                    _ => "[a, b]",
                };
                keys.push(format!("k{k}"));
                out.push_str(if k == 0 { "    matrix: {" } else { ", " });
                out.push_str(&format!("k{k}: {v}"));
            }
            out.push_str("}\n");
        }
        let matrix = !keys.is_empty();
        let all_keys: String = keys.iter().map(|k| format!("-${{matrix.{k}}}")).collect();
        let template = |rng: &mut Rng| -> String {
            match (wild, rng.below(6)) {
                (true, 0 | 1) => rng.pick(TEMPLATES).to_string(),
                (true, 2) => "${matrix.k9}".into(),
                (_, 3) if matrix => all_keys.clone(),
                (_, 4) => "$${params.seed} ${HOME}".into(),
                (_, 5) => "${params.nested.a.b.1}".into(),
                _ => "${params.seed}".into(),
            }
        };
        let main_out = if matrix {
            format!("o{i}{all_keys}")
        } else {
            format!("o{i}")
        };
        let mut outs = vec![main_out.clone()];
        if rng.chance(85) {
            let t = template(rng);
            out.push_str(&format!("    cmd: \"echo {t} > {main_out}\"\n"));
        } else {
            let kind = match wild {
                true => rng.pick(&[
                    "table", "plot", "corpus", "tokenise", "train", "evaluate", "x",
                ]),
                false => "table",
            };
            out.push_str(&format!("    uses: {kind}\n"));
            let t = template(rng);
            out.push_str(&format!("    with: {{columns: [a, \"{t}\"]}}\n"));
        }
        if !matrix {
            plain_outs.push(main_out);
        }
        let mut deps = Vec::new();
        let mut needs = Vec::new();
        for _ in 0..rng.below(3) {
            match (wild && rng.chance(30), rng.below(4)) {
                (true, 0) => outs.push(rng.pick(PATHS).to_string()),
                (true, 1) => deps.push(rng.pick(PATHS).to_string()),
                (true, 2) => needs.push(rng.pick(&["s0", "o0", "x", ""]).to_string()),
                (true, _) => outs.push(format!("o{}", rng.below(n))),
                (false, 0) => deps.push("exists.txt".into()),
                (false, 1) if !plain_outs.is_empty() && i > 0 => {
                    let d = plain_outs[rng.below(plain_outs.len())].clone();
                    if !outs.contains(&d) {
                        deps.push(d)
                    }
                }
                (false, _) if i > 0 => needs.push(names[rng.below(i)].clone()),
                _ => deps.push("data/raw".into()),
            }
        }
        for (what, list) in [("deps", &deps), ("outs", &outs), ("needs", &needs)] {
            if !list.is_empty() {
                let items: Vec<String> = list.iter().map(|x| format!("{x:?}")).collect();
                out.push_str(&format!("    {what}: [{}]\n", items.join(", ")));
            }
        }
        if rng.chance(15) {
            out.push_str(&format!("    metrics: \"m-{i}{all_keys}.json\"\n"));
        }
        if rng.chance(10) {
            let v = match wild {
                true => rng.pick(&["-1", "1e30", "x", "[1]", "\"1.5Q\""]),
                false => rng.pick(&["1", "8G", "\"${params.seed}\"", "0.5"]),
            };
            out.push_str(&format!("    resources: {{gpu: {v}}}\n"));
        }
        if rng.chance(10) {
            out.push_str("    env: {A: \"${params.nested}\", B: 1}\n");
        }
        if rng.chance(10) {
            out.push_str("    desc: \"two\\nlines\"\n");
        }
    }
    out
}

/// `-S` overrides for some mutants.
fn overrides(rng: &mut Rng) -> Vec<String> {
    if !rng.chance(10) {
        return Vec::new();
    }
    let all = [
        "seed=2",
        "seed=",
        "seed",
        "=1",
        "sede=1",
        "x=[",
        "xs=[]",
        "xs=[a/b, ..]",
        "nested.a.b=1",
        "nested.zz=1",
        "seed.a=1",
        "x={a: 1}",
        "x=${params.x}",
    ];
    (0..1 + rng.below(2))
        .map(|_| all[rng.below(all.len())].to_string())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Checks.

/// Every line of an error names the file and a line in it: `repro.yaml:<n>` with n in range.
fn unlocated_line(err: &str, source: &str) -> Option<String> {
    // The YAML parser also counts a lone `\r`, U+0085, U+2028 and U+2029 as line breaks.
    let yaml_breaks = source
        .char_indices()
        .filter(|&(i, c)| {
            matches!(c, '\n' | '\u{85}' | '\u{2028}' | '\u{2029}')
                || (c == '\r' && !source[i + 1..].starts_with('\n'))
        })
        .count();
    let last = source.lines().count().max(yaml_breaks + 1).max(1) + 1;
    for line in err.lines() {
        let ok = line.match_indices("repro.yaml:").any(|(i, m)| {
            let digits: String = line[i + m.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits
                .parse::<usize>()
                .is_ok_and(|n| (1..=last).contains(&n))
        });
        if !ok {
            return Some(line.to_string());
        }
    }
    if err.trim().is_empty() {
        return Some("(empty error)".into());
    }
    None
}

/// Whether `text` is a run of dot statements whose quoted strings are balanced and escaped.
fn dot_problem(dot: &str, names: usize) -> Option<String> {
    let lines: Vec<&str> = dot.lines().collect();
    if lines.first() != Some(&"digraph pipeline {") || lines.last() != Some(&"}") {
        return Some("not one `digraph pipeline { … }`".into());
    }
    let mut nodes = 0;
    for line in &lines[1..lines.len() - 1] {
        let t = line.trim();
        if t == "rankdir=LR;" || t == "node [shape=box];" {
            continue;
        }
        // Tokenise quoted strings (dot escapes `"` as `\"`).
        let mut strings = 0;
        let mut rest = String::new();
        let mut chars = t.chars();
        while let Some(c) = chars.next() {
            if c == '"' {
                strings += 1;
                let mut closed = false;
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => {
                            closed = true;
                            break;
                        }
                        _ => {}
                    }
                }
                if !closed {
                    return Some(format!("unclosed string in `{line}`"));
                }
                rest.push('S');
            } else {
                rest.push(c);
            }
        }
        match rest.replace(' ', "").as_str() {
            "S;" if strings == 1 => nodes += 1,
            "S->S;" if strings == 2 => {}
            other => return Some(format!("not a node or an edge: `{line}` ({other})")),
        }
    }
    (nodes != names).then(|| format!("{nodes} node lines for {names} stages"))
}

fn mermaid_problem(m: &str, names: usize) -> Option<String> {
    let mut lines = m.lines();
    if lines.next() != Some("flowchart LR") {
        return Some("no `flowchart LR` header".into());
    }
    let mut nodes = 0;
    for line in lines {
        let t = line.trim();
        let is_edge = t.split(" --> ").count() == 2
            && t.split(" --> ").all(|id| {
                id.strip_prefix('s')
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            });
        let is_node = t.starts_with('s')
            && t.ends_with("\"]")
            && t.find("[\"").is_some_and(|open| {
                let label = &t[open + 2..t.len() - 2];
                !label.contains('"') && !label.contains(['\n', '\r'])
            });
        if is_node {
            nodes += 1;
        } else if !is_edge {
            return Some(format!("not a node or an edge: `{line}`"));
        }
    }
    (nodes != names).then(|| format!("{nodes} node lines for {names} stages"))
}

/// The loader's results: topological order, adjacency in range, names unique.
fn graph_problem(p: &Pipeline) -> Option<String> {
    let n = p.stages.len();
    if p.dag.upstream.len() != n || p.dag.downstream.len() != n {
        return Some("adjacency lists do not match the stages".into());
    }
    for (i, ups) in p.dag.upstream.iter().enumerate() {
        if let Some(&u) = ups.iter().find(|&&u| u >= i) {
            return Some(format!("stage {i} comes before its upstream {u}"));
        }
    }
    let mut names: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    if names.windows(2).any(|w| w[0] == w[1]) {
        return Some("two stages share a name".into());
    }
    None
}

// ---------------------------------------------------------------------------------------------
// The loop.

#[derive(Default)]
struct Findings {
    /// Kind of failure → (count, first example).
    kinds: std::collections::BTreeMap<String, (usize, String)>,
}

impl Findings {
    fn add(&mut self, kind: String, example: String) {
        let e = self.kinds.entry(kind).or_insert((0, example));
        e.0 += 1;
    }
}

fn escaped(s: &str, max: usize) -> String {
    let e = format!("{s:?}");
    if e.len() <= max {
        return e;
    }
    let mut cut = max;
    while !e.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}… ({} bytes)", &e[..cut], s.len())
}

/// A stable name for a failure, so that one bug is one entry: the message with quoted and
/// parenthesised parts, `-S` items and numbers blanked.
fn kind_of(prefix: &str, msg: &str) -> String {
    let msg = match msg.split_once(": -S ") {
        Some((file, rest)) => format!("{file}: -S …:{}", rest.split_once(':').map_or("", |r| r.1)),
        None => msg.to_string(),
    };
    let mut out = String::new();
    let (mut in_quote, mut in_paren) = (false, false);
    let mut last_digit = false;
    for c in msg.chars().take(200) {
        if c == '`' && !in_paren {
            in_quote = !in_quote;
            if in_quote {
                out.push_str("`…`");
            }
            continue;
        }
        if c == '(' && !in_quote {
            in_paren = true;
            out.push_str("(…)");
            continue;
        }
        if c == ')' && in_paren {
            in_paren = false;
            continue;
        }
        if in_quote || in_paren {
            continue;
        }
        if c.is_ascii_digit() {
            if !last_digit {
                out.push('N');
            }
            last_digit = true;
            continue;
        }
        last_digit = false;
        out.push(c);
    }
    let out: String = out.chars().take(90).collect();
    format!("{prefix}: {out}")
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic)".into())
}

#[test]
fn loader_survives_mutants_and_locates_every_error() {
    let iters: u64 = std::env::var("REPRO_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_ITERS);
    let parse_u64 = |v: String| {
        let v = v.trim().to_string();
        match v.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16).ok(),
            None => v.parse().ok(),
        }
    };
    let master = std::env::var("REPRO_FUZZ_SEED")
        .ok()
        .and_then(parse_u64)
        .unwrap_or(DEFAULT_SEED);
    let only_case = std::env::var("REPRO_FUZZ_CASE").ok().and_then(parse_u64);

    let seeds = seeds();
    let ws = workspace();

    // Watchdog: a parse that never returns cannot fail the loop, so name it and abort.
    let current = Arc::new(Mutex::new(String::new()));
    let started = Arc::new(AtomicU64::new(0));
    let epoch = Instant::now();
    {
        let current = current.clone();
        let started = started.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_secs(1));
            let t = started.load(Ordering::SeqCst);
            if t != 0
                && (epoch.elapsed().as_millis() as u64).saturating_sub(t) > HUNG.as_millis() as u64
            {
                // Straight to stderr: the test harness's capture would swallow `eprintln!`.
                let msg = format!(
                    "pipeline_fuzz: one parse has run for over {HUNG:?}: {}\n",
                    current.lock().unwrap()
                );
                let _ = std::io::Write::write_all(&mut std::io::stderr(), msg.as_bytes());
                std::process::abort();
            }
        });
    }

    // Panics are caught and reported; keep their messages, not the default hook's noise.
    let last_panic: Arc<Mutex<String>> = Arc::default();
    let default_hook = std::panic::take_hook();
    {
        let last_panic = last_panic.clone();
        std::panic::set_hook(Box::new(move |info| {
            *last_panic.lock().unwrap() = info.to_string();
        }));
    }

    let mut findings = Findings::default();
    let mut slowest = (Duration::ZERO, String::new());
    let (mut oks, mut errs) = (0u64, 0u64);
    let cases: Vec<u64> = match only_case {
        Some(c) => vec![c],
        None => (0..iters).map(|i| case_seed(master, i)).collect(),
    };
    let t_all = Instant::now();
    for (i, &case) in cases.iter().enumerate() {
        let mut rng = Rng(case);
        // The first pass parses every seed as it is; then mutants.
        let source = if only_case.is_none() && i < seeds.len() {
            seeds[i].clone()
        } else if rng.chance(35) {
            synth(&mut rng)
        } else {
            let seed = seeds[rng.below(seeds.len())].clone();
            mutate(&mut rng, &seed, &seeds)
        };
        let overrides = overrides(&mut rng);
        if only_case.is_some() {
            // Replaying one case: show it whole, straight to stderr (even if it hangs).
            let msg = format!("pipeline_fuzz: -S {overrides:?}; mutant:\n{source}\n---\n");
            let _ = std::io::Write::write_all(&mut std::io::stderr(), msg.as_bytes());
        }
        let label = format!(
            "REPRO_FUZZ_CASE={case:#x} (REPRO_FUZZ_SEED={master:#x}, case {i}); -S {overrides:?}; mutant {}",
            escaped(&source, 600)
        );
        *current.lock().unwrap() = label.clone();
        started.store(epoch.elapsed().as_millis() as u64 + 1, Ordering::SeqCst);
        let t0 = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let p = load(&source, ws.path(), &overrides)?;
            let dot = p.dag.to_dot(&p.stages);
            let mermaid = p.dag.to_mermaid(&p.stages);
            Ok::<_, anyhow::Error>((p, dot, mermaid))
        }));
        let took = t0.elapsed();
        started.store(0, Ordering::SeqCst);
        if took > slowest.0 {
            slowest = (took, label.clone());
        }
        match result {
            Err(payload) => {
                let msg = std::mem::take(&mut *last_panic.lock().unwrap());
                let msg = if msg.is_empty() {
                    panic_message(payload.as_ref())
                } else {
                    msg
                };
                findings.add(kind_of("panic", &msg), format!("{msg}\n    {label}"));
            }
            Ok(Err(e)) => {
                errs += 1;
                let text = format!("{e:#}");
                if let Some(bad) = unlocated_line(&text, &source) {
                    let first = text.lines().next().unwrap_or("");
                    let kind = if bad != first && unlocated_line(first, &source).is_none() {
                        // A located message that goes on over a line break in quoted text.
                        kind_of("error text broken over lines by a quoted value", first)
                    } else {
                        kind_of("error without `repro.yaml:<line>`", &bad)
                    };
                    findings.add(kind, format!("error: {}\n    {label}", escaped(&text, 400)));
                }
            }
            Ok(Ok((p, dot, mermaid))) => {
                oks += 1;
                if let Some(bad) = graph_problem(&p) {
                    findings.add(format!("bad graph: {bad}"), label.clone());
                }
                if let Some(bad) = dot_problem(&dot, p.stages.len()) {
                    findings.add(
                        kind_of("malformed dot", &bad),
                        format!("{}\n    {label}", escaped(&bad, 300)),
                    );
                }
                if let Some(bad) = mermaid_problem(&mermaid, p.stages.len()) {
                    findings.add(
                        kind_of("malformed mermaid", &bad),
                        format!("{}\n    {label}", escaped(&bad, 300)),
                    );
                }
            }
        }
        if took > SLOW {
            findings.add(
                "slow: one parse over the hang bound".into(),
                format!("{took:?}\n    {label}"),
            );
        }
    }
    std::panic::set_hook(default_hook);

    eprintln!(
        "pipeline_fuzz: {} cases in {:.1?} ({oks} parsed, {errs} refused), master seed {master:#x}; slowest {:.1?}: {}",
        cases.len(),
        t_all.elapsed(),
        slowest.0,
        escaped(&slowest.1, 300),
    );
    if !findings.kinds.is_empty() {
        let mut report = format!(
            "{} kinds of failure (one example each):\n",
            findings.kinds.len()
        );
        for (kind, (count, example)) in &findings.kinds {
            report.push_str(&format!("\n[{count}×] {kind}\n  {example}\n"));
        }
        panic!("{report}");
    }
}
