//! Jane Austen's six novels from the R package janeaustenr: one document per chapter.
//!
//! The novels live in an R lazy-load database, `data/Rdata.rdb`: objects back to back, each a
//! 4-byte big-endian uncompressed length followed by a zlib stream of an R serialisation (XDR,
//! i.e. big-endian). Each novel is a character vector, one element per line of text. Only the
//! parts of the serialisation format a character vector uses are read; anything else is an
//! error naming the object.

use super::{expect_path, Document};
use crate::data::packages::{PackageRef, Registry};
use anyhow::{bail, ensure, Context, Result};
use std::path::Path;

pub const PACKAGE: PackageRef = PackageRef {
    registry: Registry::Debian,
    name: "r-cran-janeaustenr",
    version: "1.0.0-1",
    blake3: "34b35d0939d7dc33974d9dc8af0f4217c9134226c020611c236ea86bae3a28d5",
};

const DATABASE: &str = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb";

pub fn documents(unpacked: &Path) -> Result<Vec<Document>> {
    let path = expect_path(unpacked, DATABASE, &PACKAGE)?;
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let novels = read_lazy_load_strings(&bytes)
        .with_context(|| format!("{}: {}", PACKAGE.spec(), path.display()))?;
    Ok(novels.iter().flat_map(|lines| split_novel(lines)).collect())
}

/// Every object of a lazy-load database, each read as a character vector (NA becomes None).
pub fn read_lazy_load_strings(rdb: &[u8]) -> Result<Vec<Vec<Option<String>>>> {
    let mut objects = Vec::new();
    let mut at = 0;
    while at < rdb.len() {
        let k = objects.len();
        let header = rdb
            .get(at..at + 4)
            .with_context(|| format!("object {k} at byte {at}: truncated length"))?;
        let length = u32::from_be_bytes(header.try_into().unwrap()) as usize;
        let mut inflater = flate2::Decompress::new(true);
        let mut serialised = Vec::with_capacity(length);
        let status = inflater
            .decompress_vec(
                &rdb[at + 4..],
                &mut serialised,
                flate2::FlushDecompress::Finish,
            )
            .with_context(|| format!("object {k} at byte {at} is not a zlib stream"))?;
        ensure!(
            status == flate2::Status::StreamEnd && serialised.len() == length,
            "object {k} at byte {at}: decompressed {} of {length} bytes",
            serialised.len()
        );
        at += 4 + inflater.total_in() as usize;
        objects.push(read_character_vector(&serialised).with_context(|| format!("object {k}"))?);
    }
    Ok(objects)
}

const STRSXP: u32 = 16;
const CHARSXP: u32 = 9;

/// A character vector from R's XDR serialisation (format versions 2 and 3).
pub fn read_character_vector(bytes: &[u8]) -> Result<Vec<Option<String>>> {
    let mut reader = XdrReader { bytes, at: 0 };
    ensure!(
        reader.take(2)? == b"X\n",
        "not an XDR (big-endian binary) R serialisation"
    );
    let version = reader.int()?;
    reader.int()?; // the R version that wrote it
    reader.int()?; // the oldest R version that can read it
    match version {
        2 => {}
        3 => {
            let encoding_length = reader.int()? as usize;
            reader.take(encoding_length)?; // native encoding name; strings carry their own
        }
        other => bail!("R serialisation format version {other} is not supported"),
    }
    let flags = reader.int()? as u32;
    ensure!(
        flags & 0xFF == STRSXP,
        "object is R type {} rather than a character vector",
        flags & 0xFF
    );
    let mut length = reader.int()? as i64;
    if length == -1 {
        // Long vectors store the length as two more ints.
        length = ((reader.int()? as i64) << 32) | reader.int()? as u32 as i64;
    }
    let mut strings = Vec::with_capacity(length as usize);
    for i in 0..length {
        let element = reader.int()? as u32;
        ensure!(
            element & 0xFF == CHARSXP,
            "element {i} is R type {} rather than a string",
            element & 0xFF
        );
        let size = reader.int()?;
        if size == -1 {
            strings.push(None); // NA_character_
            continue;
        }
        let raw = reader.take(size as usize)?;
        // janeaustenr marks its strings UTF-8 or ASCII; Latin-1 is decoded lossily.
        strings.push(Some(String::from_utf8_lossy(raw).into_owned()));
    }
    Ok(strings)
}

struct XdrReader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> XdrReader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let slice = self
            .bytes
            .get(self.at..self.at + n)
            .with_context(|| format!("serialisation truncated at byte {}", self.at))?;
        self.at += n;
        Ok(slice)
    }

    fn int(&mut self) -> Result<i32> {
        Ok(i32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }
}

/// Splits a novel (its lines) at `CHAPTER ...` / `Chapter ...` headings. The novel's title is
/// its first line; text before the first chapter (title page, `VOLUME I`) joins chapter one.
pub fn split_novel(lines: &[Option<String>]) -> Vec<Document> {
    let lines: Vec<&str> = lines.iter().map(|l| l.as_deref().unwrap_or("")).collect();
    let novel = lines
        .iter()
        .find(|l| !l.trim().is_empty())
        .map_or("untitled", |l| l.trim());
    let is_heading = |line: &str| line.starts_with("CHAPTER ") || line.starts_with("Chapter ");
    let mut starts: Vec<usize> = (0..lines.len()).filter(|&i| is_heading(lines[i])).collect();
    if starts.is_empty() {
        starts.push(0);
    }
    let mut documents = Vec::with_capacity(starts.len());
    for (k, &start) in starts.iter().enumerate() {
        let from = if k == 0 { 0 } else { start };
        let to = starts.get(k + 1).copied().unwrap_or(lines.len());
        let text = lines[from..to].join("\n").trim().to_string();
        if !text.is_empty() {
            documents.push(Document {
                title: format!("{novel}, {}", lines[start].trim()),
                text,
            });
        }
    }
    documents
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A hand-made version-3 XDR serialisation of a character vector.
    fn serialise(strings: &[Option<&str>]) -> Vec<u8> {
        let mut b = b"X\n".to_vec();
        for v in [3i32, 0x040200, 0x030500, 5] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        b.extend_from_slice(b"UTF-8");
        b.extend_from_slice(&16i32.to_be_bytes());
        b.extend_from_slice(&(strings.len() as i32).to_be_bytes());
        for s in strings {
            b.extend_from_slice(&0x0004_0009i32.to_be_bytes());
            match s {
                Some(s) => {
                    b.extend_from_slice(&(s.len() as i32).to_be_bytes());
                    b.extend_from_slice(s.as_bytes());
                }
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        b
    }

    fn lazy_load_object(serialised: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(serialised).unwrap();
        [
            (serialised.len() as u32).to_be_bytes().to_vec(),
            e.finish().unwrap(),
        ]
        .concat()
    }

    #[test]
    fn lazy_load_database_of_character_vectors_is_read() {
        let first = [
            Some("EMMA"),
            Some(""),
            None,
            Some("CHAPTER I"),
            Some("Emma Woodhouse…"),
        ];
        let second = [Some("Persuasion")];
        let rdb = [
            lazy_load_object(&serialise(&first)),
            lazy_load_object(&serialise(&second)),
        ]
        .concat();
        let objects = read_lazy_load_strings(&rdb).unwrap();
        let expected: Vec<Vec<Option<String>>> = [&first[..], &second[..]]
            .iter()
            .map(|v| v.iter().map(|s| s.map(str::to_string)).collect())
            .collect();
        assert_eq!(objects, expected);
    }

    #[test]
    fn non_character_objects_are_rejected() {
        let mut bytes = serialise(&[Some("x")]);
        bytes[2 + 16 + 5 + 3] = 14; // REALSXP in place of STRSXP
        let err = read_character_vector(&bytes).unwrap_err();
        assert!(err.to_string().contains("R type 14"), "{err}");
    }

    #[test]
    fn novels_split_at_chapter_headings() {
        let lines: Vec<Option<String>> = [
            "EMMA",
            "",
            "VOLUME I",
            "CHAPTER I",
            "One.",
            "",
            "CHAPTER II",
            "Two.",
        ]
        .iter()
        .map(|s| Some(s.to_string()))
        .collect();
        let chapters = split_novel(&lines);
        let titles: Vec<&str> = chapters.iter().map(|d| d.title.as_str()).collect();
        assert_eq!(titles, ["EMMA, CHAPTER I", "EMMA, CHAPTER II"]);
        assert_eq!(chapters[0].text, "EMMA\n\nVOLUME I\nCHAPTER I\nOne.");
        assert_eq!(chapters[1].text, "CHAPTER II\nTwo.");
    }
}
