//! Spelling correction of a question's words the knowledge base does not
//! hold (pure: no I/O).
//!
//! A customer's typo in the key word ("pasword", "adress") costs the
//! question its best evidence twice: the full-text side finds no section
//! holding it, and the embedding model sees word pieces ("pas", "##word")
//! instead of the word. A word is a typo candidate when it is neither a
//! word of the knowledge base ([`Vocabulary`]) nor a word the caller knows
//! otherwise (a dictionary: the embedding model's whole-word vocabulary,
//! the synonym table, the knowledge base's stems); its correction is the
//! nearest word of the knowledge base within [`max_distance`]
//! (Damerau-Levenshtein: an insertion, deletion, substitution or swap of
//! two neighbouring letters is one edit); at equal distance the one that
//! begins as the typo does for longer (people mistype a word's end more
//! than its start: "asign" is "assign" rather than "sign", "limt" is
//! "limit" rather than "list"), then the most frequent.
//!
//! The distance allowed grows with the word: one edit for 4 to 7 letters,
//! two from 8. A short word is one edit away from many others ("form",
//! "from", "farm"), so shorter words are never corrected, and two edits on
//! a word of five letters would reach words of another meaning; the usual
//! choice for a typo model (most typos are one edit; long words carry more
//! of them and stay far from each other).

use std::collections::HashMap;

/// Words shorter than this are not corrected.
pub const MIN_CORRECTED_CHARS: usize = 4;
/// Words longer than this are neither corrected nor kept in a vocabulary:
/// no word of a support article is, and it bounds each distance's cost.
pub const MAX_WORD_CHARS: usize = 32;

/// The edits a word of `chars` letters may be away from its correction:
/// none under [`MIN_CORRECTED_CHARS`], one up to 7 letters, two from 8 (up
/// to [`MAX_WORD_CHARS`]).
pub fn max_distance(chars: usize) -> usize {
    match chars {
        0..MIN_CORRECTED_CHARS => 0,
        MIN_CORRECTED_CHARS..=7 => 1,
        8..=MAX_WORD_CHARS => 2,
        _ => 0,
    }
}

/// The Damerau-Levenshtein distance between two words, in characters.
pub fn distance(a: &str, b: &str) -> usize {
    strsim::damerau_levenshtein(a, b)
}

/// How many characters two words begin with alike.
fn common_prefix(a: &str, b: &str) -> usize {
    a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count()
}

/// English clitics as customers write them without the apostrophe
/// ("isnt", "youre", "weve", "theyll"): the word before them and these
/// letters. Not "s", "d" or "m": a real word and one of those letters is
/// also how a typo looks ("acess" is "aces" and "s"); "whats" is then
/// corrected to "what", which changes nothing that counts.
const CLITICS: &[&str] = &["t", "re", "ve", "ll"];

/// Whether `word` is a real word (`real`) with a clitic written without
/// its apostrophe: "isnt" (isn't: the tokenizer's "isn" and "t"), "youre",
/// "theyll". A "t" follows only an "n" (n't).
pub fn is_contraction(word: &str, real: impl Fn(&str) -> bool) -> bool {
    CLITICS.iter().any(|clitic| {
        word.strip_suffix(clitic).is_some_and(|stem| {
            stem.chars().count() >= 2 && (*clitic != "t" || stem.ends_with('n')) && real(stem)
        })
    })
}

/// The words of `text` as a vocabulary holds them: runs of letters and
/// digits, lower-cased, those holding a digit left out ("2fa", "ipv6":
/// not words to correct), each once, in the order they come, at most
/// `limit`. Words longer than [`MAX_WORD_CHARS`] are left out.
pub fn words(text: &str, limit: usize) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for token in text.split(|c: char| !c.is_alphanumeric()) {
        if out.len() >= limit {
            break;
        }
        if token.is_empty()
            || token.chars().any(|c| c.is_numeric())
            || token.chars().count() > MAX_WORD_CHARS
        {
            continue;
        }
        let word = token.to_lowercase();
        if !out.contains(&word) {
            out.push(word);
        }
    }
    out
}

/// How many of each letter a to z a word has (other characters are not
/// counted): an edit changes these counts by at most two (a substitution),
/// so two words whose counts differ by more than twice the distance
/// allowed cannot be within it. The cheap test that spares most of the
/// vocabulary the distance.
fn letters(word: &str) -> [u8; 26] {
    let mut counts = [0u8; 26];
    for c in word.chars() {
        if c.is_ascii_lowercase() {
            let i = (c as u8 - b'a') as usize;
            counts[i] = counts[i].saturating_add(1);
        }
    }
    counts
}

/// The edits the letter counts of two words prove at least: each edit
/// changes the counts' sum of differences by at most 2 (a substitution),
/// and a character outside a to z is one edit too at most (counted by the
/// length).
fn at_least_edits(a: &[u8; 26], b: &[u8; 26]) -> usize {
    let differ: usize = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y) as usize).sum();
    differ.div_ceil(2)
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    word: String,
    chars: usize,
    sections: u64,
    letters: [u8; 26],
}

/// The words of a knowledge base with how many of its sections hold each:
/// what a typo is corrected to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Vocabulary {
    /// Most frequent first, then in alphabetical order.
    entries: Vec<Entry>,
    index: HashMap<String, usize>,
}

/// A word's correction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Correction<'a> {
    pub word: &'a str,
    pub distance: usize,
    /// Sections holding it.
    pub sections: u64,
}

impl Vocabulary {
    /// The vocabulary of `words` (each with the sections holding it),
    /// lower-cased, its `limit` most frequent words kept. A word given
    /// twice counts its sections once, the larger. Empty words, words
    /// holding anything but letters and words longer than
    /// [`MAX_WORD_CHARS`] are left out.
    pub fn new(words: impl IntoIterator<Item = (String, u64)>, limit: usize) -> Self {
        let mut counts: HashMap<String, u64> = HashMap::new();
        for (word, sections) in words {
            let word = word.to_lowercase();
            if word.is_empty()
                || word.chars().count() > MAX_WORD_CHARS
                || !word.chars().all(char::is_alphabetic)
            {
                continue;
            }
            let entry = counts.entry(word).or_insert(0);
            *entry = (*entry).max(sections);
        }
        let mut entries: Vec<Entry> = counts
            .into_iter()
            .map(|(word, sections)| Entry {
                chars: word.chars().count(),
                letters: letters(&word),
                word,
                sections,
            })
            .collect();
        entries.sort_by(|a, b| b.sections.cmp(&a.sections).then(a.word.cmp(&b.word)));
        entries.truncate(limit);
        let index = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.word.clone(), i))
            .collect();
        Self { entries, index }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether the vocabulary holds `word` (in any case).
    pub fn contains(&self, word: &str) -> bool {
        self.index.contains_key(&word.to_lowercase())
    }

    /// How many sections hold `word` (0: none, or not kept).
    pub fn sections(&self, word: &str) -> u64 {
        self.index
            .get(&word.to_lowercase())
            .map_or(0, |i| self.entries[*i].sections)
    }

    /// The nearest word to `word` within its [`max_distance`]; at equal
    /// distance the one sharing the longest beginning with it, then the
    /// one more sections hold, then the first in alphabetical order. None
    /// for a word the vocabulary holds, a word too short or too long to
    /// correct, or one with nothing near.
    pub fn correction(&self, word: &str) -> Option<Correction<'_>> {
        let word = word.to_lowercase();
        let chars = word.chars().count();
        let allowed = max_distance(chars);
        if allowed == 0 || self.contains(&word) {
            return None;
        }
        let counts = letters(&word);
        // (distance, beginning shared) of the best so far.
        let mut best: Option<(Correction<'_>, usize)> = None;
        // Entries are most frequent first: a later one replaces the best
        // only when it is nearer, or as near and begins as the word does
        // for longer.
        for e in &self.entries {
            if e.chars.abs_diff(chars) > allowed || at_least_edits(&e.letters, &counts) > allowed {
                continue;
            }
            let d = distance(&word, &e.word);
            if d > allowed {
                continue;
            }
            let prefix = common_prefix(&word, &e.word);
            let better = match &best {
                None => true,
                Some((b, p)) => d < b.distance || (d == b.distance && prefix > *p),
            };
            if better {
                let correction = Correction {
                    word: &e.word,
                    distance: d,
                    sections: e.sections,
                };
                best = Some((correction, prefix));
            }
        }
        best.map(|(c, _)| c)
    }
}

/// The words of `text` ([`words`], at most `limit` read) worth correcting:
/// long enough ([`MIN_CORRECTED_CHARS`]), not held by the vocabulary, and
/// not real words: neither known to the caller (`real`: a dictionary, the
/// synonym table) nor one of those with a clitic missing its apostrophe
/// ([`is_contraction`]).
pub fn unknown_words(
    text: &str,
    limit: usize,
    vocabulary: &Vocabulary,
    real: impl Fn(&str) -> bool,
) -> Vec<String> {
    words(text, limit)
        .into_iter()
        .filter(|w| {
            w.chars().count() >= MIN_CORRECTED_CHARS
                && !vocabulary.contains(w)
                && !real(w)
                && !is_contraction(w, &real)
        })
        .collect()
}

/// `text` with each word of `corrections` (a typo, lower-cased, and its
/// correction) replaced by its correction wherever it stands as a whole
/// word, in any case; everything else as it was.
pub fn apply(text: &str, corrections: &[(String, String)]) -> String {
    if corrections.is_empty() {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len() + 16);
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if word.is_empty() {
            return;
        }
        let lower = word.to_lowercase();
        match corrections.iter().find(|(typo, _)| *typo == lower) {
            Some((_, correction)) => out.push_str(correction),
            None => out.push_str(word),
        }
        word.clear();
    };
    for c in text.chars() {
        if c.is_alphanumeric() {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vocabulary(words: &[(&str, u64)]) -> Vocabulary {
        Vocabulary::new(words.iter().map(|(w, n)| (w.to_string(), *n)), 1_000)
    }

    #[test]
    fn the_distance_counts_a_swap_of_neighbours_as_one_edit() {
        assert_eq!(distance("pasword", "password"), 1);
        assert_eq!(distance("adress", "address"), 1);
        assert_eq!(distance("tsak", "task"), 1);
        assert_eq!(distance("recieve", "receive"), 1);
        assert_eq!(distance("notifcations", "notifications"), 1);
        assert_eq!(distance("task", "task"), 0);
        assert_eq!(distance("", "abc"), 3);
    }

    #[test]
    fn longer_words_may_be_further_from_their_correction() {
        assert_eq!(max_distance(3), 0);
        assert_eq!(max_distance(4), 1);
        assert_eq!(max_distance(7), 1);
        assert_eq!(max_distance(8), 2);
        assert_eq!(max_distance(MAX_WORD_CHARS), 2);
        assert_eq!(max_distance(MAX_WORD_CHARS + 1), 0);
    }

    #[test]
    fn a_typo_is_corrected_to_the_nearest_word_of_the_knowledge_base() {
        let v = vocabulary(&[
            ("password", 12),
            ("passwords", 3),
            ("address", 4),
            ("export", 9),
            ("expert", 1),
            ("notifications", 7),
        ]);
        let fix = |w: &str| v.correction(w).map(|c| c.word.to_string());
        assert_eq!(fix("pasword").as_deref(), Some("password"));
        assert_eq!(fix("Adress").as_deref(), Some("address"));
        assert_eq!(fix("notifcatons").as_deref(), Some("notifications"));
        // A word the knowledge base holds is not a typo.
        assert_eq!(fix("password"), None);
        assert_eq!(fix("EXPORT"), None);
        // Too far: five letters allow one edit, not two.
        assert_eq!(fix("exprt"), Some("export".into()));
        assert_eq!(fix("xeprot"), None);
        // Too short to correct: "tsk" is one edit from "task" but also
        // from many other words.
        let v2 = vocabulary(&[("task", 50)]);
        assert_eq!(v2.correction("tsk"), None);
        assert_eq!(v2.correction("tsak").map(|c| c.word), Some("task"));
        // Nothing near.
        assert_eq!(fix("pasta"), None);
        assert_eq!(Vocabulary::default().correction("pasword"), None);
    }

    #[test]
    fn at_equal_distance_the_word_beginning_alike_then_the_more_frequent_wins() {
        // "asign" is one edit from "sign" and from "assign": the typist
        // began the word right.
        let v = vocabulary(&[("sign", 40), ("assign", 3)]);
        let c = v.correction("asign").unwrap();
        assert_eq!((c.word, c.distance, c.sections), ("assign", 1, 3));
        let v = vocabulary(&[("list", 40), ("limit", 3), ("lint", 1)]);
        assert_eq!(v.correction("limt").unwrap().word, "limit");
        // As long a beginning: the more frequent.
        let v = vocabulary(&[("fern", 2), ("form", 40), ("foam", 9)]);
        let c = v.correction("forn").unwrap();
        assert_eq!((c.word, c.distance, c.sections), ("form", 1, 40));
        // Same count too: the first in alphabetical order.
        let v = vocabulary(&[("fork", 40), ("form", 40)]);
        assert_eq!(v.correction("forn").unwrap().word, "fork");
        // A nearer word beats one beginning alike or more frequent.
        let v = vocabulary(&[("notifications", 90), ("notification", 5)]);
        assert_eq!(v.correction("notifcation").unwrap().word, "notification");
    }

    #[test]
    fn a_clitic_without_its_apostrophe_is_no_typo() {
        let real = |w: &str| ["aces", "isn", "you", "can", "they", "task"].contains(&w);
        assert!(is_contraction("isnt", real));
        assert!(is_contraction("cant", real));
        assert!(is_contraction("youre", real));
        assert!(is_contraction("theyll", real));
        // A "t" follows an "n" only; the word before must be real; an
        // "s" is a typo's as often as a clitic's.
        assert!(!is_contraction("taskt", real));
        assert!(!is_contraction("limtre", real));
        assert!(!is_contraction("acess", real));
        assert!(!is_contraction("t", real));
        let v = vocabulary(&[("access", 10), ("limit", 3)]);
        assert_eq!(
            unknown_words("the acess limts, isnt it", 100, &v, real),
            ["acess", "limts"]
        );
    }

    #[test]
    fn the_vocabulary_keeps_its_most_frequent_words() {
        let v = Vocabulary::new(
            [
                ("Export".to_string(), 3),
                ("export".to_string(), 5),
                ("csv".to_string(), 2),
                ("two-factor".to_string(), 9),
                ("2fa".to_string(), 9),
                ("".to_string(), 9),
                ("x".repeat(MAX_WORD_CHARS + 1), 9),
                ("task".to_string(), 8),
            ],
            2,
        );
        assert_eq!(v.len(), 2);
        assert!(v.contains("EXPORT") && v.contains("task"));
        assert_eq!(v.sections("export"), 5);
        assert!(!v.contains("csv"), "the least frequent goes");
        assert!(!v.contains("2fa") && !v.contains("two-factor"));
        assert!(Vocabulary::new(Vec::new(), 10).is_empty());
    }

    #[test]
    fn words_are_lower_cased_runs_of_letters() {
        assert_eq!(
            words(
                "How do I reset my Pasword? pasword, 2FA & two-factor; didn't",
                100
            ),
            ["how", "do", "i", "reset", "my", "pasword", "two", "factor", "didn", "t"]
        );
        assert_eq!(words("one two three four", 2), ["one", "two"]);
        assert!(words(&"a".repeat(MAX_WORD_CHARS + 1), 10).is_empty());
        assert!(words("", 10).is_empty());
    }

    #[test]
    fn unknown_words_are_the_long_ones_nobody_knows() {
        let v = vocabulary(&[("password", 3), ("reset", 2)]);
        let dictionary = ["how", "can", "change", "pasta"];
        let unknown = unknown_words(
            "How can I change my pasword or reset my pasta? kanban asdf",
            100,
            &v,
            |w| dictionary.contains(&w) || w == "kanban",
        );
        assert_eq!(unknown, ["pasword", "asdf"]);
        assert_eq!(unknown_words("pasword asdf", 1, &v, |_| false), ["pasword"]);
    }

    #[test]
    fn corrections_replace_whole_words_in_any_case() {
        let fixes = vec![
            ("pasword".to_string(), "password".to_string()),
            ("adress".to_string(), "address".to_string()),
        ];
        assert_eq!(
            apply(
                "Pasword reset? my adress, not my paswords (PASWORD)",
                &fixes
            ),
            "password reset? my address, not my paswords (password)"
        );
        assert_eq!(apply("nothing to fix", &fixes), "nothing to fix");
        assert_eq!(apply("pasword", &[]), "pasword");
        assert_eq!(apply("", &fixes), "");
    }

    fn word() -> impl Strategy<Value = String> {
        "[a-f]{1,10}"
    }

    proptest! {
        /// The correction is the best word a search of the whole
        /// vocabulary finds: within the distance allowed, none nearer, none
        /// as near beginning alike for longer, none as near and as alike
        /// and more frequent (the letter counts never turn away a word
        /// within reach).
        #[test]
        fn the_correction_is_the_nearest_most_frequent_word(
            entries in proptest::collection::vec((word(), 0u64..5), 0..60),
            typo in word(),
        ) {
            let v = Vocabulary::new(entries.clone(), 1_000);
            let allowed = max_distance(typo.chars().count());
            let mut reachable: Vec<(usize, usize, u64, String)> = v
                .entries
                .iter()
                .map(|e| {
                    let prefix = typo.chars().zip(e.word.chars()).take_while(|(a, b)| a == b).count();
                    (distance(&typo, &e.word), prefix, e.sections, e.word.clone())
                })
                .filter(|(d, _, _, _)| *d <= allowed)
                .collect();
            reachable.sort_by(|a, b| {
                a.0.cmp(&b.0).then(b.1.cmp(&a.1)).then(b.2.cmp(&a.2)).then(a.3.cmp(&b.3))
            });
            let found = v.correction(&typo);
            if allowed == 0 || v.contains(&typo) {
                prop_assert_eq!(found, None);
            } else {
                let expected = reachable.first().map(|(d, _, n, w)| (w.clone(), *d, *n));
                prop_assert_eq!(found.map(|c| (c.word.to_string(), c.distance, c.sections)), expected);
            }
        }

        /// Applying corrections changes only the corrected words: with
        /// each correction undone the text is what it was.
        #[test]
        fn applying_corrections_changes_only_the_typos(
            text in "[a-fA-F ,.?!'-]{0,80}",
            typos in proptest::collection::vec(word(), 0..4),
        ) {
            let fixes: Vec<(String, String)> = typos
                .iter()
                .map(|t| (t.clone(), format!("{t}zq")))
                .collect();
            let fixed = apply(&text, &fixes);
            let undone: Vec<(String, String)> = fixes
                .iter()
                .map(|(t, c)| (c.clone(), t.clone()))
                .collect();
            let back = apply(&fixed, &undone);
            // Case is not kept for a corrected word.
            prop_assert_eq!(back.to_lowercase(), text.to_lowercase());
            prop_assert_eq!(words(&fixed, 100).len(), words(&text, 100).len());
            prop_assert_eq!(apply(&text, &[]), text);
        }
    }
}
