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
}
