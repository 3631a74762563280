//! A ticket as it stood at a moment: its events up to then (a time, a
//! global position, or both), the state they fold into, and whether their
//! hash chain holds. `casebook replay ticket --as-of` and the GraphQL
//! `auditTrail` both answer from [`ticket_at`], so they cannot disagree.

use std::collections::BTreeMap;

use casebook_domain::audit::{ChainInput, StreamVerifier};
use casebook_domain::masking::mask_pii;
use casebook_domain::ticket::{transcript, Handler, TranscriptEntry};
use casebook_domain::{
    Category, Channel, EventEnvelope, Priority, Ticket, TicketEvent, TicketStatus,
};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use casebook_projections::store::{stored_event, EVENT_COLUMNS};

/// The most events one answer holds: a longer stream is refused rather
/// than read into memory whole.
pub const MAX_TRAIL_EVENTS: usize = 20_000;

/// Which moment: everything (`Latest`), up to a time, up to a global
/// position, or up to whichever of the two comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct AsOf {
    pub time: Option<DateTime<Utc>>,
    pub position: Option<i64>,
}

impl AsOf {
    pub fn time(t: DateTime<Utc>) -> Self {
        Self {
            time: Some(t),
            position: None,
        }
    }

    pub fn position(p: i64) -> Self {
        Self {
            time: None,
            position: Some(p),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TicketHistory {
    pub ticket_id: String,
    pub as_of: Option<DateTime<Utc>>,
    pub as_of_position: Option<i64>,
    pub events: Vec<EventEnvelope>,
    pub state: TicketView,
    /// Every shown event's stored hash is the one recomputed from its
    /// content and its predecessor's, and the sequences run 1, 2, 3…
    pub chain_valid: bool,
}

/// The ticket as staff saw it then.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TicketView {
    pub status: TicketStatus,
    pub channel: Option<Channel>,
    pub subject: Option<String>,
    pub category: Category,
    pub priority: Priority,
    pub customer_id: Option<Uuid>,
    /// The staff member holding it, if any.
    pub assignee: Option<String>,
    /// Who answered the customer then: the AI or a person.
    pub handler: Handler,
    pub opened_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    pub first_response_at: Option<DateTime<Utc>>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub closed_at: Option<DateTime<Utc>>,
    pub sla_breaches: Vec<String>,
    pub feedback_helpful: Option<bool>,
    pub messages_count: u32,
    /// The conversation: customer messages and replies sent, in order.
    pub messages: Vec<TranscriptEntry>,
    pub drafts: Vec<DraftView>,
    pub approvals: Vec<ApprovalView>,
    pub escalations: Vec<EscalationView>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DraftView {
    pub draft_id: Uuid,
    pub body: String,
    pub confidence: f64,
    pub in_reply_to: Option<Uuid>,
    pub approval_id: Option<Uuid>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApprovalView {
    pub approval_id: Uuid,
    pub draft_id: Uuid,
    /// `pending`, `approved` or `rejected`.
    pub status: &'static str,
    /// What would be (or was) sent: the draft, or the approver's edit.
    pub body: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EscalationView {
    pub escalation_id: Uuid,
    pub reason: &'static str,
    pub note: Option<String>,
    pub open: bool,
    pub escalated_at: Option<DateTime<Utc>>,
}

impl TicketView {
    fn of(t: &Ticket, events: &[TicketEvent]) -> Self {
        use casebook_domain::ticket::ApprovalState;
        let mut notes: BTreeMap<Uuid, (Option<String>, DateTime<Utc>)> = BTreeMap::new();
        for e in events {
            if let TicketEvent::TicketEscalated {
                escalation_id,
                note,
                escalated_at,
                ..
            } = e
            {
                notes.insert(*escalation_id, (note.clone(), *escalated_at));
            }
        }
        Self {
            status: t.status,
            channel: t.channel,
            subject: t.subject.clone(),
            category: t.category,
            priority: t.priority,
            customer_id: t.customer_id,
            assignee: t.assigned_to.clone(),
            handler: t.handler,
            opened_at: t.opened_at,
            updated_at: t.updated_at,
            first_response_at: t.first_response_at,
            resolved_at: t.resolved_at,
            closed_at: t.closed_at,
            sla_breaches: t.sla_breaches.iter().cloned().collect(),
            feedback_helpful: t.feedback,
            messages_count: t.messages_count,
            messages: transcript(events),
            drafts: t
                .drafts
                .iter()
                .map(|(id, d)| DraftView {
                    draft_id: *id,
                    body: d.body.clone(),
                    confidence: d.confidence,
                    in_reply_to: d.in_reply_to,
                    approval_id: d.approval,
                })
                .collect(),
            approvals: t
                .approvals
                .iter()
                .map(|(id, a)| ApprovalView {
                    approval_id: *id,
                    draft_id: a.draft_id,
                    status: match a.state {
                        ApprovalState::Pending => "pending",
                        ApprovalState::Approved => "approved",
                        ApprovalState::Rejected => "rejected",
                    },
                    body: a.body.clone(),
                })
                .collect(),
            escalations: t
                .escalations
                .iter()
                .map(|(id, e)| {
                    let (note, at) = notes
                        .get(id)
                        .map(|(n, at)| (n.clone(), Some(*at)))
                        .unwrap_or((None, None));
                    EscalationView {
                        escalation_id: *id,
                        reason: e.reason.as_str(),
                        note,
                        open: e.open,
                        escalated_at: at,
                    }
                })
                .collect(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("no ticket {0}")]
    NotFound(String),
    #[error("event {position} of the ticket could not be read: {reason}")]
    Unreadable { position: i64, reason: String },
    #[error("the ticket has more than {MAX_TRAIL_EVENTS} events up to that moment; ask for an earlier one")]
    TooLong,
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
    ticket_at(
        pool,
        ticket_id,
        AsOf {
            time: as_of,
            position: None,
        },
    )
    .await
}

/// The ticket's events up to the moment (`occurred_at <= time` and
/// `position <= position`, each when given), their state, and whether
/// their chain holds. A ticket with no event by then is [`HistoryError::NotFound`].
pub async fn ticket_at(
    pool: &PgPool,
    ticket_id: &str,
    as_of: AsOf,
) -> Result<TicketHistory, HistoryError> {
    let rows = sqlx::query(&format!(
        "SELECT {EVENT_COLUMNS}, payload::text AS payload_text, metadata::text AS metadata_text,
                (extract(epoch FROM occurred_at) * 1000000)::bigint AS micros
           FROM events
          WHERE aggregate_type = 'ticket' AND aggregate_id = $1
            AND ($2::timestamptz IS NULL OR occurred_at <= $2)
            AND ($3::bigint IS NULL OR position <= $3)
          ORDER BY sequence
          LIMIT $4"
    ))
    .bind(ticket_id)
    .bind(as_of.time)
    .bind(as_of.position)
    .bind(MAX_TRAIL_EVENTS as i64 + 1)
    .fetch_all(pool)
    .await?;
    if rows.is_empty() {
        return Err(HistoryError::NotFound(ticket_id.to_string()));
    }
    if rows.len() > MAX_TRAIL_EVENTS {
        return Err(HistoryError::TooLong);
    }
    let mut state = Ticket::default();
    let mut events = Vec::with_capacity(rows.len());
    let mut decoded = Vec::with_capacity(rows.len());
    let mut verifier = StreamVerifier::default();
    let mut chain_valid = true;
    for row in &rows {
        let envelope: EventEnvelope = stored_event(row)?.into();
        if chain_valid {
            let event_id = envelope.event_id.to_string();
            let payload: String = row.try_get("payload_text")?;
            let metadata: String = row.try_get("metadata_text")?;
            let input = ChainInput {
                event_id: &event_id,
                aggregate_type: &envelope.aggregate_type,
                aggregate_id: &envelope.aggregate_id,
                sequence: envelope.sequence,
                event_type: &envelope.event_type,
                event_version: &envelope.event_version,
                occurred_at_micros: row.try_get("micros")?,
                payload: &payload,
                metadata: &metadata,
            };
            chain_valid = verifier.check(&input, &envelope.hash).is_ok();
        }
        // Through the upcasters, as every reader of the store.
        let event: TicketEvent = envelope.decode().map_err(|e| HistoryError::Unreadable {
            position: envelope.position,
            reason: e.to_string(),
        })?;
        state.apply_event(event.clone());
        decoded.push(event);
        events.push(envelope);
    }
    Ok(TicketHistory {
        ticket_id: ticket_id.to_string(),
        as_of: as_of.time,
        as_of_position: as_of.position,
        events,
        state: TicketView::of(&state, &decoded),
        chain_valid,
    })
}

/// Masks every email address and phone number in a JSON value's strings,
/// wherever they are (payloads are hostile input: a number may sit in any
/// field). Strings that are a UUID or an RFC 3339 time are ids and moments,
/// not personal data, and stay as they are.
pub fn mask_identifiers(value: &mut Value) {
    match value {
        Value::String(s) => {
            if Uuid::parse_str(s).is_err() && DateTime::parse_from_rfc3339(s).is_err() {
                let masked = mask_pii(s);
                if masked != *s {
                    *s = masked;
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(mask_identifiers),
        Value::Object(fields) => fields.values_mut().for_each(mask_identifiers),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn identifiers_are_masked_everywhere_but_ids_and_times_stay() {
        let id = "0193f0a0-0000-7000-8000-000000000001";
        let mut v = json!({
            "body": "write to ada@example.com or call +44 7700 900123",
            "nested": [{"note": "ada@example.com"}],
            "ticket_id": id,
            "at": "2026-11-24T10:00:00.123Z",
            "count": 12345678,
        });
        mask_identifiers(&mut v);
        let text = v.to_string();
        assert!(!text.contains("ada@example.com"), "{text}");
        assert!(!text.contains("900123"), "{text}");
        assert_eq!(v["ticket_id"], id);
        assert_eq!(v["at"], "2026-11-24T10:00:00.123Z");
        assert_eq!(v["count"], 12345678);
        assert_eq!(v["nested"][0]["note"], "a***@example.com");
    }
}
