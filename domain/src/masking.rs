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

/// Free text (a provider's error body, an exception message) with every
/// email address and every phone-number-like run of seven or more digits
/// masked, for logs, DLQ headers and escalation notes.
pub fn mask_pii(text: &str) -> String {
    mask_phones_in(&mask_emails_in(text))
}

fn is_local_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '%' | '+' | '-')
}

fn is_domain_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-')
}

fn mask_emails_in(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let mut copied = 0;
    while i < chars.len() {
        if chars[i] == '@' {
            let mut start = i;
            while start > copied && is_local_char(chars[start - 1]) {
                start -= 1;
            }
            let mut end = i + 1;
            while end < chars.len() && is_domain_char(chars[end]) {
                end += 1;
            }
            // A trailing dot ends the sentence, not the domain.
            while end > i + 1 && chars[end - 1] == '.' {
                end -= 1;
            }
            let domain: String = chars[i + 1..end].iter().collect();
            if start < i && domain.contains('.') {
                out.extend(&chars[copied..start]);
                let local: String = chars[start..i].iter().collect();
                out.push_str(&mask_email(&format!("{local}@{domain}")));
                copied = end;
                i = end;
                continue;
            }
        }
        i += 1;
    }
    out.extend(&chars[copied..]);
    out
}

fn mask_phones_in(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_digit() || (c == '+' && chars.get(i + 1).is_some_and(|n| n.is_ascii_digit()))
        {
            // A run of digits and the separators phone numbers are written with.
            let mut end = i;
            let mut digits = 0;
            let mut last_digit_end = i;
            while end < chars.len()
                && (chars[end].is_ascii_digit()
                    || matches!(chars[end], ' ' | '-' | '.' | '(' | ')' | '+'))
            {
                if chars[end].is_ascii_digit() {
                    digits += 1;
                    last_digit_end = end + 1;
                }
                end += 1;
            }
            let run = &chars[i..last_digit_end.max(i + 1)];
            if digits >= 7 {
                let mut seen = 0;
                for ch in run {
                    if ch.is_ascii_digit() {
                        seen += 1;
                        out.push(if seen > digits - 2 { *ch } else { '*' });
                    } else {
                        out.push(*ch);
                    }
                }
            } else {
                out.extend(run);
            }
            i = last_digit_end.max(i + 1);
            continue;
        }
        out.push(c);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_text_loses_addresses_and_numbers() {
        let body = r#"{"code": 21211, "message": "The 'To' number whatsapp:+15551234567 is not valid. Contact ada.lovelace@example.com."}"#;
        let masked = mask_pii(body);
        assert!(!masked.contains("5551234567"), "{masked}");
        assert!(!masked.contains("ada.lovelace"), "{masked}");
        assert!(masked.contains("a***@example.com."), "{masked}");
        assert!(masked.contains("+*********67"), "{masked}");
        // Short numbers (codes, counts) stay readable.
        assert!(masked.contains("21211"), "{masked}");
        assert_eq!(
            mask_pii("call (555) 123-4567 now"),
            "call (***) ***-**67 now"
        );
        assert_eq!(mask_pii("HTTP 500 at 10:30"), "HTTP 500 at 10:30");
        assert_eq!(
            mask_pii("no @ here, a@b, x@y.z"),
            "no @ here, a@b, x***@y.z"
        );
    }

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
}
