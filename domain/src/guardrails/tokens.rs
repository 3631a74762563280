//! A small tokenizer for the output guardrails: words, numbers (digits or
//! spelled out), currency markers, identifiers and punctuation.
//!
//! A run of letters and digits is classified by its shape rather than looked
//! up: `49`, `1,299.00` and `1.299,00` are amounts; `2k` and `1.5M` are
//! amounts with a multiplier; `2.4.1` and `192.168.1.20` are dotted (versions,
//! addresses, dates); `250MB` and `9am` carry a unit; `21st` is an ordinal;
//! `USD49` and `49USD` are a currency code and an amount; `E1042`, `v2` and
//! `7f3a9c` are identifiers. Sequences of number words ("forty-nine", "a
//! hundred and fifty") become one number token.

/// What a number looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    /// Digits with at most one kind of separator pattern that money uses:
    /// `49`, `49.99`, `49,99`, `1,299.00`, `1.299,00`, `1.299.000`.
    Amount,
    /// Digits with a multiplier suffix: `2k`, `1.5M`, `3bn`.
    Scaled,
    /// Number words: "forty-nine", "a hundred and fifty".
    Spelled,
    /// Three or more dot-separated groups that are not thousands:
    /// versions, IP addresses, dotted dates.
    Dotted,
    /// A unit glued to the digits: `250MB`, `9am`, `30s`, `1080p`.
    Unit,
    /// `1st`, `2nd`, `21st`.
    Ordinal,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Kind {
    Word,
    Number(Shape),
    /// A currency symbol (`$`, `€`, …) or ISO code glued to digits (`USD49`).
    Currency,
    /// Letters and digits mixed: `v2.4.1`, `E1042`, `0x80070005`.
    Ident,
    Punct(char),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Token {
    pub kind: Kind,
    /// Lowercased text (apostrophes normalised to `'`).
    pub lower: String,
    /// Whether the original started with an upper-case letter.
    pub capitalised: bool,
    /// Whether the original was all upper case (at least two letters).
    pub upper: bool,
    /// Whether whitespace preceded the token.
    pub spaced: bool,
}

impl Token {
    pub fn is_word(&self, w: &str) -> bool {
        self.kind == Kind::Word && self.lower == w
    }
    pub fn is_word_in(&self, set: &[&str]) -> bool {
        self.kind == Kind::Word && set.contains(&self.lower.as_str())
    }
    pub fn is_punct(&self, c: char) -> bool {
        self.kind == Kind::Punct(c)
    }
    pub fn is_number(&self) -> bool {
        matches!(self.kind, Kind::Number(_))
    }
    pub fn shape(&self) -> Option<Shape> {
        match self.kind {
            Kind::Number(s) => Some(s),
            _ => None,
        }
    }
}

const CURRENCY_SYMBOLS: &[char] = &[
    '$', '€', '£', '¥', '₹', '₩', '₽', '₺', '₪', '₫', '₱', '฿', '¢', '₣', '₦', '₴', '₲', '₵', '₡',
    '₭', '₮', '₸', '₼', '₾',
];

/// ISO 4217 codes of the currencies customers are likely to see, in upper
/// case. Codes that are also ordinary words or languages (TRY, PHP, ALL,
/// TOP, CUP) are left out or accepted only in capitals.
const CODES: &[&str] = &[
    "USD", "EUR", "GBP", "JPY", "INR", "CHF", "AUD", "CAD", "NZD", "SEK", "NOK", "DKK", "PLN",
    "CNY", "RMB", "HKD", "SGD", "BRL", "MXN", "ZAR", "CZK", "HUF", "RUB", "KRW", "ILS", "AED",
    "SAR", "THB", "IDR", "MYR", "TRY", "NGN", "KES", "EGP", "ARS", "CLP", "COP", "TWD", "UAH",
    "RON", "BGN", "ISK", "VND", "PKR", "BDT", "QAR", "KWD",
];
/// Codes also accepted in lower case ("49 usd"): none of them is an
/// English word.
const LOWER_CODES: &[&str] = &[
    "usd", "eur", "gbp", "jpy", "inr", "chf", "aud", "cad", "nzd", "sek", "nok", "dkk", "pln",
    "cny", "rmb", "hkd", "sgd", "brl", "mxn", "zar", "czk", "huf", "krw", "aed", "thb", "myr",
    "twd", "uah", "pkr", "bdt", "qar", "kwd",
];
/// Abbreviations written before or after an amount: "Rs 999", "299 kr".
const ABBREVIATIONS: &[&str] = &[
    "rs", "kr", "zł", "zl", "kč", "ft", "lei", "sfr", "円", "元", "원", "руб", "грн",
];

/// Whether a word names a currency by its code or abbreviation.
pub(crate) fn is_currency_code(t: &Token) -> bool {
    if t.kind != Kind::Word {
        return false;
    }
    let upper = t.lower.to_uppercase();
    (t.upper && CODES.contains(&upper.as_str()))
        || LOWER_CODES.contains(&t.lower.as_str())
        || ABBREVIATIONS.contains(&t.lower.as_str())
}

/// Currency names, as they follow an amount ("49 dollars", "two grand").
pub(crate) const CURRENCY_WORDS: &[&str] = &[
    "dollar",
    "dollars",
    "buck",
    "bucks",
    "euro",
    "euros",
    "pound",
    "pounds",
    "quid",
    "sterling",
    "yen",
    "rupee",
    "rupees",
    "franc",
    "francs",
    "cent",
    "cents",
    "pence",
    "penny",
    "pennies",
    "grand",
    "yuan",
    "renminbi",
    "peso",
    "pesos",
    "krona",
    "kronor",
    "krone",
    "kroner",
    "zloty",
    "zlotys",
    "ruble",
    "rubles",
    "rouble",
    "roubles",
    "lira",
    "shekel",
    "shekels",
    "baht",
    "ringgit",
    "dirham",
    "dirhams",
    "riyal",
    "riyals",
    "naira",
    "rand",
    "eurocent",
    "eurocents",
    "fiver",
    "fivers",
    "tenner",
    "tenners",
];
/// The singular ones, which "a" or "an" can quantify ("a dollar a day").
pub(crate) const CURRENCY_SINGULAR: &[&str] = &[
    "dollar", "buck", "euro", "pound", "quid", "rupee", "franc", "cent", "penny", "grand", "peso",
    "fiver", "tenner",
];

const UNITS: &[&str] = &[
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
];
const TENS: &[(&str, u64)] = &[
    ("twenty", 20),
    ("thirty", 30),
    ("forty", 40),
    ("fourty", 40),
    ("fifty", 50),
    ("sixty", 60),
    ("seventy", 70),
    ("eighty", 80),
    ("ninety", 90),
];
const SCALES: &[&str] = &["hundred", "thousand", "million", "billion", "dozen"];

fn is_number_word(w: &str) -> bool {
    UNITS.contains(&w) || TENS.iter().any(|(t, _)| *t == w) || SCALES.contains(&w)
}

/// The value of a sequence of number words ("forty nine", "a hundred and
/// fifty", "two thousand five hundred"), or `None` if it is not one.
pub(crate) fn spelled_value(words: &[&str]) -> Option<u64> {
    let mut total: u64 = 0;
    let mut current: u64 = 0;
    let mut any = false;
    for (i, w) in words.iter().enumerate() {
        if let Some(u) = UNITS.iter().position(|x| x == w) {
            current = current.checked_add(u as u64)?;
        } else if let Some((_, t)) = TENS.iter().find(|(x, _)| x == w) {
            current = current.checked_add(*t)?;
        } else if *w == "hundred" {
            current = current.max(1).checked_mul(100)?;
        } else if *w == "dozen" {
            current = current.max(1).checked_mul(12)?;
        } else if let Some(scale) = match *w {
            "thousand" => Some(1_000u64),
            "million" => Some(1_000_000),
            "billion" => Some(1_000_000_000),
            _ => None,
        } {
            total = total.checked_add(current.max(1).checked_mul(scale)?)?;
            current = 0;
        } else if (*w == "a" || *w == "an") && i == 0 {
            current = 1;
            continue;
        } else if *w == "and" && any {
            continue;
        } else {
            return None;
        }
        any = true;
    }
    any.then(|| total + current)
}

fn is_symbol(c: char) -> bool {
    CURRENCY_SYMBOLS.contains(&c)
}

/// Splits `text` into tokens.
pub(crate) fn tokenize(text: &str) -> Vec<Token> {
    let chars: Vec<char> = text
        .chars()
        .map(|c| match c {
            '’' | '‘' | '`' => '\'',
            '–' | '—' | '‑' | '−' => '-',
            '\u{a0}' | '\u{202f}' | '\u{2009}' => ' ',
            c => c,
        })
        .collect();
    let mut out = Vec::new();
    let mut spaced = true;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            spaced = true;
            i += 1;
            continue;
        }
        if c.is_alphanumeric() {
            let start = i;
            i += 1;
            while i < chars.len() {
                let c = chars[i];
                let next = chars.get(i + 1).copied();
                let prev = chars[i - 1];
                let joins = c.is_alphanumeric()
                    || ((c == '.' || c == ',')
                        && prev.is_ascii_digit()
                        && next.is_some_and(|n| n.is_ascii_digit()))
                    || (c == '\''
                        && prev.is_alphabetic()
                        && next.is_some_and(|n| n.is_alphabetic()));
                if !joins {
                    break;
                }
                i += 1;
            }
            let run: String = chars[start..i].iter().collect();
            classify(&run, spaced, &mut out);
            spaced = false;
            continue;
        }
        let kind = if is_symbol(c) {
            Kind::Currency
        } else {
            Kind::Punct(c)
        };
        out.push(Token {
            kind,
            lower: c.to_string(),
            capitalised: false,
            upper: false,
            spaced,
        });
        spaced = false;
        i += 1;
    }
    merge_spelled(out)
}

fn word(text: &str, spaced: bool) -> Token {
    let letters: Vec<char> = text.chars().filter(|c| c.is_alphabetic()).collect();
    Token {
        kind: Kind::Word,
        lower: text.to_lowercase(),
        capitalised: text.chars().next().is_some_and(char::is_uppercase),
        upper: letters.len() >= 2 && letters.iter().all(|c| c.is_uppercase()),
        spaced,
    }
}

fn number(text: &str, shape: Shape, spaced: bool) -> Token {
    Token {
        kind: Kind::Number(shape),
        lower: text.to_lowercase(),
        capitalised: false,
        upper: false,
        spaced,
    }
}

fn digit_shape(digits: &str) -> Shape {
    let dots = digits.matches('.').count();
    if dots < 2 {
        return Shape::Amount;
    }
    // 1.299.000 or 1.299.000,50 are thousands; 2.4.1 and 3.4.2025 are not.
    let integer = digits.split(',').next().unwrap_or(digits);
    let mut groups = integer.split('.');
    let first_ok = groups.next().is_some_and(|g| (1..=3).contains(&g.len()));
    if first_ok && groups.all(|g| g.len() == 3) {
        Shape::Amount
    } else {
        Shape::Dotted
    }
}

fn classify(run: &str, spaced: bool, out: &mut Vec<Token>) {
    let is_digitish = |c: char| c.is_ascii_digit() || c == '.' || c == ',';
    if run.chars().all(is_digitish) {
        out.push(number(run, digit_shape(run), spaced));
        return;
    }
    if run.chars().any(|c| c.is_ascii_digit()) {
        // digits then letters: 2k, 49USD, 21st, 250MB
        let split = run.find(|c: char| !is_digitish(c)).unwrap_or(run.len());
        let (digits, rest) = run.split_at(split);
        if !digits.is_empty() && rest.chars().all(char::is_alphabetic) {
            let rest_lower = rest.to_lowercase();
            let shape = digit_shape(digits);
            if ["k", "m", "bn", "mn", "b"].contains(&rest_lower.as_str()) && shape == Shape::Amount
            {
                out.push(number(run, Shape::Scaled, spaced));
            } else if ["st", "nd", "rd", "th"].contains(&rest_lower.as_str()) {
                out.push(number(run, Shape::Ordinal, spaced));
            } else {
                let suffix = word(rest, false);
                if is_currency_code(&suffix) {
                    out.push(number(digits, shape, spaced));
                    out.push(Token {
                        kind: Kind::Currency,
                        ..suffix
                    });
                } else {
                    out.push(number(run, Shape::Unit, spaced));
                }
            }
            return;
        }
        // letters then digits: USD49, Rs999, E1042, v2
        let split = run.find(|c: char| c.is_ascii_digit()).unwrap_or(run.len());
        let (letters, digits) = run.split_at(split);
        if !letters.is_empty()
            && letters.chars().all(char::is_alphabetic)
            && digits.chars().all(is_digitish)
        {
            let prefix = word(letters, spaced);
            if is_currency_code(&prefix) {
                out.push(Token {
                    kind: Kind::Currency,
                    ..prefix
                });
                out.push(number(digits, digit_shape(digits), false));
                return;
            }
        }
        out.push(Token {
            kind: Kind::Ident,
            ..word(run, spaced)
        });
        return;
    }
    // "money's", "it's": the word, then "'s"
    let lower = run.to_lowercase();
    if let Some(stem) = lower.strip_suffix("'s").filter(|s| !s.is_empty()) {
        let stem_len = stem.len();
        out.push(word(&run[..stem_len], spaced));
        out.push(word(&run[stem_len..], false));
        return;
    }
    out.push(word(run, spaced));
}

/// Joins runs of number words ("forty - nine", "a hundred and fifty") into
/// one `Spelled` number token.
fn merge_spelled(tokens: Vec<Token>) -> Vec<Token> {
    let mut out: Vec<Token> = Vec::with_capacity(tokens.len());
    let mut i = 0;
    while i < tokens.len() {
        let starts = tokens[i].kind == Kind::Word
            && (is_number_word(&tokens[i].lower)
                || (matches!(tokens[i].lower.as_str(), "a" | "an")
                    && tokens.get(i + 1).is_some_and(|n| {
                        n.kind == Kind::Word && SCALES.contains(&n.lower.as_str())
                    })));
        if !starts {
            out.push(tokens[i].clone());
            i += 1;
            continue;
        }
        let mut words = vec![tokens[i].lower.as_str()];
        let mut j = i + 1;
        let mut end = i + 1;
        while j < tokens.len() {
            let t = &tokens[j];
            if t.kind == Kind::Word && is_number_word(&t.lower) {
                words.push(t.lower.as_str());
                j += 1;
                end = j;
            } else if (t.is_punct('-') && !t.spaced || t.is_word("and"))
                && tokens
                    .get(j + 1)
                    .is_some_and(|n| n.kind == Kind::Word && is_number_word(&n.lower))
            {
                j += 1;
            } else {
                break;
            }
        }
        let joined = words.join(" ");
        if spelled_value(&words).is_some() {
            out.push(number(&joined, Shape::Spelled, tokens[i].spaced));
            i = end;
        } else {
            out.push(tokens[i].clone());
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(text: &str) -> Vec<(Kind, String)> {
        tokenize(text)
            .into_iter()
            .map(|t| (t.kind, t.lower))
            .collect()
    }

    #[test]
    fn number_words_have_values() {
        assert_eq!(spelled_value(&["forty", "nine"]), Some(49));
        assert_eq!(spelled_value(&["a", "hundred", "and", "fifty"]), Some(150));
        assert_eq!(
            spelled_value(&["two", "thousand", "five", "hundred"]),
            Some(2500)
        );
        assert_eq!(spelled_value(&["twelve"]), Some(12));
        assert_eq!(spelled_value(&["ninety", "nine"]), Some(99));
        assert_eq!(spelled_value(&["one", "million"]), Some(1_000_000));
        assert_eq!(spelled_value(&["a", "dozen"]), Some(12));
        assert_eq!(spelled_value(&["and"]), None);
        assert_eq!(spelled_value(&["forty", "apples"]), None);
    }

    #[test]
    fn shapes_are_told_apart() {
        use Kind::*;
        assert_eq!(
            kinds("US$49 49USD USD49"),
            vec![
                (Word, "us".into()),
                (Currency, "$".into()),
                (Number(Shape::Amount), "49".into()),
                (Number(Shape::Amount), "49".into()),
                (Currency, "usd".into()),
                (Currency, "usd".into()),
                (Number(Shape::Amount), "49".into()),
            ]
        );
        assert_eq!(
            kinds("v2.4.1 2.4.1 1.299.000 2k 250MB 21st E1042"),
            vec![
                (Ident, "v2.4.1".into()),
                (Number(Shape::Dotted), "2.4.1".into()),
                (Number(Shape::Amount), "1.299.000".into()),
                (Number(Shape::Scaled), "2k".into()),
                (Number(Shape::Unit), "250mb".into()),
                (Number(Shape::Ordinal), "21st".into()),
                (Ident, "e1042".into()),
            ]
        );
        assert_eq!(
            kinds("forty-nine dollars, a hundred and fifty"),
            vec![
                (Number(Shape::Spelled), "forty nine".into()),
                (Word, "dollars".into()),
                (Punct(','), ",".into()),
                (Number(Shape::Spelled), "a hundred fifty".into()),
            ]
        );
        assert_eq!(
            kinds("We'll pay."),
            vec![
                (Word, "we'll".into()),
                (Word, "pay".into()),
                (Punct('.'), ".".into()),
            ]
        );
    }

    #[test]
    fn a_lone_article_is_not_a_number() {
        assert_eq!(tokenize("a plan")[0].kind, Kind::Word);
        assert_eq!(tokenize("and one")[0].kind, Kind::Word);
    }
}
