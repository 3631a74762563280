//! Ranking knowledge base sections for a question, from evidence the store
//! gathered (pure: no I/O).
//!
//! The store hands over candidates (the sections nearest the question's
//! embedding and those sharing its words), each with its cosine similarity
//! (to the section's embedded text, and to its heading path embedded
//! alone) and which of the question's terms (stemmed lexemes) it holds, in its
//! heading path (article title and section headings) or in its text, and
//! how many sections of the whole knowledge base hold each term.
//!
//! A section's similarity is the larger of its two cosines
//! ([`RankingParams::heading_weight`]): an article's headings are often
//! the customers' own questions ("How do I export my project data?"), and
//! a question can be as near its heading as its text is far, the text
//! being written in the product's words rather than the customer's.
//!
//! A section's relevance is its similarity plus a lexical part: the
//! share of the question's terms it holds, each weighted by its inverse
//! document frequency (a word most sections hold says little; one only a
//! few hold says much), a term in a heading counting fully and one only in
//! the text for [`RankingParams::body_weight`]. An article whose other
//! sections also match lends its best one a damped part of their
//! relevance ([`RankingParams::article_support`]): the article that answers
//! several parts of a question wins over one that shares a phrase.
//!
//! Relevance is on the cosine's scale, so one line (calibrated on the
//! tuning split of `kb/eval`) separates answers from knowledge gaps: a
//! question none of whose rarer words the knowledge base holds falls under
//! it even when the embedding finds a loosely similar section.

use std::collections::{BTreeMap, HashMap};

/// A term of the question and in how many sections of the knowledge base
/// it occurs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryTerm {
    pub lexeme: String,
    pub sections_with: u64,
    /// None: a word of the question. Some(i): a synonym of term i
    /// ([`synonyms`]), which matches for it.
    pub stands_for: Option<usize>,
}

/// Where a candidate section holds a term of the question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TermMatch {
    /// Index into [`CandidateSet::terms`].
    pub term: usize,
    /// In the heading path (the article title or a section heading).
    pub in_heading: bool,
    /// In the section's text.
    pub in_body: bool,
}

/// One candidate section.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub id: String,
    pub document: String,
    /// Cosine similarity of the question to the section's embedded text
    /// (heading path and text).
    pub cosine: f64,
    /// Cosine similarity of the question to the section's heading path
    /// embedded alone (None for a section stored without it).
    pub heading_cosine: Option<f64>,
    pub matches: Vec<TermMatch>,
}

impl Candidate {
    /// How similar the section is to the question: its text's cosine, or
    /// its heading path's where that is higher, at `heading_weight`
    /// ([`RankingParams::heading_weight`]).
    pub fn similarity(&self, heading_weight: f64) -> f64 {
        match self.heading_cosine {
            Some(heading) if heading > self.cosine => {
                self.cosine + heading_weight.clamp(0.0, 1.0) * (heading - self.cosine)
            }
            _ => self.cosine,
        }
    }
}

/// What the store found for one question.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CandidateSet {
    /// Sections in the knowledge base (of the model searched).
    pub total_sections: u64,
    pub terms: Vec<QueryTerm>,
    pub candidates: Vec<Candidate>,
}

/// The ranking's weights, checked on the tuning split of `kb/eval`
/// (`casebook bench answers`, docs/performance.md).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RankingParams {
    /// How much the lexical share (0 to 1) adds to the cosine.
    pub lexical_weight: f64,
    /// What a term found only in a section's text counts for, against 1 in
    /// its heading path.
    pub body_weight: f64,
    /// The share of the article's other matching sections' lexical
    /// relevance its best section gains (the second at this weight, the
    /// third at half of it, ...).
    pub article_support: f64,
    /// How much a question's closeness to the knowledge base as a whole
    /// ([`closeness`]) is taken from its sections' relevance, measured from
    /// [`RankingParams::closeness_centre`]: hubness reduction, as in CSLS
    /// (cross-domain similarity local scaling). A generic question lies
    /// near many sections at once, and its best cosine says less than the
    /// same cosine of a question near few. The same for every candidate of
    /// a question: it moves the knowledge-gap decision, not the order.
    pub specificity: f64,
    /// The closeness at which nothing is taken or added: the mean
    /// closeness of the tuning split's questions, so that relevance stays
    /// on the cosine's scale where the line and the draft confidence read
    /// it (docs/performance.md).
    pub closeness_centre: f64,
    /// How much of the heading path's cosine, where it is above the text's,
    /// a section takes ([`Candidate::similarity`]): 0 reads the text's
    /// embedding alone, 1 the larger of the two.
    pub heading_weight: f64,
}

impl Default for RankingParams {
    fn default() -> Self {
        Self {
            lexical_weight: 0.2,
            body_weight: 1.0,
            article_support: 0.6,
            specificity: 0.5,
            closeness_centre: 0.34,
            heading_weight: 1.0,
        }
    }
}

/// Sections a question's closeness to the knowledge base is measured over:
/// its nearest by embedding (the store gives at least this many).
pub const CLOSENESS_NEIGHBOURS: usize = 20;

/// How near a question is to the knowledge base as a whole: the mean cosine
/// of its [`CLOSENESS_NEIGHBOURS`] nearest candidates (all of them when
/// there are fewer; 0 when there are none). The texts' cosines: the
/// nearest are found by them, and the centre was measured on them.
pub fn closeness(set: &CandidateSet) -> f64 {
    let mut cosines: Vec<f64> = set.candidates.iter().map(|c| c.cosine).collect();
    cosines.sort_by(|a, b| b.total_cmp(a));
    cosines.truncate(CLOSENESS_NEIGHBOURS);
    if cosines.is_empty() {
        0.0
    } else {
        cosines.iter().sum::<f64>() / cosines.len() as f64
    }
}

/// A ranked candidate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ranked {
    /// Index into [`CandidateSet::candidates`].
    pub candidate: usize,
    /// The section's own relevance (similarity plus its lexical part).
    pub own: f64,
    /// What ranks it: its own relevance plus its article's support, read
    /// against the question's closeness to the whole knowledge base
    /// ([`RankingParams::specificity`]).
    pub relevance: f64,
}

/// Inverse document frequency (the BM25 form: never negative, highest for
/// a term in one section).
pub fn idf(sections_with: u64, total_sections: u64) -> f64 {
    let n = total_sections.max(sections_with) as f64;
    let df = sections_with as f64;
    (1.0 + (n - df + 0.5) / (df + 0.5)).ln()
}

/// The share (0 to 1) of the question's term weight a candidate holds: each
/// word of the question weighs its idf, and counts as held when the
/// candidate holds it or one of its synonyms.
pub fn lexical_share(set: &CandidateSet, candidate: &Candidate, params: &RankingParams) -> f64 {
    let word_of = |i: usize| -> Option<usize> {
        let term = set.terms.get(i)?;
        match term.stands_for {
            None => Some(i),
            Some(j) => set
                .terms
                .get(j)
                .filter(|w| w.stands_for.is_none())
                .map(|_| j),
        }
    };
    let weight = |i: usize| idf(set.terms[i].sections_with, set.total_sections);
    let total: f64 = (0..set.terms.len())
        .filter(|i| set.terms[*i].stands_for.is_none())
        .map(weight)
        .sum();
    if total <= 0.0 {
        return 0.0;
    }
    let mut held: BTreeMap<usize, f64> = BTreeMap::new();
    for m in &candidate.matches {
        let Some(word) = word_of(m.term) else {
            continue;
        };
        let counts = if m.in_heading {
            1.0
        } else if m.in_body {
            params.body_weight
        } else {
            0.0
        };
        let entry = held.entry(word).or_insert(0.0);
        *entry = entry.max(weight(word) * counts);
    }
    (held.values().sum::<f64>() / total).clamp(0.0, 1.0)
}

/// Customers' words for what the knowledge base names otherwise, each with
/// the words articles use: general support vocabulary. The identity
/// providers beyond Okta and the assistive technology were written for
/// classes of the tuning split's misses, each with the class's other
/// members; nothing is drawn from the report split. Not here, though
/// tried: the tools customers move from ("trello" → import: the same
/// names come in "do you integrate with Jira?", a knowledge gap, and
/// "monday" is a weekday) and connectivity ("internet" → offline:
/// "internet explorer"). Single words; the store stems both sides.
const SYNONYMS: &[(&[&str], &[&str])] = &[
    (
        &["outage", "outages", "down", "downtime"],
        &["status", "incident"],
    ),
    (
        &["popup", "popups", "ping", "pings", "alert", "alerts"],
        &["notification"],
    ),
    (
        &[
            "freelancer",
            "freelancers",
            "contractor",
            "contractors",
            "external",
        ],
        &["guest"],
    ),
    (
        &["register", "registering", "registration", "signup"],
        &["sign", "account"],
    ),
    (&["login", "signin", "logon"], &["log"]),
    (
        &["bill", "bills", "receipt", "receipts"],
        &["invoice", "billing"],
    ),
    (
        &[
            "subscription",
            "price",
            "prices",
            "cost",
            "costs",
            "tier",
            "pricing",
        ],
        &["plan"],
    ),
    (
        &[
            "colleague",
            "colleagues",
            "coworker",
            "coworkers",
            "teammate",
            "teammates",
        ],
        &["member"],
    ),
    (&["kanban", "cards"], &["board"]),
    (&["gantt", "roadmap"], &["timeline"]),
    (&["2fa", "mfa", "otp", "authenticator"], &["two-factor"]),
    // Identity providers.
    (
        &["okta", "sso", "azure", "entra", "onelogin", "adfs"],
        &["saml", "sso"],
    ),
    (&["spreadsheet", "excel", "xlsx"], &["csv"]),
    (&["backup", "backups"], &["export"]),
    (&["upload", "uploads", "uploading"], &["attach", "file"]),
    (&["repeat", "repeating", "recurrence"], &["recurring"]),
    (
        &["todo", "tickbox", "tickboxes", "checkbox", "checkboxes"],
        &["checklist"],
    ),
    (&["quiet", "silence", "snooze"], &["mute", "disturb"]),
    (
        &["hotkey", "hotkeys", "keybinding", "keybindings"],
        &["shortcut"],
    ),
    (&["ics", "icalendar"], &["ical"]),
    (&["unarchive", "unarchiving"], &["archive", "restore"]),
    (&["recover", "undelete"], &["restore", "trash"]),
    (&["timesheet", "hours"], &["time"]),
    // Assistive technology.
    (
        &[
            "screenreader",
            "voiceover",
            "nvda",
            "jaws",
            "contrast",
            "a11y",
        ],
        &["accessibility"],
    ),
];

/// Whether the synonym table knows `word` as a customer's word ("kanban",
/// "gantt"): a real word, however few dictionaries hold it.
pub fn has_synonyms(word: &str) -> bool {
    let lower = word.to_lowercase();
    SYNONYMS
        .iter()
        .any(|(words, _)| words.contains(&lower.as_str()))
}

/// The synonyms of the question's words ([`SYNONYMS`]): pairs of a word of
/// the question and a word the articles use for it, at most `limit`.
pub fn synonyms(question: &str, limit: usize) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for word in question
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        let lower = word.to_lowercase();
        for (words, alternatives) in SYNONYMS {
            if words.contains(&lower.as_str()) {
                for alternative in *alternatives {
                    let pair = (lower.clone(), alternative.to_string());
                    if !out.contains(&pair) && out.len() < limit {
                        out.push(pair);
                    }
                }
            }
        }
    }
    out
}

/// The candidates best first. Ties keep the candidates' order.
pub fn rank(set: &CandidateSet, params: &RankingParams) -> Vec<Ranked> {
    let lexical: Vec<f64> = set
        .candidates
        .iter()
        .map(|c| lexical_share(set, c, params))
        .collect();
    let own: Vec<f64> = set
        .candidates
        .iter()
        .zip(&lexical)
        .map(|(c, l)| c.similarity(params.heading_weight) + params.lexical_weight * l)
        .collect();
    // Each article's sections, most relevant first.
    let mut by_article: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, c) in set.candidates.iter().enumerate() {
        by_article.entry(c.document.as_str()).or_default().push(i);
    }
    let mut support = vec![0.0; set.candidates.len()];
    for sections in by_article.values_mut() {
        sections.sort_by(|a, b| own[*b].total_cmp(&own[*a]).then(a.cmp(b)));
        // The article's best section gains a damped part of the lexical
        // evidence of its others; the others gain nothing.
        let gained: f64 = sections
            .iter()
            .skip(1)
            .enumerate()
            .map(|(i, s)| params.lexical_weight * lexical[*s] / (i + 1) as f64)
            .sum();
        support[sections[0]] = params.article_support * gained;
    }
    let specific = params.specificity * (params.closeness_centre - closeness(set));
    let mut ranked: Vec<Ranked> = (0..set.candidates.len())
        .map(|i| Ranked {
            candidate: i,
            own: own[i],
            relevance: own[i] + support[i] + specific,
        })
        .collect();
    ranked.sort_by(|a, b| {
        b.relevance
            .total_cmp(&a.relevance)
            .then(a.candidate.cmp(&b.candidate))
    });
    ranked
}

/// The passages that count for a question whose line is `line`: none when
/// the best is under it (a knowledge gap); otherwise the best and those
/// within `band` under the line, which give an answer its context (the
/// other sections of the article, mostly).
pub fn relevant(ranked: Vec<Ranked>, line: f64, band: f64) -> Vec<Ranked> {
    match ranked.first() {
        Some(best) if best.relevance >= line => ranked
            .into_iter()
            .filter(|r| r.relevance >= line - band.max(0.0))
            .collect(),
        _ => Vec::new(),
    }
}

/// Words that greet, thank or sign off: they say nothing about what is
/// asked.
const PLEASANTRIES: &[&str] = &[
    "hi",
    "hello",
    "hey",
    "hiya",
    "dear",
    "good",
    "morning",
    "afternoon",
    "evening",
    "there",
    "team",
    "support",
    "thanks",
    "thank",
    "you",
    "thx",
    "cheers",
    "regards",
    "kind",
    "best",
    "many",
    "sincerely",
    "greetings",
    "please",
    "all",
    "folks",
    "guys",
];
/// Of those, the ones a name may follow ("Hi Ada", "Thanks Sam").
const GREETINGS: &[&str] = &[
    "hi",
    "hello",
    "hey",
    "hiya",
    "dear",
    "thanks",
    "thank",
    "thx",
    "cheers",
    "regards",
    "greetings",
];

fn is_pleasantry(word: &str) -> bool {
    PLEASANTRIES.contains(&word.to_lowercase().as_str())
}

/// The question without greetings and sign-offs ("Hi team,", "Thanks,
/// Paul", "Kind regards, Jan"): what is embedded and searched for, so that
/// courtesy neither pulls the embedding nor dilutes the words. A part of
/// the message (between punctuation) goes when all its words are
/// pleasantries, when it starts with one and has at most three words, or
/// when it is the last one, of at most two words, after one that went (a
/// signature). A message that is nothing else is kept as it is.
pub fn strip_pleasantries(text: &str) -> String {
    let parts: Vec<&str> = text
        .split_inclusive(['.', ',', '!', '?', ';', ':', '\n'])
        .collect();
    let words = |p: &str| -> Vec<String> {
        p.split(|c: char| !c.is_alphanumeric() && c != '\'')
            .filter(|w| !w.is_empty())
            .map(str::to_string)
            .collect()
    };
    let mut kept: Vec<&str> = Vec::with_capacity(parts.len());
    let mut dropped_before = false;
    for (i, part) in parts.iter().enumerate() {
        let w = words(part);
        let last = parts[i + 1..].iter().all(|p| words(p).is_empty());
        let drop = !w.is_empty()
            && (w.iter().all(|x| is_pleasantry(x))
                || (GREETINGS.contains(&w[0].to_lowercase().as_str()) && w.len() <= 3)
                || (last && dropped_before && w.len() <= 2 && !part.contains('?')));
        if drop {
            dropped_before = true;
        } else {
            if !w.is_empty() {
                dropped_before = false;
            }
            kept.push(part);
        }
    }
    let out = kept.concat();
    let out = out
        .trim()
        .trim_start_matches([',', '.', '!', ';', ':'])
        .trim_end_matches([',', ';', ':'])
        .trim();
    if out.chars().any(char::is_alphanumeric) {
        out.to_string()
    } else {
        text.trim().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn term(lexeme: &str, sections_with: u64) -> QueryTerm {
        QueryTerm {
            lexeme: lexeme.into(),
            sections_with,
            stands_for: None,
        }
    }

    fn hit(term: usize, in_heading: bool, in_body: bool) -> TermMatch {
        TermMatch {
            term,
            in_heading,
            in_body,
        }
    }

    fn candidate(id: &str, document: &str, cosine: f64, matches: Vec<TermMatch>) -> Candidate {
        Candidate {
            heading_cosine: None,
            id: id.into(),
            document: document.into(),
            cosine,
            matches,
        }
    }

    #[test]
    fn rare_terms_weigh_more() {
        assert!(idf(1, 100) > idf(10, 100));
        assert!(idf(10, 100) > idf(90, 100));
        assert!(idf(100, 100) > 0.0, "never negative");
        // A count above the total (a race between the two counts) is
        // read as the total.
        assert_eq!(idf(120, 100), idf(120, 120));
    }

    #[test]
    fn the_lexical_share_weights_terms_by_rarity_and_place() {
        let set = CandidateSet {
            total_sections: 100,
            terms: vec![term("export", 5), term("task", 80)],
            candidates: vec![],
        };
        let p = RankingParams::default();
        let (rare, common) = (idf(5, 100), idf(80, 100));
        let heading = candidate("a", "a", 0.5, vec![hit(0, true, true)]);
        assert!((lexical_share(&set, &heading, &p) - rare / (rare + common)).abs() < 1e-12);
        let body = candidate("b", "b", 0.5, vec![hit(0, false, true)]);
        assert!(
            (lexical_share(&set, &body, &p) - p.body_weight * rare / (rare + common)).abs() < 1e-12
        );
        let both = candidate(
            "c",
            "c",
            0.5,
            vec![hit(0, true, false), hit(1, false, true)],
        );
        let expected = (rare + p.body_weight * common) / (rare + common);
        assert!((lexical_share(&set, &both, &p) - expected).abs() < 1e-12);
        // A repeated or out-of-range match counts once, or not at all.
        let odd = candidate(
            "d",
            "d",
            0.5,
            vec![hit(0, true, false), hit(0, true, false), hit(7, true, true)],
        );
        assert!((lexical_share(&set, &odd, &p) - rare / (rare + common)).abs() < 1e-12);
        let none = CandidateSet::default();
        assert_eq!(lexical_share(&none, &heading, &p), 0.0);
    }

    #[test]
    fn the_words_decide_between_two_near_sections() {
        // "export my tasks to csv": the import section is a little nearer
        // in meaning, the export one holds the rarer word in its heading.
        let set = CandidateSet {
            total_sections: 100,
            terms: vec![term("export", 4), term("task", 60), term("csv", 6)],
            candidates: vec![
                candidate(
                    "import#1",
                    "import",
                    0.77,
                    vec![hit(1, true, true), hit(2, true, true)],
                ),
                candidate(
                    "export#1",
                    "export",
                    0.72,
                    vec![hit(0, true, true), hit(1, false, true), hit(2, false, true)],
                ),
            ],
        };
        let ranked = rank(&set, &RankingParams::default());
        assert_eq!(ranked[0].candidate, 1);
        assert!(ranked[0].relevance > ranked[1].relevance);
        // Without the lexical part the cosine decides.
        let cosine_only = RankingParams {
            lexical_weight: 0.0,
            ..RankingParams::default()
        };
        assert_eq!(rank(&set, &cosine_only)[0].candidate, 0);
    }

    #[test]
    fn an_article_with_several_matching_sections_wins() {
        let set = CandidateSet {
            total_sections: 100,
            terms: vec![term("invoice", 3), term("vat", 2)],
            candidates: vec![
                candidate("plans#1", "plans", 0.60, vec![hit(0, false, true)]),
                candidate("billing#1", "billing", 0.59, vec![hit(0, false, true)]),
                candidate("billing#2", "billing", 0.50, vec![hit(1, false, true)]),
            ],
        };
        let p = RankingParams {
            specificity: 0.0,
            ..RankingParams::default()
        };
        let ranked = rank(&set, &p);
        assert_eq!(ranked[0].candidate, 1, "{ranked:?}");
        // Only the best section of an article gains; its own relevance is
        // what it was.
        let second = ranked.iter().find(|r| r.candidate == 2).unwrap();
        assert_eq!(second.relevance, second.own);
        let first = ranked[0];
        let expected_gain =
            p.article_support * p.lexical_weight * lexical_share(&set, &set.candidates[2], &p);
        assert!((first.relevance - first.own - expected_gain).abs() < 1e-12);
        // No support: the nearer article wins.
        let alone = RankingParams {
            article_support: 0.0,
            ..p
        };
        assert_eq!(rank(&set, &alone)[0].candidate, 0);
    }

    /// The candidates' indexes, in ranked order.
    fn order(ranked: &[Ranked]) -> Vec<usize> {
        ranked.iter().map(|r| r.candidate).collect()
    }

    #[test]
    fn relevance_is_the_cosine_when_no_word_matches() {
        let set = CandidateSet {
            total_sections: 10,
            terms: vec![term("weather", 0)],
            candidates: vec![
                candidate("a#0", "a", 0.41, vec![]),
                candidate("b#0", "b", 0.43, vec![]),
            ],
        };
        let p = RankingParams {
            specificity: 0.0,
            ..RankingParams::default()
        };
        let ranked = rank(&set, &p);
        assert_eq!(order(&ranked), [1, 0]);
        assert_eq!(ranked[0].relevance, 0.43);
        assert!(rank(&CandidateSet::default(), &RankingParams::default()).is_empty());
    }

    #[test]
    fn a_section_whose_heading_is_the_question_takes_the_headings_cosine() {
        let with_heading = |mut c: Candidate, heading: Option<f64>| {
            c.heading_cosine = heading;
            c
        };
        let set = CandidateSet {
            total_sections: 10,
            terms: vec![],
            candidates: vec![
                // Text a little nearer, heading far.
                with_heading(candidate("a#0", "a", 0.50, vec![]), Some(0.30)),
                // Text a little farther, heading the customer's question.
                with_heading(candidate("b#0", "b", 0.45, vec![]), Some(0.70)),
                // Stored without a heading vector: the text's cosine.
                candidate("c#0", "c", 0.48, vec![]),
            ],
        };
        let p = RankingParams {
            specificity: 0.0,
            ..RankingParams::default()
        };
        let ranked = rank(&set, &p);
        assert_eq!(order(&ranked), [1, 0, 2]);
        assert_eq!(ranked[0].relevance, 0.70);
        // A heading farther than the text takes nothing away.
        assert_eq!(ranked[1].relevance, 0.50);
        assert_eq!(ranked[2].relevance, 0.48);
        // Half the weight: half the way from the text's cosine.
        let half = RankingParams {
            heading_weight: 0.5,
            ..p
        };
        assert!((rank(&set, &half)[0].relevance - 0.575).abs() < 1e-12);
        // No weight: the texts' cosines alone decide.
        let off = RankingParams {
            heading_weight: 0.0,
            ..p
        };
        assert_eq!(order(&rank(&set, &off)), [0, 2, 1]);
        // The question's closeness is read from the texts' cosines.
        assert!((closeness(&set) - (0.50 + 0.45 + 0.48) / 3.0).abs() < 1e-12);
    }

    #[test]
    fn a_question_near_everything_counts_less_than_one_near_its_answer() {
        // Two questions whose best section is as near; the first is near
        // every other section too (a generic question), the second only to
        // its answer.
        let set = |others: f64| CandidateSet {
            total_sections: 40,
            terms: vec![],
            candidates: std::iter::once(candidate("a#0", "a", 0.6, vec![]))
                .chain((0..30).map(|i| candidate(&format!("o#{i}"), "o", others, vec![])))
                .collect(),
        };
        let (generic, specific) = (set(0.5), set(0.2));
        // The nearest 20 only: 0.6 and nineteen others.
        assert!((closeness(&generic) - (0.6 + 19.0 * 0.5) / 20.0).abs() < 1e-12);
        assert!((closeness(&specific) - (0.6 + 19.0 * 0.2) / 20.0).abs() < 1e-12);
        let p = RankingParams {
            specificity: 0.5,
            closeness_centre: 0.3,
            ..RankingParams::default()
        };
        let (g, s) = (rank(&generic, &p), rank(&specific, &p));
        assert_eq!((g[0].candidate, s[0].candidate), (0, 0), "the order stays");
        assert!(g[0].relevance < s[0].relevance);
        let shift = |set: &CandidateSet| 0.5 * (0.3 - closeness(set));
        assert!((g[0].relevance - (g[0].own + shift(&generic))).abs() < 1e-12);
        assert!((s[0].relevance - (s[0].own + shift(&specific))).abs() < 1e-12);
        // Every candidate of a question moves alike.
        assert!((g[1].relevance - g[1].own - shift(&generic)).abs() < 1e-12);
        // At the centre nothing moves; without candidates there is nothing.
        let centred = RankingParams {
            closeness_centre: closeness(&generic),
            ..p
        };
        let c = rank(&generic, &centred);
        assert!((c[0].relevance - c[0].own).abs() < 1e-12);
        assert_eq!(closeness(&CandidateSet::default()), 0.0);
        // Without the weight, closeness does not count.
        let off = RankingParams {
            specificity: 0.0,
            ..p
        };
        assert_eq!(
            rank(&generic, &off)[0].relevance,
            rank(&generic, &off)[0].own
        );
    }

    #[test]
    fn greetings_and_signatures_are_not_the_question() {
        assert_eq!(
            strip_pleasantries("Hi team, how do I export a project? Thanks, Paul"),
            "how do I export a project?"
        );
        assert_eq!(
            strip_pleasantries("Hello! My invoice is wrong.\nKind regards,\nJan"),
            "My invoice is wrong."
        );
        assert_eq!(
            strip_pleasantries("hey, the reset mail never arrives. cheers, tom"),
            "the reset mail never arrives."
        );
        // The question itself stays, words of courtesy inside it too.
        assert_eq!(
            strip_pleasantries("how do I add my team to the workspace"),
            "how do I add my team to the workspace"
        );
        assert_eq!(
            strip_pleasantries("Can I thank a colleague in a comment, please?"),
            "Can I thank a colleague in a comment"
        );
        assert_eq!(
            strip_pleasantries("Team plan or Business plan? Thanks. Also CSV?"),
            "Team plan or Business plan? Also CSV?"
        );
        // Nothing but courtesy: kept, the knowledge base will not match it.
        assert_eq!(strip_pleasantries("Hi there! Thanks"), "Hi there! Thanks");
        assert_eq!(strip_pleasantries(""), "");
    }

    #[test]
    fn a_synonym_holds_the_word_it_stands_for() {
        let mut set = CandidateSet {
            total_sections: 100,
            terms: vec![term("outag", 0), term("now", 10)],
            candidates: vec![],
        };
        set.terms.push(QueryTerm {
            lexeme: "status".into(),
            sections_with: 3,
            stands_for: Some(0),
        });
        let p = RankingParams::default();
        let (outage, now) = (idf(0, 100), idf(10, 100));
        let status = candidate("s", "s", 0.4, vec![hit(2, true, true)]);
        // Weighed as the question's word, not as the synonym.
        assert!((lexical_share(&set, &status, &p) - outage / (outage + now)).abs() < 1e-12);
        // The word and its synonym together count once.
        let both = candidate(
            "b",
            "b",
            0.4,
            vec![hit(0, false, true), hit(2, true, false)],
        );
        assert!((lexical_share(&set, &both, &p) - outage / (outage + now)).abs() < 1e-12);
        // A synonym of a synonym (or of nothing) holds nothing.
        set.terms.push(QueryTerm {
            lexeme: "incid".into(),
            sections_with: 2,
            stands_for: Some(2),
        });
        let chained = candidate("c", "c", 0.4, vec![hit(3, true, true)]);
        assert_eq!(lexical_share(&set, &chained, &p), 0.0);
    }

    #[test]
    fn synonyms_map_customers_words_to_the_articles() {
        assert_eq!(
            synonyms("Is there an OUTAGE? my popups stopped", 10),
            [
                ("outage".to_string(), "status".to_string()),
                ("outage".to_string(), "incident".to_string()),
                ("popups".to_string(), "notification".to_string()),
            ]
        );
        assert!(synonyms("how do I export a project", 10).is_empty());
        assert_eq!(
            synonyms(&"outage ".repeat(50), 10).len(),
            2,
            "each pair once"
        );
        assert_eq!(synonyms("outage popups kanban", 2).len(), 2, "bounded");
        assert!(has_synonyms("Kanban") && has_synonyms("gantt"));
        assert!(!has_synonyms("board"), "only the customers' words");
    }

    #[test]
    fn the_line_decides_on_the_best_and_the_band_keeps_its_context() {
        let r = |candidate: usize, relevance: f64| Ranked {
            candidate,
            own: relevance,
            relevance,
        };
        let ranked = vec![r(0, 0.7), r(1, 0.58), r(2, 0.52), r(3, 0.49)];
        let kept: Vec<usize> = relevant(ranked.clone(), 0.6, 0.1)
            .iter()
            .map(|r| r.candidate)
            .collect();
        assert_eq!(kept, [0, 1, 2]);
        assert_eq!(relevant(ranked.clone(), 0.6, 0.0).len(), 1);
        assert_eq!(
            relevant(ranked.clone(), 0.6, -1.0).len(),
            1,
            "no negative band"
        );
        assert!(relevant(ranked, 0.71, 0.5).is_empty(), "a gap");
        assert!(relevant(Vec::new(), 0.0, 0.1).is_empty());
    }
}
