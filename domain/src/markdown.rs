//! Markdown to a channel's text: knowledge base sections and model output
//! are Markdown, customers read plain email or WhatsApp.
//!
//! - [`to_plain`] (email, web form): headings and paragraphs as lines of
//!   text, numbered lists numbered, bullet lists with `•`, emphasis dropped,
//!   links as "text (address)", code blocks as lines indented by four spaces.
//! - [`to_whatsapp`]: the same, with WhatsApp's own markup: headings and
//!   strong text as `*bold*`, emphasis as `_italic_`.
//!
//! Parsed by pulldown-cmark (CommonMark); raw HTML keeps its text and loses
//! its tags. Nothing is escaped: the result is not Markdown any more.

use pulldown_cmark::{CodeBlockKind, Event, Parser, Tag, TagEnd};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    Plain,
    WhatsApp,
}

/// Plain text for email and the web form.
pub fn to_plain(markdown: &str) -> String {
    render(markdown, Style::Plain)
}

/// Text in WhatsApp's markup.
pub fn to_whatsapp(markdown: &str) -> String {
    render(markdown, Style::WhatsApp)
}

struct Writer {
    style: Style,
    out: String,
    /// Open lists: the next number of an ordered one, None for bullets.
    lists: Vec<Option<u64>>,
    /// A list item's marker was just written: its first block follows on
    /// the same line.
    at_item_start: bool,
    code_block: bool,
    /// Open links: their address and where their text starts.
    links: Vec<(String, usize)>,
}

impl Writer {
    fn trim_trailing_spaces(&mut self) {
        let kept = self.out.trim_end_matches([' ', '\t']).len();
        self.out.truncate(kept);
    }

    /// A new line, unless at the start of one.
    fn line_break(&mut self) {
        self.trim_trailing_spaces();
        if !self.out.is_empty() && !self.out.ends_with('\n') {
            self.out.push('\n');
        }
    }

    /// A blank line between blocks (a line break only inside lists).
    fn block_break(&mut self) {
        if self.at_item_start {
            return;
        }
        if !self.lists.is_empty() {
            self.line_break();
            self.indent();
            return;
        }
        self.trim_trailing_spaces();
        if self.out.is_empty() || self.out.ends_with("\n\n") {
            return;
        }
        if self.out.ends_with('\n') {
            self.out.push('\n');
        } else {
            self.out.push_str("\n\n");
        }
    }

    fn indent(&mut self) {
        for _ in 0..self.lists.len() {
            self.out.push_str("   ");
        }
    }

    fn text(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        self.at_item_start = false;
        if self.code_block {
            for line in text.lines() {
                self.line_break();
                self.indent();
                self.out.push_str("    ");
                self.out.push_str(line);
            }
            if text.ends_with('\n') {
                self.out.push('\n');
            }
        } else {
            self.out.push_str(text);
        }
    }

    fn mark(&mut self, plain: &str, whatsapp: &str) {
        let m = match self.style {
            Style::Plain => plain,
            Style::WhatsApp => whatsapp,
        };
        self.out.push_str(m);
    }

    fn start(&mut self, tag: Tag<'_>) {
        match tag {
            Tag::Paragraph | Tag::BlockQuote(_) | Tag::HtmlBlock => self.block_break(),
            Tag::Heading { .. } => {
                self.block_break();
                self.at_item_start = false;
                self.mark("", "*");
            }
            Tag::CodeBlock(kind) => {
                if !self.at_item_start {
                    self.block_break();
                }
                self.at_item_start = false;
                self.code_block = true;
                if let CodeBlockKind::Indented = kind {
                    // Same result: indented lines.
                }
            }
            Tag::List(start) => {
                if self.lists.is_empty() {
                    self.block_break();
                } else {
                    self.at_item_start = false;
                }
                self.lists.push(start);
            }
            Tag::Item => {
                self.line_break();
                self.at_item_start = false;
                for _ in 1..self.lists.len() {
                    self.out.push_str("   ");
                }
                let marker = match self.lists.last_mut() {
                    Some(Some(n)) => {
                        let m = format!("{n}. ");
                        *n = n.saturating_add(1);
                        m
                    }
                    _ => "• ".to_string(),
                };
                self.out.push_str(&marker);
                self.at_item_start = true;
            }
            Tag::Emphasis => self.mark("", "_"),
            Tag::Strong => self.mark("", "*"),
            Tag::Link { dest_url, .. } => self.links.push((dest_url.to_string(), self.out.len())),
            Tag::TableCell => self.out.push(' '),
            Tag::TableRow | Tag::TableHead => self.line_break(),
            _ => {}
        }
    }

    fn end(&mut self, tag: TagEnd) {
        match tag {
            TagEnd::Heading(_) => {
                self.trim_trailing_spaces();
                self.mark("", "*");
                self.block_break();
            }
            TagEnd::Paragraph | TagEnd::BlockQuote(_) | TagEnd::HtmlBlock => {
                self.at_item_start = false
            }
            TagEnd::CodeBlock => {
                self.code_block = false;
                self.line_break();
            }
            TagEnd::List(_) => {
                self.lists.pop();
                self.line_break();
                if self.lists.is_empty() {
                    self.block_break();
                }
            }
            TagEnd::Item => self.at_item_start = false,
            TagEnd::Emphasis => self.mark("", "_"),
            TagEnd::Strong => self.mark("", "*"),
            TagEnd::Link => {
                if let Some((dest, from)) = self.links.pop() {
                    let shown = self.out.get(from..).unwrap_or("").trim().to_string();
                    let dest_shown = dest.strip_prefix("mailto:").unwrap_or(&dest);
                    if !dest.is_empty() && shown != dest_shown && !dest.starts_with('#') {
                        self.out.push_str(&format!(" ({dest_shown})"));
                    }
                }
            }
            TagEnd::TableCell => self.out.push_str(" |"),
            _ => {}
        }
    }
}

/// Text of raw HTML without its tags.
fn strip_tags(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out
}

fn render(markdown: &str, style: Style) -> String {
    let mut w = Writer {
        style,
        out: String::with_capacity(markdown.len()),
        lists: Vec::new(),
        at_item_start: false,
        code_block: false,
        links: Vec::new(),
    };
    for event in Parser::new(markdown) {
        match event {
            Event::Start(tag) => w.start(tag),
            Event::End(tag) => w.end(tag),
            Event::Text(t) => w.text(&t),
            Event::Code(t) | Event::InlineMath(t) | Event::DisplayMath(t) => w.text(&t),
            Event::Html(t) | Event::InlineHtml(t) => {
                let text = strip_tags(&t);
                w.text(&text)
            }
            Event::SoftBreak => w.out.push(' '),
            Event::HardBreak => {
                w.line_break();
                w.indent();
            }
            Event::Rule => w.block_break(),
            Event::FootnoteReference(t) => w.text(&format!("[{t}]")),
            Event::TaskListMarker(done) => w.text(if done { "[x] " } else { "[ ] " }),
        }
    }
    // Tidy: no trailing spaces, at most one blank line in a row.
    let mut out = String::with_capacity(w.out.len());
    let mut blank = 0;
    for line in w.out.lines() {
        let line = line.trim_end();
        if line.is_empty() {
            blank += 1;
            continue;
        }
        if !out.is_empty() {
            out.push_str(if blank > 0 { "\n\n" } else { "\n" });
        }
        blank = 0;
        out.push_str(line);
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const ARTICLE: &str = "## Export a project\n\n1. Open the project and choose **Export**.\n2. Choose a format:\n   - **CSV**: one row per task.\n   - **JSON**: the full structure.\n3. Select *Start export*.\n\nRun this:\n\n```\ncasebook kb ingest kb/demo\n```\n\nSee [the API](https://example.com/api) or mail <support@example.com>.";

    #[test]
    fn email_text_is_plain_with_numbered_steps() {
        let text = to_plain(ARTICLE);
        assert_eq!(
            text,
            "Export a project\n\n1. Open the project and choose Export.\n2. Choose a format:\n   • CSV: one row per task.\n   • JSON: the full structure.\n3. Select Start export.\n\nRun this:\n\n    casebook kb ingest kb/demo\n\nSee the API (https://example.com/api) or mail support@example.com."
        );
    }

    #[test]
    fn whatsapp_text_uses_its_own_bold() {
        let text = to_whatsapp(ARTICLE);
        assert!(text.starts_with("*Export a project*\n\n1. Open the project and choose *Export*.\n2. Choose a format:\n   • *CSV*: one row per task."), "{text}");
        assert!(text.contains("3. Select _Start export_."), "{text}");
        assert!(
            text.contains("\n    casebook kb ingest kb/demo\n"),
            "{text}"
        );
    }

    #[test]
    fn plain_text_stays_as_it_is() {
        let s = "Thanks for your message. A member of our team will look into it.";
        assert_eq!(to_plain(s), s);
        assert_eq!(to_whatsapp(s), s);
    }

    #[test]
    fn html_loses_its_tags() {
        assert_eq!(to_plain("Hello <b>there</b>"), "Hello there");
    }

    /// Generated Markdown: headings, paragraphs with emphasis and code,
    /// bullet and numbered lists, code blocks.
    fn block() -> impl Strategy<Value = (String, Vec<String>)> {
        let word = "[a-zA-Z][a-z]{0,8}";
        let words = prop::collection::vec(word, 1..8);
        prop_oneof![
            (1..=4usize, words.clone())
                .prop_map(|(level, w)| (format!("{} {}", "#".repeat(level), w.join(" ")), w)),
            (words.clone(), 0..4usize).prop_map(|(w, style)| {
                let mut parts = w.clone();
                let m = ["", "**", "_", "`"][style];
                parts[0] = format!("{m}{}{m}", parts[0]);
                (parts.join(" "), w)
            }),
            (prop::collection::vec(words.clone(), 1..5), any::<bool>()).prop_map(
                |(items, numbered)| {
                    let text = items
                        .iter()
                        .enumerate()
                        .map(|(i, w)| {
                            if numbered {
                                format!("{}. {}", i + 1, w.join(" "))
                            } else {
                                format!("- **{}**", w.join(" "))
                            }
                        })
                        .collect::<Vec<_>>()
                        .join("\n");
                    (text, items.concat())
                }
            ),
            prop::collection::vec(words, 1..4).prop_map(|lines| (
                format!(
                    "```\n{}\n```",
                    lines
                        .iter()
                        .map(|l| l.join(" "))
                        .collect::<Vec<_>>()
                        .join("\n")
                ),
                lines.concat()
            )),
        ]
    }

    fn no_markdown_left(text: &str) -> Result<(), TestCaseError> {
        prop_assert!(
            !text.contains("**") && !text.contains("__") && !text.contains('`'),
            "{text}"
        );
        for line in text.lines() {
            let t = line.trim_start();
            prop_assert!(!t.starts_with('#'), "heading left: {line}");
            prop_assert!(
                !t.starts_with("- ") && !t.starts_with("* ") && !t.starts_with("> "),
                "list syntax left: {line}"
            );
        }
        Ok(())
    }

    /// Every word, in order.
    fn nothing_lost(text: &str, words: &[String]) -> Result<(), TestCaseError> {
        let out: Vec<&str> = text
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty() && !w.chars().all(|c| c.is_ascii_digit()))
            .collect();
        prop_assert_eq!(out, words.iter().map(String::as_str).collect::<Vec<_>>());
        Ok(())
    }

    proptest! {
        #[test]
        fn every_channel_keeps_every_word_and_no_markdown(blocks in prop::collection::vec(block(), 1..8)) {
            let markdown = blocks.iter().map(|b| b.0.as_str()).collect::<Vec<_>>().join("\n\n");
            let words: Vec<String> = blocks.iter().flat_map(|b| b.1.clone()).collect();
            for text in [to_plain(&markdown), to_whatsapp(&markdown)] {
                nothing_lost(&text, &words)?;
                no_markdown_left(&text)?;
            }
            // WhatsApp's bold marks come in pairs.
            let whatsapp = to_whatsapp(&markdown);
            prop_assert_eq!(whatsapp.matches('*').count() % 2, 0);
        }

        #[test]
        fn any_input_is_rendered_without_panic(text in "\\PC{0,400}") {
            let _ = to_plain(&text);
            let _ = to_whatsapp(&text);
        }
    }
}
