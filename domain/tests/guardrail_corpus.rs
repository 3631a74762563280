//! The output guardrail (`review_draft`) against the labelled corpus in
//! `data/guardrail_corpus.tsv`: every price and every refund promise must be
//! caught, and at most 5 % of the safe sentences may be held.

use casebook_domain::guardrails::{review_draft, sentences, DraftIssue};

const CORPUS: &str = include_str!("data/guardrail_corpus.tsv");

#[derive(Debug)]
struct Case {
    line: usize,
    price: bool,
    refund: bool,
    sentence: &'static str,
}

fn corpus() -> Vec<Case> {
    CORPUS
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|(n, l)| {
            let (label, sentence) = l
                .split_once('\t')
                .unwrap_or_else(|| panic!("line {}: no tab: {l:?}", n + 1));
            let (price, refund) = match label {
                "price" => (true, false),
                "refund" => (false, true),
                "price+refund" => (true, true),
                "safe" => (false, false),
                other => panic!("line {}: unknown label {other:?}", n + 1),
            };
            Case {
                line: n + 1,
                price,
                refund,
                sentence: sentence.trim(),
            }
        })
        .collect()
}

#[derive(Default)]
struct Counts {
    tp: usize,
    fp: usize,
    fn_: usize,
}

impl Counts {
    fn add(&mut self, expected: bool, found: bool) {
        match (expected, found) {
            (true, true) => self.tp += 1,
            (false, true) => self.fp += 1,
            (true, false) => self.fn_ += 1,
            (false, false) => {}
        }
    }
    fn precision(&self) -> f64 {
        ratio(self.tp, self.tp + self.fp)
    }
    fn recall(&self) -> f64 {
        ratio(self.tp, self.tp + self.fn_)
    }
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        1.0
    } else {
        a as f64 / b as f64
    }
}

/// The findings `review_draft` has about the money in one sentence. The
/// passages are the sentence itself, so that only the price and refund
/// checks can speak.
fn judge(sentence: &str) -> (bool, bool) {
    let issues = review_draft(sentence, &[sentence]);
    assert!(
        !issues
            .iter()
            .any(|i| matches!(i, DraftIssue::Unsupported { .. })),
        "{sentence:?} is its own passage: {issues:?}"
    );
    (
        issues
            .iter()
            .any(|i| matches!(i, DraftIssue::MentionsPrice { .. })),
        issues
            .iter()
            .any(|i| matches!(i, DraftIssue::PromisesRefund { .. })),
    )
}

#[test]
fn the_corpus_is_large_and_varied() {
    let cases = corpus();
    let count = |f: fn(&Case) -> bool| cases.iter().filter(|c| f(c)).count();
    assert!(cases.len() >= 300, "{} sentences", cases.len());
    assert!(count(|c| c.price) >= 100);
    assert!(count(|c| c.refund) >= 60);
    assert!(count(|c| !c.price && !c.refund) >= 120);
    let mut seen = std::collections::HashSet::new();
    for c in &cases {
        assert!(seen.insert(c.sentence), "line {}: duplicate", c.line);
    }
}

#[test]
fn review_draft_catches_every_price_and_refund_with_few_false_alarms() {
    let cases = corpus();
    let (mut price, mut refund, mut overall) =
        (Counts::default(), Counts::default(), Counts::default());
    let mut safe = 0;
    let mut misses = Vec::new();
    let mut false_alarms = Vec::new();
    for c in &cases {
        let (p, r) = judge(c.sentence);
        price.add(c.price, p);
        refund.add(c.refund, r);
        overall.add(c.price || c.refund, p || r);
        if !c.price && !c.refund {
            safe += 1;
        }
        if (c.price && !p) || (c.refund && !r) {
            misses.push(format!(
                "line {} (price {p}, refund {r}): {}",
                c.line, c.sentence
            ));
        }
        if !c.price && !c.refund && (p || r) {
            false_alarms.push(format!(
                "line {} (price {p}, refund {r}): {}",
                c.line, c.sentence
            ));
        }
    }
    let fp_rate = ratio(overall.fp, safe);
    println!("guardrail corpus: {} sentences, {safe} safe", cases.len());
    for (name, c) in [
        ("price", &price),
        ("refund", &refund),
        ("overall", &overall),
    ] {
        println!(
            "  {name:8} precision {:.3} recall {:.3} (tp {}, fp {}, fn {})",
            c.precision(),
            c.recall(),
            c.tp,
            c.fp,
            c.fn_
        );
    }
    println!(
        "  safe sentences held: {} of {safe} ({:.1} %)",
        overall.fp,
        fp_rate * 100.0
    );
    for m in &misses {
        println!("  MISSED {m}");
    }
    for f in &false_alarms {
        println!("  FALSE ALARM {f}");
    }
    assert_eq!(price.recall(), 1.0, "prices missed: {misses:#?}");
    assert_eq!(refund.recall(), 1.0, "refunds missed: {misses:#?}");
    assert!(
        fp_rate <= 0.05,
        "{:.1} % of safe sentences held: {false_alarms:#?}",
        fp_rate * 100.0
    );
}

#[test]
fn findings_in_a_whole_draft_point_at_their_sentences() {
    // The corpus sentences also work inside a longer draft: each finding
    // names a sentence of the right case and quotes none of it.
    let cases = corpus();
    let unsafe_cases: Vec<&Case> = cases.iter().filter(|c| c.price || c.refund).collect();
    for chunk in unsafe_cases.chunks(3) {
        let mut draft = String::from("Thanks for reaching out.");
        // The sentence indexes each case occupies in the draft.
        let mut spans = Vec::new();
        for c in chunk {
            let text = if c.sentence.ends_with(['.', '!', '?']) {
                c.sentence.to_string()
            } else {
                format!("{}.", c.sentence)
            };
            let start = sentences(&draft).len();
            draft.push(' ');
            draft.push_str(&text);
            spans.push(start..sentences(&draft).len());
        }
        let passages = [draft.as_str()];
        let issues = review_draft(&draft, &passages);
        for (c, span) in chunk.iter().zip(&spans) {
            let found = |price: bool| {
                issues.iter().any(|i| {
                    span.contains(&i.sentence())
                        && if price {
                            matches!(i, DraftIssue::MentionsPrice { .. })
                        } else {
                            matches!(i, DraftIssue::PromisesRefund { .. })
                        }
                })
            };
            assert!(!c.price || found(true), "{draft:?}: {issues:?}");
            assert!(!c.refund || found(false), "{draft:?}: {issues:?}");
        }
        for issue in &issues {
            for c in chunk {
                assert!(!issue.describe().contains(c.sentence));
            }
        }
    }
}
