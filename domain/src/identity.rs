//! Customer identities: an email address, a phone number or a WhatsApp id,
//! normalised so that the same person always maps to the same key.
//!
//! The key doubles as the id of the `customer_identity` aggregate
//! (`email:ada@example.com`, `phone:+15551234567`, `whatsapp:+15551234567`),
//! so the event store's uniqueness makes an identity belong to exactly one
//! customer.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum IdentityKind {
    Email,
    Phone,
    Whatsapp,
}

impl IdentityKind {
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityKind::Email => "email",
            IdentityKind::Phone => "phone",
            IdentityKind::Whatsapp => "whatsapp",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("not a valid email address")]
    InvalidEmail,
    #[error("not a valid phone number: expected E.164, a '+' and 8 to 15 digits")]
    InvalidPhone,
    #[error("not a WhatsApp address: expected 'whatsapp:+<E.164 number>'")]
    InvalidWhatsapp,
}

/// A normalised identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
pub struct IdentityKey {
    pub kind: IdentityKind,
    pub value: String,
}

impl IdentityKey {
    pub fn email(raw: &str) -> Result<Self, IdentityError> {
        normalize_email(raw).map(|value| Self {
            kind: IdentityKind::Email,
            value,
        })
    }

    pub fn phone(raw: &str) -> Result<Self, IdentityError> {
        normalize_phone(raw).map(|value| Self {
            kind: IdentityKind::Phone,
            value,
        })
    }

    /// From Twilio's `From`/`To` form: `whatsapp:+15551234567`.
    pub fn whatsapp(raw: &str) -> Result<Self, IdentityError> {
        let number = raw
            .trim()
            .strip_prefix("whatsapp:")
            .ok_or(IdentityError::InvalidWhatsapp)?;
        normalize_phone(number)
            .map(|value| Self {
                kind: IdentityKind::Whatsapp,
                value,
            })
            .map_err(|_| IdentityError::InvalidWhatsapp)
    }

    /// The id of the `customer_identity` aggregate that owns this identity.
    pub fn aggregate_id(&self) -> String {
        format!("{}:{}", self.kind.as_str(), self.value)
    }
}

impl fmt::Display for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.as_str(), self.value)
    }
}

/// Lower-cases and checks an address against the practical subset of RFC 5321
/// that mail systems accept: one `@`, a dot-atom local part of at most 64
/// characters, a domain of at least two labels, at most 254 characters in all.
pub fn normalize_email(raw: &str) -> Result<String, IdentityError> {
    let email = raw.trim().to_lowercase();
    if email.is_empty() || email.len() > 254 {
        return Err(IdentityError::InvalidEmail);
    }
    let (local, domain) = email.rsplit_once('@').ok_or(IdentityError::InvalidEmail)?;
    let local_ok = !local.is_empty()
        && local.len() <= 64
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~.".contains(c));
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && domain.len() <= 253
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
        && labels
            .last()
            .is_some_and(|tld| tld.len() >= 2 && tld.chars().all(|c| c.is_ascii_alphabetic()));
    if local_ok && domain_ok {
        Ok(email)
    } else {
        Err(IdentityError::InvalidEmail)
    }
}

/// E.164: `+`, a non-zero country digit, 8 to 15 digits in all. Spaces,
/// dashes, dots and parentheses are dropped first.
pub fn normalize_phone(raw: &str) -> Result<String, IdentityError> {
    let compact: String = raw
        .trim()
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '.' | '(' | ')'))
        .collect();
    let digits = compact
        .strip_prefix('+')
        .ok_or(IdentityError::InvalidPhone)?;
    let ok = (8..=15).contains(&digits.len())
        && digits.chars().all(|c| c.is_ascii_digit())
        && !digits.starts_with('0');
    if ok {
        Ok(format!("+{digits}"))
    } else {
        Err(IdentityError::InvalidPhone)
    }
}

/// Splits an RFC 5322 mailbox (`"Ada Lovelace" <ada@example.com>` or a bare
/// address) into display name and normalised address.
pub fn parse_mailbox(raw: &str) -> Result<(Option<String>, String), IdentityError> {
    let raw = raw.trim();
    if let (Some(open), Some(close)) = (raw.rfind('<'), raw.rfind('>')) {
        if open < close {
            let address = normalize_email(&raw[open + 1..close])?;
            let name = raw[..open].trim().trim_matches('"').trim();
            let name = (!name.is_empty()).then(|| name.to_string());
            return Ok((name, address));
        }
    }
    normalize_email(raw).map(|address| (None, address))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalised_to_one_key() {
        let a = IdentityKey::email(" Ada.Lovelace@Example.COM ").unwrap();
        let b = IdentityKey::email("ada.lovelace@example.com").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.aggregate_id(), "email:ada.lovelace@example.com");
    }

    #[test]
    fn bad_emails_are_refused() {
        for bad in [
            "",
            "plain",
            "@example.com",
            "a@",
            "a@b",
            "a@@b.com",
            "a..b@example.com",
            ".a@example.com",
            "a@-example.com",
            "a@example.c0m",
            "a b@example.com",
            "a@exa_mple.com",
        ] {
            assert_eq!(
                normalize_email(bad),
                Err(IdentityError::InvalidEmail),
                "{bad}"
            );
        }
        let long_local = format!("{}@example.com", "a".repeat(65));
        assert!(normalize_email(&long_local).is_err());
    }

    #[test]
    fn phones_are_e164() {
        assert_eq!(
            normalize_phone("+1 (555) 123-4567").unwrap(),
            "+15551234567"
        );
        for bad in [
            "15551234567",
            "+0123456789",
            "+123",
            "+1234567890123456",
            "+1555abc4567",
        ] {
            assert!(normalize_phone(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn whatsapp_ids_come_from_twilio_addresses() {
        let key = IdentityKey::whatsapp("whatsapp:+14155238886").unwrap();
        assert_eq!(key.aggregate_id(), "whatsapp:+14155238886");
        assert_eq!(
            IdentityKey::whatsapp("+14155238886"),
            Err(IdentityError::InvalidWhatsapp)
        );
        assert_eq!(
            IdentityKey::whatsapp("whatsapp:12"),
            Err(IdentityError::InvalidWhatsapp)
        );
    }

    #[test]
    fn mailboxes_split_into_name_and_address() {
        assert_eq!(
            parse_mailbox("\"Ada Lovelace\" <Ada@Example.com>").unwrap(),
            (
                Some("Ada Lovelace".to_string()),
                "ada@example.com".to_string()
            )
        );
        assert_eq!(
            parse_mailbox("bob@example.org").unwrap(),
            (None, "bob@example.org".to_string())
        );
        assert!(parse_mailbox("Bob <not-an-address>").is_err());
    }
}
