//! Channel formatting of replies: an email with greeting, signature and
//! ticket reference (at most 500 words); WhatsApp messages under 300
//! characters each, split at sentence boundaries, in WhatsApp's markup; a
//! semi-formal web form reply (at most 300 words), which is also sent by
//! email. The ticket's first reply also carries the customer's status link
//! (see `crate::status_link`), within the same bounds once delivery adds
//! its token.

use crate::guardrails::sentences;
use crate::markdown::{to_plain, to_whatsapp};
use crate::status_link::TOKEN_SUFFIX_LEN;
use crate::ticket::EscalationReason;
use crate::Channel;

pub const EMAIL_MAX_WORDS: usize = 500;
pub const WEBFORM_MAX_WORDS: usize = 300;
/// Every WhatsApp message stays under this many characters.
pub const WHATSAPP_MAX_CHARS: usize = 300;

/// The short reference customers see: the last 8 hex digits of the ticket
/// id (the random part; the first digits of a v7 id are its timestamp).
pub fn ticket_reference(ticket_id: uuid::Uuid) -> String {
    ticket_id.simple().to_string()[24..].to_uppercase()
}

/// Who the reply is for and how it is signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyContext {
    pub customer_name: Option<String>,
    /// Shown to the customer: see [`ticket_reference`].
    pub ticket_reference: String,
    pub signature: String,
    /// The status page's address (without its token), on the ticket's
    /// first reply only.
    pub status_link: Option<String>,
}

impl ReplyContext {
    pub fn new(customer_name: Option<String>, ticket_id: uuid::Uuid, signature: &str) -> Self {
        Self {
            customer_name,
            ticket_reference: ticket_reference(ticket_id),
            signature: signature.to_string(),
            status_link: None,
        }
    }

    /// Puts the status link in the reply (see `crate::status_link`).
    pub fn with_status_link(mut self, link: Option<String>) -> Self {
        self.status_link = link;
        self
    }

    fn first_name(&self) -> Option<&str> {
        self.customer_name
            .as_deref()
            .and_then(|n| n.split_whitespace().next())
            .filter(|n| n.chars().count() <= 40)
    }
}

/// A reply ready for its channel: one part, or several WhatsApp messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormattedReply {
    pub body: String,
    pub parts: Vec<String>,
}

pub fn format_reply(channel: Channel, text: &str, ctx: &ReplyContext) -> FormattedReply {
    match channel {
        Channel::Email => {
            let greeting = match ctx.first_name() {
                Some(name) => format!("Hi {name},"),
                None => "Hello,".to_string(),
            };
            letter(
                &greeting,
                &to_plain(text),
                &format!("Best regards,\n{}", ctx.signature),
                ctx,
                EMAIL_MAX_WORDS,
            )
        }
        Channel::Webform => {
            let greeting = match ctx.first_name() {
                Some(name) => format!("Hello {name},"),
                None => "Hello,".to_string(),
            };
            let closing = format!("Kind regards,\n{}", ctx.signature);
            letter(&greeting, &to_plain(text), &closing, ctx, WEBFORM_MAX_WORDS)
        }
        Channel::Whatsapp => {
            let mut parts = split_for_whatsapp(&whatsapp_markup(text));
            if let Some(link) = &ctx.status_link {
                append_whatsapp_link(&mut parts, link);
            }
            FormattedReply {
                body: parts.join("\n"),
                parts,
            }
        }
    }
}

fn word_count(text: &str) -> usize {
    text.split_whitespace().count()
}

fn letter(
    greeting: &str,
    text: &str,
    closing: &str,
    ctx: &ReplyContext,
    max_words: usize,
) -> FormattedReply {
    let reference = format!("Ticket reference: {}", ctx.ticket_reference);
    // The link is one word, with or without its token.
    let link = ctx
        .status_link
        .as_deref()
        .map(|l| format!("\n\nYou can see where your request stands at any time: {l}"))
        .unwrap_or_default();
    let frame =
        word_count(greeting) + word_count(closing) + word_count(&reference) + word_count(&link);
    let body = fit_words(text.trim(), max_words.saturating_sub(frame));
    let full = format!("{greeting}\n\n{body}{link}\n\n{closing}\n\n{reference}");
    FormattedReply {
        parts: vec![full.clone()],
        body: full,
    }
}

/// The longest run of whole sentences within `budget` words; a first
/// sentence that alone is too long is cut at a word, with an ellipsis.
fn fit_words(text: &str, budget: usize) -> String {
    if word_count(text) <= budget {
        return text.to_string();
    }
    let mut out = String::new();
    let mut used = 0;
    for sentence in sentences(text) {
        let n = word_count(&sentence);
        if used + n > budget {
            break;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&sentence);
        used += n;
    }
    if out.is_empty() && budget > 0 {
        let words: Vec<&str> = text.split_whitespace().take(budget).collect();
        out = format!("{}…", words.join(" "));
    }
    out
}

/// Markdown to WhatsApp's markup (`crate::markdown::to_whatsapp`):
/// `**bold**` → `*bold*`, headings bold, lists as lines, code indented.
pub fn whatsapp_markup(text: &str) -> String {
    to_whatsapp(text)
}

/// Packs sentences into messages under the limit, keeping the text's line
/// breaks (a list's items stay on lines of their own); a sentence too long
/// for one message is split between words, a word too long between
/// characters.
pub fn split_for_whatsapp(text: &str) -> Vec<String> {
    let limit = WHATSAPP_MAX_CHARS - 1;
    // Each piece, and whether it starts a line.
    let mut pieces: Vec<(String, bool)> = Vec::new();
    for line in text.lines() {
        let mut line_pieces: Vec<String> = Vec::new();
        split_line(line, limit, &mut line_pieces);
        for (i, piece) in line_pieces.into_iter().enumerate() {
            pieces.push((piece, i == 0));
        }
    }
    let mut parts: Vec<String> = Vec::new();
    for (piece, new_line) in pieces {
        match parts.last_mut() {
            Some(last) if last.chars().count() + 1 + piece.chars().count() <= limit => {
                last.push(if new_line { '\n' } else { ' ' });
                last.push_str(&piece);
            }
            _ => parts.push(piece),
        }
    }
    parts
}

/// One line's sentences, each within `limit` characters.
fn split_line(text: &str, limit: usize, pieces: &mut Vec<String>) {
    for sentence in sentences(text) {
        if sentence.chars().count() <= limit {
            pieces.push(sentence);
            continue;
        }
        let mut current = String::new();
        for word in sentence.split_whitespace() {
            let mut word = word.to_string();
            while word.chars().count() > limit {
                if !current.is_empty() {
                    pieces.push(std::mem::take(&mut current));
                }
                let head: String = word.chars().take(limit).collect();
                word = word.chars().skip(limit).collect();
                pieces.push(head);
            }
            let needed =
                current.chars().count() + usize::from(!current.is_empty()) + word.chars().count();
            if needed > limit {
                pieces.push(std::mem::take(&mut current));
            }
            if !current.is_empty() {
                current.push(' ');
            }
            current.push_str(&word);
        }
        if !current.is_empty() {
            pieces.push(current);
        }
    }
}

/// Adds the status link to WhatsApp messages: at the end of the last one
/// when it fits there, else as a message of its own, always with room for
/// the token delivery adds. A link too long for any message (an absurd
/// `CASEBOOK_PUBLIC_URL`) is left out rather than cut.
fn append_whatsapp_link(parts: &mut Vec<String>, link: &str) {
    let limit = WHATSAPP_MAX_CHARS - 1;
    let line = format!("Follow your request here: {link} (or just reply in this chat).");
    let needed = line.chars().count() + TOKEN_SUFFIX_LEN;
    if needed > limit {
        return;
    }
    match parts.last_mut() {
        Some(last) if last.chars().count() + 2 + needed <= limit => {
            last.push_str("\n\n");
            last.push_str(&line);
        }
        _ => parts.push(line),
    }
}

/// The holding reply to a customer who writes while a person holds the
/// ticket: sent at most once per hand-off (the ticket decides).
pub const HUMAN_WILL_REPLY: &str =
    "Thanks for your message. A member of our team has your conversation and will reply here shortly.";

/// The short reply a customer gets when a human takes over.
pub fn holding_reply(reason: EscalationReason) -> &'static str {
    match reason {
        EscalationReason::PricingInquiry => {
            "Thanks for asking about pricing. A member of our team will get back to you with the details shortly."
        }
        EscalationReason::RefundRequest => {
            "Thanks for your message. A member of our billing team will review your request and get back to you shortly."
        }
        EscalationReason::Legal => "Thanks for your message. We have passed it to the right team, who will contact you shortly.",
        EscalationReason::NegativeSentiment => {
            "We are sorry for the trouble. A member of our team is looking into this personally and will reply shortly."
        }
        EscalationReason::HumanRequested => "Of course. A member of our team will take over this conversation shortly.",
        EscalationReason::KnowledgeGap
        | EscalationReason::DeliveryFailed
        | EscalationReason::ModelUnavailable
        | EscalationReason::Manual
        | EscalationReason::AutomatedMessage
        | EscalationReason::AutoReplyLimit
        | EscalationReason::WhatsappWindowClosed => {
            "Thanks for your message. A member of our team will look into it and get back to you shortly."
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ctx() -> ReplyContext {
        ReplyContext::new(
            Some("Ada Lovelace".into()),
            uuid::Uuid::from_u128(0xabcd_ef12_0000),
            "The Acme Support Team",
        )
    }

    #[test]
    fn an_email_has_greeting_signature_and_reference() {
        let r = format_reply(Channel::Email, "Open Settings, then Export.", &ctx());
        assert!(r.body.starts_with("Hi Ada,\n\nOpen Settings, then Export."));
        assert!(r.body.contains("Best regards,\nThe Acme Support Team"));
        assert!(r
            .body
            .ends_with(&format!("Ticket reference: {}", ctx().ticket_reference)));
        assert_eq!(r.parts.len(), 1);
    }

    #[test]
    fn a_long_whatsapp_reply_is_split_at_sentences() {
        let text = "First, open the app and sign in with your work account. ".repeat(8);
        let r = format_reply(Channel::Whatsapp, &text, &ctx());
        assert!(r.parts.len() > 1);
        for p in &r.parts {
            assert!(p.chars().count() < WHATSAPP_MAX_CHARS);
            assert!(p.ends_with('.'), "{p:?} ends mid-sentence");
        }
    }

    #[test]
    fn whatsapp_gets_whatsapp_markup() {
        assert_eq!(
            whatsapp_markup("## Steps\n- **Open** Settings"),
            "*Steps*\n\n• *Open* Settings"
        );
    }

    #[test]
    fn no_markdown_reaches_any_channel() {
        let md = "## Export a project\n\n1. Open the project and choose **Export**.\n2. Select **Start export**.\n\n```\nEXP-123\n```";
        let email = format_reply(Channel::Email, md, &ctx());
        assert!(email.body.contains("Export a project\n\n1. Open the project and choose Export.\n2. Select Start export.\n\n    EXP-123"), "{}", email.body);
        let form = format_reply(Channel::Webform, md, &ctx());
        assert!(
            form.body
                .contains("1. Open the project and choose Export.\n2. Select Start export."),
            "{}",
            form.body
        );
        let whatsapp = format_reply(Channel::Whatsapp, md, &ctx());
        assert_eq!(whatsapp.parts, vec!["*Export a project*\n1. Open the project and choose *Export*.\n2. Select *Start export*.\nEXP-123"]);
        for body in [&email.body, &form.body, &whatsapp.body] {
            assert!(
                !body.contains("**") && !body.contains('#') && !body.contains("```"),
                "{body}"
            );
        }
    }

    #[test]
    fn the_web_form_reply_is_semi_formal_and_plain() {
        let r = format_reply(Channel::Webform, "**Open** Settings.", &ctx());
        assert!(r.body.starts_with("Hello Ada,\n\nOpen Settings."));
        assert!(r.body.contains("Kind regards,"));
    }

    #[test]
    fn every_reason_has_a_holding_reply_without_promises() {
        for reason in EscalationReason::ALL {
            let text = holding_reply(reason).to_lowercase();
            assert!(!text.contains("refund") && !text.contains('$'), "{text}");
        }
    }

    const LINK: &str = "https://help.example.com/ticket/0195f3a2-8c1e-7d40-9a4b-3c2d1e0f9a8b";

    fn with_link() -> ReplyContext {
        ctx().with_status_link(Some(LINK.into()))
    }

    /// What delivery sends: the link with its token.
    fn delivered(part: &str) -> String {
        crate::status_link::with_token(part, LINK, &"T".repeat(32))
    }

    #[test]
    fn the_first_email_carries_the_link_above_the_signature() {
        let r = format_reply(Channel::Email, "Open Settings, then Export.", &with_link());
        assert!(r.body.contains(&format!(
            "Open Settings, then Export.\n\nYou can see where your request stands at any time: {LINK}\n\nBest regards,"
        )));
        assert!(r
            .body
            .ends_with(&format!("Ticket reference: {}", ctx().ticket_reference)));
        let plain = format_reply(Channel::Email, "Open Settings, then Export.", &ctx());
        assert!(!plain.body.contains("/ticket/"));
    }

    #[test]
    fn the_whatsapp_link_joins_the_last_message_or_gets_its_own() {
        let short = format_reply(Channel::Whatsapp, "Open Settings.", &with_link());
        assert_eq!(short.parts.len(), 1);
        assert!(short.parts[0].starts_with("Open Settings.\n\nFollow your request here: "));
        assert!(short.parts[0].ends_with('.'));
        let full =
            "Open the app and sign in with your work account, then choose Settings. ".repeat(4);
        let long = format_reply(Channel::Whatsapp, full.trim(), &with_link());
        let last = long.parts.last().unwrap();
        assert!(last.starts_with("Follow your request here: "), "{last}");
        for part in &long.parts {
            assert!(delivered(part).chars().count() < WHATSAPP_MAX_CHARS);
        }
        // A link no message could hold is left out, not cut.
        let absurd = ctx().with_status_link(Some(format!(
            "https://{}.example/ticket/x",
            "a".repeat(300)
        )));
        assert_eq!(
            format_reply(Channel::Whatsapp, "Hi.", &absurd).parts,
            vec!["Hi."]
        );
    }

    proptest! {
        #[test]
        fn with_the_link_and_its_token_every_bound_holds(text in "([a-zA-Z]{1,12}[ .!?\n]{1,2}){0,900}") {
            for channel in [Channel::Email, Channel::Webform] {
                let r = format_reply(channel, &text, &with_link());
                let max = if channel == Channel::Email { EMAIL_MAX_WORDS } else { WEBFORM_MAX_WORDS };
                prop_assert!(word_count(&delivered(&r.body)) <= max);
                prop_assert!(r.body.contains(LINK));
            }
            let r = format_reply(Channel::Whatsapp, &text, &with_link());
            prop_assert!(r.parts.iter().filter(|p| p.contains(LINK)).count() == 1);
            for part in &r.parts {
                prop_assert!(delivered(part).chars().count() < WHATSAPP_MAX_CHARS);
            }
        }

        #[test]
        fn no_email_exceeds_500_words(text in "([a-zA-Z]{1,12}[ .!?\n]{1,2}){0,900}") {
            let r = format_reply(Channel::Email, &text, &ctx());
            prop_assert!(word_count(&r.body) <= EMAIL_MAX_WORDS);
        }

        #[test]
        fn no_web_form_reply_exceeds_300_words(text in "([a-zA-Z]{1,12}[ .!?\n]{1,2}){0,600}") {
            let r = format_reply(Channel::Webform, &text, &ctx());
            prop_assert!(word_count(&r.body) <= WEBFORM_MAX_WORDS);
        }

        #[test]
        fn no_whatsapp_message_reaches_300_characters_and_nothing_is_lost(text in "\\PC{0,2000}") {
            let r = format_reply(Channel::Whatsapp, &text, &ctx());
            for part in &r.parts {
                prop_assert!(part.chars().count() < WHATSAPP_MAX_CHARS);
                prop_assert!(!part.is_empty());
            }
            let squeeze = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<String>();
            prop_assert_eq!(squeeze(&r.parts.concat()), squeeze(&whatsapp_markup(&text)));
        }
    }
}
