//! Corpora, tokenizers, token shards and batching.
//!
//! The flow a pipeline follows: [`corpus::assemble`] (or [`corpus::from_text_file`], or
//! [`stories::assemble`] for generated stories) writes `train.txt` / `heldout.txt`;
//! [`tokenize::tokenise`] trains or loads a tokenizer and writes token shards; training and
//! evaluation read them with [`shards::TokenShard`] and cut batches with [`shards::Batcher`]
//! and [`shards::eval_batches`].

pub mod corpus;
pub mod packages;
pub mod shards;
pub mod sources;
pub mod stories;
pub mod tokenize;
