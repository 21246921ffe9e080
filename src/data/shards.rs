//! Token shards on disk and the batches cut from them.
//!
//! # Shard format (version 1)
//! A shard is one file: a 32-byte header followed by the tokens, little-endian.
//!
//! | offset | size | field                                              |
//! |-------:|-----:|----------------------------------------------------|
//! |      0 |    4 | magic `b"RPTK"`                                    |
//! |      4 |    4 | format version, u32 LE (= 1)                       |
//! |      8 |    4 | bytes per token, u32 LE: 2 (u16) or 4 (u32)        |
//! |     12 |    4 | vocabulary size, u32 LE (every token is below it)  |
//! |     16 |    8 | token count, u64 LE                                |
//! |     24 |    8 | reserved, zero                                     |
//! |     32 |    … | tokens                                             |
//!
//! The token width is u16 whenever the vocabulary fits (≤ 65,536 ids), which halves the files
//! that travel to the GPU machine. Readers widen to u32.

use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};

pub const SHARD_MAGIC: [u8; 4] = *b"RPTK";
pub const SHARD_VERSION: u32 = 1;
pub const SHARD_HEADER_BYTES: usize = 32;

/// Bytes per token on disk for a vocabulary of `vocab_size` ids.
pub fn bytes_per_token(vocab_size: u32) -> u32 {
    if vocab_size <= 1 << 16 {
        2
    } else {
        4
    }
}

/// Writes `tokens` as a shard at `path` (through a temporary file and a rename, so a killed
/// writer never leaves a half shard under the final name).
pub fn write_shard(path: &Path, tokens: &[u32], vocab_size: u32) -> Result<()> {
    if let Some(bad) = tokens.iter().find(|&&t| t >= vocab_size) {
        bail!(
            "cannot write shard {}: token {bad} is outside the vocabulary of {vocab_size}",
            path.display()
        );
    }
    let width = bytes_per_token(vocab_size);
    let mut bytes = Vec::with_capacity(SHARD_HEADER_BYTES + tokens.len() * width as usize);
    bytes.extend_from_slice(&SHARD_MAGIC);
    bytes.extend_from_slice(&SHARD_VERSION.to_le_bytes());
    bytes.extend_from_slice(&width.to_le_bytes());
    bytes.extend_from_slice(&vocab_size.to_le_bytes());
    bytes.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&0u64.to_le_bytes());
    if width == 2 {
        for &t in tokens {
            bytes.extend_from_slice(&(t as u16).to_le_bytes());
        }
    } else {
        for &t in tokens {
            bytes.extend_from_slice(&t.to_le_bytes());
        }
    }
    crate::atomic::write(path, &bytes, true)
        .with_context(|| format!("cannot write shard {}", path.display()))
}

/// A shard read fully into memory (shards here are tens of MB; widening to u32 keeps every
/// consumer on one token type).
#[derive(Debug, Clone)]
pub struct TokenShard {
    path: PathBuf,
    vocab_size: u32,
    tokens: Vec<u32>,
}

impl TokenShard {
    /// Reads and validates the shard at `path`: magic, version, width, exact file size, and
    /// that every token is below the recorded vocabulary size.
    pub fn open(path: &Path) -> Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read shard {}", path.display()))?;
        Self::parse(path, &bytes)
    }

    fn parse(path: &Path, bytes: &[u8]) -> Result<Self> {
        let name = path.display();
        ensure!(
            bytes.len() >= SHARD_HEADER_BYTES,
            "{name} is not a token shard: {} bytes is shorter than the {SHARD_HEADER_BYTES}-byte header",
            bytes.len()
        );
        ensure!(
            bytes[0..4] == SHARD_MAGIC,
            "{name} is not a token shard: magic is {:?}, expected {:?}",
            String::from_utf8_lossy(&bytes[0..4]),
            "RPTK"
        );
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        let version = u32_at(4);
        ensure!(
            version == SHARD_VERSION,
            "{name}: shard format version {version} is not supported (this build reads {SHARD_VERSION})"
        );
        let width = u32_at(8);
        ensure!(
            width == 2 || width == 4,
            "{name}: bad token width {width} bytes (expected 2 or 4)"
        );
        let vocab_size = u32_at(12);
        let count = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
        let expected = (count as u128) * (width as u128) + SHARD_HEADER_BYTES as u128;
        ensure!(
            bytes.len() as u128 == expected,
            "{name}: header says {count} tokens of {width} bytes ({expected} bytes with header) but the file has {} bytes (truncated or corrupt)",
            bytes.len()
        );
        let body = &bytes[SHARD_HEADER_BYTES..];
        let tokens: Vec<u32> = if width == 2 {
            body.chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
                .collect()
        } else {
            body.chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        if let Some(at) = tokens.iter().position(|&t| t >= vocab_size) {
            bail!(
                "{name}: token {} at position {at} is outside the vocabulary of {vocab_size}",
                tokens[at]
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            vocab_size,
            tokens,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn vocab_size(&self) -> u32 {
        self.vocab_size
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// B rows of T inputs and their next-token targets, row-major (`inputs[b * T + t]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub batch_size: usize,
    pub seq_len: usize,
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
}

impl Batch {
    fn from_windows<'a>(seq_len: usize, windows: impl Iterator<Item = &'a [u32]>) -> Self {
        let mut inputs = Vec::new();
        let mut targets = Vec::new();
        let mut batch_size = 0;
        for window in windows {
            debug_assert_eq!(window.len(), seq_len + 1);
            inputs.extend_from_slice(&window[..seq_len]);
            targets.extend_from_slice(&window[1..]);
            batch_size += 1;
        }
        Self {
            batch_size,
            seq_len,
            inputs,
            targets,
        }
    }
}

/// How training windows are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sampling {
    /// Each window starts at a uniformly drawn offset (with replacement), drawn from a hash of
    /// (seed, step, row): the usual nanoGPT-style sampler.
    Random,
    /// Consecutive non-overlapping windows in file order, wrapping around at the end; the seed
    /// only rotates the starting window.
    Sequential,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatcherConfig {
    pub batch_size: usize,
    pub seq_len: usize,
    pub seed: u64,
    pub sampling: Sampling,
}

/// What a checkpoint must store to resume the batch stream exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BatcherState {
    pub seed: u64,
    pub step: u64,
}

/// Training batches over one token stream. Batch `i` is a pure function of (tokens, config, i),
/// so resuming at step `i` yields exactly the batches an uninterrupted run would have seen.
#[derive(Debug, Clone)]
pub struct Batcher<'a> {
    tokens: &'a [u32],
    config: BatcherConfig,
    step: u64,
}

impl<'a> Batcher<'a> {
    pub fn new(tokens: &'a [u32], config: BatcherConfig) -> Result<Self> {
        Self::resume(tokens, config, 0)
    }

    /// A batcher whose next batch is batch number `step`.
    pub fn resume(tokens: &'a [u32], config: BatcherConfig, step: u64) -> Result<Self> {
        ensure!(
            config.batch_size > 0 && config.seq_len > 0,
            "batch size and sequence length must be positive (got B={}, T={})",
            config.batch_size,
            config.seq_len
        );
        ensure!(
            tokens.len() > config.seq_len,
            "{} tokens cannot fill one window of {} + 1 tokens",
            tokens.len(),
            config.seq_len
        );
        Ok(Self {
            tokens,
            config,
            step,
        })
    }

    pub fn config(&self) -> &BatcherConfig {
        &self.config
    }

    pub fn state(&self) -> BatcherState {
        BatcherState {
            seed: self.config.seed,
            step: self.step,
        }
    }

    /// Batch number `step`, without moving the batcher.
    pub fn batch_at(&self, step: u64) -> Batch {
        let t = self.config.seq_len;
        let b = self.config.batch_size as u64;
        let starts: Vec<usize> = (0..b)
            .map(|row| match self.config.sampling {
                Sampling::Random => {
                    let positions = (self.tokens.len() - t) as u64;
                    (mix3(self.config.seed, step, row) % positions) as usize
                }
                Sampling::Sequential => {
                    let windows = ((self.tokens.len() - 1) / t) as u64;
                    let rotation = mix3(self.config.seed, u64::MAX, 0) % windows;
                    let index = (step.wrapping_mul(b).wrapping_add(row) + rotation) % windows;
                    index as usize * t
                }
            })
            .collect();
        Batch::from_windows(t, starts.iter().map(|&s| &self.tokens[s..s + t + 1]))
    }

    /// The next batch; advances the step counter.
    pub fn next_batch(&mut self) -> Batch {
        let batch = self.batch_at(self.step);
        self.step += 1;
        batch
    }
}

/// Evaluation batches: every non-overlapping window of T+1 tokens (window k starts at k*T, so
/// each token is predicted exactly once), grouped B at a time; the last batch may be short.
pub fn eval_batches(
    tokens: &[u32],
    batch_size: usize,
    seq_len: usize,
) -> impl Iterator<Item = Batch> + '_ {
    assert!(
        batch_size > 0 && seq_len > 0,
        "batch size and T must be positive"
    );
    let windows = tokens.len().saturating_sub(1) / seq_len;
    (0..windows.div_ceil(batch_size)).map(move |first| {
        let rows = (first * batch_size..((first + 1) * batch_size).min(windows))
            .map(|k| &tokens[k * seq_len..k * seq_len + seq_len + 1]);
        Batch::from_windows(seq_len, rows)
    })
}

/// SplitMix64's finaliser: a cheap, well-mixed 64-bit hash.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn mix3(a: u64, b: u64, c: u64) -> u64 {
    mix64(mix64(mix64(a) ^ b) ^ c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random_tokens(n: usize, vocab: u32, seed: u64) -> Vec<u32> {
        (0..n as u64)
            .map(|i| (mix3(seed, i, 7) % vocab as u64) as u32)
            .collect()
    }

    #[test]
    fn shard_round_trip_u16_and_u32() {
        let dir = tempfile::tempdir().unwrap();
        for (vocab, width) in [(4096u32, 2u64), (65_536, 2), (100_000, 4)] {
            let tokens = pseudo_random_tokens(10_001, vocab, vocab as u64);
            let path = dir.path().join(format!("v{vocab}.tok"));
            write_shard(&path, &tokens, vocab).unwrap();
            let size = std::fs::metadata(&path).unwrap().len();
            assert_eq!(size, 32 + 10_001 * width);
            let shard = TokenShard::open(&path).unwrap();
            assert_eq!(shard.tokens(), &tokens[..]);
            assert_eq!(shard.vocab_size(), vocab);
        }
    }

    #[test]
    fn write_rejects_token_outside_vocabulary() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_shard(&dir.path().join("x.tok"), &[1, 2, 300], 256).unwrap_err();
        assert!(err.to_string().contains("token 300"), "{err}");
    }

    #[test]
    fn corrupted_shards_are_rejected_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("good.tok");
        write_shard(&path, &pseudo_random_tokens(100, 1000, 1), 1000).unwrap();
        let good = std::fs::read(&path).unwrap();

        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("magic.tok", [b"XXXX", &good[4..]].concat(), "magic"),
            ("short.tok", good[..10].to_vec(), "shorter than"),
            (
                "truncated.tok",
                good[..good.len() - 1].to_vec(),
                "truncated",
            ),
            (
                "version.tok",
                {
                    let mut b = good.clone();
                    b[4] = 9;
                    b
                },
                "version 9",
            ),
            (
                "width.tok",
                {
                    let mut b = good.clone();
                    b[8] = 3;
                    b
                },
                "width",
            ),
            (
                "vocab.tok",
                {
                    let mut b = good.clone();
                    b[12..16].copy_from_slice(&10u32.to_le_bytes());
                    b
                },
                "outside the vocabulary",
            ),
        ];
        for (name, bytes, expected) in cases {
            let bad = dir.path().join(name);
            std::fs::write(&bad, bytes).unwrap();
            let err = TokenShard::open(&bad).unwrap_err().to_string();
            assert!(err.contains(name), "error does not name the file: {err}");
            assert!(err.contains(expected), "{name}: {err}");
        }
    }

    fn config(sampling: Sampling) -> BatcherConfig {
        BatcherConfig {
            batch_size: 4,
            seq_len: 16,
            seed: 42,
            sampling,
        }
    }

    #[test]
    fn batches_are_shifted_windows_of_the_stream() {
        let tokens: Vec<u32> = (0..1000).collect();
        for sampling in [Sampling::Random, Sampling::Sequential] {
            let mut batcher = Batcher::new(&tokens, config(sampling)).unwrap();
            let batch = batcher.next_batch();
            assert_eq!(batch.inputs.len(), 4 * 16);
            for row in 0..4 {
                let x = &batch.inputs[row * 16..(row + 1) * 16];
                let y = &batch.targets[row * 16..(row + 1) * 16];
                for t in 0..16 {
                    assert_eq!(y[t], x[t] + 1);
                    if t > 0 {
                        assert_eq!(x[t], x[t - 1] + 1);
                    }
                }
            }
        }
    }

    #[test]
    fn batcher_is_deterministic_and_resumes_exactly() {
        let tokens = pseudo_random_tokens(5000, 500, 3);
        for sampling in [Sampling::Random, Sampling::Sequential] {
            let mut straight = Batcher::new(&tokens, config(sampling)).unwrap();
            let uninterrupted: Vec<Batch> = (0..20).map(|_| straight.next_batch()).collect();

            let mut first = Batcher::new(&tokens, config(sampling)).unwrap();
            let mut resumed_run: Vec<Batch> = (0..7).map(|_| first.next_batch()).collect();
            let state = first.state();
            assert_eq!(state.step, 7);
            let mut second = Batcher::resume(&tokens, config(sampling), state.step).unwrap();
            resumed_run.extend((7..20).map(|_| second.next_batch()));
            assert_eq!(uninterrupted, resumed_run, "{sampling:?}");

            // A different seed gives a different stream.
            let mut other = config(sampling);
            other.seed = 43;
            let other_first = Batcher::new(&tokens, other).unwrap().batch_at(0);
            assert_ne!(other_first, uninterrupted[0], "{sampling:?}");
        }
    }

    #[test]
    fn sequential_sampling_covers_each_window_once_per_epoch() {
        let tokens: Vec<u32> = (0..16 * 8 + 1).collect();
        let batcher = Batcher::new(&tokens, config(Sampling::Sequential)).unwrap();
        let mut starts: Vec<u32> = (0..2)
            .flat_map(|s| {
                let b = batcher.batch_at(s);
                (0..4).map(move |r| b.inputs[r * 16])
            })
            .collect();
        starts.sort();
        assert_eq!(starts, (0..8).map(|k| k * 16).collect::<Vec<_>>());
    }

    #[test]
    fn eval_batches_cover_every_target_once() {
        let tokens: Vec<u32> = (0..16 * 10 + 5).collect();
        let batches: Vec<Batch> = eval_batches(&tokens, 4, 16).collect();
        assert_eq!(
            batches.iter().map(|b| b.batch_size).collect::<Vec<_>>(),
            [4, 4, 2]
        );
        let targets: Vec<u32> = batches.iter().flat_map(|b| b.targets.clone()).collect();
        assert_eq!(targets, (1..=160).collect::<Vec<_>>());
    }
}
