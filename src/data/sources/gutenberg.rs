//! Removing Project Gutenberg's header and licence from a book's text.

/// The text between Gutenberg's start and end markers, when the text has them.
///
/// The header ends at a `*** START OF THE/THIS PROJECT GUTENBERG EBOOK ... ***` line (or, in
/// older files, `*END*THE SMALL PRINT!`); the licence begins at `*** END OF ...` or at
/// `End of the Project Gutenberg EBook` / `End of Project Gutenberg's ...`. Text without the
/// markers is returned whole (trimmed): the package's plays are already clean.
pub fn strip_boilerplate(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|line| is_header_end(line))
        .map_or(0, |i| i + 1);
    let end = lines[start..]
        .iter()
        .position(|line| is_licence_start(line))
        .map_or(lines.len(), |i| start + i);
    lines[start..end].join("\n").trim().to_string()
}

fn is_header_end(line: &str) -> bool {
    let upper = line.trim().to_ascii_uppercase();
    (upper.starts_with("***") && upper.contains("START OF") && upper.contains("GUTENBERG"))
        || upper.starts_with("*END*THE SMALL PRINT")
}

fn is_licence_start(line: &str) -> bool {
    let upper = line.trim().to_ascii_uppercase();
    (upper.starts_with("***") && upper.contains("END OF") && upper.contains("GUTENBERG"))
        || upper.starts_with("END OF THE PROJECT GUTENBERG")
        || upper.starts_with("END OF PROJECT GUTENBERG")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gutenberg_header_and_licence_are_removed() {
        let book = "The Project Gutenberg EBook of Hamlet\r\n\
                    This eBook is for the use of anyone anywhere at no cost\r\n\
                    *** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\
                    \r\n\
                    HAMLET\r\n\
                    Who's there?\r\n\
                    End of the Project Gutenberg EBook of Hamlet\r\n\
                    *** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\
                    Section 1. General Terms of Use and Redistributing\r\n";
        assert_eq!(strip_boilerplate(book), "HAMLET\nWho's there?");
    }

    #[test]
    fn old_small_print_header_and_star_end_marker() {
        let book =
            "legal words\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\
                    Text of the play.\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\nlicence";
        assert_eq!(strip_boilerplate(book), "Text of the play.");
    }

    #[test]
    fn text_without_markers_is_kept_whole() {
        let play = "\nMACBETH\n\nThe end of Gutenberg's hopes is not a marker.\n";
        assert_eq!(
            strip_boilerplate(play),
            "MACBETH\n\nThe end of Gutenberg's hopes is not a marker."
        );
    }
}
