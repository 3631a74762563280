//! The built-in responder: answers from the one best section, as a person
//! would. Its text is the section's own Markdown (steps in order), cut to
//! the channel's length between blocks, under the section's heading and
//! followed by the article's title; delivery renders it for the channel
//! (`casebook_domain::markdown`). It never stitches sentences of several
//! articles together: when the best section is not clearly better than the
//! best one of another article, it asks which of the two is meant.

use casebook_domain::knowledge::HEADING_SEPARATOR;
use casebook_domain::Channel;

use crate::knowledge::Passage;

/// How much the relevance of the best section and of the best one of
/// another article must differ before the responder picks the first
/// without asking (`knowledge::Passage::score`). (A rival ranked lower
/// though scored higher lost in the ranking: the ranking decided.)
pub const AMBIGUITY_MARGIN: f64 = 0.01;

/// Words of the section an answer carries at most, per channel.
pub fn word_budget(channel: Channel) -> usize {
    match channel {
        Channel::Email => 220,
        Channel::Webform => 180,
        Channel::Whatsapp => 90,
    }
}

/// What the responder says.
#[derive(Debug, Clone, PartialEq)]
pub enum LocalAnswer {
    /// The answer, drawn from one article.
    Answer { body: String, document_id: String },
    /// Which of two articles is meant.
    Clarify {
        body: String,
        document_ids: [String; 2],
    },
}

impl LocalAnswer {
    pub fn body(&self) -> &str {
        match self {
            LocalAnswer::Answer { body, .. } | LocalAnswer::Clarify { body, .. } => body,
        }
    }
}

/// The last part of a passage's heading path (the article title for its
/// introduction).
fn topic(p: &Passage) -> &str {
    p.section
        .as_deref()
        .and_then(|s| s.rsplit(HEADING_SEPARATOR).next())
        .filter(|s| !s.trim().is_empty())
        .unwrap_or(&p.title)
}

/// The first blocks of `markdown` within `budget` words (a first block
/// longer than that: its first lines within it; a first line longer than
/// that: its first words).
fn trim_blocks(markdown: &str, budget: usize) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut used = 0;
    for block in markdown.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let n = block.split_whitespace().count();
        if used + n <= budget {
            out.push(block.to_string());
            used += n;
            continue;
        }
        if out.is_empty() {
            let mut lines: Vec<String> = Vec::new();
            for line in block.lines() {
                let n = line.split_whitespace().count();
                if used + n > budget {
                    if lines.is_empty() {
                        let words: Vec<&str> = line.split_whitespace().take(budget).collect();
                        lines.push(format!("{}…", words.join(" ")));
                    }
                    break;
                }
                lines.push(line.to_string());
                used += n;
            }
            out.push(lines.join("\n"));
        }
        break;
    }
    out.join("\n\n")
}

/// The answer from `passages` (the relevant ones, best first), or None
/// when there are none.
pub fn respond(passages: &[&Passage], channel: Channel) -> Option<LocalAnswer> {
    let best = *passages.first()?;
    let rival = passages
        .iter()
        .find(|p| p.document_id != best.document_id)
        .filter(|p| (p.score - best.score).abs() < AMBIGUITY_MARGIN);
    if let Some(rival) = rival {
        return Some(LocalAnswer::Clarify {
            body: format!(
                "Which do you mean: \"{}\" ({}) or \"{}\" ({})?",
                topic(best),
                best.title,
                topic(rival),
                rival.title
            ),
            document_ids: [best.document_id.clone(), rival.document_id.clone()],
        });
    }
    let heading = topic(best);
    let text = trim_blocks(&best.body, word_budget(channel));
    let body = if heading == best.title {
        format!("{text}\n\nMore in \"{}\".", best.title)
    } else {
        format!("**{heading}**\n\n{text}\n\nMore in \"{}\".", best.title)
    };
    Some(LocalAnswer::Answer {
        body,
        document_id: best.document_id.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passage(doc: &str, title: &str, section: &str, body: &str, score: f64) -> Passage {
        Passage {
            chunk_id: format!("{doc}#0"),
            document_id: doc.into(),
            title: title.into(),
            body: body.into(),
            score,
            section: Some(format!("{title}{HEADING_SEPARATOR}{section}")),
        }
    }

    #[test]
    fn the_answer_is_the_best_section_with_its_steps_in_order() {
        let export = passage(
            "15-export",
            "How do I export my project data?",
            "Export a project",
            "1. Open the project.\n2. Choose **CSV**.\n3. Select **Start export**.",
            0.7,
        );
        let import = passage(
            "16-import",
            "Import",
            "Import from CSV",
            "1. Open Import.",
            0.6,
        );
        let answer = respond(&[&export, &import], Channel::Email).unwrap();
        assert_eq!(
            answer,
            LocalAnswer::Answer {
                body: "**Export a project**\n\n1. Open the project.\n2. Choose **CSV**.\n3. Select **Start export**.\n\nMore in \"How do I export my project data?\".".into(),
                document_id: "15-export".into(),
            }
        );
        assert!(!answer.body().contains("Import"), "one article only");
    }

    #[test]
    fn two_close_articles_make_it_ask() {
        let a = passage("a", "Export", "Export a project", "Text.", 0.6);
        let b = passage("b", "Import", "Import from CSV", "Text.", 0.595);
        let same = passage("a", "Export", "Errors", "Text.", 0.599);
        match respond(&[&a, &same, &b], Channel::Whatsapp).unwrap() {
            LocalAnswer::Clarify { body, document_ids } => {
                assert_eq!(
                    body,
                    "Which do you mean: \"Export a project\" (Export) or \"Import from CSV\" (Import)?"
                );
                assert_eq!(document_ids, ["a".to_string(), "b".to_string()]);
            }
            other => panic!("{other:?}"),
        }
        // A rival ranked lower though much more similar lost on words.
        let far = passage("c", "Import", "Import from CSV", "Text.", 0.75);
        assert!(matches!(
            respond(&[&a, &far], Channel::Email),
            Some(LocalAnswer::Answer { .. })
        ));
        // Another section of the same article is no rival.
        assert!(matches!(
            respond(&[&a, &same], Channel::Whatsapp),
            Some(LocalAnswer::Answer { .. })
        ));
        assert_eq!(respond(&[], Channel::Email), None);
    }

    #[test]
    fn the_answer_fits_the_channel() {
        let long: String = (1..=40)
            .map(|i| format!("Paragraph {i} has exactly seven words here.\n\n"))
            .collect();
        let p = passage("a", "T", "S", &long, 0.8);
        for channel in [Channel::Email, Channel::Webform, Channel::Whatsapp] {
            let body = respond(&[&p], channel).unwrap().body().to_string();
            let words = body.split_whitespace().count();
            assert!(words <= word_budget(channel) + 4, "{channel:?}: {words}");
            assert!(body.contains("Paragraph 1 has"));
            assert!(body.ends_with("More in \"T\"."));
        }
        // One line longer than the budget is cut between words.
        let cut = trim_blocks(&"w ".repeat(500), 10);
        assert_eq!(cut, format!("{}…", ["w"; 10].join(" ")));
    }
}
