//! Customer identities: an email address, a phone number or a WhatsApp id,
//! normalised so that the same person always maps to the same key.
//!
//! The key doubles as the id of the `customer_identity` aggregate
//! (`email:ada@example.com`, `phone:+15551234567`, `whatsapp:+15551234567`),
//! so the event store's uniqueness makes an identity belong to exactly one
//! customer.

use std::fmt;

use chrono::{DateTime, TimeDelta, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

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

/// Which channels prove the identities they report: a WhatsApp number that
/// Twilio signed and mail that arrived in our mailbox do; a web-form email
/// is only a claim.
pub fn channel_proves_identity(channel: crate::Channel) -> bool {
    match channel {
        crate::Channel::Whatsapp | crate::Channel::Email => true,
        crate::Channel::Webform => false,
    }
}

/// How long a confirmation link works.
pub const CLAIM_VALID_HOURS: i64 = 48;

/// The id of the `email_claim` aggregate a confirmation token opens: the
/// SHA-256 of the token, so the store never holds the token itself.
pub fn email_claim_id(token: &str) -> String {
    format!(
        "email-claim:{}",
        hex::encode(Sha256::digest(token.as_bytes()))
    )
}

/// A web-form submitter's claim to an email address, open until they follow
/// the one-time link sent to that address. One claim per submission.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EmailClaimCommand {
    Open {
        claim_id: Uuid,
        identity: IdentityKey,
        /// The customer the submission created (it holds the claim).
        customer_id: Uuid,
        ticket_id: Uuid,
        at: DateTime<Utc>,
    },
    /// The acknowledgement with the link went out (Gmail ids).
    RecordAcknowledgement {
        provider_message_id: String,
        thread_id: Option<String>,
        at: DateTime<Utc>,
    },
    Confirm {
        at: DateTime<Utc>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum EmailClaimEvent {
    EmailClaimOpened {
        claim_id: Uuid,
        identity: IdentityKey,
        customer_id: Uuid,
        ticket_id: Uuid,
        opened_at: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    },
    ClaimAcknowledgementSent {
        provider_message_id: String,
        thread_id: Option<String>,
        sent_at: DateTime<Utc>,
    },
    EmailClaimConfirmed {
        claim_id: Uuid,
        identity: IdentityKey,
        customer_id: Uuid,
        confirmed_at: DateTime<Utc>,
    },
}

impl DomainEvent for EmailClaimEvent {
    fn event_type(&self) -> String {
        match self {
            EmailClaimEvent::EmailClaimOpened { .. } => "EmailClaimOpened",
            EmailClaimEvent::ClaimAcknowledgementSent { .. } => "ClaimAcknowledgementSent",
            EmailClaimEvent::EmailClaimConfirmed { .. } => "EmailClaimConfirmed",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        "1".to_string()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmailClaimError {
    #[error("this claim is already open")]
    AlreadyOpened,
    #[error("no such confirmation link")]
    NotFound,
    #[error("this confirmation link was already used")]
    AlreadyConfirmed,
    #[error("this confirmation link has expired")]
    Expired,
    #[error("only an email address can be confirmed by link")]
    NotAnEmail,
}

/// What is known of one claim.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EmailClaim {
    pub claim_id: Option<Uuid>,
    pub identity: Option<IdentityKey>,
    pub customer_id: Option<Uuid>,
    pub ticket_id: Option<Uuid>,
    pub expires_at: Option<DateTime<Utc>>,
    pub acknowledged: Option<String>,
    pub thread_id: Option<String>,
    pub confirmed_at: Option<DateTime<Utc>>,
}

impl EmailClaim {
    pub fn decide(
        &self,
        command: EmailClaimCommand,
    ) -> Result<Vec<EmailClaimEvent>, EmailClaimError> {
        match command {
            EmailClaimCommand::Open {
                claim_id,
                identity,
                customer_id,
                ticket_id,
                at,
            } => {
                if self.claim_id.is_some() {
                    return Err(EmailClaimError::AlreadyOpened);
                }
                if identity.kind != IdentityKind::Email {
                    return Err(EmailClaimError::NotAnEmail);
                }
                Ok(vec![EmailClaimEvent::EmailClaimOpened {
                    claim_id,
                    identity,
                    customer_id,
                    ticket_id,
                    opened_at: at,
                    expires_at: at + TimeDelta::hours(CLAIM_VALID_HOURS),
                }])
            }
            EmailClaimCommand::RecordAcknowledgement {
                provider_message_id,
                thread_id,
                at,
            } => {
                if self.claim_id.is_none() {
                    return Err(EmailClaimError::NotFound);
                }
                if self.acknowledged.is_some() {
                    return Ok(vec![]);
                }
                Ok(vec![EmailClaimEvent::ClaimAcknowledgementSent {
                    provider_message_id,
                    thread_id,
                    sent_at: at,
                }])
            }
            EmailClaimCommand::Confirm { at } => {
                let (Some(claim_id), Some(identity), Some(customer_id), Some(expires_at)) = (
                    self.claim_id,
                    self.identity.clone(),
                    self.customer_id,
                    self.expires_at,
                ) else {
                    return Err(EmailClaimError::NotFound);
                };
                if self.confirmed_at.is_some() {
                    return Err(EmailClaimError::AlreadyConfirmed);
                }
                if at >= expires_at {
                    return Err(EmailClaimError::Expired);
                }
                Ok(vec![EmailClaimEvent::EmailClaimConfirmed {
                    claim_id,
                    identity,
                    customer_id,
                    confirmed_at: at,
                }])
            }
        }
    }

    pub fn apply_event(&mut self, event: EmailClaimEvent) {
        match event {
            EmailClaimEvent::EmailClaimOpened {
                claim_id,
                identity,
                customer_id,
                ticket_id,
                expires_at,
                ..
            } => {
                self.claim_id = Some(claim_id);
                self.identity = Some(identity);
                self.customer_id = Some(customer_id);
                self.ticket_id = Some(ticket_id);
                self.expires_at = Some(expires_at);
            }
            EmailClaimEvent::ClaimAcknowledgementSent {
                provider_message_id,
                thread_id,
                ..
            } => {
                self.acknowledged = Some(provider_message_id);
                self.thread_id = thread_id;
            }
            EmailClaimEvent::EmailClaimConfirmed { confirmed_at, .. } => {
                self.confirmed_at = Some(confirmed_at)
            }
        }
    }
}

crate::impl_aggregate!(
    EmailClaim,
    "email_claim",
    EmailClaimCommand,
    EmailClaimEvent,
    EmailClaimError
);

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

    mod claims {
        use super::super::*;
        use cqrs_es::test::TestFramework;

        fn at() -> DateTime<Utc> {
            DateTime::parse_from_rfc3339("2026-11-24T10:00:00Z")
                .unwrap()
                .with_timezone(&Utc)
        }

        fn opened() -> EmailClaimEvent {
            EmailClaimEvent::EmailClaimOpened {
                claim_id: Uuid::from_u128(1),
                identity: IdentityKey::email("ada@example.com").unwrap(),
                customer_id: Uuid::from_u128(2),
                ticket_id: Uuid::from_u128(3),
                opened_at: at(),
                expires_at: at() + TimeDelta::hours(48),
            }
        }

        fn confirmed(when: DateTime<Utc>) -> EmailClaimEvent {
            EmailClaimEvent::EmailClaimConfirmed {
                claim_id: Uuid::from_u128(1),
                identity: IdentityKey::email("ada@example.com").unwrap(),
                customer_id: Uuid::from_u128(2),
                confirmed_at: when,
            }
        }

        #[test]
        fn a_claim_opens_for_48_hours() {
            TestFramework::<EmailClaim>::with(())
                .given_no_previous_events()
                .when(EmailClaimCommand::Open {
                    claim_id: Uuid::from_u128(1),
                    identity: IdentityKey::email("ada@example.com").unwrap(),
                    customer_id: Uuid::from_u128(2),
                    ticket_id: Uuid::from_u128(3),
                    at: at(),
                })
                .then_expect_events(vec![opened()]);
        }

        #[test]
        fn a_phone_cannot_be_claimed_by_link() {
            TestFramework::<EmailClaim>::with(())
                .given_no_previous_events()
                .when(EmailClaimCommand::Open {
                    claim_id: Uuid::from_u128(1),
                    identity: IdentityKey::phone("+15551234567").unwrap(),
                    customer_id: Uuid::from_u128(2),
                    ticket_id: Uuid::from_u128(3),
                    at: at(),
                })
                .then_expect_error(EmailClaimError::NotAnEmail);
        }

        #[test]
        fn a_claim_is_confirmed_once_and_before_it_expires() {
            let soon = at() + TimeDelta::hours(1);
            TestFramework::<EmailClaim>::with(())
                .given(vec![opened()])
                .when(EmailClaimCommand::Confirm { at: soon })
                .then_expect_events(vec![confirmed(soon)]);
            TestFramework::<EmailClaim>::with(())
                .given(vec![opened(), confirmed(soon)])
                .when(EmailClaimCommand::Confirm { at: soon })
                .then_expect_error(EmailClaimError::AlreadyConfirmed);
            TestFramework::<EmailClaim>::with(())
                .given(vec![opened()])
                .when(EmailClaimCommand::Confirm {
                    at: at() + TimeDelta::hours(48),
                })
                .then_expect_error(EmailClaimError::Expired);
            TestFramework::<EmailClaim>::with(())
                .given_no_previous_events()
                .when(EmailClaimCommand::Confirm { at: soon })
                .then_expect_error(EmailClaimError::NotFound);
        }

        #[test]
        fn the_acknowledgement_is_recorded_once() {
            let sent = EmailClaimEvent::ClaimAcknowledgementSent {
                provider_message_id: "g1".into(),
                thread_id: Some("t1".into()),
                sent_at: at(),
            };
            TestFramework::<EmailClaim>::with(())
                .given(vec![opened()])
                .when(EmailClaimCommand::RecordAcknowledgement {
                    provider_message_id: "g1".into(),
                    thread_id: Some("t1".into()),
                    at: at(),
                })
                .then_expect_events(vec![sent.clone()]);
            TestFramework::<EmailClaim>::with(())
                .given(vec![opened(), sent])
                .when(EmailClaimCommand::RecordAcknowledgement {
                    provider_message_id: "g2".into(),
                    thread_id: None,
                    at: at(),
                })
                .then_expect_events(vec![]);
        }

        #[test]
        fn the_store_keeps_a_hash_of_the_token_not_the_token() {
            let id = email_claim_id("secret-token");
            assert!(id.starts_with("email-claim:"));
            assert!(!id.contains("secret-token"));
            assert_eq!(id.len(), "email-claim:".len() + 64);
            assert_ne!(id, email_claim_id("secret-tokem"));
        }

        #[test]
        fn only_whatsapp_and_mail_prove_who_wrote() {
            assert!(channel_proves_identity(crate::Channel::Whatsapp));
            assert!(channel_proves_identity(crate::Channel::Email));
            assert!(!channel_proves_identity(crate::Channel::Webform));
        }
    }
}
