//! Splitting knowledge base documents into overlapping chunks.

/// One chunk of a document: its text, prefixed with the document's title so
/// that its embedding carries the topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub ordinal: usize,
    pub text: String,
}

/// A title from a Markdown document's first `# ` heading, or its first line.
pub fn title_of(markdown: &str) -> Option<String> {
    let first = markdown.lines().map(str::trim).find(|l| !l.is_empty())?;
    Some(first.trim_start_matches('#').trim().to_string()).filter(|t| !t.is_empty())
}

/// Splits `body` into chunks of at most `max_words` words that overlap by
/// `overlap` words, breaking between paragraphs where possible (a paragraph
/// longer than a chunk is broken between words). Each chunk starts with the
/// title.
pub fn chunk(title: &str, body: &str, max_words: usize, overlap: usize) -> Vec<Chunk> {
    assert!(overlap < max_words, "overlap must be smaller than a chunk");
    let mut words_by_paragraph: Vec<Vec<&str>> = body
        .split("\n\n")
        .map(|p| p.split_whitespace().collect::<Vec<_>>())
        .filter(|p| !p.is_empty())
        .collect();
    // Drop the title line if the body repeats it as its heading.
    if let Some(first) = words_by_paragraph.first() {
        if first.first() == Some(&"#") && first[1..].join(" ") == title {
            words_by_paragraph.remove(0);
        }
    }
    let mut chunks: Vec<Vec<&str>> = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    for paragraph in words_by_paragraph {
        // Break before a paragraph that does not fit, if the chunk is
        // already substantial, rather than in its middle.
        if current.len() + paragraph.len() > max_words && current.len() > max_words / 2 {
            flush(&mut current, &mut chunks, overlap);
        }
        for word in paragraph {
            if current.len() == max_words {
                flush(&mut current, &mut chunks, overlap);
            }
            current.push(word);
        }
    }
    if !current.is_empty() && (chunks.is_empty() || current.len() > overlap) {
        chunks.push(current);
    }
    chunks
        .into_iter()
        .enumerate()
        .map(|(ordinal, words)| Chunk {
            ordinal,
            text: format!("{title}\n{}", words.join(" ")),
        })
        .collect()
}

/// Ends the current chunk; the next one starts with its last `overlap` words.
fn flush<'a>(current: &mut Vec<&'a str>, chunks: &mut Vec<Vec<&'a str>>, overlap: usize) {
    let tail = current[current.len().saturating_sub(overlap)..].to_vec();
    chunks.push(std::mem::replace(current, tail));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_document_is_one_chunk_with_its_title() {
        let chunks = chunk(
            "Export",
            "# Export\n\nOpen Settings.\n\nPress Export.",
            50,
            10,
        );
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].text, "Export\nOpen Settings. Press Export.");
    }

    #[test]
    fn long_documents_overlap_and_respect_the_size() {
        let body: String = (0..300).map(|i| format!("w{i} ")).collect();
        let chunks = chunk("T", &body, 100, 20);
        assert!(chunks.len() >= 3);
        for c in &chunks {
            assert!(c.text.split_whitespace().count() <= 101);
        }
        let first: Vec<&str> = chunks[0].text.split_whitespace().collect();
        let second: Vec<&str> = chunks[1].text.split_whitespace().collect();
        assert_eq!(first[first.len() - 20..], second[1..21], "20 words shared");
        assert!(chunks.last().unwrap().text.contains("w299"));
    }

    #[test]
    fn titles_come_from_the_first_heading() {
        assert_eq!(
            title_of("\n# How do I export?\n\nText").as_deref(),
            Some("How do I export?")
        );
        assert_eq!(title_of("   \n"), None);
    }
}
