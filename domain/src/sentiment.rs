//! A deterministic sentiment scorer for customer messages.
//!
//! Each word found in a small lexicon (support-desk vocabulary, valence -4
//! to +4, in the manner of AFINN) adds its valence to a sum, adjusted by:
//!
//! - negation: "not", "no", "never", "don't", … within the three words
//!   before flips the word's valence and halves it ("not helpful" is mildly
//!   negative, "not bad" mildly positive);
//! - intensifiers: "very", "really", "extremely", … right before multiply it
//!   by 1.5; "slightly", "somewhat", "a bit" by 0.5;
//! - shouting: a negative word of three or more letters in capitals counts
//!   1.5 times; two or more "!" in a negative message add -1.
//!
//! The sum `s` becomes a score in [0, 1] as `(1 + s / sqrt(s² + 30)) / 2`:
//! 0.5 is neutral, a single mildly negative word ("frustrated", -2) stays
//! above 0.3, a strongly negative one ("worst", -4) or several negative
//! words fall below it. Any profanity caps the score at 0.1.

/// Messages scoring below this are treated as angry (`negative_sentiment`).
pub const NEGATIVE_THRESHOLD: f64 = 0.3;

const LEXICON: &[(&str, f64)] = &[
    // negative
    ("worst", -4.0),
    ("hate", -4.0),
    ("scam", -4.0),
    ("pathetic", -4.0),
    ("disgusting", -4.0),
    ("furious", -4.0),
    ("outrageous", -3.0),
    ("horrible", -3.0),
    ("terrible", -3.0),
    ("awful", -3.0),
    ("useless", -3.0),
    ("ridiculous", -3.0),
    ("unacceptable", -3.0),
    ("incompetent", -3.0),
    ("angry", -3.0),
    ("livid", -4.0),
    ("rubbish", -3.0),
    ("garbage", -3.0),
    ("joke", -2.0),
    ("disappointed", -2.0),
    ("disappointing", -2.0),
    ("frustrated", -2.0),
    ("frustrating", -2.0),
    ("annoyed", -2.0),
    ("annoying", -2.0),
    ("upset", -2.0),
    ("unhappy", -2.0),
    ("fed", -1.0),
    ("bad", -2.0),
    ("poor", -2.0),
    ("broken", -2.0),
    ("sucks", -3.0),
    ("lousy", -3.0),
    ("waste", -2.0),
    ("wasted", -2.0),
    ("slow", -1.0),
    ("fail", -1.0),
    ("fails", -1.0),
    ("failed", -1.0),
    ("failing", -1.0),
    ("wrong", -1.0),
    ("confusing", -1.0),
    ("worse", -3.0),
    ("never", -1.0),
    ("ignored", -2.0),
    ("ignoring", -2.0),
    ("unusable", -3.0),
    ("lost", -1.0),
    ("cancel", -1.0),
    ("complaint", -2.0),
    ("stupid", -3.0),
    ("idiots", -4.0),
    ("idiot", -4.0),
    // positive
    ("thanks", 2.0),
    ("thank", 2.0),
    ("great", 3.0),
    ("love", 3.0),
    ("awesome", 3.0),
    ("excellent", 3.0),
    ("amazing", 3.0),
    ("perfect", 3.0),
    ("helpful", 2.0),
    ("good", 2.0),
    ("nice", 2.0),
    ("happy", 2.0),
    ("glad", 2.0),
    ("appreciate", 2.0),
    ("appreciated", 2.0),
    ("works", 1.0),
    ("worked", 1.0),
    ("fixed", 2.0),
    ("solved", 2.0),
    ("pleased", 2.0),
    ("fantastic", 3.0),
    ("wonderful", 3.0),
    ("easy", 1.0),
    ("fast", 1.0),
    ("kind", 2.0),
];

/// Words that make a message profane regardless of the rest.
const PROFANITY: &[&str] = &[
    "fuck", "fucking", "fucked", "fucker", "shit", "shitty", "bullshit", "crap", "crappy", "damn",
    "damned", "bastard", "bastards", "asshole", "assholes", "bitch", "wtf", "piss", "pissed",
    "dick",
];

const NEGATORS: &[&str] = &[
    "not", "no", "never", "dont", "doesnt", "didnt", "isnt", "wasnt", "arent", "cant", "cannot",
    "wont", "wouldnt", "shouldnt", "hardly", "nothing", "without",
];

const AMPLIFIERS: &[&str] = &[
    "very",
    "really",
    "extremely",
    "so",
    "totally",
    "absolutely",
    "completely",
    "utterly",
    "super",
];
const DAMPENERS: &[&str] = &["slightly", "somewhat", "little", "bit", "kinda", "fairly"];

/// The result of scoring a text.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sentiment {
    /// 0 (hostile) … 0.5 (neutral) … 1 (delighted).
    pub score: f64,
    pub profane: bool,
}

impl Sentiment {
    pub fn is_negative(&self) -> bool {
        self.score < NEGATIVE_THRESHOLD
    }
}

fn words(text: &str) -> Vec<(String, bool)> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .filter(|w| !w.is_empty())
        .map(|w| {
            let shouted = w.chars().count() >= 3
                && w.chars().all(|c| !c.is_lowercase())
                && w.chars().any(|c| c.is_uppercase());
            (w.to_lowercase().replace('\'', ""), shouted)
        })
        .collect()
}

fn valence(word: &str) -> Option<f64> {
    LEXICON.iter().find(|(w, _)| *w == word).map(|(_, v)| *v)
}

pub fn score(text: &str) -> Sentiment {
    let tokens = words(text);
    let mut sum = 0.0;
    let mut profane = false;
    for (i, (word, shouted)) in tokens.iter().enumerate() {
        if PROFANITY.contains(&word.as_str()) {
            profane = true;
            sum -= 4.0;
            continue;
        }
        let Some(mut v) = valence(word) else { continue };
        // "never" counts as negative only when it is not negating something.
        if word == "never" && tokens.get(i + 1).is_some_and(|(n, _)| valence(n).is_some()) {
            continue;
        }
        if i > 0 {
            let prev = tokens[i - 1].0.as_str();
            if AMPLIFIERS.contains(&prev) {
                v *= 1.5;
            } else if DAMPENERS.contains(&prev) {
                v *= 0.5;
            }
        }
        let negated = tokens[i.saturating_sub(3)..i]
            .iter()
            .any(|(w, _)| NEGATORS.contains(&w.as_str()));
        if negated {
            v *= -0.5;
        }
        if *shouted && v < 0.0 {
            v *= 1.5;
        }
        sum += v;
    }
    if sum < 0.0 && text.matches('!').count() >= 2 {
        sum -= 1.0;
    }
    let mut score = (1.0 + sum / (sum * sum + 30.0).sqrt()) / 2.0;
    if profane {
        score = score.min(0.1);
    }
    Sentiment { score, profane }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Labelled examples: (text, whether it should count as negative).
    const LABELLED: &[(&str, bool)] = &[
        ("How do I export my data to CSV?", false),
        ("My export fails with error 42, can you help?", false),
        ("I'm a bit frustrated, the sync is slow today.", false),
        ("Thanks, that worked perfectly!", false),
        ("This is not bad at all, thank you.", false),
        ("The app is not working after the update.", false),
        ("This is the worst service I have ever used.", true),
        (
            "Your product is useless and your support is terrible!!",
            true,
        ),
        ("I am absolutely furious, nobody answers.", true),
        ("What the fuck is going on with my account", true),
        ("THIS IS UNACCEPTABLE. I want answers now!!", true),
        ("I hate this app, it's garbage.", true),
        ("Really disappointed and annoyed, this is ridiculous.", true),
        ("Not helpful at all.", false),
    ];

    #[test]
    fn labelled_examples_are_classified() {
        for (text, negative) in LABELLED {
            let s = score(text);
            assert_eq!(s.is_negative(), *negative, "{text:?} scored {:.3}", s.score);
        }
    }

    #[test]
    fn neutral_text_is_one_half() {
        assert_eq!(score("Where can I find the invoices page").score, 0.5);
        assert_eq!(score("").score, 0.5);
    }

    #[test]
    fn negation_and_intensity_move_the_score() {
        let helpful = score("helpful").score;
        assert!(score("very helpful").score > helpful);
        assert!(score("not helpful").score < 0.5);
        assert!(score("not bad").score > 0.5);
        assert!(score("BROKEN").score < score("broken").score);
    }

    #[test]
    fn profanity_caps_the_score() {
        let s = score("thanks, great, shit happens");
        assert!(s.profane);
        assert!(s.score <= 0.1);
    }

    #[test]
    fn scoring_is_deterministic() {
        let text = "Really disappointed, the export is broken again!!";
        assert_eq!(score(text), score(text));
    }
}
