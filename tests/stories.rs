//! The stories pipeline (SPEC §7) through the real binary, tiny: generated stories, a story
//! model and its dense twin, and every interpretability stage, checked for what must hold
//! whatever the tiny models learnt.

mod common;
use common::*;
use std::collections::HashMap;
use std::path::Path;

/// A CSV file's rows as maps from column to value.
fn rows(ws: &Ws, rel: &str) -> Vec<HashMap<String, String>> {
    let mut r = csv::Reader::from_path(ws.root().join(rel)).unwrap();
    let header: Vec<String> = r.headers().unwrap().iter().map(String::from).collect();
    r.records()
        .map(|rec| {
            let rec = rec.unwrap();
            header
                .iter()
                .cloned()
                .zip(rec.iter().map(String::from))
                .collect()
        })
        .collect()
}

fn num(row: &HashMap<String, String>, col: &str) -> f64 {
    row[col]
        .parse()
        .unwrap_or_else(|_| panic!("{col} is not a number in {row:?}"))
}

#[test]
fn stories_smoke_pipeline_end_to_end() {
    let ws = Ws::new("stages: {}\n");
    let smoke = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/stories-smoke.yaml");
    let smoke = smoke.to_str().unwrap();
    let out = ws.repro(&["run", smoke]);
    assert!(out.status.success(), "{}", text(&out));
    let res = "results/stories-smoke";

    // gating: one index row per collected token; the results name the generated corpus.
    let tokens = rows(&ws, &format!("{res}/gating/tokens.csv"));
    let gating: serde_json::Value =
        serde_json::from_str(&ws.read(&format!("{res}/gating/gating.json"))).unwrap();
    assert_eq!(gating["tokens"].as_u64().unwrap() as usize, tokens.len());
    assert_eq!(gating["stories"], 32);
    assert_eq!(gating["corpus"][0]["package"], "repro-stories", "{gating}");
    assert!(tokens
        .iter()
        .all(|t| t["top5_next"].matches(" | ").count() == 4));

    // neighbours: 5 per target token and layer, best first, cosines in [0, 1], never from
    // the target story itself.
    let near = rows(&ws, &format!("{res}/neighbours/neighbours.csv"));
    let targets = tokens
        .iter()
        .filter(|t| t["story"] == "0" && t["position"] != "0")
        .count();
    assert!(
        near.len() <= 2 * targets * 5 && near.len() > targets,
        "{} rows",
        near.len()
    );
    for pair in near.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if a["layer"] == b["layer"] && a["position"] == b["position"] {
            assert!(num(a, "cosine") >= num(b, "cosine"), "{a:?} {b:?}");
        }
    }
    for n in &near {
        assert!((0.0..=1.0 + 1e-5).contains(&num(n, "cosine")), "{n:?}");
        assert_ne!(n["neighbour_story"], "0", "{n:?}");
    }
    assert!(ws
        .read(&format!("{res}/neighbours/neighbours.txt"))
        .contains('⟦'));

    // cluster: per layer, both spaces and both labels; in layer 0 a circuit's neighbours
    // share its token far more often than shuffled labels would.
    let clusters = rows(&ws, &format!("{res}/cluster/clusters.csv"));
    assert_eq!(clusters.len(), 2 * 2 * 2, "2 layers × 2 spaces × 2 labels");
    let first = &clusters[0];
    assert_eq!(
        (
            first["layer"].as_str(),
            first["space"].as_str(),
            first["label"].as_str()
        ),
        ("0", "circuits", "token")
    );
    assert!(
        num(first, "agreement") > 2.0 * num(first, "shuffled"),
        "{first:?}"
    );
    for l in 0..2 {
        let svg = ws.read(&format!("{res}/cluster/layer{l}.svg"));
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    }

    // patch: 56 ordered pairs × 3 layer sets × 2 models. At the last layer the noun's
    // feedforward reaches nothing that is read at "was": patching it must change nothing.
    let patching = rows(&ws, &format!("{res}/patch/patching.csv"));
    assert_eq!(patching.len(), 56 * 3 * 2);
    for r in patching.iter().filter(|r| r["layers"] == "1") {
        assert!(
            (num(r, "ld_patched") - num(r, "ld_clean")).abs() < 1e-4,
            "{r:?}"
        );
    }
    let methods: Vec<&str> = patching.iter().map(|r| r["method"].as_str()).collect();
    assert!(methods.contains(&"gating") && methods.contains(&"mlp-activation"));
    assert_eq!(rows(&ws, &format!("{res}/patch/probe.csv")).len(), 16);
    assert_eq!(rows(&ws, &format!("{res}/patch/summary.csv")).len(), 6);
    assert!(ws
        .read(&format!("{res}/patch/patching.svg"))
        .starts_with("<svg"));

    // ablate: 3 layer sets × m in {1, 2, all} × 8 facts; removing experts at the last layer
    // changes nothing at "was" either.
    let ablation = rows(&ws, &format!("{res}/ablate/ablation.csv"));
    assert_eq!(ablation.len(), 3 * 3 * 8);
    for r in ablation.iter().filter(|r| r["layers"] == "1") {
        assert!(
            num(r, "drop_top").abs() < 1e-4 && num(r, "drop_random").abs() < 1e-4,
            "{r:?}"
        );
    }

    // Nothing runs the second time.
    let out = ws.repro(&["run", smoke]);
    assert_eq!(
        text(&out).lines().last(),
        Some("0 ran, 0 restored, 11 up to date"),
        "{}",
        text(&out)
    );

    bad_inputs_to_the_analyses_fail_with_their_reason(&ws);
}

/// Inputs that pass the load checks but not the run: each stage fails naming what is wrong,
/// and the others go on.
fn bad_inputs_to_the_analyses_fail_with_their_reason(ws: &Ws) {
    let (models, tokens, gating) = (
        "models/stories-smoke",
        "data/stories-smoke/tokens",
        "results/stories-smoke/gating",
    );
    ws.write("bad/classes.yaml", "a: [the, dog]\nb: [cat, The]\n");
    ws.write("bad/gating/gating.safetensors", "not a safetensors file");
    ws.write("bad/gating/vocab.json", "[]");
    let stages = [
        ("long-noun", format!("uses: patch\n    with: {{models: [{models}/sgatlin], tokens: {tokens}, facts: {{xylophonequartzes: zz, turtle: slow}}}}"), "the noun `xylophonequartzes` is"),
        ("dense-gating", format!("uses: gating\n    with: {{model: {models}/dense, tokens: {tokens}}}"), "has no router"),
        ("dense-ablate", format!("uses: ablate\n    with: {{model: {models}/dense, tokens: {tokens}}}"), "a mlp model has none"),
        ("no-story", format!("uses: neighbours\n    with: {{gating: {gating}, targets: [999]}}"), "story 999 was not collected"),
        ("no-layer", format!("uses: neighbours\n    with: {{gating: {gating}, layers: [5]}}"), "layer 5 does not exist"),
        ("no-channel", format!("uses: cluster\n    with: {{gating: {gating}, classes: {{a: [the]}}, channels: [9]}}"), "channel 9 does not exist"),
        ("two-classes", format!("uses: cluster\n    with: {{gating: {gating}, classes: bad/classes.yaml}}"), "`The` is in two classes"),
        ("damaged", "uses: neighbours\n    with: {gating: bad/gating}".to_string(), "gating.safetensors"),
    ];
    let mut pipeline = String::from("stages:\n");
    for (name, body, _) in &stages {
        pipeline += &format!("  {name}:\n    {body}\n    outs: [bad/out/{name}]\n");
    }
    ws.write("bad.yaml", &pipeline);
    let out = ws.repro(&["run", "bad.yaml", "--keep-going"]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains(&format!("{} failed", stages.len())), "{said}");
    for (name, _, reason) in &stages {
        let log = ws.read(&format!(".repro/logs/{name}.log"));
        assert!(
            log.contains(reason),
            "{name}: expected `{reason}` in its log:\n{log}"
        );
        assert!(
            !ws.root().join("bad/out").join(name).exists(),
            "{name} left an output"
        );
    }
}
