//! Masking of personal data for logs.
//!
//! Masking keeps just enough to tell values apart while debugging (the first
//! letter and the domain of an address, the last two digits of a number)
//! and nothing that identifies a person.

/// `ada.lovelace@example.com` → `a***@example.com`.
pub fn mask_email(email: &str) -> String {
    match email.rsplit_once('@') {
        Some((local, domain)) => {
            let first: String = local.chars().take(1).collect();
            format!("{first}***@{domain}")
        }
        None => "***".to_string(),
    }
}

/// `+15551234567` → `+*********67`; `whatsapp:+1555…` keeps its prefix.
pub fn mask_phone(phone: &str) -> String {
    if let Some(rest) = phone.strip_prefix("whatsapp:") {
        return format!("whatsapp:{}", mask_phone(rest));
    }
    let chars: Vec<char> = phone.chars().collect();
    let keep = 2.min(chars.len());
    let mut out = String::with_capacity(chars.len());
    for (i, c) in chars.iter().enumerate() {
        if i >= chars.len() - keep || *c == '+' {
            out.push(*c);
        } else if c.is_ascii_digit() {
            out.push('*');
        } else {
            out.push(*c);
        }
    }
    out
}

/// Masks every email address and every phone-number-like sequence (seven
/// or more digits, optionally led by `+`, with spaces, dots, dashes or
/// brackets between them) in free text, such as a provider's error body.
/// Addresses become `a***@example.com`; numbers keep their last two
/// digits. Over-masking (a long date or id) is preferred to a leak.
pub fn mask_pii(text: &str) -> String {
    mask_phone_numbers(&mask_emails(text))
}

fn is_local_char(c: char) -> bool {
    c.is_alphanumeric() || "._%+-'".contains(c)
}

fn is_domain_char(c: char) -> bool {
    c.is_alphanumeric() || c == '.' || c == '-'
}

fn mask_emails(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0; // chars[..copied] are in `out`
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '@' {
            i += 1;
            continue;
        }
        let mut start = i;
        while start > copied && is_local_char(chars[start - 1]) {
            start -= 1;
        }
        let mut end = i + 1;
        while end < chars.len() && is_domain_char(chars[end]) {
            end += 1;
        }
        while end > i + 1 && matches!(chars[end - 1], '.' | '-') {
            end -= 1;
        }
        let domain: String = chars[i + 1..end].iter().collect();
        let is_address = start < i
            && domain
                .rsplit_once('.')
                .is_some_and(|(host, tld)| !host.is_empty() && tld.chars().count() >= 2);
        if is_address {
            out.extend(&chars[copied..start]);
            out.extend(chars[start..].iter().take(1));
            out.push_str("***@");
            out.push_str(&domain);
            copied = end;
            i = end;
        } else {
            i += 1;
        }
    }
    out.extend(&chars[copied..]);
    out
}

fn mask_phone_numbers(text: &str) -> String {
    const SEPARATORS: &str = " -.()/";
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let starts = chars[i].is_ascii_digit()
            || (chars[i] == '+' && chars.get(i + 1).is_some_and(char::is_ascii_digit));
        if !starts {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        // The run: digits, with at most two separators in a row between them.
        let mut end = i + 1;
        let mut last_digit = if chars[i].is_ascii_digit() { i } else { i + 1 };
        let mut gap = 0;
        while end < chars.len() {
            let c = chars[end];
            if c.is_ascii_digit() {
                last_digit = end;
                gap = 0;
            } else if SEPARATORS.contains(c) && gap < 2 {
                gap += 1;
            } else {
                break;
            }
            end += 1;
        }
        let run = &chars[i..=last_digit];
        let digits = run.iter().filter(|c| c.is_ascii_digit()).count();
        if digits >= 7 {
            let mut seen = 0;
            for c in run {
                if c.is_ascii_digit() {
                    seen += 1;
                    out.push(if seen > digits - 2 { *c } else { '*' });
                } else {
                    out.push(*c);
                }
            }
        } else {
            out.extend(run);
        }
        i = last_digit + 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_keep_first_letter_and_domain() {
        assert_eq!(mask_email("ada.lovelace@example.com"), "a***@example.com");
        assert_eq!(mask_email("not-an-email"), "***");
    }

    #[test]
    fn phones_keep_last_two_digits() {
        assert_eq!(mask_phone("+15551234567"), "+*********67");
        assert_eq!(mask_phone("whatsapp:+15551234567"), "whatsapp:+*********67");
    }

    #[test]
    fn free_text_loses_every_address_and_number() {
        let body = r#"{"code": 21211, "message": "The 'To' number whatsapp:+447700900041 is not a valid phone number. Contact ada.lovelace@example.co.uk or (555) 123-4567 / +1 555 123 4567", "more_info": "https://www.twilio.com/docs/errors/21211", "status": 400}"#;
        let masked = mask_pii(body);
        assert!(masked.contains("whatsapp:+**********41"), "{masked}");
        assert!(masked.contains("a***@example.co.uk"), "{masked}");
        assert!(masked.contains("(***) ***-**67"), "{masked}");
        assert!(masked.contains("+* *** *** **67"), "{masked}");
        for leaked in ["447700900041", "ada.lovelace", "555", "4567"] {
            assert!(!masked.contains(leaked), "{leaked} in {masked}");
        }
        // What helps debugging stays.
        assert!(masked.contains(r#""code": 21211"#), "{masked}");
        assert!(masked.contains("errors/21211"), "{masked}");
        assert!(masked.contains(r#""status": 400"#), "{masked}");
    }

    #[test]
    fn text_without_personal_data_is_unchanged() {
        for text in [
            "HTTP 503: service unavailable after 3 attempts in 12s",
            "no @ here, a@b, user@localhost, @example.com",
            "",
            "ünïcödé 12 34",
        ] {
            assert_eq!(mask_pii(text), text);
        }
        assert_eq!(mask_pii("to: bob@example.com."), "to: b***@example.com.");
        assert_eq!(mask_pii("x@y.com,z@w.org"), "x***@y.com,z***@w.org");
    }
}
