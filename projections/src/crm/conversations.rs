use std::collections::HashMap;

use async_trait::async_trait;
use casebook_domain::{Channel, EventEnvelope, TicketEvent};
use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::projector::{ticket_events, ProjectionError, Projector};

/// `crm_conversations`: per ticket, the channels the conversation crossed
/// and how many messages went each way.
pub struct ConversationsProjector;

/// One conversation's events of a batch, folded.
struct Folded {
    /// Opened in this batch: its customer and time.
    opened: Option<(Uuid, DateTime<Utc>)>,
    /// Channels in the order they first appear.
    channels: Vec<&'static str>,
    last_message_at: Option<DateTime<Utc>>,
    inbound: i32,
    outbound: i32,
}

impl Folded {
    fn touch(&mut self, channel: Channel, at: DateTime<Utc>, inbound: i32, outbound: i32) {
        if !self.channels.contains(&channel.as_str()) {
            self.channels.push(channel.as_str());
        }
        self.last_message_at = Some(self.last_message_at.map_or(at, |last| last.max(at)));
        self.inbound += inbound;
        self.outbound += outbound;
    }
}

/// The conversations of a batch as columns; `channels` joined by commas
/// (channel names have none), as Postgres has no array of arrays.
#[derive(Default)]
struct Columns {
    ticket_id: Vec<Uuid>,
    customer_id: Vec<Uuid>,
    channels: Vec<String>,
    started_at: Vec<DateTime<Utc>>,
    last_message_at: Vec<DateTime<Utc>>,
    inbound: Vec<i32>,
    outbound: Vec<i32>,
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

    /// Conversations are written by ticket id.
    fn reader_indexes(&self) -> &'static [&'static str] {
        &["crm_conversations_customer_idx"]
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        events: &[EventEnvelope],
    ) -> Result<(), ProjectionError> {
        let mut order: Vec<Uuid> = Vec::new();
        let mut folded: HashMap<Uuid, Folded> = HashMap::new();
        for (ticket_id, event, _) in ticket_events(self.name(), events) {
            let row = folded.entry(ticket_id).or_insert_with(|| {
                order.push(ticket_id);
                Folded {
                    opened: None,
                    channels: Vec::new(),
                    last_message_at: None,
                    inbound: 0,
                    outbound: 0,
                }
            });
            match event {
                TicketEvent::TicketOpened {
                    customer_id,
                    channel,
                    opened_at,
                    ..
                } => {
                    row.opened = Some((customer_id, opened_at));
                    row.touch(channel, opened_at, 0, 0);
                }
                TicketEvent::CustomerMessageReceived {
                    channel,
                    received_at,
                    ..
                } => row.touch(channel, received_at, 1, 0),
                TicketEvent::ResponseSent {
                    channel, sent_at, ..
                } => row.touch(channel, sent_at, 0, 1),
                _ => {}
            }
        }
        // Two statements for the whole batch: the conversations it opened,
        // and what it adds to the others.
        let (mut new, mut changed) = (Columns::default(), Columns::default());
        for id in order {
            let row = &folded[&id];
            let Some(last) = row.last_message_at else {
                continue;
            };
            let (columns, customer_id, started_at) = match row.opened {
                Some((customer_id, opened_at)) => (&mut new, customer_id, opened_at),
                None => (&mut changed, Uuid::nil(), last),
            };
            columns.ticket_id.push(id);
            columns.customer_id.push(customer_id);
            columns.channels.push(row.channels.join(","));
            columns.started_at.push(started_at);
            columns.last_message_at.push(last);
            columns.inbound.push(row.inbound);
            columns.outbound.push(row.outbound);
        }
        if !new.ticket_id.is_empty() {
            sqlx::query(
                "INSERT INTO crm_conversations (ticket_id, customer_id, channels, started_at, last_message_at,
                                                inbound_count, outbound_count)
                 SELECT ticket_id, customer_id, string_to_array(channels, ','), started_at, last_message_at,
                        inbound, outbound
                   FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::timestamptz[], $5::timestamptz[],
                               $6::int4[], $7::int4[])
                        AS t(ticket_id, customer_id, channels, started_at, last_message_at, inbound, outbound)
                 ON CONFLICT (ticket_id) DO NOTHING",
            )
            .bind(&new.ticket_id)
            .bind(&new.customer_id)
            .bind(&new.channels)
            .bind(&new.started_at)
            .bind(&new.last_message_at)
            .bind(&new.inbound)
            .bind(&new.outbound)
            .execute(&mut *tx)
            .await?;
        }
        if !changed.ticket_id.is_empty() {
            sqlx::query(
                "UPDATE crm_conversations c
                    SET channels = c.channels || ARRAY(
                            SELECT ch FROM unnest(string_to_array(t.channels, ',')) WITH ORDINALITY AS n(ch, i)
                             WHERE NOT ch = ANY(c.channels) ORDER BY i),
                        last_message_at = GREATEST(c.last_message_at, t.last_message_at),
                        inbound_count = c.inbound_count + t.inbound,
                        outbound_count = c.outbound_count + t.outbound
                   FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::int4[], $5::int4[])
                        AS t(ticket_id, channels, last_message_at, inbound, outbound)
                  WHERE c.ticket_id = t.ticket_id",
            )
            .bind(&changed.ticket_id)
            .bind(&changed.channels)
            .bind(&changed.last_message_at)
            .bind(&changed.inbound)
            .bind(&changed.outbound)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }
}
