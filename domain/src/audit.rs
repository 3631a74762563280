//! The tamper-evident hash chain over every stream of the event store.
//!
//! Each stored event carries `hash = sha256(encode(prev_hash, event fields))`
//! where `prev_hash` is the hash of the previous event of the same stream
//! (empty for the first). Fields are length-prefixed (`<bytes>:<value>;`) so
//! that no two different events encode to the same bytes. The writer
//! (`commands`' event store, which holds the stream's head) computes the hash
//! before it inserts; JSON enters the hash as Postgres prints `jsonb`
//! ([`jsonb_text`]), so `casebook audit verify` can let the database print
//! what it stored and recompute the same bytes. Rows inserted without a hash
//! get it from the database's fallback trigger (`casebook_events_chain`),
//! which uses the same encoding.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// The fields of one stored event that the chain covers, as text.
#[derive(Debug, Clone, Copy)]
pub struct ChainInput<'a> {
    pub event_id: &'a str,
    pub aggregate_type: &'a str,
    pub aggregate_id: &'a str,
    pub sequence: i64,
    pub event_type: &'a str,
    pub event_version: &'a str,
    /// Microseconds since the Unix epoch.
    pub occurred_at_micros: i64,
    /// The canonical text of the JSON payload (Postgres `jsonb::text`).
    pub payload: &'a str,
    /// The canonical text of the JSON metadata (Postgres `jsonb::text`).
    pub metadata: &'a str,
}

/// `n` in decimal, without allocating (verification hashes millions).
fn decimal(n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    let mut n = n;
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

fn field(hasher: &mut Sha256, value: &str) {
    let mut buf = [0u8; 20];
    hasher.update(decimal(value.len() as u64, &mut buf));
    hasher.update(b":");
    hasher.update(value.as_bytes());
    hasher.update(b";");
}

/// A signed number as a field, as `to_string` would print it.
fn number_field(hasher: &mut Sha256, n: i64) {
    let mut buf = [0u8; 20];
    let digits = decimal(n.unsigned_abs(), &mut buf);
    let len = digits.len() + usize::from(n < 0);
    let mut len_buf = [0u8; 20];
    hasher.update(decimal(len as u64, &mut len_buf));
    hasher.update(b":");
    if n < 0 {
        hasher.update(b"-");
    }
    hasher.update(digits);
    hasher.update(b";");
}

/// The hash of an event whose stream's previous hash is `prev` (`""` for the
/// first event of a stream), as lower-case hex.
pub fn chain_hash(prev: &str, input: &ChainInput<'_>) -> String {
    let mut h = Sha256::new();
    field(&mut h, prev);
    field(&mut h, input.event_id);
    field(&mut h, input.aggregate_type);
    field(&mut h, input.aggregate_id);
    number_field(&mut h, input.sequence);
    field(&mut h, input.event_type);
    field(&mut h, input.event_version);
    number_field(&mut h, input.occurred_at_micros);
    field(&mut h, input.payload);
    field(&mut h, input.metadata);
    hex::encode(h.finalize())
}

/// `value` as Postgres prints it from `jsonb` (`jsonb::text`): object keys
/// ordered by length, then bytewise; `", "` between items and `": "` after
/// keys; numbers in plain decimal notation (no exponent), as `numeric` prints
/// them; strings escaped as Postgres's `escape_json` does.
pub fn jsonb_text(value: &Value) -> String {
    let mut out = String::with_capacity(256);
    write_jsonb(&mut out, value);
    out
}

fn write_jsonb(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_jsonb(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| {
                a.0.len()
                    .cmp(&b.0.len())
                    .then_with(|| a.0.as_bytes().cmp(b.0.as_bytes()))
            });
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_string(out, key);
                out.push_str(": ");
                write_jsonb(out, item);
            }
            out.push('}');
        }
    }
}

fn write_string(out: &mut String, s: &str) {
    use std::fmt::Write;
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A JSON number as `numeric` prints it: integers as they are, floats in
/// plain notation with the digits serde_json wrote (shortest round trip),
/// the exponent folded into the position of the point.
fn write_number(out: &mut String, n: &serde_json::Number) {
    if n.is_i64() || n.is_u64() {
        out.push_str(&n.to_string());
        return;
    }
    let text = n.to_string();
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(i) => (&text[..i], text[i + 1..].parse::<i64>().unwrap_or(0)),
        None => (text.as_str(), 0),
    };
    let (negative, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mantissa),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits: String = format!("{int_part}{frac_part}");
    // The value is 0.<digits> * 10^(point), with `point` digits before the
    // decimal point.
    let point = int_part.len() as i64 + exponent;
    // `numeric` keeps the scale it was given: the digits after the point in
    // the text, less the exponent.
    let scale = (frac_part.len() as i64 - exponent).max(0);
    let mut whole = String::new();
    let mut fraction = String::new();
    for (i, d) in digits.chars().enumerate() {
        if (i as i64) < point {
            whole.push(d);
        } else {
            fraction.push(d);
        }
    }
    if point > digits.len() as i64 {
        whole.extend(std::iter::repeat_n(
            '0',
            (point - digits.len() as i64) as usize,
        ));
    }
    if point < 0 {
        fraction.insert_str(0, &"0".repeat((-point) as usize));
    }
    let whole = whole.trim_start_matches('0');
    let whole = if whole.is_empty() { "0" } else { whole };
    fraction.truncate(scale as usize);
    while (fraction.len() as i64) < scale {
        fraction.push('0');
    }
    let zero = whole == "0" && fraction.chars().all(|c| c == '0');
    if negative && !zero {
        out.push('-');
    }
    out.push_str(whole);
    if !fraction.is_empty() {
        out.push('.');
        out.push_str(&fraction);
    }
}

/// Where a stream's chain first disagrees with its stored hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    pub sequence: i64,
    pub expected: String,
    pub stored: String,
}

/// Checks one stream's events in sequence order: each stored hash must be
/// the one recomputed from the event and its predecessor's hash, and the
/// sequences must run 1, 2, 3… without gaps.
#[derive(Debug, Clone)]
pub struct StreamVerifier {
    prev: String,
    next_sequence: i64,
}

impl Default for StreamVerifier {
    fn default() -> Self {
        Self {
            prev: String::new(),
            next_sequence: 1,
        }
    }
}

impl StreamVerifier {
    pub fn check(&mut self, input: &ChainInput<'_>, stored: &str) -> Result<(), ChainBreak> {
        let expected = chain_hash(&self.prev, input);
        if input.sequence != self.next_sequence || expected != stored {
            return Err(ChainBreak {
                sequence: input.sequence,
                expected,
                stored: stored.to_string(),
            });
        }
        self.prev = expected;
        self.next_sequence += 1;
        Ok(())
    }

    /// Takes an event whose content is not at hand (purged to the archive,
    /// where it is checked against its stored hash): its sequence must
    /// still follow, and its stored hash is the next one's predecessor.
    pub fn skip(&mut self, sequence: i64, stored: &str) -> Result<(), ChainBreak> {
        if sequence != self.next_sequence {
            return Err(ChainBreak {
                sequence,
                expected: format!("sequence {}", self.next_sequence),
                stored: stored.to_string(),
            });
        }
        self.prev = stored.to_string();
        self.next_sequence += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input<'a>(sequence: i64, payload: &'a str) -> ChainInput<'a> {
        ChainInput {
            event_id: "0193f0a0-0000-7000-8000-000000000001",
            aggregate_type: "ticket",
            aggregate_id: "t-1",
            sequence,
            event_type: "TicketOpened",
            event_version: "1",
            occurred_at_micros: 1_795_000_000_000_000,
            payload,
            metadata: "{}",
        }
    }

    #[test]
    fn the_hash_covers_every_field_and_the_predecessor() {
        let base = chain_hash("", &input(1, "{\"a\": 1}"));
        assert_eq!(base.len(), 64);
        assert_ne!(base, chain_hash("", &input(1, "{\"a\": 2}")));
        assert_ne!(base, chain_hash("x", &input(1, "{\"a\": 1}")));
        assert_ne!(base, chain_hash("", &input(2, "{\"a\": 1}")));
        // Length prefixes keep shifted boundaries apart.
        let mut shifted = input(1, "{\"a\": 1}");
        shifted.aggregate_type = "ticke";
        shifted.aggregate_id = "tt-1";
        assert_ne!(base, chain_hash("", &shifted));
    }

    #[test]
    fn jsonb_text_prints_as_postgres_does() {
        let v: Value = serde_json::from_str(
            r#"{"zz": [1, 2.5, null, true], "a": "x\"\\\n\u0001é", "bb": {"k": 1e16, "j": 1.5e-7, "i": -0.0, "h": 1.0}, "ab": -3}"#,
        )
        .unwrap();
        assert_eq!(
            jsonb_text(&v),
            r#"{"a": "x\"\\\n\u0001é", "ab": -3, "bb": {"h": 1.0, "i": 0.0, "j": 0.00000015, "k": 10000000000000000}, "zz": [1, 2.5, null, true]}"#
        );
        assert_eq!(jsonb_text(&serde_json::json!({})), "{}");
        assert_eq!(jsonb_text(&serde_json::json!([])), "[]");
        assert_eq!(jsonb_text(&serde_json::json!(0.1)), "0.1");
        assert_eq!(jsonb_text(&serde_json::json!(-12.75e2)), "-1275.0");
    }

    #[test]
    fn numbers_are_fields_as_printed() {
        for n in [0i64, 7, -7, 10, 1_795_000_000_000_000, i64::MIN, i64::MAX] {
            let mut a = Sha256::new();
            number_field(&mut a, n);
            let mut b = Sha256::new();
            field(&mut b, &n.to_string());
            assert_eq!(a.finalize(), b.finalize(), "{n}");
        }
    }

    #[test]
    fn a_known_vector_stays_stable() {
        // Guards the encoding shared with the SQL trigger: changing it breaks
        // every stored chain.
        let h = chain_hash("", &input(1, "{}"));
        let again = chain_hash("", &input(1, "{}"));
        assert_eq!(h, again);
        let mut hasher = Sha256::new();
        hasher.update(
            "0:;36:0193f0a0-0000-7000-8000-000000000001;6:ticket;3:t-1;1:1;12:TicketOpened;1:1;16:1795000000000000;2:{};2:{};"
                .as_bytes(),
        );
        assert_eq!(h, hex::encode(hasher.finalize()));
    }

    #[test]
    fn verification_finds_the_first_altered_event() {
        let h1 = chain_hash("", &input(1, "{}"));
        let h2 = chain_hash(&h1, &input(2, "{}"));
        let h3 = chain_hash(&h2, &input(3, "{}"));
        let verify = |events: Vec<(ChainInput<'_>, &str)>| {
            let mut v = StreamVerifier::default();
            events
                .iter()
                .try_for_each(|(input, stored)| v.check(input, stored))
        };
        let good = vec![
            (input(1, "{}"), h1.as_str()),
            (input(2, "{}"), h2.as_str()),
            (input(3, "{}"), h3.as_str()),
        ];
        assert_eq!(verify(good), Ok(()));
        let tampered = vec![
            (input(1, "{}"), h1.as_str()),
            (input(2, "{\"x\": 1}"), h2.as_str()),
            (input(3, "{}"), h3.as_str()),
        ];
        assert_eq!(verify(tampered).unwrap_err().sequence, 2);
        let gap = vec![(input(1, "{}"), h1.as_str()), (input(3, "{}"), h3.as_str())];
        assert_eq!(verify(gap).unwrap_err().sequence, 3);
    }
}
