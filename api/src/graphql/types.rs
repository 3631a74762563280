//! The schema's enums and small shared types, and their mapping to the
//! read models' text columns.

use async_graphql::{Enum, SimpleObject};
use casebook_domain::masking::{mask_email, mask_phone};

/// The schema's mirror of a domain enum, read from and written to the read
/// models' text columns through the domain's own names.
macro_rules! mirrored {
    ($(#[$doc:meta])* $name:ident = $domain:path { $($variant:ident),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
        pub enum $name {
            $($variant),+
        }

        impl $name {
            pub fn as_db(self) -> &'static str {
                match self {
                    $($name::$variant => <$domain>::$variant.as_str()),+
                }
            }

            pub fn from_db(s: &str) -> Option<Self> {
                match s.parse::<$domain>().ok()? {
                    $(<$domain>::$variant => Some($name::$variant)),+
                }
            }
        }
    };
}

mirrored!(
    /// A ticket's status.
    TicketStatus = casebook_domain::TicketStatus {
        Received, InProgress, AwaitingApproval, Responded, Escalated, Resolved, Closed,
    }
);
mirrored!(
    /// A channel customers write in on.
    Channel = casebook_domain::Channel { Email, Whatsapp, Webform }
);
mirrored!(
    Priority = casebook_domain::Priority {
        Low,
        Medium,
        High,
        Urgent
    }
);
mirrored!(
    Category = casebook_domain::Category {
        General,
        Technical,
        Billing,
        Account,
        Feedback
    }
);

#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum EscalationStatus {
    Open,
    Resolved,
}

impl EscalationStatus {
    pub fn as_db(self) -> &'static str {
        match self {
            EscalationStatus::Open => "open",
            EscalationStatus::Resolved => "resolved",
        }
    }
}

#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum ApprovalStatus {
    Pending,
    Approved,
    Rejected,
}

impl ApprovalStatus {
    pub fn as_db(self) -> &'static str {
        match self {
            ApprovalStatus::Pending => "pending",
            ApprovalStatus::Approved => "approved",
            ApprovalStatus::Rejected => "rejected",
        }
    }

    pub fn from_db(s: &str) -> Option<Self> {
        [
            ApprovalStatus::Pending,
            ApprovalStatus::Approved,
            ApprovalStatus::Rejected,
        ]
        .into_iter()
        .find(|v| v.as_db() == s)
    }
}

/// How a customer is identified.
#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum IdentifierKind {
    Email,
    Phone,
}

impl IdentifierKind {
    /// The stored kinds this one covers (a WhatsApp number is a phone).
    pub fn db_kinds(self) -> &'static [&'static str] {
        match self {
            IdentifierKind::Email => &["email"],
            IdentifierKind::Phone => &["phone", "whatsapp"],
        }
    }
}

/// Message direction, seen from the desk.
#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

/// Relay-style page information.
#[derive(SimpleObject, Clone, Debug, Default)]
pub struct PageInfo {
    pub has_next_page: bool,
    pub has_previous_page: bool,
    pub start_cursor: Option<String>,
    pub end_cursor: Option<String>,
}

/// An identifier as the viewer may see it.
pub fn shown_identifier(kind: &str, value: &str, masked: bool) -> String {
    if !masked {
        return value.to_string();
    }
    match kind {
        "email" => mask_email(value),
        _ => mask_phone(value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stored_status_has_an_enum_value() {
        for s in [
            "received",
            "in_progress",
            "awaiting_approval",
            "responded",
            "escalated",
            "resolved",
            "closed",
        ] {
            assert_eq!(TicketStatus::from_db(s).unwrap().as_db(), s);
        }
    }

    #[test]
    fn analysts_get_masked_identifiers() {
        let email = shown_identifier("email", "ada.lovelace@example.com", true);
        assert!(!email.contains("lovelace"), "{email}");
        let phone = shown_identifier("whatsapp", "+447700900123", true);
        assert!(!phone.contains("7700900"), "{phone}");
        assert_eq!(shown_identifier("email", "a@b.c", false), "a@b.c");
    }
}
