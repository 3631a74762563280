//! Masking of personal data for logs and for the analyst role.
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

/// Masks an identity value of the given kind (`email`, `phone`, `whatsapp`).
pub fn mask_identity(kind: crate::IdentityKind, value: &str) -> String {
    match kind {
        crate::IdentityKind::Email => mask_email(value),
        crate::IdentityKind::Phone | crate::IdentityKind::Whatsapp => mask_phone(value),
    }
}

/// Masks email addresses and phone-number-like digit runs (8 or more digits,
/// allowing spaces, dashes, dots and parentheses between them) inside free
/// text, for read-only roles that may read messages but not contact details.
pub fn mask_pii_in_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, word) in text.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let trimmed = word.trim_matches(|c: char| !c.is_alphanumeric() && c != '+');
        if trimmed.contains('@') && crate::identity::normalize_email(trimmed).is_ok() {
            out.push_str(&word.replace(trimmed, &mask_email(trimmed)));
        } else {
            out.push_str(word);
        }
    }
    mask_digit_runs(&out)
}

fn mask_digit_runs(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_ascii_digit()
            || (chars[i] == '+' && chars.get(i + 1).is_some_and(|c| c.is_ascii_digit()))
        {
            let start = i;
            let mut end = i;
            let mut digits = 0;
            let mut j = i;
            while j < chars.len() {
                let c = chars[j];
                if c.is_ascii_digit() {
                    digits += 1;
                    end = j + 1;
                } else if !(matches!(c, ' ' | '-' | '.' | '(' | ')') || (c == '+' && j == start)) {
                    break;
                }
                j += 1;
            }
            let run: String = chars[start..end].iter().collect();
            if digits >= 8 {
                out.push_str(&mask_phone(&run));
            } else {
                out.push_str(&run);
            }
            i = end.max(start + 1);
        } else {
            out.push(chars[i]);
            i += 1;
        }
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
    fn free_text_loses_addresses_and_numbers() {
        let masked =
            mask_pii_in_text("Reach me at ada@example.com or +1 555 123 4567, order 1234.");
        assert!(!masked.contains("ada@"), "{masked}");
        assert!(!masked.contains("123 4567"), "{masked}");
        assert!(masked.contains("a***@example.com"), "{masked}");
        assert!(masked.contains("order 1234."), "{masked}");
    }
}
