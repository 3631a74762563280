use std::collections::HashMap;

use async_trait::async_trait;
use casebook_domain::sla::SlaKind;
use casebook_domain::ticket::ApprovalState;
use casebook_domain::{EventEnvelope, Ticket};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::metrics::ESCALATIONS;
use crate::projector::{ticket_events, ProjectionError, Projector};

/// `crm_tickets`: one row per ticket with its current status, SLA and
/// counters. The row keeps the domain's ticket state and folds each event
/// with the domain's own `apply`, so the status rules exist once.
pub struct TicketsProjector;

#[async_trait]
impl Projector for TicketsProjector {
    fn name(&self) -> &'static str {
        "crm-tickets"
    }

    fn aggregate_types(&self) -> &'static [&'static str] {
        &["ticket"]
    }

    fn tables(&self) -> &'static [&'static str] {
        &["crm_tickets"]
    }

    /// Live updates (staff subscriptions) follow the tickets read model.
    fn announces(&self) -> bool {
        true
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        events: &[EventEnvelope],
    ) -> Result<(), ProjectionError> {
        let mut ids: Vec<Uuid> = events
            .iter()
            .filter_map(|e| e.aggregate_id.parse().ok())
            .collect();
        ids.sort();
        ids.dedup();
        let rows: Vec<(Uuid, serde_json::Value)> = sqlx::query_as(
            "SELECT ticket_id, state FROM crm_tickets WHERE ticket_id = ANY($1) FOR UPDATE",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        let mut states: HashMap<Uuid, Ticket> = HashMap::with_capacity(ids.len());
        for (id, state) in rows {
            match serde_json::from_value(state) {
                Ok(ticket) => {
                    states.insert(id, ticket);
                }
                Err(e) => {
                    tracing::error!(ticket_id = %id, error = %e, "stored ticket state unreadable; refolding from this batch")
                }
            }
        }
        let mut changed: Vec<Uuid> = Vec::new();
        for (id, event, _) in ticket_events(self.name(), events) {
            states.entry(id).or_default().apply_event(event);
            if !changed.contains(&id) {
                changed.push(id);
            }
        }
        for id in changed {
            let t = &states[&id];
            let (Some(customer_id), Some(channel), Some(opened_at), Some(deadlines)) =
                (t.customer_id, t.channel, t.opened_at, t.deadlines)
            else {
                // Events of a ticket whose opening this projector never saw.
                continue;
            };
            let pending_approvals = t
                .approvals
                .values()
                .filter(|a| a.state == ApprovalState::Pending)
                .count() as i32;
            let state = serde_json::to_value(t).expect("ticket state serialises");
            sqlx::query(
                "INSERT INTO crm_tickets (ticket_id, customer_id, channel, subject, category, priority, status, assigned_to,
                                          created_at, updated_at, first_response_at, first_response_due, resolution_due,
                                          sla_due_at, sla_breached, messages_count, open_escalations, pending_approvals,
                                          feedback_helpful, state, first_response_breach_due, resolution_breach_due)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20,
                         $21, $22)
                 ON CONFLICT (ticket_id) DO UPDATE SET
                    status = EXCLUDED.status, subject = EXCLUDED.subject, category = EXCLUDED.category,
                    priority = EXCLUDED.priority, assigned_to = EXCLUDED.assigned_to, updated_at = EXCLUDED.updated_at,
                    first_response_at = EXCLUDED.first_response_at, sla_due_at = EXCLUDED.sla_due_at,
                    sla_breached = EXCLUDED.sla_breached, messages_count = EXCLUDED.messages_count,
                    open_escalations = EXCLUDED.open_escalations, pending_approvals = EXCLUDED.pending_approvals,
                    feedback_helpful = EXCLUDED.feedback_helpful, state = EXCLUDED.state,
                    first_response_breach_due = EXCLUDED.first_response_breach_due,
                    resolution_breach_due = EXCLUDED.resolution_breach_due",
            )
            .bind(id)
            .bind(customer_id)
            .bind(channel.as_str())
            .bind(&t.subject)
            .bind(t.category.as_str())
            .bind(t.priority.as_str())
            .bind(t.status.as_str())
            .bind(&t.assigned_to)
            .bind(opened_at)
            .bind(t.updated_at.unwrap_or(opened_at))
            .bind(t.first_response_at)
            .bind(deadlines.first_response_due)
            .bind(deadlines.resolution_due)
            .bind(deadlines.next_due(t.first_response_at))
            .bind(!t.sla_breaches.is_empty())
            .bind(t.messages_count as i32)
            .bind(t.open_escalations().count() as i32)
            .bind(pending_approvals)
            .bind(t.feedback)
            .bind(state)
            // What the SLA monitor looks for: deadlines whose breach is
            // still to be recorded (see migration 20261125000020).
            .bind(t.unrecorded_sla_due(SlaKind::FirstResponse))
            .bind(t.unrecorded_sla_due(SlaKind::Resolution))
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }

    fn after_commit(&self, applied: &[EventEnvelope]) {
        for e in applied.iter().filter(|e| e.event_type == "TicketEscalated") {
            let reason = e
                .payload
                .get("reason")
                .and_then(|r| r.as_str())
                .unwrap_or("unknown");
            ESCALATIONS.with_label_values(&[reason]).inc();
        }
    }
}
