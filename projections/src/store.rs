//! Reading the event store directly, for rebuilds and audits.

use casebook_domain::StoredEvent;
use sqlx::postgres::PgRow;
use sqlx::Row;
use uuid::Uuid;

/// The columns [`stored_event`] reads, for `SELECT {EVENT_COLUMNS} FROM events`.
pub const EVENT_COLUMNS: &str =
    "position, event_id, aggregate_type, aggregate_id, sequence, event_type, \
     event_version, occurred_at, payload, metadata, hash";

pub fn stored_event(row: &PgRow) -> Result<StoredEvent, sqlx::Error> {
    Ok(StoredEvent {
        event_id: row.try_get::<Uuid, _>("event_id")?,
        position: row.try_get("position")?,
        aggregate_type: row.try_get("aggregate_type")?,
        aggregate_id: row.try_get("aggregate_id")?,
        sequence: row.try_get("sequence")?,
        event_type: row.try_get("event_type")?,
        event_version: row.try_get("event_version")?,
        occurred_at: row.try_get("occurred_at")?,
        payload: row.try_get("payload")?,
        metadata: row.try_get("metadata")?,
        hash: row.try_get("hash")?,
    })
}
