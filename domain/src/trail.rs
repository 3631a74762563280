//! Who looked at which audit trail, and when: every `auditTrail` query is
//! itself recorded, as an event of the `audit_trail` stream of the ticket
//! looked at (aggregate id: the ticket id), so the record of the readers
//! sits in the same tamper-evident store as what they read.

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The aggregate type of the trail-views streams.
pub const AUDIT_TRAIL: &str = "audit_trail";
/// The longest viewer sub or role recorded (as `users.sub` allows).
const MAX_VIEWER_CHARS: usize = 200;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TrailCommand {
    RecordView {
        ticket_id: Uuid,
        /// The staff user's sub.
        viewer: String,
        role: String,
        as_of: Option<DateTime<Utc>>,
        as_of_position: Option<i64>,
        /// How many events the answer held.
        events_shown: u32,
        /// Whether identifiers were shown unmasked (`auditor_pii`, or a
        /// supervisor).
        pii_unmasked: bool,
        at: DateTime<Utc>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum TrailEvent {
    AuditTrailViewed {
        ticket_id: Uuid,
        viewer: String,
        role: String,
        #[serde(default)]
        as_of: Option<DateTime<Utc>>,
        #[serde(default)]
        as_of_position: Option<i64>,
        events_shown: u32,
        pii_unmasked: bool,
        viewed_at: DateTime<Utc>,
    },
}

impl DomainEvent for TrailEvent {
    fn event_type(&self) -> String {
        "AuditTrailViewed".to_string()
    }

    fn event_version(&self) -> String {
        crate::upcast::current_version(AUDIT_TRAIL, "AuditTrailViewed").to_string()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrailError {
    #[error("a trail view needs the viewer's sub and role (1 to {MAX_VIEWER_CHARS} characters)")]
    InvalidViewer,
    #[error("a trail view is recorded on the stream of the ticket viewed")]
    WrongTicket,
}

/// The views of one ticket's trail recorded so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrailViews {
    pub ticket_id: Option<Uuid>,
    pub views: u64,
    pub last_viewed_at: Option<DateTime<Utc>>,
}

fn valid_name(s: &str) -> bool {
    let n = s.chars().count();
    (1..=MAX_VIEWER_CHARS).contains(&n) && !s.chars().any(char::is_control)
}

impl TrailViews {
    pub fn decide(&self, command: TrailCommand) -> Result<Vec<TrailEvent>, TrailError> {
        match command {
            TrailCommand::RecordView {
                ticket_id,
                viewer,
                role,
                as_of,
                as_of_position,
                events_shown,
                pii_unmasked,
                at,
            } => {
                if !valid_name(&viewer) || !valid_name(&role) {
                    return Err(TrailError::InvalidViewer);
                }
                if self.ticket_id.is_some_and(|t| t != ticket_id) {
                    return Err(TrailError::WrongTicket);
                }
                Ok(vec![TrailEvent::AuditTrailViewed {
                    ticket_id,
                    viewer,
                    role,
                    as_of,
                    as_of_position,
                    events_shown,
                    pii_unmasked,
                    viewed_at: at,
                }])
            }
        }
    }

    pub fn apply_event(&mut self, event: TrailEvent) {
        match event {
            TrailEvent::AuditTrailViewed {
                ticket_id,
                viewed_at,
                ..
            } => {
                self.ticket_id = Some(ticket_id);
                self.views += 1;
                self.last_viewed_at = Some(viewed_at);
            }
        }
    }
}

crate::impl_aggregate!(
    TrailViews,
    "audit_trail",
    TrailCommand,
    TrailEvent,
    TrailError
);

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    type Given = TestFramework<TrailViews>;

    fn view(ticket: u128, viewer: &str) -> TrailCommand {
        TrailCommand::RecordView {
            ticket_id: Uuid::from_u128(ticket),
            viewer: viewer.into(),
            role: "auditor".into(),
            as_of: None,
            as_of_position: Some(7),
            events_shown: 3,
            pii_unmasked: false,
            at: DateTime::from_timestamp(1_795_000_000, 0).unwrap(),
        }
    }

    fn viewed(ticket: u128, viewer: &str) -> TrailEvent {
        TrailEvent::AuditTrailViewed {
            ticket_id: Uuid::from_u128(ticket),
            viewer: viewer.into(),
            role: "auditor".into(),
            as_of: None,
            as_of_position: Some(7),
            events_shown: 3,
            pii_unmasked: false,
            viewed_at: DateTime::from_timestamp(1_795_000_000, 0).unwrap(),
        }
    }

    #[test]
    fn a_view_is_recorded_with_who_and_what() {
        Given::with(())
            .given_no_previous_events()
            .when(view(1, "ida"))
            .then_expect_events(vec![viewed(1, "ida")]);
        Given::with(())
            .given(vec![viewed(1, "ida")])
            .when(view(1, "max"))
            .then_expect_events(vec![viewed(1, "max")]);
    }

    #[test]
    fn a_view_without_a_viewer_or_of_another_ticket_is_refused() {
        Given::with(())
            .given_no_previous_events()
            .when(view(1, ""))
            .then_expect_error(TrailError::InvalidViewer);
        Given::with(())
            .given_no_previous_events()
            .when(view(1, &"x".repeat(201)))
            .then_expect_error(TrailError::InvalidViewer);
        Given::with(())
            .given(vec![viewed(1, "ida")])
            .when(view(2, "ida"))
            .then_expect_error(TrailError::WrongTicket);
    }
}
