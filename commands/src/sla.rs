//! The SLA monitor: tickets past their first-response or resolution
//! deadline get an `SlaBreached` event, exactly once per kind (the ticket
//! refuses a second). The read model keeps each kind's deadline only while
//! its breach is still to be recorded, so a pass never re-reads tickets it
//! already dealt with.

use std::time::Duration;

use casebook_domain::sla::SlaKind;
use casebook_domain::{Actor, EventMetadata, Ticket, TicketCommand, TicketError};
use chrono::Utc;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::store::{CommandError, EventStore};

/// Most tickets one pass looks at; the rest wait for the next pass.
pub const BATCH: i64 = 500;

/// Looks for breaches once; returns how many it recorded.
pub async fn check_once(store: &EventStore, pool: &PgPool) -> Result<usize, sqlx::Error> {
    // Candidates from the read model: only tickets with a deadline passed
    // whose breach is still to be recorded (a partial index of just those),
    // so tickets whose breaches are all recorded never crowd out a new one.
    // The ticket itself decides.
    let rows: Vec<(Uuid, bool, bool)> = sqlx::query_as(
        "SELECT ticket_id,
                COALESCE(first_response_breach_due < now(), false),
                COALESCE(resolution_breach_due < now(), false)
           FROM crm_tickets
          WHERE sla_breach_due_at IS NOT NULL AND sla_breach_due_at < now()
          ORDER BY sla_breach_due_at
          LIMIT $1",
    )
    .bind(BATCH)
    .fetch_all(pool)
    .await?;
    let due = rows.into_iter().flat_map(|(id, first, resolution)| {
        [
            (first, SlaKind::FirstResponse),
            (resolution, SlaKind::Resolution),
        ]
        .into_iter()
        .filter(|(is_due, _)| *is_due)
        .map(move |(_, kind)| (id, kind))
    });
    let meta = EventMetadata::new(Uuid::now_v7().to_string(), Actor::system("sla-monitor"));
    let mut recorded = 0;
    for (ticket_id, kind) in due {
        match store
            .execute::<Ticket>(
                &ticket_id.to_string(),
                TicketCommand::RecordSlaBreach {
                    kind,
                    at: Utc::now(),
                },
                &meta,
            )
            .await
        {
            Ok(events) if !events.is_empty() => {
                recorded += 1;
                tracing::warn!(%ticket_id, kind = kind.as_str(), "SLA breached");
            }
            Ok(_)
            | Err(CommandError::Rejected(
                TicketError::SlaAlreadyBreached(_)
                | TicketError::SlaNotBreached(_)
                | TicketError::Closed,
            )) => {}
            Err(e) => tracing::warn!(%ticket_id, error = %e, "could not record an SLA breach"),
        }
    }
    Ok(recorded)
}

/// Checks every `every` until `shutdown`.
pub async fn run(store: EventStore, pool: PgPool, every: Duration, shutdown: CancellationToken) {
    loop {
        if let Err(e) = check_once(&store, &pool).await {
            tracing::warn!(error = %e, "SLA check failed");
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
