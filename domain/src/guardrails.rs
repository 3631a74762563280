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

mod money;
mod tokens;

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

/// What a draft may not do without a human looking at it. Each finding
/// names the sentence (its index in [`sentences`] of the draft) and never
/// carries the draft's text, so findings can be logged; the sentence itself
/// is `sentences(draft)[finding.sentence()]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DraftIssue {
    /// States a monetary amount: a price, a zero price or a discount.
    MentionsPrice { sentence: usize },
    /// Promises, grants or refuses a refund, a reversed, waived or credited
    /// charge.
    PromisesRefund { sentence: usize },
    /// Names one of [`INTERNAL_SYSTEMS`].
    NamesInternalSystem {
        sentence: usize,
        system: &'static str,
    },
    /// A claim the knowledge-base passages do not support (see [`support`]).
    Unsupported { sentence: usize },
}

impl DraftIssue {
    /// The index of the sentence the finding is about.
    pub fn sentence(&self) -> usize {
        match self {
            DraftIssue::MentionsPrice { sentence }
            | DraftIssue::PromisesRefund { sentence }
            | DraftIssue::NamesInternalSystem { sentence, .. }
            | DraftIssue::Unsupported { sentence } => *sentence,
        }
    }

    /// A description for people (approval reasons, logs). It contains no
    /// text of the draft: sentences are numbered from 1.
    pub fn describe(&self) -> String {
        let n = self.sentence() + 1;
        match self {
            DraftIssue::MentionsPrice { .. } => format!("sentence {n} mentions a price"),
            DraftIssue::PromisesRefund { .. } => format!("sentence {n} promises a refund"),
            DraftIssue::NamesInternalSystem { system, .. } => {
                format!("sentence {n} names an internal system ({system})")
            }
            DraftIssue::Unsupported { .. } => {
                format!("sentence {n} is not supported by the knowledge base")
            }
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

/// Words of courtesy, greetings and sign-offs. They make no claim about the
/// product, so the support check ignores them; a sentence of nothing else
/// ("Thanks for reaching out.", "Hope this helps!", "Hi Ada!") is not
/// judged.
const COURTESY: &[&str] = &[
    "thanks",
    "thank",
    "reaching",
    "reach",
    "contacting",
    "writing",
    "hope",
    "helps",
    "helped",
    "helpful",
    "hi",
    "hello",
    "hey",
    "dear",
    "regards",
    "best",
    "kind",
    "kindest",
    "warm",
    "warmest",
    "cheers",
    "sincerely",
    "welcome",
    "question",
    "questions",
    "other",
    "further",
    "anything",
    "else",
    "hesitate",
    "ask",
    "great",
    "day",
    "nice",
    "good",
    "morning",
    "afternoon",
    "evening",
    "glad",
    "happy",
    "pleasure",
    "sorry",
    "apologies",
    "apologise",
    "apologize",
    "inconvenience",
    "patience",
    "understanding",
    "trouble",
    "waiting",
    "wait",
    "touch",
    "hear",
    "soon",
    "assist",
    "assistance",
    "anytime",
    "luck",
    "wishes",
    "ll",
    "ve",
    "re",
    "don",
    "now",
    "today",
    "right",
    "away",
    "already",
    "still",
    "simply",
    "sure",
    "certainly",
    "absolutely",
    "course",
    "again",
    "look",
    "forward",
    "reply",
    "answer",
];
/// Words after which capitalised words are the customer's or our name.
const GREETINGS: &[&str] = &[
    "hi",
    "hello",
    "hey",
    "dear",
    "thanks",
    "thank",
    "you",
    "cheers",
    "regards",
    "best",
    "sincerely",
    "welcome",
    "morning",
    "afternoon",
    "evening",
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

/// The content words of a sentence the support check judges: no courtesy
/// words, no names after a greeting ("Hi Ada", "Thanks, Sam"), no "free"
/// after "feel".
fn claim_words(sentence: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut after_greeting = false;
    let mut previous = String::new();
    for raw in sentence.split(|c: char| !c.is_alphanumeric()) {
        if raw.is_empty() {
            continue;
        }
        let lower = raw.to_lowercase();
        let is_greeting = GREETINGS.contains(&lower.as_str());
        let is_name =
            after_greeting && !is_greeting && raw.chars().next().is_some_and(char::is_uppercase);
        let courtesy =
            COURTESY.contains(&lower.as_str()) || (lower == "free" && previous == "feel");
        if !is_name
            && !courtesy
            && lower.chars().count() > 1
            && !STOPWORDS.contains(&lower.as_str())
            && lower != "feel"
        {
            out.push(stem(&lower));
        }
        after_greeting = is_greeting || is_name;
        previous = lower;
    }
    out
}

/// Abbreviations whose full stop does not end a sentence when a digit or a
/// lower-case word follows ("Rs. 999", "e.g. the export").
const ABBREVIATIONS: &[&str] = &[
    "rs", "fr", "e.g", "i.e", "eg", "ie", "approx", "incl", "excl", "no", "nr", "vs", "mr", "mrs",
    "ms", "dr", "st", "ca", "cf", "ref", "vol", "fig", "ed", "min", "max", "sec",
];

/// The byte ranges of the draft's sentences, trimmed.
fn sentence_spans(text: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut start = 0;
    let push = |out: &mut Vec<(usize, usize)>, from: usize, to: usize| {
        let piece = &text[from..to];
        let lead = piece.len() - piece.trim_start().len();
        let trimmed = piece.trim();
        if !trimmed.is_empty() {
            out.push((from + lead, from + lead + trimmed.len()));
        }
    };
    for (k, &(at, c)) in chars.iter().enumerate() {
        if !matches!(c, '.' | '!' | '?' | '\n') {
            continue;
        }
        let next = chars.get(k + 1).map(|&(_, n)| n);
        if !next.is_none_or(char::is_whitespace) {
            continue;
        }
        if c == '.' {
            let word_start = text[..at]
                .rfind(|ch: char| !(ch.is_alphanumeric() || ch == '.'))
                .map_or(0, |p| {
                    p + text[p..].chars().next().map_or(1, char::len_utf8)
                });
            let word = text[word_start..at].to_lowercase();
            let following = text[at + 1..].trim_start().chars().next();
            if ABBREVIATIONS.contains(&word.as_str())
                && following.is_some_and(|f| f.is_ascii_digit() || f.is_lowercase())
            {
                continue;
            }
        }
        let end = at + c.len_utf8();
        push(&mut out, start, end);
        start = end;
    }
    push(&mut out, start, text.len());
    out
}

/// The draft's sentences.
pub fn sentences(text: &str) -> Vec<String> {
    sentence_spans(text)
        .into_iter()
        .map(|(a, b)| text[a..b].to_string())
        .collect()
}

/// What the support check found: how many sentences make a claim (are
/// judged), how many of those the passages support, and which do not
/// (indexes into [`sentences`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Support {
    pub judged: usize,
    pub supported: usize,
    pub unsupported: Vec<usize>,
}

/// How many claim words of a sentence may be missing from the passages:
/// none for sentences of up to three (a short claim has no room for an
/// invented word: "Exports are free." needs "export" and "free"), one of
/// four, two of five, and at most half from six on.
pub fn allowed_unknown(claim_words: usize) -> usize {
    (claim_words / 2).min(claim_words.saturating_sub(3))
}

/// Judges every sentence of the draft that makes a claim against the
/// passages' vocabulary. Sentences of courtesy only ("Thanks for reaching
/// out.", "Hi Ada!", "Let me know if you have any other questions.") are
/// not judged; every other sentence is, however short, and is supported
/// when at most [`allowed_unknown`] of its claim words are missing from the
/// passages.
pub fn support(draft: &str, passages: &[&str]) -> Support {
    let vocabulary: HashSet<String> = passages.iter().flat_map(|p| content_words(p)).collect();
    let mut result = Support::default();
    for (index, sentence) in sentences(draft).iter().enumerate() {
        let words = claim_words(sentence);
        if words.is_empty() {
            continue;
        }
        result.judged += 1;
        let unknown = words.iter().filter(|w| !vocabulary.contains(*w)).count();
        if unknown <= allowed_unknown(words.len()) {
            result.supported += 1;
        } else {
            result.unsupported.push(index);
        }
    }
    result
}

/// Checks a draft against the passages it was grounded in: every sentence
/// for prices, refund promises and internal names, and every claim for
/// support. Findings come in sentence order.
pub fn review_draft(draft: &str, passages: &[&str]) -> Vec<DraftIssue> {
    let mut issues = Vec::new();
    let sentences = sentences(draft);
    let mut unsupported = vec![false; sentences.len()];
    for index in support(draft, passages).unsupported {
        unsupported[index] = true;
    }
    for (sentence, text) in sentences.iter().enumerate() {
        let tokens = tokens::tokenize(text);
        if money::states_price(&tokens) {
            issues.push(DraftIssue::MentionsPrice { sentence });
        }
        if money::promises_refund(&tokens) {
            issues.push(DraftIssue::PromisesRefund { sentence });
        }
        let n = normalise(text);
        for system in INTERNAL_SYSTEMS {
            if has(&n, system) {
                issues.push(DraftIssue::NamesInternalSystem { sentence, system });
            }
        }
        if unsupported[sentence] {
            issues.push(DraftIssue::Unsupported { sentence });
        }
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
            .contains(&DraftIssue::MentionsPrice { sentence: 0 }));
        assert!(
            review_draft("Open Settings. We will refund you today.", &passages)
                .contains(&DraftIssue::PromisesRefund { sentence: 1 })
        );
        assert!(review_draft("I checked Jira for you.", &passages).contains(
            &DraftIssue::NamesInternalSystem {
                sentence: 0,
                system: "jira"
            }
        ));
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
        assert_eq!(
            review_draft(invented, &passages),
            vec![DraftIssue::Unsupported { sentence: 0 }]
        );
    }

    #[test]
    fn short_claims_are_judged_and_courtesy_is_not() {
        let passages = ["To export your data, open Settings and choose Export."];
        // Before, sentences of fewer than four content words were skipped.
        for short in [
            "Exports are free.",
            "It syncs hourly.",
            "Drive backups run nightly.",
        ] {
            let draft = format!("Thanks for reaching out. {short} Hope this helps!");
            assert_eq!(
                review_draft(&draft, &passages)
                    .into_iter()
                    .filter(|i| matches!(i, DraftIssue::Unsupported { .. }))
                    .collect::<Vec<_>>(),
                vec![DraftIssue::Unsupported { sentence: 1 }],
                "{short}"
            );
        }
        for courtesy in [
            "Thanks for reaching out.",
            "Hi Ada!",
            "Hello Sam, thanks for your patience.",
            "Let me know if you have any other questions.",
            "Feel free to reach out again.",
            "Best regards.",
            "Happy to help!",
        ] {
            let s = support(courtesy, &passages);
            assert_eq!((s.judged, s.unsupported.len()), (0, 0), "{courtesy}");
        }
        let s = support("Open Settings. Choose Export. Thanks!", &passages);
        assert_eq!(
            s,
            Support {
                judged: 2,
                supported: 2,
                unsupported: vec![]
            }
        );
    }

    #[test]
    fn short_sentences_may_miss_fewer_words() {
        assert_eq!(
            (1..=8).map(allowed_unknown).collect::<Vec<_>>(),
            vec![0, 0, 0, 1, 2, 3, 3, 4]
        );
    }

    #[test]
    fn findings_carry_no_text_of_the_draft() {
        let draft = "Write to ada@example.com. Call +44 7700 900123 for a refund of $49.";
        let issues = review_draft(draft, &["Nothing relevant here."]);
        assert!(!issues.is_empty());
        for issue in &issues {
            let logged = format!("{} {:?}", issue.describe(), issue);
            assert!(!logged.contains("ada@"), "{logged}");
            assert!(!logged.contains("7700"), "{logged}");
            assert!(!logged.contains("49"), "{logged}");
        }
        let sentences = sentences(draft);
        let price = issues
            .iter()
            .find(|i| matches!(i, DraftIssue::MentionsPrice { .. }))
            .unwrap();
        assert!(sentences[price.sentence()].contains("$49"));
        assert_eq!(price.describe(), "sentence 2 mentions a price");
    }

    #[test]
    fn a_huge_hostile_draft_is_reviewed_in_linear_time() {
        // One sentence of 60,000 words that trigger every window and
        // sentence-wide check: quadratic work would take minutes.
        let mut draft = String::new();
        for _ in 0..6_000 {
            draft.push_str("refund request 1 to 2 to 3 or no extra extra fee ");
        }
        draft.push_str("costs 49.");
        let started = std::time::Instant::now();
        let issues = review_draft(&draft, &["refund request costs"]);
        assert!(issues.contains(&DraftIssue::MentionsPrice { sentence: 0 }));
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn abbreviations_before_numbers_do_not_end_a_sentence() {
        assert_eq!(
            sentences("The plan is Rs. 999 a month. See e.g. the Billing page."),
            vec!["The plan is Rs. 999 a month.", "See e.g. the Billing page."]
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
