//! Recording who looked at a ticket's audit trail: one `AuditTrailViewed`
//! event on the ticket's `audit_trail` stream per query, appended before
//! the answer is given (no record, no answer).

use casebook_domain::trail::{TrailCommand, TrailError, TrailViews};
use casebook_domain::{Actor, ActorKind, EventMetadata};
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::store::{CommandError, EventStore};

/// One look at a trail.
#[derive(Debug, Clone)]
pub struct TrailView<'a> {
    pub ticket_id: Uuid,
    pub viewer: &'a str,
    pub role: &'a str,
    pub as_of: Option<DateTime<Utc>>,
    pub as_of_position: Option<i64>,
    pub events_shown: usize,
    pub pii_unmasked: bool,
}

/// Appends the view as an event whose actor is the viewer.
pub async fn record_view(
    store: &EventStore,
    view: &TrailView<'_>,
    correlation_id: &str,
) -> Result<(), CommandError<TrailError>> {
    let meta = EventMetadata::new(correlation_id, Actor::new(ActorKind::Agent, view.viewer));
    store
        .execute::<TrailViews>(
            &view.ticket_id.to_string(),
            TrailCommand::RecordView {
                ticket_id: view.ticket_id,
                viewer: view.viewer.to_string(),
                role: view.role.to_string(),
                as_of: view.as_of,
                as_of_position: view.as_of_position,
                events_shown: u32::try_from(view.events_shown).unwrap_or(u32::MAX),
                pii_unmasked: view.pii_unmasked,
                at: Utc::now(),
            },
            &meta,
        )
        .await?;
    Ok(())
}
