use async_trait::async_trait;
use casebook_domain::{Channel, EventEnvelope, TicketEvent};
use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::projector::{ticket_events, ProjectionError, Projector};

/// `crm_conversations`: per ticket, the channels the conversation crossed
/// and how many messages went each way.
pub struct ConversationsProjector;

async fn touch(
    tx: &mut PgConnection,
    ticket_id: Uuid,
    channel: Channel,
    at: DateTime<Utc>,
    inbound: i32,
    outbound: i32,
) -> Result<(), ProjectionError> {
    sqlx::query(
        "UPDATE crm_conversations
            SET channels = CASE WHEN $2 = ANY(channels) THEN channels ELSE channels || $2 END,
                last_message_at = GREATEST(last_message_at, $3),
                inbound_count = inbound_count + $4,
                outbound_count = outbound_count + $5
          WHERE ticket_id = $1",
    )
    .bind(ticket_id)
    .bind(channel.as_str())
    .bind(at)
    .bind(inbound)
    .bind(outbound)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

#[async_trait]
impl Projector for ConversationsProjector {
    fn name(&self) -> &'static str {
        "crm-conversations"
    }

    fn aggregate_types(&self) -> &'static [&'static str] {
        &["ticket"]
    }

    fn tables(&self) -> &'static [&'static str] {
        &["crm_conversations"]
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        events: &[EventEnvelope],
    ) -> Result<(), ProjectionError> {
        for (ticket_id, event, _) in ticket_events(self.name(), events) {
            match event {
                TicketEvent::TicketOpened {
                    customer_id,
                    channel,
                    opened_at,
                    ..
                } => {
                    sqlx::query(
                        "INSERT INTO crm_conversations (ticket_id, customer_id, channels, started_at, last_message_at)
                         VALUES ($1, $2, ARRAY[$3], $4, $4) ON CONFLICT (ticket_id) DO NOTHING",
                    )
                    .bind(ticket_id)
                    .bind(customer_id)
                    .bind(channel.as_str())
                    .bind(opened_at)
                    .execute(&mut *tx)
                    .await?;
                }
                TicketEvent::CustomerMessageReceived {
                    channel,
                    received_at,
                    ..
                } => touch(tx, ticket_id, channel, received_at, 1, 0).await?,
                TicketEvent::ResponseSent {
                    channel, sent_at, ..
                } => touch(tx, ticket_id, channel, sent_at, 0, 1).await?,
                _ => {}
            }
        }
        Ok(())
    }
}
