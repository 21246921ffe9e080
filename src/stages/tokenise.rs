//! `tokenise`: trains a byte-level BPE on a corpus' train split (or takes GPT-2's) and writes
//! packed token shards (documents joined with eos) for train and held-out text.
//!
//! ```text
//! tokenise:
//!   uses: tokenise
//!   with: {input: data/prose, vocab: 4096}      # or {input: data/prose, tokenizer: gpt2}
//!   outs: [data/tokens]
//! ```

use super::{out_dir, parse_with, Progress, StageContext, StageKind};
use crate::data::tokenize::{self, TokenizerSpec};
use anyhow::Result;
use serde::Deserialize;
use serde_json::{Map, Value};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct With {
    input: String,
    #[serde(default)]
    vocab: Option<u32>,
    /// `bpe` (default) or `gpt2`.
    #[serde(default)]
    tokenizer: Option<String>,
    #[serde(default)]
    pad: bool,
}

impl With {
    fn spec(&self) -> Result<TokenizerSpec, String> {
        match (self.tokenizer.as_deref().unwrap_or("bpe"), self.vocab) {
            ("bpe", Some(v)) if v >= 300 => Ok(TokenizerSpec::Bpe {
                vocab_size: v,
                pad: self.pad,
            }),
            ("bpe", Some(v)) => Err(format!(
                "with.vocab = {v} is too small for a byte-level BPE (at least 300)"
            )),
            ("bpe", None) => Err("a BPE needs with.vocab (e.g. 4096)".into()),
            ("gpt2", None) => Ok(TokenizerSpec::Gpt2),
            ("gpt2", Some(_)) => {
                Err("GPT-2's tokenizer has its own vocabulary: drop with.vocab".into())
            }
            (other, _) => Err(format!("with.tokenizer `{other}`: expected bpe or gpt2")),
        }
    }
}

pub struct Tokenise;

impl StageKind for Tokenise {
    fn name(&self) -> &'static str {
        "tokenise"
    }

    fn version(&self) -> &'static str {
        "1"
    }

    fn inputs(&self, with: &Map<String, Value>) -> Result<Vec<String>, String> {
        let w: With = parse_with(with)?;
        w.spec()?;
        Ok(vec![w.input])
    }

    fn run(&self, ctx: &StageContext) -> Result<()> {
        let w: With = parse_with(&ctx.with).map_err(anyhow::Error::msg)?;
        let spec = w.spec().map_err(anyhow::Error::msg)?;
        let out = out_dir(ctx)?;
        let mut progress = Progress::from_env();
        let mut say = |msg: &str| {
            println!("{msg}");
            progress.message(msg);
        };
        let report = tokenize::tokenise(&ctx.workspace.join(&w.input), &spec, &out, &mut say)?;
        let m = &report.manifest;
        println!(
            "vocab {}: train {} tokens, held-out {} tokens (trained in {:.1}s, encoded in {:.1}s)",
            m.vocab_size,
            m.train.tokens,
            m.heldout.tokens,
            report.train_seconds,
            report.encode_seconds
        );
        Ok(())
    }
}
