//! Tokenizers (a byte-level BPE trained on the corpus, or GPT-2's) and turning a corpus into
//! token shards.
//!
//! Packing: the documents of a split are concatenated in file order, each followed by the
//! end-of-text token, into one shard. Training windows therefore cross document boundaries
//! with an explicit `<|endoftext|>` between documents, as GPT-2 and nanoGPT do.
//!
//! Outputs of [`tokenise`] in `out_dir`: `tokenizer.json` (BPE only; GPT-2's is built in),
//! `train.tok` and `heldout.tok` (see [`super::shards`]), and `tokens.json`
//! ([`TokensManifest`]). All are deterministic functions of the corpus and the spec; timings
//! are returned, never written, so the outputs stay content-addressable.

use super::corpus::{self, HELDOUT_FILE, TRAIN_FILE};
use super::shards::{self, write_shard};
use anyhow::{anyhow, ensure, Context, Result};
use rayon::prelude::*;
use std::path::Path;
use std::time::Instant;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, NormalizerWrapper, PostProcessorWrapper, TokenizerBuilder};

pub const EOS_TOKEN: &str = "<|endoftext|>";
pub const PAD_TOKEN: &str = "<pad>";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TRAIN_SHARD: &str = "train.tok";
pub const HELDOUT_SHARD: &str = "heldout.tok";
pub const TOKENS_MANIFEST: &str = "tokens.json";

/// Which tokenizer (a stage's `with:` block).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum TokenizerSpec {
    /// A byte-level BPE trained on the corpus' train split. `vocab_size` counts the 256 byte
    /// tokens, the merges and the special tokens (`<|endoftext|>`, and `<pad>` when `pad`).
    Bpe {
        vocab_size: u32,
        #[serde(default)]
        pad: bool,
    },
    /// GPT-2's BPE (r50k_base, 50,257 tokens), compiled into tiktoken-rs.
    Gpt2,
}

/// A tokenizer ready to encode; special tokens are never produced from text by [`encode`]
/// (the corpus guarantees documents do not contain `<|endoftext|>`).
///
/// [`encode`]: TextTokenizer::encode
pub enum TextTokenizer {
    Bpe(Box<tokenizers::Tokenizer>),
    Gpt2(&'static tiktoken_rs::CoreBPE),
}

/// GPT-2's end-of-text id in r50k_base.
const GPT2_EOS: u32 = 50_256;
const GPT2_VOCAB: u32 = 50_257;

impl TextTokenizer {
    /// Trains a byte-level BPE on `documents` (rayon-parallel inside the tokenizers crate).
    pub fn train_bpe<S: AsRef<str> + Send + Sync>(
        documents: &[S],
        vocab_size: u32,
        pad: bool,
    ) -> Result<Self> {
        let mut special = vec![AddedToken::from(EOS_TOKEN, true)];
        if pad {
            special.push(AddedToken::from(PAD_TOKEN, true));
        }
        let minimum = 256 + special.len() as u32;
        ensure!(
            vocab_size >= minimum,
            "a byte-level BPE needs a vocabulary of at least {minimum} (256 bytes and the \
             special tokens); {vocab_size} was asked for"
        );
        let mut trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size as usize)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(special)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        // No prefix space: decode(encode(text)) == text exactly, as with GPT-2.
        let byte_level = ByteLevel::new(false, true, true);
        let mut tokenizer = TokenizerBuilder::<
            BPE,
            NormalizerWrapper,
            ByteLevel,
            PostProcessorWrapper,
            ByteLevel,
        >::new()
        .with_model(BPE::default())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(byte_level))
        .with_post_processor(None)
        .with_decoder(Some(byte_level))
        .build()
        .map_err(|e| anyhow!("cannot build the BPE tokenizer: {e}"))?;
        tokenizer
            .train(&mut trainer, documents.iter().map(|d| d.as_ref()))
            .map_err(|e| anyhow!("BPE training failed: {e}"))?;
        Ok(Self::Bpe(Box::new(tokenizers::Tokenizer::from(tokenizer))))
    }

    pub fn gpt2() -> Self {
        Self::Gpt2(tiktoken_rs::r50k_base_singleton())
    }

    /// A BPE tokenizer saved by [`TextTokenizer::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let tokenizer = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("cannot load tokenizer {}: {e}", path.display()))?;
        ensure!(
            tokenizer.token_to_id(EOS_TOKEN).is_some(),
            "tokenizer {} has no {EOS_TOKEN} token",
            path.display()
        );
        Ok(Self::Bpe(Box::new(tokenizer)))
    }

    /// Writes `tokenizer.json` (HuggingFace format, loadable from Python too). GPT-2's
    /// tokenizer is built in and has nothing to save.
    pub fn save(&self, path: &Path) -> Result<bool> {
        match self {
            Self::Bpe(tokenizer) => {
                tokenizer
                    .save(path, false)
                    .map_err(|e| anyhow!("cannot write tokenizer {}: {e}", path.display()))?;
                Ok(true)
            }
            Self::Gpt2(_) => Ok(false),
        }
    }

    pub fn vocab_size(&self) -> u32 {
        match self {
            Self::Bpe(tokenizer) => tokenizer.get_vocab_size(true) as u32,
            Self::Gpt2(_) => GPT2_VOCAB,
        }
    }

    pub fn eos_id(&self) -> u32 {
        match self {
            Self::Bpe(tokenizer) => tokenizer
                .token_to_id(EOS_TOKEN)
                .expect("trained and loaded tokenizers have an end-of-text token"),
            Self::Gpt2(_) => GPT2_EOS,
        }
    }

    pub fn pad_id(&self) -> Option<u32> {
        match self {
            Self::Bpe(tokenizer) => tokenizer.token_to_id(PAD_TOKEN),
            Self::Gpt2(_) => None,
        }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Self::Bpe(tokenizer) => Ok(tokenizer
                .encode_fast(text, false)
                .map_err(|e| anyhow!("encoding failed: {e}"))?
                .get_ids()
                .to_vec()),
            Self::Gpt2(bpe) => Ok(bpe.encode_ordinary(text)),
        }
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Self::Bpe(tokenizer) => tokenizer
                .decode(ids, false)
                .map_err(|e| anyhow!("decoding failed: {e}")),
            Self::Gpt2(bpe) => bpe.decode(ids).map_err(|e| anyhow!("decoding failed: {e}")),
        }
    }

    /// The packed token stream of `documents`: each document's tokens followed by the
    /// end-of-text token. Documents are encoded in parallel; the order is the input order.
    pub fn encode_documents<S: AsRef<str> + Sync>(&self, documents: &[S]) -> Result<Vec<u32>> {
        let eos = self.eos_id();
        let encoded: Vec<Vec<u32>> = documents
            .par_iter()
            .map(|doc| self.encode(doc.as_ref()))
            .collect::<Result<_>>()?;
        let mut stream = Vec::with_capacity(encoded.iter().map(|e| e.len() + 1).sum());
        for tokens in encoded {
            stream.extend_from_slice(&tokens);
            stream.push(eos);
        }
        Ok(stream)
    }
}

/// What [`tokenise`] wrote, saved as `tokens.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokensManifest {
    pub tokenizer: TokenizerSpec,
    /// The tokenizer's real vocabulary (a small corpus can give a BPE fewer merges than asked).
    pub vocab_size: u32,
    pub eos_id: u32,
    pub pad_id: Option<u32>,
    /// `tokenizer.json`, or None for GPT-2's built-in tokenizer.
    pub tokenizer_file: Option<String>,
    pub train: ShardRecord,
    pub heldout: ShardRecord,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShardRecord {
    pub file: String,
    pub documents: usize,
    pub tokens: u64,
    pub text_bytes: u64,
    pub file_bytes: u64,
}

/// The manifest plus how long the work took (kept out of the files).
#[derive(Debug, Clone)]
pub struct TokeniseReport {
    pub manifest: TokensManifest,
    pub train_seconds: f64,
    pub encode_seconds: f64,
}

/// Trains (or takes) the tokenizer, encodes `corpus_dir/train.txt` and `heldout.txt`, and
/// writes the tokenizer, the two shards and `tokens.json` into `out_dir`.
pub fn tokenise(
    corpus_dir: &Path,
    spec: &TokenizerSpec,
    out_dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<TokeniseReport> {
    let train_docs = corpus::read_documents(&corpus_dir.join(TRAIN_FILE))?;
    let heldout_docs = corpus::read_documents(&corpus_dir.join(HELDOUT_FILE))?;
    ensure!(
        !train_docs.is_empty(),
        "{} holds no documents",
        corpus_dir.join(TRAIN_FILE).display()
    );
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;

    let started = Instant::now();
    let tokenizer = match spec {
        TokenizerSpec::Bpe { vocab_size, pad } => {
            progress(&format!(
                "training a byte-level BPE of {vocab_size} tokens on {} documents",
                train_docs.len()
            ));
            TextTokenizer::train_bpe(&train_docs, *vocab_size, *pad)?
        }
        TokenizerSpec::Gpt2 => TextTokenizer::gpt2(),
    };
    let train_seconds = started.elapsed().as_secs_f64();
    let tokenizer_file = tokenizer
        .save(&out_dir.join(TOKENIZER_FILE))?
        .then(|| TOKENIZER_FILE.to_string());

    let started = Instant::now();
    let mut records = Vec::new();
    for (docs, file) in [(&train_docs, TRAIN_SHARD), (&heldout_docs, HELDOUT_SHARD)] {
        progress(&format!("encoding {} documents into {file}", docs.len()));
        let tokens = tokenizer.encode_documents(docs)?;
        let path = out_dir.join(file);
        write_shard(&path, &tokens, tokenizer.vocab_size())?;
        records.push(ShardRecord {
            file: file.to_string(),
            documents: docs.len(),
            tokens: tokens.len() as u64,
            text_bytes: docs.iter().map(|d| d.len() as u64).sum(),
            file_bytes: (shards::SHARD_HEADER_BYTES
                + tokens.len() * shards::bytes_per_token(tokenizer.vocab_size()) as usize)
                as u64,
        });
    }
    let encode_seconds = started.elapsed().as_secs_f64();
    let heldout = records.pop().expect("two shards");
    let train = records.pop().expect("two shards");
    let manifest = TokensManifest {
        tokenizer: spec.clone(),
        vocab_size: tokenizer.vocab_size(),
        eos_id: tokenizer.eos_id(),
        pad_id: tokenizer.pad_id(),
        tokenizer_file,
        train,
        heldout,
    };
    let path = out_dir.join(TOKENS_MANIFEST);
    std::fs::write(&path, serde_json::to_string_pretty(&manifest)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(TokeniseReport {
        manifest,
        train_seconds,
        encode_seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::shards::TokenShard;

    /// Seeded sentences of made-up words (one to three syllables, common ones more often),
    /// so the BPE has many merges to find.
    fn generated_documents(count: usize, seed: u64) -> Vec<String> {
        const SYLLABLES: [&str; 20] = [
            "the", "tur", "tle", "was", "slow", "an", "rab", "bit", "ran", "fast", "ri", "ver",
            "hel", "lo", "friend", "un", "der", "sun", "moon", "ball",
        ];
        let mut state = seed;
        let mut next = move |n: usize| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as usize % n
        };
        (0..count)
            .map(|_| {
                let sentences = 2 + next(4);
                (0..sentences)
                    .map(|_| {
                        let words: Vec<String> = (0..4 + next(8))
                            .map(|_| {
                                let syllables = 1 + next(3);
                                (0..syllables)
                                    .map(|_| {
                                        let common = 1 + next(SYLLABLES.len());
                                        SYLLABLES[next(common)]
                                    })
                                    .collect::<String>()
                            })
                            .collect();
                        let mut s = words.join(" ");
                        s[..1].make_ascii_uppercase();
                        s + if next(5) == 0 { "!" } else { "." }
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect()
    }

    #[test]
    fn bpe_training_reaches_the_vocabulary_and_round_trips_heldout_text() {
        let train = generated_documents(400, 1);
        let tokenizer = TextTokenizer::train_bpe(&train, 400, true).unwrap();
        assert_eq!(tokenizer.vocab_size(), 400);
        assert_eq!(tokenizer.eos_id(), 0);
        assert_eq!(tokenizer.pad_id(), Some(1));

        let heldout = generated_documents(20, 2).join("\n\nÜnïcödé — “quotes” and\ttabs.\n");
        let ids = tokenizer.encode(&heldout).unwrap();
        assert_eq!(tokenizer.decode(&ids).unwrap(), heldout);
        assert!(
            ids.len() * 2 < heldout.len(),
            "merges should compress: {} tokens for {} bytes",
            ids.len(),
            heldout.len()
        );
    }

    #[test]
    fn bpe_training_is_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let train = generated_documents(200, 5);
        for name in ["a.json", "b.json"] {
            let tokenizer = TextTokenizer::train_bpe(&train, 300, false).unwrap();
            tokenizer.save(&dir.path().join(name)).unwrap();
        }
        let a = std::fs::read(dir.path().join("a.json")).unwrap();
        let b = std::fs::read(dir.path().join("b.json")).unwrap();
        assert!(
            a == b,
            "two trainings on the same text gave different tokenizers"
        );
    }

    #[test]
    fn packing_puts_one_eos_after_each_document() {
        let tokenizer = TextTokenizer::train_bpe(&generated_documents(200, 3), 300, false).unwrap();
        let docs = [
            "The turtle was slow.",
            "A rabbit ran fast!",
            "Hello friend.",
        ];
        let stream = tokenizer.encode_documents(&docs).unwrap();
        let mut expected = Vec::new();
        for doc in docs {
            expected.extend(tokenizer.encode(doc).unwrap());
            expected.push(tokenizer.eos_id());
        }
        assert_eq!(stream, expected);
        let eos_positions: Vec<usize> = (0..stream.len())
            .filter(|&i| stream[i] == tokenizer.eos_id())
            .collect();
        assert_eq!(eos_positions.len(), 3);
        assert_eq!(*eos_positions.last().unwrap(), stream.len() - 1);
    }

    #[test]
    fn gpt2_tokenizer_is_built_in() {
        let gpt2 = TextTokenizer::gpt2();
        let ids = gpt2.encode("Hello world").unwrap();
        assert_eq!(ids, [15496, 995]);
        assert_eq!(gpt2.decode(&ids).unwrap(), "Hello world");
        assert_eq!((gpt2.vocab_size(), gpt2.eos_id()), (50_257, 50_256));
    }

    #[test]
    fn tokenise_writes_a_tokenizer_shards_and_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("stories.txt");
        std::fs::write(
            &input,
            generated_documents(300, 9).join("\n<|endoftext|>\n"),
        )
        .unwrap();
        let corpus_dir = dir.path().join("corpus");
        let split = corpus::SplitSpec {
            heldout_fraction: 0.1,
            seed: 0,
            max_bytes: None,
        };
        corpus::from_text_file(&input, "<|endoftext|>", &split, &corpus_dir).unwrap();
        let out = dir.path().join("tokens");
        let spec = TokenizerSpec::Bpe {
            vocab_size: 300,
            pad: false,
        };
        let report = tokenise(&corpus_dir, &spec, &out, &mut |_| {}).unwrap();
        let manifest = report.manifest;
        assert_eq!(
            (manifest.train.documents, manifest.heldout.documents),
            (270, 30)
        );

        let heldout = TokenShard::open(&out.join(HELDOUT_SHARD)).unwrap();
        assert_eq!(heldout.len() as u64, manifest.heldout.tokens);
        assert_eq!(heldout.vocab_size(), 300);
        let eos_count = heldout
            .tokens()
            .iter()
            .filter(|&&t| t == manifest.eos_id)
            .count();
        assert_eq!(eos_count, 30);

        let reloaded = TextTokenizer::load(&out.join(TOKENIZER_FILE)).unwrap();
        let docs = corpus::read_documents(&corpus_dir.join(HELDOUT_FILE)).unwrap();
        assert_eq!(reloaded.encode_documents(&docs).unwrap(), heldout.tokens());
        let json = std::fs::read_to_string(out.join(TOKENS_MANIFEST)).unwrap();
        assert_eq!(
            serde_json::from_str::<TokensManifest>(&json).unwrap(),
            manifest
        );
    }

    #[test]
    fn tokenizer_spec_parses_from_yaml_like_json() {
        let bpe: TokenizerSpec =
            serde_json::from_str(r#"{"kind": "bpe", "vocab_size": 4096}"#).unwrap();
        assert_eq!(
            bpe,
            TokenizerSpec::Bpe {
                vocab_size: 4096,
                pad: false
            }
        );
        let gpt2: TokenizerSpec = serde_json::from_str(r#"{"kind": "gpt2"}"#).unwrap();
        assert_eq!(gpt2, TokenizerSpec::Gpt2);
        assert!(serde_json::from_str::<TokenizerSpec>(r#"{"kind": "bpe", "vocab": 1}"#).is_err());
    }
}
