use std::collections::HashMap;

use async_trait::async_trait;
use casebook_domain::sla::SlaKind;
use casebook_domain::ticket::ApprovalState;
use casebook_domain::{EventEnvelope, Ticket, TicketEvent};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::metrics::ESCALATIONS;
use crate::projector::{ticket_events, ProjectionError, Projector};

/// `crm_tickets`: one row per ticket with its current status, SLA,
/// counters and hand-off (who handles it, `assignee`, `handler`,
/// `resolved_at`, `closed_at`, `previous_ticket_id`). The row keeps the
/// domain's ticket state and folds each event with the domain's own
/// `apply`, so the status rules exist once.
///
/// The same projector keeps the staff queues, in the same transaction:
/// `crm_escalations` (one row per escalation: `open` until resolved; its
/// `assigned_to` follows the ticket's assignee while open) and
/// `crm_approvals` (one row per held draft: `pending`, then `approved`
/// with the edit, if any, or `rejected` with the reason). Every row
/// carries the ticket's `customer_id`. Rows are written with upserts keyed
/// by the event's ids, so a redelivered event changes nothing.
pub struct TicketsProjector;

/// Writes the queue rows one event implies; `t` is the ticket's state
/// with the event applied.
async fn project_queues(
    tx: &mut PgConnection,
    ticket_id: Uuid,
    t: &Ticket,
    event: &TicketEvent,
) -> Result<(), ProjectionError> {
    let Some(customer_id) = t.customer_id else {
        return Ok(());
    };
    match event {
        TicketEvent::TicketEscalated {
            escalation_id,
            reason,
            note,
            escalated_at,
            ..
        } => {
            sqlx::query(
                "INSERT INTO crm_escalations (escalation_id, ticket_id, customer_id, reason, note, status, assigned_to, created_at)
                 VALUES ($1, $2, $3, $4, $5, 'open', $6, $7)
                 ON CONFLICT (escalation_id) DO NOTHING",
            )
            .bind(escalation_id)
            .bind(ticket_id)
            .bind(customer_id)
            .bind(reason.as_str())
            .bind(note)
            .bind(&t.assigned_to)
            .bind(escalated_at)
            .execute(&mut *tx)
            .await?;
        }
        TicketEvent::EscalationResolved {
            escalation_id,
            resolved_by,
            note,
            resolved_at,
        } => {
            sqlx::query(
                "UPDATE crm_escalations SET status = 'resolved', resolved_at = $2, resolved_by = $3, resolution_note = $4
                  WHERE escalation_id = $1",
            )
            .bind(escalation_id)
            .bind(resolved_at)
            .bind(resolved_by)
            .bind(note)
            .execute(&mut *tx)
            .await?;
        }
        TicketEvent::TicketAssigned { .. }
        | TicketEvent::TicketUnassigned { .. }
        | TicketEvent::TicketHandedBackToAi { .. } => {
            sqlx::query(
                "UPDATE crm_escalations SET assigned_to = $2 WHERE ticket_id = $1 AND status = 'open'",
            )
            .bind(ticket_id)
            .bind(&t.assigned_to)
            .execute(&mut *tx)
            .await?;
        }
        TicketEvent::ApprovalRequested {
            approval_id,
            draft_id,
            reasons,
            requested_at,
        } => {
            let Some(draft) = t.drafts.get(draft_id) else {
                return Ok(());
            };
            sqlx::query(
                "INSERT INTO crm_approvals (approval_id, ticket_id, customer_id, status, draft_id, draft_body, confidence,
                                            reasons, created_at)
                 VALUES ($1, $2, $3, 'pending', $4, $5, $6, $7, $8)
                 ON CONFLICT (approval_id) DO NOTHING",
            )
            .bind(approval_id)
            .bind(ticket_id)
            .bind(customer_id)
            .bind(draft_id)
            .bind(&draft.body)
            .bind(draft.confidence)
            .bind(reasons)
            .bind(requested_at)
            .execute(&mut *tx)
            .await?;
        }
        TicketEvent::ResponseApproved {
            approval_id,
            approved_by,
            edited_body,
            approved_at,
            ..
        } => {
            sqlx::query(
                "UPDATE crm_approvals SET status = 'approved', edited_body = $2, decided_at = $3, decided_by = $4
                  WHERE approval_id = $1",
            )
            .bind(approval_id)
            .bind(edited_body)
            .bind(approved_at)
            .bind(approved_by)
            .execute(&mut *tx)
            .await?;
        }
        TicketEvent::ResponseRejected {
            approval_id,
            rejected_by,
            reason,
            rejected_at,
            ..
        } => {
            sqlx::query(
                "UPDATE crm_approvals SET status = 'rejected', reason = $2, decided_at = $3, decided_by = $4
                  WHERE approval_id = $1",
            )
            .bind(approval_id)
            .bind(reason)
            .bind(rejected_at)
            .bind(rejected_by)
            .execute(&mut *tx)
            .await?;
        }
        _ => {}
    }
    Ok(())
}

#[async_trait]
impl Projector for TicketsProjector {
    fn name(&self) -> &'static str {
        "crm-tickets"
    }

    fn aggregate_types(&self) -> &'static [&'static str] {
        &["ticket"]
    }

    fn tables(&self) -> &'static [&'static str] {
        &["crm_tickets", "crm_escalations", "crm_approvals"]
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
            let state = states.entry(id).or_default();
            state.apply_event(event.clone());
            project_queues(&mut *tx, id, state, &event).await?;
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
                                          feedback_helpful, state, first_response_breach_due, resolution_breach_due,
                                          handler, resolved_at, closed_at, previous_ticket_id, last_customer_message_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20,
                         $21, $22, $23, $24, $25, $26, $27)
                 ON CONFLICT (ticket_id) DO UPDATE SET
                    status = EXCLUDED.status, subject = EXCLUDED.subject, category = EXCLUDED.category,
                    priority = EXCLUDED.priority, assigned_to = EXCLUDED.assigned_to, updated_at = EXCLUDED.updated_at,
                    first_response_at = EXCLUDED.first_response_at, sla_due_at = EXCLUDED.sla_due_at,
                    sla_breached = EXCLUDED.sla_breached, messages_count = EXCLUDED.messages_count,
                    open_escalations = EXCLUDED.open_escalations, pending_approvals = EXCLUDED.pending_approvals,
                    feedback_helpful = EXCLUDED.feedback_helpful, state = EXCLUDED.state,
                    first_response_breach_due = EXCLUDED.first_response_breach_due,
                    resolution_breach_due = EXCLUDED.resolution_breach_due,
                    handler = EXCLUDED.handler, resolved_at = EXCLUDED.resolved_at, closed_at = EXCLUDED.closed_at,
                    previous_ticket_id = EXCLUDED.previous_ticket_id,
                    last_customer_message_at = EXCLUDED.last_customer_message_at",
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
            .bind(t.handler.as_str())
            .bind(t.resolved_at)
            .bind(t.closed_at)
            .bind(t.previous_ticket_id)
            .bind(t.last_customer_message_at)
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
