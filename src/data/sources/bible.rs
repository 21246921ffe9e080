//! The World English Bible from a SWORD zText module: one document per chapter.
//!
//! A zText module stores each testament as `*.bzz`, concatenated zlib streams (one per book,
//! as the module's `BlockType=BOOK` says), and `*.bzs`, an index of 12-byte little-endian
//! records (offset into `.bzz`, compressed size, uncompressed size), one per block. The text is
//! OSIS XML fragments; verse boundaries (the `.bzv` index) are not needed for prose.

use super::{expect_path, Document};
use crate::data::packages::{PackageRef, Registry};
use anyhow::{ensure, Context, Result};
use std::io::Read;
use std::path::Path;

pub const PACKAGE: PackageRef = PackageRef {
    registry: Registry::Debian,
    name: "sword-text-web",
    version: "426.0-1",
    blake3: "50bb0a192d2cebd8e9becd24d0dccd457c4a6d18e8b17218e6387bc2ff8d0a79",
};

const MODULE_DIR: &str = "usr/share/sword/modules/texts/ztext/engWEB2015eb";

pub fn documents(unpacked: &Path) -> Result<Vec<Document>> {
    let module = expect_path(unpacked, MODULE_DIR, &PACKAGE)?;
    let mut documents = Vec::new();
    for testament in ["ot", "nt"] {
        let read = |ext: &str| {
            let path = module.join(format!("{testament}.{ext}"));
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))
        };
        let blocks = read_ztext_blocks(&read("bzs")?, &read("bzz")?)
            .with_context(|| format!("{}: {MODULE_DIR}/{testament}.bzz", PACKAGE.spec()))?;
        for block in blocks {
            for (osis_id, fragment) in split_chapters(&block) {
                let text = osis_to_text(fragment);
                if !text.is_empty() {
                    documents.push(Document {
                        title: format!("World English Bible {}", osis_id.replace('.', " ")),
                        text,
                    });
                }
            }
        }
    }
    Ok(documents)
}

/// The decompressed blocks of one testament, in index order (empty records are skipped).
pub fn read_ztext_blocks(bzs: &[u8], bzz: &[u8]) -> Result<Vec<String>> {
    ensure!(
        bzs.len().is_multiple_of(12),
        "block index is {} bytes, not a whole number of 12-byte records",
        bzs.len()
    );
    let mut blocks = Vec::new();
    for (i, record) in bzs.chunks_exact(12).enumerate() {
        let field = |k: usize| u32::from_le_bytes(record[4 * k..4 * k + 4].try_into().unwrap());
        let (offset, size, uncompressed) = (field(0) as usize, field(1) as usize, field(2));
        if size == 0 {
            continue;
        }
        let compressed = bzz.get(offset..offset + size).with_context(|| {
            format!(
                "block {i} at {offset}+{size} runs past the end of the {}-byte data file",
                bzz.len()
            )
        })?;
        let mut text = Vec::with_capacity(uncompressed as usize);
        flate2::read::ZlibDecoder::new(compressed)
            .read_to_end(&mut text)
            .with_context(|| format!("block {i} is not a zlib stream"))?;
        ensure!(
            text.len() == uncompressed as usize,
            "block {i} decompressed to {} bytes, the index says {uncompressed}",
            text.len()
        );
        blocks.push(String::from_utf8(text).with_context(|| format!("block {i} is not UTF-8"))?);
    }
    Ok(blocks)
}

/// Splits a book's OSIS at its `<chapter sID="Book.N"/>` milestones into (osisID, fragment).
/// What precedes the first chapter (book titles, a preface) stays with the first chapter.
pub fn split_chapters(osis: &str) -> Vec<(String, &str)> {
    let mut starts: Vec<(usize, String)> = Vec::new();
    let mut from = 0;
    while let Some(at) = osis[from..].find("<chapter ") {
        let at = from + at;
        let end = osis[at..].find('>').map_or(osis.len(), |e| at + e + 1);
        if let Some(id) = attribute(&osis[at..end], "sID") {
            starts.push((at, id.to_string()));
        }
        from = end;
    }
    if starts.is_empty() {
        return vec![("book".to_string(), osis)];
    }
    starts[0].0 = 0;
    let mut chapters = Vec::with_capacity(starts.len());
    for (k, (start, id)) in starts.iter().enumerate() {
        let end = starts.get(k + 1).map_or(osis.len(), |next| next.0);
        chapters.push((id.clone(), &osis[*start..end]));
    }
    chapters
}

/// Plain text from OSIS: footnotes and cross-references (`<note>`) are dropped, titles,
/// paragraphs and poetry lines become lines, all other markup goes and its text stays.
pub fn osis_to_text(osis: &str) -> String {
    let mut out = String::with_capacity(osis.len() / 2);
    let mut note_depth = 0usize;
    let mut rest = osis;
    while !rest.is_empty() {
        let Some(open) = rest.find('<') else {
            if note_depth == 0 {
                push_unescaped(&mut out, rest);
            }
            break;
        };
        if note_depth == 0 {
            push_unescaped(&mut out, &rest[..open]);
        }
        let Some(close) = rest[open..].find('>') else {
            break; // a truncated tag ends the fragment
        };
        let tag = &rest[open + 1..open + close];
        rest = &rest[open + close + 1..];

        let closing = tag.starts_with('/');
        let self_closing = tag.ends_with('/');
        let name = tag
            .trim_start_matches('/')
            .split(|c: char| c.is_whitespace() || c == '/')
            .next()
            .unwrap_or_default();
        if name == "note" {
            if closing {
                note_depth = note_depth.saturating_sub(1);
            } else if !self_closing {
                note_depth += 1;
            }
            continue;
        }
        if note_depth > 0 {
            continue;
        }
        let breaks_line = match name {
            "title" | "lb" | "lg" | "item" | "list" | "p" => true,
            // Paragraphs and poetry lines are milestones: `<div sID=../>` ... `<div eID=../>`.
            "div" | "l" => self_closing || closing,
            "chapter" => true,
            _ => false,
        };
        if breaks_line {
            out.push('\n');
        }
    }
    tidy_lines(&out)
}

fn attribute<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=\"");
    let start = tag.find(&key)? + key.len();
    let len = tag[start..].find('"')?;
    Some(&tag[start..start + len])
}

fn push_unescaped(out: &mut String, text: &str) {
    if !text.contains('&') {
        out.push_str(text);
        return;
    }
    out.push_str(
        &text
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    );
}

/// Collapses runs of spaces, trims each line and drops empty lines.
fn tidy_lines(text: &str) -> String {
    text.lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn zlib(text: &str) -> Vec<u8> {
        let mut encoder =
            flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(text.as_bytes()).unwrap();
        encoder.finish().unwrap()
    }

    fn index(records: &[(u32, u32, u32)]) -> Vec<u8> {
        records
            .iter()
            .flat_map(|&(o, s, u)| [o.to_le_bytes(), s.to_le_bytes(), u.to_le_bytes()])
            .flatten()
            .collect()
    }

    #[test]
    fn ztext_blocks_are_read_through_the_index() {
        let (a, b) = ("In the beginning", "<w>Now</w> these are the names");
        let (za, zb) = (zlib(a), zlib(b));
        let bzz = [za.clone(), zb.clone()].concat();
        let bzs = index(&[
            (0, za.len() as u32, a.len() as u32),
            (0, 0, 0), // an empty record, as modules have for absent books
            (za.len() as u32, zb.len() as u32, b.len() as u32),
        ]);
        assert_eq!(read_ztext_blocks(&bzs, &bzz).unwrap(), [a, b]);
    }

    #[test]
    fn ztext_index_errors_are_reported() {
        let z = zlib("text");
        let short = read_ztext_blocks(&[0u8; 13], &z).unwrap_err();
        assert!(short.to_string().contains("12-byte"), "{short}");
        let past_end = read_ztext_blocks(&index(&[(0, z.len() as u32 + 5, 4)]), &z).unwrap_err();
        assert!(past_end.to_string().contains("past the end"), "{past_end}");
        let wrong_size = read_ztext_blocks(&index(&[(0, z.len() as u32, 99)]), &z).unwrap_err();
        assert!(
            wrong_size.to_string().contains("index says 99"),
            "{wrong_size}"
        );
    }

    #[test]
    fn osis_markup_is_stripped_to_prose() {
        let osis = r#"<title type="main">Exodus</title> <div sID="g1" type="x-p"/><w lemma="strong:H0935">Now</w> <w lemma="x">these</w> are the names &amp; sons.<note placement="foot"><reference type="annotateRef">1:1 </reference>A <w>nested</w> footnote.</note> Joseph died.<div eID="g1" type="x-p"/> <lg sID="a"/><l level="1" sID="b"/>“I will sing,<l eID="b" level="1"/><l level="2" sID="c"/>for he has triumphed.<l eID="c" level="2"/><lg eID="a"/>"#;
        assert_eq!(
            osis_to_text(osis),
            "Exodus\nNow these are the names & sons. Joseph died.\n“I will sing,\nfor he has triumphed."
        );
    }

    #[test]
    fn books_split_into_chapters_keeping_the_book_title() {
        let osis = r#"<title>Ruth</title><chapter n="1" osisID="Ruth.1" sID="Ruth.1"/>One.<chapter eID="Ruth.1"/><chapter n="2" osisID="Ruth.2" sID="Ruth.2"/>Two.<chapter eID="Ruth.2"/>"#;
        let chapters = split_chapters(osis);
        let ids: Vec<&str> = chapters.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["Ruth.1", "Ruth.2"]);
        assert_eq!(osis_to_text(chapters[0].1), "Ruth\nOne.");
        assert_eq!(osis_to_text(chapters[1].1), "Two.");
    }
}
