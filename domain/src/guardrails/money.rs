//! Whether a sentence of a draft states a price or promises a refund.
//!
//! Both work on the tokens of one sentence (see `tokens`).
//!
//! **A price** is a monetary amount the customer would pay:
//! 1. a number next to a currency marker, either side, with or without a
//!    space: `$49`, `$ 49`, `49 €`, `US$49`, `USD49`, `49USD`, `CHF 45`,
//!    `Rs. 999`, `49,- €`, `€1.5k`, "forty-nine dollars", "49 US dollars";
//!    or a currency word quantified by "a", "a few", "hundreds of" ("a dollar
//!    a day", "hundreds of dollars");
//! 2. a bare number used as an amount (nothing but a billing period,
//!    function word or the sentence's end follows it: "49 per month", "49.",
//!    "49 for the year" — "1,000 automation runs" is a count) together with
//!    a price word before it ("costs", "priced at", "charge you", "billed",
//!    "fee", "invoice", "plan is" …) or a billing period after it ("per seat
//!    per month", "a month") when no limit word ("up to", "limited",
//!    "allows") makes it a quota;
//! 3. a price of zero: "free of charge", "for free", "at no extra cost", "no
//!    additional fee", "costs nothing", "is free" (not "feel free", "free up",
//!    "the Free plan", "toll-free");
//! 4. a discount: "20% off", "a 15 % discount", "discount of 30%", "half
//!    price", "offer you a discount".
//!
//! Numbers that are identifiers, dates, times, versions, phone numbers,
//! percentages or carry a unit never count as amounts on their own.
//!
//! **A refund promise** commits to money going back to the customer, or to
//! a charge being reversed, cancelled, waived or credited — and refusals of
//! refunds ("we can't refund annual plans"), which are as much a decision
//! for a human. Mentions are not promises: "our refund policy", "your refund
//! request" (unless approved), "you asked about a refund", "refunds are
//! covered in our terms", "any refund is up to our billing team", "I can't
//! promise a refund", "I can't issue refunds".

use super::tokens::{is_currency_code, Kind, Shape, Token, CURRENCY_SINGULAR, CURRENCY_WORDS};

// ---------------------------------------------------------------- prices

/// Words that make a nearby bare amount a price.
const PRICE_CUES: &[&str] = &[
    "cost",
    "costs",
    "costing",
    "price",
    "prices",
    "priced",
    "pricing",
    "charge",
    "charges",
    "charged",
    "charging",
    "bill",
    "bills",
    "billed",
    "pay",
    "pays",
    "paid",
    "paying",
    "payable",
    "fee",
    "fees",
    "invoice",
    "invoices",
    "invoiced",
    "refund",
    "refunds",
    "refunded",
    "reimburse",
    "reimbursed",
    "credit",
    "credited",
    "quote",
    "quoted",
    "owe",
    "owes",
    "owed",
    "owing",
    "deposit",
    "surcharge",
    "downpayment",
    "charging",
];
/// Words that make a nearby bare amount a price unless a limit word says it
/// is a quota ("the plan allows 20 per day").
const WEAK_PRICE_CUES: &[&str] = &[
    "plan",
    "plans",
    "tier",
    "subscription",
    "renewal",
    "renews",
    "billing",
    "total",
    "totals",
    "comes",
    "come",
    "amount",
    "amounts",
    "rate",
    "rates",
    "upgrade",
    "upgrading",
    "difference",
    "starts",
    "due",
    "balance",
];
const LIMIT_WORDS: &[&str] = &[
    "up",
    "limit",
    "limits",
    "limited",
    "maximum",
    "max",
    "most",
    "allowance",
    "quota",
    "cap",
    "capped",
    "allow",
    "allows",
    "allowed",
    "include",
    "includes",
    "included",
    "supports",
    "holds",
    "keeps",
    "send",
    "create",
    "run",
    "make",
    "get",
    "gets",
    "receive",
    "receives",
    "above",
    "below",
    "beyond",
    "over",
    "under",
    "exceed",
    "exceeds",
    "exceeding",
];
/// What may follow a number that is an amount: billing periods and
/// function words, not a noun that makes it a count.
const AFTER_AMOUNT: &[&str] = &[
    "per",
    "a",
    "an",
    "each",
    "every",
    "for",
    "monthly",
    "annually",
    "yearly",
    "weekly",
    "quarterly",
    "plus",
    "excl",
    "excluding",
    "incl",
    "including",
    "inclusive",
    "exclusive",
    "ex",
    "vat",
    "tax",
    "taxes",
    "net",
    "gross",
    "upfront",
    "flat",
    "in",
    "and",
    "or",
    "to",
    "at",
    "more",
    "extra",
    "instead",
    "today",
    "now",
    "then",
    "once",
    "only",
    "total",
    "on",
    "with",
    "when",
    "if",
    "but",
    "so",
    "because",
    "after",
    "before",
    "from",
    "this",
    "next",
    "is",
    "was",
    "will",
    "would",
    "which",
    "that",
    "off",
    "back",
    "less",
    "up",
];
/// Verbs that make "for 20" a price: "get it for 20", "buy it for 20".
const PURCHASE_VERBS: &[&str] = &[
    "get",
    "buy",
    "buying",
    "bought",
    "purchase",
    "purchased",
    "order",
    "ordered",
    "grab",
    "subscribe",
    "available",
    "sell",
    "sells",
    "sold",
    "offer",
    "offered",
    "upgrade",
];
const BILLING_UNITS: &[&str] = &[
    "month", "months", "mo", "mth", "year", "years", "yr", "annum", "seat", "seats", "user",
    "users", "member", "members", "license", "licence", "licenses", "licences", "agent", "agents",
    "head", "editor", "editors", "login",
];
const BILLING_ADVERBS: &[&str] = &["monthly", "annually", "yearly", "quarterly"];
/// Verbs whose object is a count: "use 8", "invite 3".
const COUNT_VERBS: &[&str] = &[
    "use", "uses", "using", "used", "invite", "invited", "inviting", "remove", "removed", "delete",
    "deleted", "keep", "kept", "create", "created", "select", "selected", "pick",
];
/// Words before a number that make it an identifier.
const ID_WORDS: &[&str] = &[
    "version",
    "v",
    "step",
    "steps",
    "section",
    "chapter",
    "page",
    "port",
    "http",
    "error",
    "code",
    "order",
    "ticket",
    "id",
    "number",
    "no",
    "nr",
    "reference",
    "ref",
    "status",
    "room",
    "line",
    "row",
    "column",
    "item",
    "build",
    "release",
    "ios",
    "android",
    "chrome",
    "firefox",
    "safari",
    "edge",
    "windows",
    "macos",
    "python",
    "php",
    "node",
    "java",
    "level",
    "option",
    "case",
    "issue",
    "pr",
    "ext",
    "extension",
    "floor",
    "suite",
    "unit",
    "apt",
    "pin",
    "account",
    "card",
];
const MONTHS: &[&str] = &[
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
    "jan",
    "feb",
    "mar",
    "apr",
    "jun",
    "jul",
    "aug",
    "sep",
    "sept",
    "oct",
    "nov",
    "dec",
];
const YEAR_PREPOSITIONS: &[&str] = &[
    "in", "since", "until", "till", "by", "of", "before", "after", "during", "from",
];
const QUANTIFIERS: &[&str] = &[
    "few",
    "couple",
    "several",
    "hundreds",
    "thousands",
    "millions",
    "dozens",
    "some",
];

fn word_at(t: &[Token], i: usize) -> Option<&Token> {
    t.get(i).filter(|x| x.kind == Kind::Word)
}

fn prev(t: &[Token], i: usize, back: usize) -> Option<&Token> {
    i.checked_sub(back).and_then(|j| t.get(j))
}

/// Nouns a currency word can qualify without being an amount: "a pound
/// sign", "the dollar amount".
const NOT_MONEY_AFTER_CURRENCY: &[&str] = &[
    "sign", "signs", "symbol", "symbols", "amount", "amounts", "value", "values", "figure",
    "figures", "field", "fields", "key", "format", "formats", "store", "stores", "bill",
];

/// Whether the currency word at `i` names money rather than qualifies a
/// noun.
fn is_money_word(t: &[Token], i: usize) -> bool {
    t.get(i).is_some_and(|x| x.is_word_in(CURRENCY_WORDS))
        && !word_at(t, i + 1).is_some_and(|n| n.is_word_in(NOT_MONEY_AFTER_CURRENCY))
}

fn is_currency_marker_before(t: &[Token], i: usize) -> bool {
    // `$49`, `$ 49`, `USD 49`, `Rs. 999`
    match prev(t, i, 1) {
        Some(p) if p.kind == Kind::Currency || is_currency_code(p) => true,
        Some(p) if p.is_punct('.') => prev(t, i, 2).is_some_and(is_currency_code),
        _ => false,
    }
}

fn is_currency_marker_after(t: &[Token], i: usize) -> bool {
    let mut j = i + 1;
    // `49,- €`, `49.– EUR`
    if t.get(j).is_some_and(|x| x.is_punct(',') || x.is_punct('.'))
        && t.get(j + 1).is_some_and(|x| x.is_punct('-'))
    {
        j += 2;
    }
    let Some(next) = t.get(j) else { return false };
    if next.kind == Kind::Currency || is_currency_code(next) || is_money_word(t, j) {
        return true;
    }
    // "a 20-dollar fee", "49 US dollars", "45 Swiss francs"
    (next.kind == Kind::Word || next.is_punct('-') && !next.spaced) && is_money_word(t, j + 1)
}

fn is_currency_amount(t: &[Token], i: usize) -> bool {
    let tok = &t[i];
    match tok.shape() {
        Some(Shape::Dotted | Shape::Unit | Shape::Ordinal) | None => {
            // "a dollar a day", "a few dollars", "hundreds of dollars"
            if tok.is_word("a") || tok.is_word("an") {
                return word_at(t, i + 1).is_some_and(|n| n.is_word_in(CURRENCY_SINGULAR))
                    && is_money_word(t, i + 1);
            }
            if tok.is_word_in(QUANTIFIERS) {
                let j = if t.get(i + 1).is_some_and(|n| n.is_word("of")) {
                    i + 2
                } else {
                    i + 1
                };
                return is_money_word(t, j);
            }
            // "£12.50p": a unit after the digits, a currency before them
            tok.shape() == Some(Shape::Unit) && is_currency_marker_before(t, i)
        }
        Some(_) => is_currency_marker_before(t, i) || is_currency_marker_after(t, i),
    }
}

/// Whether the number at `i` is part of an identifier, date, time, phone
/// number, range of counts or percentage rather than an amount.
fn is_not_an_amount(t: &[Token], i: usize) -> bool {
    let tok = &t[i];
    if matches!(
        tok.shape(),
        Some(Shape::Dotted | Shape::Unit | Shape::Ordinal) | None
    ) {
        return true;
    }
    if let Some(p) = prev(t, i, 1) {
        if ['#', '+', '(', '@', '_', '=']
            .iter()
            .any(|c| p.is_punct(*c))
        {
            return true;
        }
        // "555-0100", "2025-04-30", "12/03": glued; "Team – 8" is a dash
        if (p.is_punct('-') || p.is_punct('/')) && !tok.spaced {
            return true;
        }
        // "use 8", "invite 3": a count
        if p.is_word_in(COUNT_VERBS) {
            return true;
        }
        // "14:30", but not "Total due: 49"
        if p.is_punct(':') && prev(t, i, 2).is_some_and(|q| q.is_number()) {
            return true;
        }
        if !tok.spaced && matches!(p.kind, Kind::Word | Kind::Ident) {
            return true;
        }
        if p.is_word_in(ID_WORDS) || p.is_word_in(MONTHS) {
            return true;
        }
        if p.is_word_in(&["in", "with"])
            && prev(t, i, 2).is_some_and(|q| q.is_word_in(&["ending", "ends", "end"]))
        {
            return true;
        }
    }
    if let Some(n) = t.get(i + 1) {
        let after = t.get(i + 2);
        if [':', '-', '/', '.', ','].iter().any(|c| n.is_punct(*c))
            && after.is_some_and(|a| a.is_number())
        {
            return true;
        }
        if n.is_punct('%') || n.is_word_in(&["percent", "pc", "pct", "x", "times"]) {
            return true;
        }
        if n.is_word("per") && t.get(i + 2).is_some_and(|a| a.is_word("cent")) {
            return true;
        }
        if n.is_word_in(MONTHS) {
            return true;
        }
    }
    let year = tok.shape() == Some(Shape::Amount)
        && tok.lower.len() == 4
        && tok
            .lower
            .parse::<u32>()
            .is_ok_and(|y| (1900..=2100).contains(&y));
    if year && prev(t, i, 1).is_some_and(|p| p.is_word_in(YEAR_PREPOSITIONS)) {
        return true;
    }
    false
}

/// Whether what follows the number at `i` leaves it an amount ("49 per
/// month", "49.", "49 for") rather than a count ("49 users").
fn is_followed_like_an_amount(t: &[Token], i: usize) -> bool {
    let mut i = i;
    // "5 to 10 business days": the range's end decides; a few hops at most,
    // so that a hostile "1 to 1 to 1 …" stays linear.
    for _ in 0..4 {
        let Some(n) = t.get(i + 1) else { return true };
        return match &n.kind {
            Kind::Punct(c) => matches!(c, '.' | ',' | ';' | '!' | '?' | ')' | ':' | '/' | '"'),
            Kind::Word => {
                if n.is_word_in(&["to", "or", "and"]) && t.get(i + 2).is_some_and(|x| x.is_number())
                {
                    if is_not_an_amount(t, i + 2) {
                        return false;
                    }
                    i += 2;
                    continue;
                }
                n.is_word_in(AFTER_AMOUNT)
            }
            Kind::Currency => true,
            Kind::Number(_) | Kind::Ident => false,
        };
    }
    false
}

fn has_billing_period_after(t: &[Token], i: usize) -> bool {
    let Some(n) = t.get(i + 1) else { return false };
    if n.is_word_in(BILLING_ADVERBS) {
        return true;
    }
    (n.is_word_in(&["per", "a", "an", "each", "every"]) || n.is_punct('/'))
        && word_at(t, i + 2).is_some_and(|u| u.is_word_in(BILLING_UNITS))
}

/// Nouns after a price word that make it a name: "the price field".
const FIELD_NOUNS: &[&str] = &[
    "field", "fields", "column", "columns", "page", "pages", "list", "label", "labels", "sheet",
    "table", "filter", "property", "estimate", "centre", "center", "date", "dates", "day", "cycle",
    "period",
];

fn is_price_cue(t: &[Token], j: usize) -> bool {
    let x = &t[j];
    if x.is_word_in(&["add", "adds", "added", "adding"]) {
        // "it adds up to 480"
        return word_at(t, j + 1).is_some_and(|n| n.is_word("up"));
    }
    x.is_word_in(PRICE_CUES) && !word_at(t, j + 1).is_some_and(|n| n.is_word_in(FIELD_NOUNS))
}

fn is_bare_price(t: &[Token], i: usize, first_limit: Option<usize>) -> bool {
    if !t[i].is_number() || is_not_an_amount(t, i) || !is_followed_like_an_amount(t, i) {
        return false;
    }
    let window = i.saturating_sub(8)..i;
    let strong = window.clone().any(|j| is_price_cue(t, j));
    if strong {
        return true;
    }
    // "You can get it for 9.99", "buy it for 20"
    if prev(t, i, 1).is_some_and(|p| p.is_word_in(&["for", "at"]))
        && t[i.saturating_sub(6)..i]
            .iter()
            .any(|x| x.is_word_in(PURCHASE_VERBS))
    {
        return true;
    }
    // "You will get 49 back", "We'll give you 20 back"
    if t.get(i + 1).is_some_and(|n| n.is_word("back"))
        && t[i.saturating_sub(4)..i].iter().any(|x| {
            x.is_word_in(&[
                "get", "give", "pay", "send", "put", "receive", "getting", "giving",
            ])
        })
    {
        return true;
    }
    if first_limit.is_some_and(|l| l < i) {
        return false;
    }
    // a weak cue, or a rate before the amount: "per seat it's 9"
    let weak = window.clone().any(|j| {
        (t[j].is_word_in(WEAK_PRICE_CUES)
            && !word_at(t, j + 1).is_some_and(|n| n.is_word_in(FIELD_NOUNS)))
            || t[j].is_word("per") && word_at(t, j + 1).is_some_and(|u| u.is_word_in(BILLING_UNITS))
    });
    if weak {
        return true;
    }
    has_billing_period_after(t, i)
}

fn is_predicate_free(t: &[Token], i: usize) -> bool {
    if !t[i].is_word("free") || (t[i].capitalised && i > 0) {
        // "Free" inside a sentence is the plan's name
        return false;
    }
    if prev(t, i, 1).is_some_and(|p| p.is_punct('-') || p.is_word("feel") || p.is_word("feels")) {
        return false;
    }
    if prev(t, i, 1).is_some_and(|p| p.is_word("for")) {
        return true;
    }
    match t.get(i + 1) {
        None => true,
        Some(n) => match &n.kind {
            // not "Free: 50 runs", a label
            Kind::Punct(c) => matches!(c, '.' | ',' | ';' | '!' | '?' | ')'),
            Kind::Word => {
                if n.is_word("to") {
                    // "free to use", not "free to reach out"
                    return word_at(t, i + 2).is_some_and(|x| {
                        x.is_word_in(&[
                            "use", "try", "add", "install", "download", "access", "join",
                            "upgrade", "keep",
                        ])
                    });
                }
                if n.is_word("of") {
                    // "free of charge", not "free of bugs"
                    return word_at(t, i + 2).is_some_and(|x| {
                        x.is_word_in(&[
                            "charge", "charges", "cost", "costs", "fee", "fees", "payment",
                        ])
                    });
                }
                n.is_word_in(&[
                    "for", "on", "with", "in", "forever", "until", "during", "and", "or", "too",
                    "again", "now", "anyway", "when", "if", "as",
                ])
            }
            _ => false,
        },
    }
}

fn is_zero_price(t: &[Token], i: usize) -> bool {
    if is_predicate_free(t, i) {
        return true;
    }
    let tok = &t[i];
    let charge_nouns = ["cost", "costs", "charge", "charges", "fee", "fees"];
    let qualifiers = ["extra", "additional", "hidden", "added", "further", "any"];
    if tok.is_word("no") || tok.is_word("without") {
        let mut j = i + 1;
        while j < i + 4 && word_at(t, j).is_some_and(|x| x.is_word_in(&qualifiers)) {
            j += 1;
        }
        return word_at(t, j).is_some_and(|x| x.is_word_in(&charge_nouns));
    }
    // "onboarding is complimentary", "the first month is on us"
    if tok.is_word("complimentary")
        || (tok.is_word("on")
            && (word_at(t, i + 1).is_some_and(|n| n.is_word("us"))
                && !word_at(t, i + 2).is_some_and(|n| n.kind == Kind::Word)
                || word_at(t, i + 1).is_some_and(|n| n.is_word("the"))
                    && word_at(t, i + 2).is_some_and(|n| n.is_word("house")))
            && prev(t, i, 1).is_some_and(|p| p.is_word_in(&["is", "are", "be", "'s"])))
    {
        return true;
    }
    if tok.is_word_in(&[
        "cost", "costs", "costing", "pay", "pays", "paying", "charge", "charged", "charges",
    ]) {
        // "costs nothing", "won't cost you a penny", "costs double"
        let zero = [
            "nothing", "anything", "zero", "penny", "cent", "dime", "thing", "double", "twice",
            "triple", "half",
        ];
        return t[i + 1..(i + 4).min(t.len())]
            .iter()
            .any(|x| x.is_word_in(&zero));
    }
    false
}

/// Words that make a percentage a price: a discount, a saving, a
/// surcharge or a price change.
const PERCENT_PRICE_WORDS: &[&str] = &[
    "off",
    "discount",
    "discounts",
    "discounted",
    "reduction",
    "saving",
    "savings",
    "save",
    "saves",
    "surcharge",
    "markup",
    "price",
    "prices",
    "cost",
    "costs",
    "fee",
    "fees",
    "cheaper",
    "pricier",
    "charge",
    "rebate",
    "expensive",
];

fn is_discount(t: &[Token], i: usize) -> bool {
    let tok = &t[i];
    let percent_at = |j: usize| {
        t.get(j).is_some_and(|x| x.is_number())
            && t.get(j + 1)
                .is_some_and(|x| x.is_punct('%') || x.is_word_in(&["percent", "pc", "pct"]))
    };
    if percent_at(i) {
        // "20% off", "a 25% saving", "save 20 percent", "the surcharge is 2 %"
        let after = &t[(i + 2).min(t.len())..(i + 5).min(t.len())];
        let before = &t[i.saturating_sub(4)..i];
        return after
            .iter()
            .chain(before)
            .any(|x| x.is_word_in(PERCENT_PRICE_WORDS));
    }
    if tok.is_word_in(&["discount", "reduction"]) {
        // "a discount of 30%"
        if t.get(i + 1).is_some_and(|x| x.is_word("of")) && percent_at(i + 2) {
            return true;
        }
        // "we can offer you a discount"
        let offers = [
            "offer", "offering", "give", "giving", "apply", "applied", "extend", "grant", "get",
            "receive",
        ];
        return t[i.saturating_sub(4)..i]
            .iter()
            .any(|x| x.is_word_in(&offers));
    }
    // "half price", "half off"
    tok.is_word("half")
        && word_at(t, i + 1).is_some_and(|x| x.is_word_in(&["price", "off", "priced"]))
}

/// Whether the tokens of one sentence state a price.
pub(crate) fn states_price(t: &[Token]) -> bool {
    // Computed once, so that a long sentence costs linear time.
    let first_limit = t.iter().position(|x| x.is_word_in(LIMIT_WORDS));
    (0..t.len()).any(|i| {
        (t[i].is_number() || t[i].kind == Kind::Word)
            && (is_currency_amount(t, i)
                || is_bare_price(t, i, first_limit)
                || is_zero_price(t, i)
                || is_discount(t, i))
    })
}

// --------------------------------------------------------------- refunds

/// Nouns after "refund" that make it a mention: "refund policy".
const MENTION_NOUNS: &[&str] = &[
    "policy",
    "policies",
    "article",
    "articles",
    "page",
    "pages",
    "section",
    "terms",
    "faq",
    "guide",
    "rules",
    "process",
    "procedure",
    "request",
    "requests",
    "form",
    "forms",
    "team",
    "department",
    "question",
    "questions",
    "conditions",
    "information",
    "info",
    "options",
    "decision",
    "decisions",
    "inquiry",
    "enquiry",
];
/// Words shortly before "a refund" that make it a mention: the customer's
/// request, not our promise.
const REQUEST_WORDS: &[&str] = &[
    "handle",
    "handles",
    "handling",
    "manage",
    "manages",
    "review",
    "reviews",
    "decides",
    "whether",
    "wondering",
    "request",
    "requests",
    "requested",
    "requesting",
    "ask",
    "asked",
    "asking",
    "like",
    "want",
    "wanted",
    "wants",
    "about",
    "regarding",
    "re",
    "question",
    "inquiry",
    "enquiry",
];
/// Verbs that, negated before "a refund", defer to a human: "I can't
/// promise a refund".
const DEFER_VERBS: &[&str] = &[
    "promise",
    "guarantee",
    "approve",
    "confirm",
    "decide",
    "authorise",
    "authorize",
    "authorised",
    "authorized",
    "commit",
];
/// Who decides about refunds, when the draft defers to them.
const DEFER_PEOPLE: &[&str] = &[
    "team",
    "colleague",
    "colleagues",
    "department",
    "specialist",
    "specialists",
    "billing",
    "finance",
];
/// Verbs that say where refunds are described: "refunds are covered in our
/// terms".
const DOCUMENT_VERBS: &[&str] = &[
    "covered",
    "described",
    "explained",
    "outlined",
    "detailed",
    "documented",
    "listed",
    "explains",
    "depend",
    "depends",
    "governed",
    "describes",
    "covers",
];
/// What the agent itself cannot do: "I can't issue refunds".
const SELF_DEFER_VERBS: &[&str] = &[
    "issue", "process", "give", "offer", "grant", "make", "handle", "do", "arrange",
];
/// Words that turn a mention back into a promise: "your refund request has
/// been approved".
const GRANT_WORDS: &[&str] = &[
    "approved",
    "accepted",
    "granted",
    "eligible",
    "entitled",
    "qualify",
    "qualifies",
    "guaranteed",
];
const MONEY_NOUNS: &[&str] = &[
    "paid",
    "charge",
    "charges",
    "payment",
    "payments",
    "transaction",
    "transactions",
    "fee",
    "fees",
    "money",
    "funds",
    "amount",
    "overcharge",
    "invoice",
    "invoices",
    "debit",
    "difference",
    "cash",
];
/// What turns "payment" or "invoice" into something other than money.
const NOT_MONEY_AFTER: &[&str] = &[
    "method",
    "methods",
    "details",
    "provider",
    "page",
    "settings",
    "info",
    "information",
    "number",
    "history",
    "email",
    "address",
    "date",
    "field",
    "card",
];
const RETURN_VERBS: &[&str] = &[
    "settle",
    "settled",
    "settling",
    "reverse",
    "reversed",
    "reverses",
    "reversing",
    "reversal",
    "cancel",
    "cancels",
    "cancelled",
    "canceled",
    "cancelling",
    "canceling",
    "void",
    "voided",
    "voiding",
    "remove",
    "removed",
    "removing",
    "return",
    "returned",
    "returning",
    "drop",
    "dropped",
    "undo",
    "undone",
];
const NOT_CREDIT_AFTER: &[&str] = &[
    "card", "cards", "score", "check", "union", "limit", "line", "rating", "goes", "go", "page",
    "pages", "roll", "history", "report",
];

fn is_negation(t: &Token) -> bool {
    t.kind == Kind::Word
        && (t.lower.ends_with("n't")
            || ["not", "never", "cannot", "cant", "wont", "dont", "unable"]
                .contains(&t.lower.as_str()))
}

fn negated_before(t: &[Token], i: usize, within: usize) -> bool {
    t[i.saturating_sub(within)..i].iter().any(is_negation)
}

fn is_money_noun(t: &[Token], i: usize) -> bool {
    t[i].is_word_in(MONEY_NOUNS)
        && !word_at(t, i + 1).is_some_and(|n| n.is_word_in(NOT_MONEY_AFTER))
        && !prev(t, i, 1).is_some_and(|p| p.is_word("in"))
}

/// What a sentence says as a whole about refunds, computed once.
struct RefundContext {
    /// A refund is granted: "approved", "eligible", … (not negated).
    granted: bool,
    /// Says where refunds are described: "covered in our terms".
    documented: bool,
    /// Leaves refunds to people ("our billing team") with no modal promise.
    deferred: bool,
}

impl RefundContext {
    fn of(t: &[Token]) -> Self {
        let granted = t
            .iter()
            .enumerate()
            .any(|(j, x)| x.is_word_in(GRANT_WORDS) && !negated_before(t, j, 3));
        let documented = t.iter().any(|x| x.is_word_in(DOCUMENT_VERBS));
        let to_people = t.iter().any(|x| x.is_word_in(DEFER_PEOPLE));
        let modal = t.iter().any(|x| {
            x.is_word_in(&[
                "will", "would", "can", "could", "shall", "going", "may", "might",
            ]) || x.lower.ends_with("'ll")
                || x.lower.ends_with("'d")
        });
        RefundContext {
            granted,
            documented,
            deferred: to_people && !modal,
        }
    }
}

fn refund_term_is_mention(t: &[Token], i: usize, cx: &RefundContext) -> bool {
    if !t[i].is_word_in(&[
        "refund",
        "refunds",
        "reimbursement",
        "reimbursements",
        "compensation",
    ]) {
        return false;
    }
    if cx.granted {
        return false;
    }
    if word_at(t, i + 1).is_some_and(|n| n.is_word_in(MENTION_NOUNS)) {
        return true;
    }
    let before = &t[i.saturating_sub(5)..i];
    if before.iter().any(|x| x.is_word_in(REQUEST_WORDS)) {
        return true;
    }
    // "refunds are covered in our terms"; "any refund is up to our billing
    // team": people decide, nobody promises (no "will", "can", "'ll")
    if cx.documented || cx.deferred {
        return true;
    }
    // "I can't promise a refund"; "I can't issue refunds" (the agent's
    // power, not the company's policy: "we can't issue refunds" is a
    // refusal)
    (i.saturating_sub(4)..i).any(|j| {
        let myself = t[j.saturating_sub(4)..j]
            .iter()
            .any(|x| x.is_word_in(&["i", "i'm", "i've", "i'd"]));
        negated_before(t, j, 3)
            && (t[j].is_word_in(DEFER_VERBS) || myself && t[j].is_word_in(SELF_DEFER_VERBS))
    })
}

fn is_refund_at(t: &[Token], i: usize, cx: &RefundContext) -> bool {
    let tok = &t[i];
    if tok.kind != Kind::Word {
        return false;
    }
    let w = tok.lower.as_str();
    let core = [
        "refund",
        "reimburs",
        "repay",
        "repaid",
        "chargeback",
        "reversal",
        "compensat",
        "waive",
    ];
    if core.iter().any(|c| w.starts_with(c)) {
        return !refund_term_is_mention(t, i, cx);
    }
    if w.starts_with("credit") {
        // not "credit card", "the credits page", "500 AI credits left"
        let counted = prev(t, i, 1).is_some_and(|p| p.is_number())
            || prev(t, i, 2).is_some_and(|p| p.is_number())
            || word_at(t, i + 1).is_some_and(|n| n.is_word_in(&["left", "remaining"]));
        return !counted && !word_at(t, i + 1).is_some_and(|n| n.is_word_in(NOT_CREDIT_AFTER));
    }
    if tok.is_word_in(&[
        "cover",
        "covered",
        "covering",
        "absorb",
        "absorbed",
        "absorbing",
    ]) {
        // "we'll cover the cost", "we'll absorb the fee": our promise
        let ours = t[i.saturating_sub(3)..i]
            .iter()
            .any(|x| x.is_word_in(&["we", "we'll", "we've", "i'll", "i've", "i", "we're", "us"]));
        let money = (i + 1..(i + 5).min(t.len()))
            .any(|j| is_money_noun(t, j) || t[j].is_word_in(&["cost", "costs"]));
        return ours && money;
    }
    if tok.is_word_in(RETURN_VERBS) {
        // "reverse the charge", "the charge has been reversed"
        let after = (i + 1..(i + 5).min(t.len())).any(|j| is_money_noun(t, j));
        let before = (i.saturating_sub(5)..i).any(|j| is_money_noun(t, j));
        return after || before;
    }
    if tok.is_word_in(&[
        "take", "taken", "took", "knock", "knocked", "taking", "write", "written", "wrote",
        "writing",
    ]) {
        // "the charge will be taken off your bill", "write off the invoice"
        let off = t[i + 1..(i + 5).min(t.len())]
            .iter()
            .any(|x| x.is_word("off"));
        let money = (i.saturating_sub(5)..(i + 5).min(t.len())).any(|j| is_money_noun(t, j));
        return off && money;
    }
    if tok.is_word("make") || tok.is_word("makes") {
        // "to make up for it", "we'll make it up to you"
        return word_at(t, i + 1).is_some_and(|n| n.is_word("up"))
            && word_at(t, i + 2).is_some_and(|n| n.is_word("for"))
            || word_at(t, i + 1).is_some_and(|n| n.is_word("it"))
                && word_at(t, i + 2).is_some_and(|n| n.is_word("up"));
    }
    if tok.is_word("whole") {
        // "you'll be made whole"
        return prev(t, i, 1).is_some_and(|p| p.is_word_in(&["made", "make", "making"]));
    }
    if tok.is_word("back") {
        // not "invoices go back 24 months"
        if prev(t, i, 1).is_some_and(|p| {
            p.is_word_in(&[
                "go", "goes", "went", "going", "date", "dates", "dating", "look", "looking",
            ])
        }) {
            return false;
        }
        // "your money back", "€120 back", "pay you back"
        // "get back what you paid", "send back the payment"
        if (i + 1..(i + 4).min(t.len())).any(|j| is_money_noun(t, j)) {
            return true;
        }
        return (i.saturating_sub(5)..i).any(|j| {
            is_money_noun(t, j)
                || t[j].is_word_in(&["pay", "paid", "paying", "pays"])
                || (t[j].is_number() && is_currency_amount(t, j))
                || (t[j].is_number()
                    && j + 1 == i
                    && t[j.saturating_sub(4)..j]
                        .iter()
                        .any(|x| x.is_word_in(&["get", "give", "send", "put", "receive"])))
        });
    }
    if tok.is_word_in(&["charge", "charged", "charging", "bill", "billed", "billing"]) {
        // "you won't be charged", "we will not bill you"
        return negated_before(t, i, 3);
    }
    false
}

/// Whether the tokens of one sentence promise, grant or refuse a refund.
pub(crate) fn promises_refund(t: &[Token]) -> bool {
    let cx = RefundContext::of(t);
    (0..t.len()).any(|i| is_refund_at(t, i, &cx))
}

#[cfg(test)]
mod tests {
    use super::super::tokens::tokenize;
    use super::*;

    fn price(s: &str) -> bool {
        states_price(&tokenize(s))
    }
    fn refund(s: &str) -> bool {
        promises_refund(&tokenize(s))
    }

    #[test]
    fn amounts_next_to_a_currency_are_prices() {
        for s in [
            "$ 49",
            "49 €",
            "US$49",
            "USD49",
            "49usd",
            "CHF 45.50",
            "Rs. 999",
            "€1.5k",
            "forty-nine dollars",
            "a hundred bucks",
            "twelve euros a month",
        ] {
            assert!(price(s), "{s}");
        }
    }

    #[test]
    fn counts_and_identifiers_are_not() {
        for s in [
            "1,000 automation runs per month",
            "Version 2.4.1",
            "Call +1 415 555 0100.",
            "Error E1042",
            "99.9% uptime",
            "Renews on March 12.",
            "Exports are limited to 50 per month.",
        ] {
            assert!(!price(s), "{s}");
        }
    }

    #[test]
    fn a_refund_promise_is_not_a_mention() {
        assert!(refund("We'll reverse the charge."));
        assert!(refund("You'll get your money back."));
        assert!(!refund("Our refund policy is in the billing article."));
        assert!(!refund("I can't promise a refund."));
        assert!(refund("Your refund request has been approved."));
        assert!(!refund("We'll get back to you."));
    }
}
