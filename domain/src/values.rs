//! Small value types shared by every aggregate and read model.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The channel a message arrived on or leaves by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    Email,
    Whatsapp,
    Webform,
}

impl Channel {
    pub const ALL: [Channel; 3] = [Channel::Email, Channel::Whatsapp, Channel::Webform];

    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Whatsapp => "whatsapp",
            Channel::Webform => "webform",
        }
    }
}

/// Which way a message travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// Web form categories; other channels start as `General`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    #[default]
    General,
    Technical,
    Billing,
    Account,
    Feedback,
}

impl Category {
    pub const ALL: [Category; 5] = [
        Category::General,
        Category::Technical,
        Category::Billing,
        Category::Account,
        Category::Feedback,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Category::General => "general",
            Category::Technical => "technical",
            Category::Billing => "billing",
            Category::Account => "account",
            Category::Feedback => "feedback",
        }
    }
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default, PartialOrd, Ord,
)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    Low,
    #[default]
    Medium,
    High,
    Urgent,
}

impl Priority {
    pub const ALL: [Priority; 4] = [
        Priority::Low,
        Priority::Medium,
        Priority::High,
        Priority::Urgent,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Medium => "medium",
            Priority::High => "high",
            Priority::Urgent => "urgent",
        }
    }
}

/// Where a ticket stands, as customers and staff see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TicketStatus {
    /// Acknowledged, not yet looked at by the agent.
    #[default]
    Received,
    /// The agent (AI or human) is working on it.
    InProgress,
    /// A draft waits for a human to approve it.
    AwaitingApproval,
    /// A reply went out; waiting on the customer.
    Responded,
    /// Handed over to a human.
    Escalated,
    Resolved,
    Closed,
}

impl TicketStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TicketStatus::Received => "received",
            TicketStatus::InProgress => "in_progress",
            TicketStatus::AwaitingApproval => "awaiting_approval",
            TicketStatus::Responded => "responded",
            TicketStatus::Escalated => "escalated",
            TicketStatus::Resolved => "resolved",
            TicketStatus::Closed => "closed",
        }
    }

    /// Resolved and closed tickets no longer take new customer messages as-is.
    pub fn is_open(self) -> bool {
        !matches!(self, TicketStatus::Resolved | TicketStatus::Closed)
    }
}

macro_rules! impl_text {
    ($ty:ty, $what:literal) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $ty {
            type Err = UnknownValue;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(|_| {
                    UnknownValue {
                        what: $what,
                        value: s.chars().take(40).collect(),
                    }
                })
            }
        }
    };
}

impl_text!(Channel, "channel");
impl_text!(Direction, "direction");
impl_text!(Category, "category");
impl_text!(Priority, "priority");
impl_text!(TicketStatus, "ticket status");

/// A text that names no known value of an enumeration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what}: {value:?}")]
pub struct UnknownValue {
    pub what: &'static str,
    pub value: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips() {
        for c in Channel::ALL {
            assert_eq!(c.as_str().parse::<Channel>().unwrap(), c);
        }
        for c in Category::ALL {
            assert_eq!(c.as_str().parse::<Category>().unwrap(), c);
        }
        for p in Priority::ALL {
            assert_eq!(p.as_str().parse::<Priority>().unwrap(), p);
        }
        assert_eq!(
            "in_progress".parse::<TicketStatus>().unwrap(),
            TicketStatus::InProgress
        );
    }

    #[test]
    fn unknown_text_is_refused() {
        let err = "fax".parse::<Channel>().unwrap_err();
        assert_eq!(err.what, "channel");
        assert!("URGENT".parse::<Priority>().is_err());
    }
}
