use async_trait::async_trait;
use casebook_domain::{EventEnvelope, TicketEvent};
use sqlx::PgConnection;

use crate::projector::{ticket_events, ProjectionError, Projector};

/// `crm_messages`: every message in and out, with its channel, the
/// channel's own message id and, for replies, the delivery status.
pub struct MessagesProjector;

#[async_trait]
impl Projector for MessagesProjector {
    fn name(&self) -> &'static str {
        "crm-messages"
    }

    fn aggregate_types(&self) -> &'static [&'static str] {
        &["ticket"]
    }

    fn tables(&self) -> &'static [&'static str] {
        &["crm_messages"]
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        events: &[EventEnvelope],
    ) -> Result<(), ProjectionError> {
        for (ticket_id, event, e) in ticket_events(self.name(), events) {
            match event {
                TicketEvent::CustomerMessageReceived {
                    message_id,
                    customer_id,
                    channel,
                    channel_message_id,
                    body,
                    received_at,
                    ..
                } => {
                    sqlx::query(
                        "INSERT INTO crm_messages (message_id, ticket_id, customer_id, direction, channel,
                                                   channel_message_id, body, at, position)
                         VALUES ($1, $2, $3, 'inbound', $4, $5, $6, $7, $8) ON CONFLICT (message_id) DO NOTHING",
                    )
                    .bind(message_id)
                    .bind(ticket_id)
                    .bind(customer_id)
                    .bind(channel.as_str())
                    .bind(channel_message_id)
                    .bind(body)
                    .bind(received_at)
                    .bind(e.position)
                    .execute(&mut *tx)
                    .await?;
                }
                TicketEvent::ResponseSent {
                    response_id,
                    channel,
                    body,
                    sent_at,
                    ..
                } => {
                    sqlx::query(
                        "INSERT INTO crm_messages (message_id, ticket_id, customer_id, direction, channel, body, at, position)
                         VALUES ($1, $2, (SELECT customer_id FROM crm_messages
                                           WHERE ticket_id = $2 AND direction = 'inbound' LIMIT 1),
                                 'outbound', $3, $4, $5, $6)
                         ON CONFLICT (message_id) DO NOTHING",
                    )
                    .bind(response_id)
                    .bind(ticket_id)
                    .bind(channel.as_str())
                    .bind(body)
                    .bind(sent_at)
                    .bind(e.position)
                    .execute(&mut *tx)
                    .await?;
                }
                TicketEvent::DeliveryStatusChanged {
                    response_id,
                    status,
                    provider_message_id,
                    ..
                } => {
                    sqlx::query(
                        "UPDATE crm_messages SET delivery_status = $2,
                                channel_message_id = coalesce($3, channel_message_id)
                          WHERE message_id = $1",
                    )
                    .bind(response_id)
                    .bind(status.as_str())
                    .bind(provider_message_id)
                    .execute(&mut *tx)
                    .await?;
                }
                _ => {}
            }
        }
        Ok(())
    }
}
