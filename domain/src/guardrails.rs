//! The agent's hard guardrails, as pure functions.
//!
//! Input: what a customer message must never be answered by the AI alone
//! (pricing, refunds, legal threats, explicit requests for a human, anger).
//! Output: what a draft must never say without a human looking at it
//! (prices, refunds, internal systems, claims the knowledge base does not
//! support).

use std::collections::HashSet;

use crate::sentiment::{self, Sentiment};
use crate::ticket::EscalationReason;
use crate::Channel;

fn normalise(text: &str) -> String {
    let lowered: String = text
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '$' || c == '€' || c == '£' {
                c
            } else {
                ' '
            }
        })
        .collect();
    format!(
        " {} ",
        lowered.split_whitespace().collect::<Vec<_>>().join(" ")
    )
}

/// Whether `phrase` occurs in `normalised` as whole words.
fn has(normalised: &str, phrase: &str) -> bool {
    normalised.contains(&format!(" {phrase} "))
}

fn has_any(normalised: &str, phrases: &[&str]) -> bool {
    phrases.iter().any(|p| has(normalised, p))
}

const LEGAL: &[&str] = &[
    "lawyer",
    "lawyers",
    "legal",
    "sue",
    "suing",
    "sued",
    "attorney",
    "attorneys",
    "lawsuit",
    "court",
    "legal action",
    "solicitor",
];
const REFUND: &[&str] = &[
    "refund",
    "refunds",
    "refunded",
    "money back",
    "reimburse",
    "reimbursement",
    "chargeback",
    "charge back",
    "repay",
    "compensation",
];
const PRICING: &[&str] = &[
    "price",
    "prices",
    "pricing",
    "cost",
    "costs",
    "how much",
    "quote",
    "discount",
    "discounts",
    "cheaper",
    "per seat",
    "per user",
    "fee",
    "fees",
    "rate card",
    "tariff",
];
const HUMAN: &[&str] = &[
    "talk to a person",
    "speak to a person",
    "talk to a human",
    "speak to a human",
    "human agent",
    "real person",
    "real human",
    "talk to someone",
    "speak to someone",
    "live agent",
    "talk to an agent",
    "speak to an agent",
    "speak with a person",
    "speak with someone",
    "customer service representative",
    "talk to a representative",
    "speak to a representative",
];
/// On WhatsApp, a message that is only one of these words asks for a human.
const HUMAN_BARE: &[&str] = &["human", "agent", "representative", "person", "operator"];

/// What the input guardrail found.
#[derive(Debug, Clone, PartialEq)]
pub struct InputAssessment {
    /// Why the message must go to a human, if it must.
    pub escalate: Option<EscalationReason>,
    pub sentiment: Sentiment,
}

/// Checks a customer message. When several reasons apply the most serious
/// wins: legal, refund, pricing, an explicit request for a human, anger.
pub fn assess_input(text: &str, channel: Channel) -> InputAssessment {
    let n = normalise(text);
    let sentiment = sentiment::score(text);
    let bare = n.trim();
    let escalate = if has_any(&n, LEGAL) {
        Some(EscalationReason::Legal)
    } else if has_any(&n, REFUND) {
        Some(EscalationReason::RefundRequest)
    } else if has_any(&n, PRICING) {
        Some(EscalationReason::PricingInquiry)
    } else if has_any(&n, HUMAN) || (channel == Channel::Whatsapp && HUMAN_BARE.contains(&bare)) {
        Some(EscalationReason::HumanRequested)
    } else if sentiment.is_negative() || sentiment.profane {
        Some(EscalationReason::NegativeSentiment)
    } else {
        None
    };
    InputAssessment {
        escalate,
        sentiment,
    }
}

/// Why a draft may not go out without a human.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DraftIssue {
    MentionsPrice,
    PromisesRefund,
    NamesInternalSystem(String),
    Unsupported(String),
}

impl DraftIssue {
    pub fn describe(&self) -> String {
        match self {
            DraftIssue::MentionsPrice => "mentions a price".into(),
            DraftIssue::PromisesRefund => "mentions a refund".into(),
            DraftIssue::NamesInternalSystem(s) => format!("names an internal system ({s})"),
            DraftIssue::Unsupported(s) => format!("not supported by the knowledge base: {s:?}"),
        }
    }
}

/// Names of systems customers must not hear about.
pub const INTERNAL_SYSTEMS: &[&str] = &[
    "jira",
    "salesforce",
    "zendesk",
    "kibana",
    "grafana",
    "datadog",
    "pagerduty",
    "admin panel",
    "back office",
    "backoffice",
    "internal tool",
    "internal wiki",
    "staging",
    "postgres",
    "kafka",
    "casebook",
];

const STOPWORDS: &[&str] = &[
    "the", "a", "an", "and", "or", "but", "to", "of", "in", "on", "at", "for", "with", "by",
    "from", "is", "are", "was", "were", "be", "been", "it", "its", "this", "that", "these",
    "those", "you", "your", "we", "our", "i", "my", "me", "us", "can", "will", "would", "could",
    "should", "do", "does", "did", "have", "has", "had", "if", "then", "so", "as", "not", "no",
    "yes", "there", "here", "what", "which", "who", "how", "when", "where", "also", "just", "any",
    "all", "some", "into", "out", "up", "about", "than", "more", "most", "please", "thanks",
    "thank", "hi", "hello", "dear", "regards", "best", "let", "know", "need", "help", "happy",
    "glad", "once",
];

fn stem(word: &str) -> String {
    let w = word.trim_matches('\'');
    for suffix in ["ing", "ed", "es", "s"] {
        if w.len() > suffix.len() + 3 {
            if let Some(stripped) = w.strip_suffix(suffix) {
                return stripped.to_string();
            }
        }
    }
    w.to_string()
}

/// The words of a text that carry meaning (no stop words), lightly stemmed.
pub fn content_words(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.len() > 1 && !STOPWORDS.contains(w))
        .map(stem)
        .collect()
}

/// The draft's sentences.
pub fn sentences(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let chars: Vec<char> = text.chars().collect();
    for (i, c) in chars.iter().enumerate() {
        current.push(*c);
        let end = matches!(c, '.' | '!' | '?' | '\n')
            && chars.get(i + 1).is_none_or(|n| n.is_whitespace());
        if end {
            let s = current.trim().to_string();
            if !s.is_empty() {
                out.push(s);
            }
            current.clear();
        }
    }
    let s = current.trim().to_string();
    if !s.is_empty() {
        out.push(s);
    }
    out
}

/// Share of a sentence's content words a passage set must contain for the
/// sentence to count as supported.
pub const SUPPORT_THRESHOLD: f64 = 0.5;

/// How many of the draft's substantive sentences the passages support, and
/// which do not. Sentences of fewer than four content words (greetings,
/// sign-offs, "Let me know if that helps") are not judged.
pub fn support(draft: &str, passages: &[&str]) -> (usize, Vec<String>) {
    let vocabulary: HashSet<String> = passages.iter().flat_map(|p| content_words(p)).collect();
    let mut supported = 0;
    let mut unsupported = Vec::new();
    for sentence in sentences(draft) {
        let words = content_words(&sentence);
        if words.len() < 4 {
            continue;
        }
        let known = words.iter().filter(|w| vocabulary.contains(*w)).count();
        if known as f64 / words.len() as f64 >= SUPPORT_THRESHOLD {
            supported += 1;
        } else {
            unsupported.push(sentence);
        }
    }
    (supported, unsupported)
}

fn mentions_price(n: &str) -> bool {
    let has_currency_amount = n.split_whitespace().any(|w| {
        (w.starts_with(['$', '€', '£']) || w.ends_with(['$', '€', '£']))
            && w.chars().any(|c| c.is_ascii_digit())
    });
    has_currency_amount
        || has_any(
            n,
            &[
                "usd",
                "eur",
                "gbp",
                "dollars",
                "euros",
                "pounds",
                "per month",
                "per year",
                "a month",
                "a year",
            ],
        ) && n
            .split_whitespace()
            .any(|w| w.chars().all(|c| c.is_ascii_digit()))
        || has_any(n, &["price", "prices", "pricing", "costs"])
}

/// Checks a draft against the passages it was grounded in.
pub fn review_draft(draft: &str, passages: &[&str]) -> Vec<DraftIssue> {
    let n = normalise(draft);
    let mut issues = Vec::new();
    if mentions_price(&n) {
        issues.push(DraftIssue::MentionsPrice);
    }
    if has_any(&n, REFUND) {
        issues.push(DraftIssue::PromisesRefund);
    }
    for system in INTERNAL_SYSTEMS {
        if has(&n, system) {
            issues.push(DraftIssue::NamesInternalSystem(system.to_string()));
        }
    }
    let (_, unsupported) = support(draft, passages);
    for sentence in unsupported {
        let short: String = sentence.chars().take(80).collect();
        issues.push(DraftIssue::Unsupported(short));
    }
    issues
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(text: &str, channel: Channel) -> Option<EscalationReason> {
        assess_input(text, channel).escalate
    }

    #[test]
    fn questions_about_the_product_pass() {
        for text in [
            "How do I export my data to CSV?",
            "Where can I change my password?",
            "Is there a mobile app for Android?",
            "Can I invite my team to a workspace?",
        ] {
            assert_eq!(reason(text, Channel::Email), None, "{text}");
        }
    }

    #[test]
    fn each_input_rule_has_its_reason() {
        let cases = [
            (
                "How much does the Pro plan cost?",
                EscalationReason::PricingInquiry,
            ),
            (
                "Can I get a discount for 50 seats?",
                EscalationReason::PricingInquiry,
            ),
            (
                "I want a refund for last month.",
                EscalationReason::RefundRequest,
            ),
            ("Give me my money back", EscalationReason::RefundRequest),
            ("My lawyer will hear about this.", EscalationReason::Legal),
            ("We will sue you.", EscalationReason::Legal),
            (
                "I need to talk to a person please",
                EscalationReason::HumanRequested,
            ),
            ("Can I get a human agent?", EscalationReason::HumanRequested),
            (
                "This is the worst, useless support ever!!",
                EscalationReason::NegativeSentiment,
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(reason(text, Channel::Webform), Some(expected), "{text}");
        }
    }

    #[test]
    fn legal_outranks_refund_and_refund_outranks_pricing() {
        assert_eq!(
            reason("Refund me or my attorney calls", Channel::Email),
            Some(EscalationReason::Legal)
        );
        assert_eq!(
            reason("What does a refund cost me?", Channel::Email),
            Some(EscalationReason::RefundRequest)
        );
    }

    #[test]
    fn a_bare_human_on_whatsapp_asks_for_a_human() {
        assert_eq!(
            reason("human", Channel::Whatsapp),
            Some(EscalationReason::HumanRequested)
        );
        assert_eq!(
            reason(" Agent! ", Channel::Whatsapp),
            Some(EscalationReason::HumanRequested)
        );
        assert_eq!(
            reason("representative", Channel::Whatsapp),
            Some(EscalationReason::HumanRequested)
        );
        // By email a bare word is not enough, and words inside others never count.
        assert_eq!(reason("human", Channel::Email), None);
        assert_eq!(
            reason("Is the legacy exporter still supported?", Channel::Email),
            None
        );
        assert_eq!(reason("The agenda view is empty", Channel::Whatsapp), None);
    }

    #[test]
    fn drafts_with_prices_refunds_or_internal_names_are_held() {
        let passages = ["Open Settings, then Billing, to see your plan."];
        assert!(review_draft("The Pro plan is $49 per month.", &passages)
            .contains(&DraftIssue::MentionsPrice));
        assert!(review_draft("We will refund you today.", &passages)
            .contains(&DraftIssue::PromisesRefund));
        assert!(review_draft("I checked Jira for you.", &passages)
            .contains(&DraftIssue::NamesInternalSystem("jira".into())));
    }

    #[test]
    fn a_grounded_draft_passes_and_an_invented_one_does_not() {
        let passages = [
            "To export your data, open Settings, choose Export, pick CSV or JSON and press Download. Large exports are emailed to you.",
        ];
        let grounded = "Hi Ada! To export your data, open Settings and choose Export. Pick CSV and press Download. Hope this helps!";
        assert_eq!(review_draft(grounded, &passages), vec![]);
        let invented =
            "Exports are instantly synchronised to Google Drive every night automatically.";
        let issues = review_draft(invented, &passages);
        assert!(
            matches!(issues.as_slice(), [DraftIssue::Unsupported(_)]),
            "{issues:?}"
        );
    }

    #[test]
    fn sentences_split_on_terminal_punctuation() {
        assert_eq!(
            sentences("Version 2.5 is out. Update now! Questions? Ask."),
            vec!["Version 2.5 is out.", "Update now!", "Questions?", "Ask."]
        );
    }
}
