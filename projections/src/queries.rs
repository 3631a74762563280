//! Reads of the CRM read models for the HTTP layer. Each takes any
//! executor: the API passes a transaction from
//! [`begin_scoped`](crate::access::begin_scoped) when it reads on a
//! caller's behalf, so row-level security checks the caller again.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgExecutor;
use uuid::Uuid;

/// What a customer may see of a ticket.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct TicketSummary {
    pub ticket_id: Uuid,
    #[serde(skip)]
    pub customer_id: Uuid,
    pub status: String,
    pub channel: String,
    pub priority: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub first_response_at: Option<DateTime<Utc>>,
    pub sla_due_at: DateTime<Utc>,
    pub messages_count: i32,
}

impl TicketSummary {
    /// The same view, folded from the domain state (used before the read
    /// model has caught up with a just-acknowledged submission).
    pub fn from_state(t: &casebook_domain::Ticket) -> Option<Self> {
        let deadlines = t.deadlines?;
        let opened_at = t.opened_at?;
        Some(Self {
            ticket_id: t.id?,
            customer_id: t.customer_id?,
            status: t.status.as_str().to_string(),
            channel: t.channel?.as_str().to_string(),
            priority: t.priority.as_str().to_string(),
            created_at: opened_at,
            updated_at: t.updated_at.unwrap_or(opened_at),
            first_response_at: t.first_response_at,
            sla_due_at: deadlines.next_due(t.first_response_at),
            messages_count: t.messages_count as i32,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct MessageView {
    pub direction: String,
    pub channel: String,
    pub body: String,
    pub at: DateTime<Utc>,
}

pub async fn ticket_summary(
    db: impl PgExecutor<'_>,
    ticket_id: Uuid,
) -> Result<Option<TicketSummary>, sqlx::Error> {
    sqlx::query_as(
        "SELECT ticket_id, customer_id, status, channel, priority, created_at, updated_at, first_response_at,
                sla_due_at, messages_count
           FROM crm_tickets WHERE ticket_id = $1",
    )
    .bind(ticket_id)
    .fetch_optional(db)
    .await
}

pub async fn ticket_messages(
    db: impl PgExecutor<'_>,
    ticket_id: Uuid,
) -> Result<Vec<MessageView>, sqlx::Error> {
    sqlx::query_as(
        "SELECT direction, channel, body, at FROM crm_messages WHERE ticket_id = $1 ORDER BY at, position",
    )
    .bind(ticket_id)
    .fetch_all(db)
    .await
}
