use std::collections::HashMap;

use async_trait::async_trait;
use casebook_domain::{EventEnvelope, TicketEvent};
use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::projector::{ticket_events, ProjectionError, Projector};

/// `crm_messages`: every message in and out, with its channel, the
/// channel's own message id and, for replies, the delivery status.
pub struct MessagesProjector;

/// Message rows of one batch, as columns.
#[derive(Default)]
struct Rows {
    message_id: Vec<Uuid>,
    ticket_id: Vec<Uuid>,
    customer_id: Vec<Option<Uuid>>,
    channel: Vec<&'static str>,
    channel_message_id: Vec<Option<String>>,
    body: Vec<String>,
    at: Vec<DateTime<Utc>>,
    position: Vec<i64>,
}

impl Rows {
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        message_id: Uuid,
        ticket_id: Uuid,
        customer_id: Option<Uuid>,
        channel: &'static str,
        channel_message_id: Option<String>,
        body: String,
        at: DateTime<Utc>,
        position: i64,
    ) {
        self.message_id.push(message_id);
        self.ticket_id.push(ticket_id);
        self.customer_id.push(customer_id);
        self.channel.push(channel);
        self.channel_message_id.push(channel_message_id);
        self.body.push(body);
        self.at.push(at);
        self.position.push(position);
    }
}

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

    /// Messages are written by id; a ticket's first inbound message is found
    /// by ticket (`crm_messages_ticket_idx` stays).
    fn reader_indexes(&self) -> &'static [&'static str] {
        &["crm_messages_channel_id_idx"]
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        events: &[EventEnvelope],
    ) -> Result<(), ProjectionError> {
        // Three statements for the whole batch, in this order: inbound
        // messages, outbound ones (whose customer is the ticket's, read from
        // its inbound rows, which the first statement may just have
        // written), and delivery statuses (of rows either may have written).
        let mut inbound = Rows::default();
        let mut outbound = Rows::default();
        let mut statuses: Vec<Uuid> = Vec::new();
        let mut status_of: HashMap<Uuid, (&'static str, Option<String>)> = HashMap::new();
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
                } => inbound.push(
                    message_id,
                    ticket_id,
                    Some(customer_id),
                    channel.as_str(),
                    Some(channel_message_id),
                    body,
                    received_at,
                    e.position,
                ),
                TicketEvent::ResponseSent {
                    response_id,
                    channel,
                    body,
                    sent_at,
                    ..
                } => outbound.push(
                    response_id,
                    ticket_id,
                    None,
                    channel.as_str(),
                    None,
                    body,
                    sent_at,
                    e.position,
                ),
                TicketEvent::DeliveryStatusChanged {
                    response_id,
                    status,
                    provider_message_id,
                    ..
                } => {
                    // The last status wins; a provider id, once known, stays.
                    let (last, provider) = status_of.entry(response_id).or_insert_with(|| {
                        statuses.push(response_id);
                        (status.as_str(), None)
                    });
                    *last = status.as_str();
                    if provider_message_id.is_some() {
                        *provider = provider_message_id;
                    }
                }
                _ => {}
            }
        }
        if !inbound.message_id.is_empty() {
            sqlx::query(
                "INSERT INTO crm_messages (message_id, ticket_id, customer_id, direction, channel,
                                           channel_message_id, body, at, position)
                 SELECT message_id, ticket_id, customer_id, 'inbound', channel, channel_message_id, body, at, position
                   FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[],
                               $7::timestamptz[], $8::int8[])
                        AS t(message_id, ticket_id, customer_id, channel, channel_message_id, body, at, position)
                 ON CONFLICT (message_id) DO NOTHING",
            )
            .bind(&inbound.message_id)
            .bind(&inbound.ticket_id)
            .bind(&inbound.customer_id)
            .bind(&inbound.channel)
            .bind(&inbound.channel_message_id)
            .bind(&inbound.body)
            .bind(&inbound.at)
            .bind(&inbound.position)
            .execute(&mut *tx)
            .await?;
        }
        if !outbound.message_id.is_empty() {
            sqlx::query(
                "INSERT INTO crm_messages (message_id, ticket_id, customer_id, direction, channel, body, at, position)
                 SELECT message_id, ticket_id,
                        (SELECT m.customer_id FROM crm_messages m
                          WHERE m.ticket_id = t.ticket_id AND m.direction = 'inbound' LIMIT 1),
                        'outbound', channel, body, at, position
                   FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::timestamptz[], $6::int8[])
                        AS t(message_id, ticket_id, channel, body, at, position)
                 ON CONFLICT (message_id) DO NOTHING",
            )
            .bind(&outbound.message_id)
            .bind(&outbound.ticket_id)
            .bind(&outbound.channel)
            .bind(&outbound.body)
            .bind(&outbound.at)
            .bind(&outbound.position)
            .execute(&mut *tx)
            .await?;
        }
        if !statuses.is_empty() {
            let (status, provider): (Vec<&str>, Vec<Option<String>>) =
                statuses.iter().map(|id| status_of[id].clone()).unzip();
            sqlx::query(
                "UPDATE crm_messages m SET delivery_status = t.status,
                        channel_message_id = coalesce(t.provider_message_id, m.channel_message_id)
                   FROM unnest($1::uuid[], $2::text[], $3::text[]) AS t(message_id, status, provider_message_id)
                  WHERE m.message_id = t.message_id",
            )
            .bind(&statuses)
            .bind(&status)
            .bind(&provider)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }
}
