//! Service-level rules: when the first response and the resolution are due.

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use crate::Channel;

/// First-response windows per channel: email 5 minutes, WhatsApp 2 minutes,
/// web form 5 minutes.
pub fn first_response_window(channel: Channel) -> TimeDelta {
    match channel {
        Channel::Email => TimeDelta::minutes(5),
        Channel::Whatsapp => TimeDelta::minutes(2),
        Channel::Webform => TimeDelta::minutes(5),
    }
}

/// Every ticket should be resolved within 24 hours of being opened.
pub fn resolution_window() -> TimeDelta {
    TimeDelta::hours(24)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlaKind {
    FirstResponse,
    Resolution,
}

impl SlaKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SlaKind::FirstResponse => "first_response",
            SlaKind::Resolution => "resolution",
        }
    }
}

/// The deadlines of a ticket opened at `opened_at` on `channel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlaDeadlines {
    pub first_response_due: DateTime<Utc>,
    pub resolution_due: DateTime<Utc>,
}

impl SlaDeadlines {
    pub fn for_ticket(channel: Channel, opened_at: DateTime<Utc>) -> Self {
        Self {
            first_response_due: opened_at + first_response_window(channel),
            resolution_due: opened_at + resolution_window(),
        }
    }

    /// The deadline that matters next: the first response until one was
    /// sent, then the resolution.
    pub fn next_due(&self, first_response_at: Option<DateTime<Utc>>) -> DateTime<Utc> {
        match first_response_at {
            None => self.first_response_due,
            Some(_) => self.resolution_due,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_follow_the_channel() {
        let t = DateTime::parse_from_rfc3339("2026-11-24T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let d = SlaDeadlines::for_ticket(Channel::Whatsapp, t);
        assert_eq!(d.first_response_due, t + TimeDelta::minutes(2));
        assert_eq!(d.resolution_due, t + TimeDelta::hours(24));
        assert_eq!(
            SlaDeadlines::for_ticket(Channel::Email, t).first_response_due,
            t + TimeDelta::minutes(5)
        );
        assert_eq!(d.next_due(None), d.first_response_due);
        assert_eq!(d.next_due(Some(t)), d.resolution_due);
    }
}
