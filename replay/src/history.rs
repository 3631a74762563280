//! A ticket as it stood at a moment: its events up to then and the state
//! they fold into.

use casebook_domain::{EventEnvelope, Ticket, TicketEvent};
use casebook_projections::store::{stored_event, EVENT_COLUMNS};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

#[derive(Debug, Clone, Serialize)]
pub struct TicketHistory {
    pub ticket_id: String,
    pub as_of: Option<DateTime<Utc>>,
    pub events: Vec<EventEnvelope>,
    pub state: Ticket,
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("no ticket {0}")]
    NotFound(String),
    #[error("event {position} of the ticket could not be read: {reason}")]
    Unreadable { position: i64, reason: String },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// The ticket's events stored up to `as_of` (all of them without it), and
/// its state folded from exactly those.
pub async fn ticket_as_of(
    pool: &PgPool,
    ticket_id: &str,
    as_of: Option<DateTime<Utc>>,
) -> Result<TicketHistory, HistoryError> {
    let rows = sqlx::query(&format!(
        "SELECT {EVENT_COLUMNS} FROM events
          WHERE aggregate_type = 'ticket' AND aggregate_id = $1 AND ($2::timestamptz IS NULL OR occurred_at <= $2)
          ORDER BY sequence"
    ))
    .bind(ticket_id)
    .bind(as_of)
    .fetch_all(pool)
    .await?;
    if rows.is_empty() {
        return Err(HistoryError::NotFound(ticket_id.to_string()));
    }
    let mut state = Ticket::default();
    let mut events = Vec::with_capacity(rows.len());
    for row in &rows {
        let envelope: EventEnvelope = stored_event(row)?.into();
        let event: TicketEvent = envelope.decode().map_err(|e| HistoryError::Unreadable {
            position: envelope.position,
            reason: e.to_string(),
        })?;
        state.apply_event(event);
        events.push(envelope);
    }
    Ok(TicketHistory {
        ticket_id: ticket_id.to_string(),
        as_of,
        events,
        state,
    })
}
