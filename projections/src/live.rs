//! Live updates: what a projector has just committed, announced with
//! Postgres `NOTIFY` inside the batch's own transaction (so a listener hears
//! of an event only once the read model has it, and never of a batch that
//! rolled back). A notification carries positions only; listeners read the
//! events themselves from the store, once per process however many
//! subscribers they serve.

use casebook_domain::EventEnvelope;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool};

use crate::store::{stored_event, EVENT_COLUMNS};

/// The notification channel.
pub const CHANNEL: &str = "casebook_projected";

/// Positions per notification (a payload must stay under 8,000 bytes; a
/// position is at most 20 characters and a comma).
const POSITIONS_PER_NOTIFICATION: usize = 300;

/// Announces `applied` (in position order) on [`CHANNEL`] as
/// comma-separated positions.
pub async fn announce(tx: &mut PgConnection, applied: &[EventEnvelope]) -> Result<(), sqlx::Error> {
    let mut positions: Vec<i64> = applied.iter().map(|e| e.position).collect();
    positions.sort_unstable();
    positions.dedup();
    for chunk in positions.chunks(POSITIONS_PER_NOTIFICATION) {
        let payload = chunk
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(payload)
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

/// The positions a notification names; anything malformed is dropped.
pub fn parse_positions(payload: &str) -> Vec<i64> {
    payload
        .split(',')
        .take(POSITIONS_PER_NOTIFICATION)
        .filter_map(|p| p.trim().parse().ok())
        .filter(|p| *p > 0)
        .collect()
}

/// The stored events at these positions, in position order.
pub async fn events_at(
    pool: &PgPool,
    positions: &[i64],
) -> Result<Vec<EventEnvelope>, sqlx::Error> {
    if positions.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<PgRow> = sqlx::query(&format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE position = ANY($1) ORDER BY position"
    ))
    .bind(positions)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| stored_event(r).map(EventEnvelope::from))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_survive_the_round_trip_and_junk_is_dropped() {
        assert_eq!(parse_positions("1,22,333"), vec![1, 22, 333]);
        assert_eq!(parse_positions("5,x,,-3,7"), vec![5, 7]);
        assert!(parse_positions("").is_empty());
    }
}
