//! Sanitising of customer-supplied text before it becomes an event.
//!
//! Text is kept as text (customers paste code and angle brackets; it is
//! escaped where it is rendered), but control characters, invisible
//! formatting characters (zero-width and bidirectional overrides, which can
//! disguise content) and stray whitespace are removed.

fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2064}' |
        '\u{2066}'..='\u{2069}' | '\u{FEFF}' | '\u{00AD}')
}

/// One line: controls and newlines become spaces, runs of whitespace collapse.
pub fn single_line(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut pending_space = false;
    for c in raw.chars() {
        if is_invisible(c) {
            continue;
        }
        if c.is_whitespace() || c.is_control() {
            pending_space = !out.is_empty();
            continue;
        }
        if pending_space {
            out.push(' ');
            pending_space = false;
        }
        out.push(c);
    }
    out
}

/// Several lines: line endings become `\n`, controls other than `\n` and `\t`
/// are dropped, trailing spaces go, and more than two blank lines collapse.
pub fn multi_line(raw: &str) -> String {
    let normalised = raw.replace("\r\n", "\n").replace('\r', "\n");
    let mut lines: Vec<String> = Vec::new();
    let mut blank_run = 0;
    for line in normalised.split('\n') {
        let cleaned: String = line
            .chars()
            .filter(|c| !is_invisible(*c) && (!c.is_control() || *c == '\t'))
            .collect();
        let cleaned = cleaned.trim_end().to_string();
        if cleaned.is_empty() {
            blank_run += 1;
            if blank_run > 2 {
                continue;
            }
        } else {
            blank_run = 0;
        }
        lines.push(cleaned);
    }
    lines.join("\n").trim_matches('\n').trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_line_collapses_and_strips() {
        assert_eq!(single_line("  Ada\r\n \t Lovelace\u{0}  "), "Ada Lovelace");
        assert_eq!(single_line("pay\u{202E}lacol"), "paylacol");
        assert_eq!(single_line("\u{200B}"), "");
    }

    #[test]
    fn multi_line_keeps_paragraphs() {
        let raw = "Hello,\r\n\r\n\r\n\r\nMy export fails.   \r\nThanks\u{7}\n\n";
        assert_eq!(multi_line(raw), "Hello,\n\n\nMy export fails.\nThanks");
        assert_eq!(multi_line("a <b> & c"), "a <b> & c");
    }
}
