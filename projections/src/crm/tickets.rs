use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use casebook_domain::sla::SlaKind;
use casebook_domain::ticket::ApprovalState;
use casebook_domain::{EventEnvelope, Ticket, TicketEvent};
use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::metrics::ESCALATIONS;
use crate::projector::{ticket_events, FillPart, PageMemory, ProjectionError, Projector};

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

/// Tickets whose state a [`ShadowTickets`] keeps in memory; past them it
/// writes the rows it kept back and forgets them all, and reads states
/// back from its shadow again.
const STATES_IN_MEMORY: usize = 250_000;
/// Rows per statement when a [`ShadowTickets`] writes what it kept back.
const ROWS_PER_WRITE: usize = 5_000;

/// Fills a rebuild's shadow as [`TicketsProjector`] does, keeping each
/// ticket's state in memory between pages instead of reading it back from
/// `crm_tickets.state` (a `jsonb` read and parse per ticket per page): the
/// shadow has no other writer, so the state it holds is the one it wrote.
/// It also keeps the tickets' rows back until the fill ends
/// ([`Projector::finish_fill`]) or memory is full: a ticket touched by
/// several pages (opened, then resolved pages later) is written once.
pub struct ShadowTickets {
    kept: PageMemory<Kept>,
    /// Tickets held before it writes and forgets them all.
    limit: usize,
}

#[derive(Default)]
struct Kept {
    states: HashMap<Uuid, Ticket>,
    /// Tickets whose row is behind their state.
    unwritten: HashSet<Uuid>,
}

impl ShadowTickets {
    /// A filler holding at most `limit` tickets' states at once.
    pub fn holding(limit: usize) -> Self {
        Self {
            kept: PageMemory::new(),
            limit: limit.max(1),
        }
    }
}

/// The ids of `kept`'s unwritten tickets in key order (each statement then
/// fills neighbouring index pages), in statements' worth.
fn unwritten_parts(kept: &mut Kept) -> Vec<Vec<Uuid>> {
    let mut ids: Vec<Uuid> = kept.unwritten.drain().collect();
    ids.sort_unstable();
    ids.chunks(ROWS_PER_WRITE).map(<[Uuid]>::to_vec).collect()
}

/// Writes the rows of `kept`'s unwritten tickets.
async fn write_kept(tx: &mut PgConnection, kept: &mut Kept) -> Result<(), ProjectionError> {
    for part in unwritten_parts(kept) {
        write_rows(&mut *tx, part.into_iter(), &mut kept.states).await?;
    }
    Ok(())
}

/// Tickets' rows a [`ShadowTickets`] kept back: one statement's worth,
/// with the states they are written from.
struct KeptRows {
    ids: Vec<Uuid>,
    states: HashMap<Uuid, Ticket>,
}

#[async_trait]
impl FillPart for KeptRows {
    async fn write(self: Box<Self>, tx: &mut PgConnection) -> Result<(), ProjectionError> {
        let KeptRows { ids, mut states } = *self;
        write_rows(tx, ids.into_iter(), &mut states).await
    }
}

#[async_trait]
impl Projector for ShadowTickets {
    fn name(&self) -> &'static str {
        TicketsProjector.name()
    }

    fn aggregate_types(&self) -> &'static [&'static str] {
        TicketsProjector.aggregate_types()
    }

    fn tables(&self) -> &'static [&'static str] {
        TicketsProjector.tables()
    }

    fn reader_indexes(&self) -> &'static [&'static str] {
        TicketsProjector.reader_indexes()
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        events: &[EventEnvelope],
    ) -> Result<(), ProjectionError> {
        let mut kept = self.kept.take();
        let changed = fold_tickets(tx, events, &mut kept.states).await?;
        kept.unwritten.extend(changed);
        if kept.states.len() > self.limit {
            write_kept(tx, &mut kept).await?;
            kept.states.clear();
        }
        self.kept.put_back(kept);
        Ok(())
    }

    fn finish_fill(&self) -> Vec<Box<dyn FillPart>> {
        let mut kept = self.kept.take();
        unwritten_parts(&mut kept)
            .into_iter()
            .map(|ids| {
                let states = ids
                    .iter()
                    .filter_map(|id| kept.states.remove_entry(id))
                    .collect();
                Box::new(KeptRows { ids, states }) as Box<dyn FillPart>
            })
            .collect()
    }
}

/// Applies a batch of ticket events (the live path): each ticket's state
/// read from its row and folded with the domain's own `apply`, the queue
/// rows each event implies, and the tickets' rows.
async fn apply_tickets(
    tx: &mut PgConnection,
    events: &[EventEnvelope],
) -> Result<(), ProjectionError> {
    let mut states = HashMap::new();
    let changed = fold_tickets(tx, events, &mut states).await?;
    write_rows(tx, changed.into_iter(), &mut states).await
}

/// Folds a batch of ticket events into each ticket's state (from `states`,
/// when it holds the ticket, else read from its row) with the domain's own
/// `apply`, and writes the queue rows each event implies. Returns the
/// tickets changed, in the order first touched; their states are left in
/// `states`.
async fn fold_tickets(
    tx: &mut PgConnection,
    events: &[EventEnvelope],
    states: &mut HashMap<Uuid, Ticket>,
) -> Result<Vec<Uuid>, ProjectionError> {
    let name = TicketsProjector.name();
    let mut ids: Vec<Uuid> = events
        .iter()
        .filter_map(|e| e.aggregate_id.parse().ok())
        .filter(|id| !states.contains_key(id))
        .collect();
    ids.sort();
    ids.dedup();
    if !ids.is_empty() {
        let rows: Vec<(Uuid, serde_json::Value)> = sqlx::query_as(
            "SELECT ticket_id, state FROM crm_tickets WHERE ticket_id = ANY($1) FOR UPDATE",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        states.reserve(rows.len());
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
    }
    let mut changed: Vec<Uuid> = Vec::new();
    let mut seen: HashSet<Uuid> = HashSet::new();
    for (id, event, _) in ticket_events(name, events) {
        let state = states.entry(id).or_default();
        state.apply_event(event.clone());
        project_queues(&mut *tx, id, state, &event).await?;
        if seen.insert(id) {
            changed.push(id);
        }
    }
    Ok(changed)
}

/// Writes the rows of tickets `ids` as `states` holds them. A ticket whose
/// opening was never seen has no row, and is dropped from `states`: the
/// next batch starts it afresh, as it would from the table.
async fn write_rows(
    tx: &mut PgConnection,
    ids: impl Iterator<Item = Uuid>,
    states: &mut HashMap<Uuid, Ticket>,
) -> Result<(), ProjectionError> {
    let mut rows = TicketRows::default();
    for id in ids {
        let Some(state) = states.get(&id) else {
            continue;
        };
        if !rows.push(id, state) {
            states.remove(&id);
        }
    }
    rows.upsert(tx).await
}

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

/// The `crm_tickets` rows of one batch, as columns: written with one
/// statement however many tickets the batch touched (a rebuild's page
/// touches about a thousand).
#[derive(Default)]
struct TicketRows {
    ticket_id: Vec<Uuid>,
    customer_id: Vec<Uuid>,
    channel: Vec<&'static str>,
    subject: Vec<Option<String>>,
    category: Vec<&'static str>,
    priority: Vec<&'static str>,
    status: Vec<&'static str>,
    assigned_to: Vec<Option<String>>,
    created_at: Vec<DateTime<Utc>>,
    updated_at: Vec<DateTime<Utc>>,
    first_response_at: Vec<Option<DateTime<Utc>>>,
    first_response_due: Vec<DateTime<Utc>>,
    resolution_due: Vec<DateTime<Utc>>,
    sla_due_at: Vec<DateTime<Utc>>,
    sla_breached: Vec<bool>,
    messages_count: Vec<i32>,
    open_escalations: Vec<i32>,
    pending_approvals: Vec<i32>,
    feedback_helpful: Vec<Option<bool>>,
    /// The ticket's state as JSON text (cast to jsonb by the statement).
    state: Vec<String>,
    first_response_breach_due: Vec<Option<DateTime<Utc>>>,
    resolution_breach_due: Vec<Option<DateTime<Utc>>>,
    handler: Vec<&'static str>,
    resolved_at: Vec<Option<DateTime<Utc>>>,
    closed_at: Vec<Option<DateTime<Utc>>>,
    previous_ticket_id: Vec<Option<Uuid>>,
    last_customer_message_at: Vec<Option<DateTime<Utc>>>,
}

impl TicketRows {
    /// Adds the row of ticket `id` in state `t`; a ticket whose opening
    /// this projector never saw has no row.
    /// Whether it has one.
    fn push(&mut self, id: Uuid, t: &Ticket) -> bool {
        let (Some(customer_id), Some(channel), Some(opened_at), Some(deadlines)) =
            (t.customer_id, t.channel, t.opened_at, t.deadlines)
        else {
            return false;
        };
        self.ticket_id.push(id);
        self.customer_id.push(customer_id);
        self.channel.push(channel.as_str());
        self.subject.push(t.subject.clone());
        self.category.push(t.category.as_str());
        self.priority.push(t.priority.as_str());
        self.status.push(t.status.as_str());
        self.assigned_to.push(t.assigned_to.clone());
        self.created_at.push(opened_at);
        self.updated_at.push(t.updated_at.unwrap_or(opened_at));
        self.first_response_at.push(t.first_response_at);
        self.first_response_due.push(deadlines.first_response_due);
        self.resolution_due.push(deadlines.resolution_due);
        self.sla_due_at
            .push(deadlines.next_due(t.first_response_at));
        self.sla_breached.push(!t.sla_breaches.is_empty());
        self.messages_count.push(t.messages_count as i32);
        self.open_escalations
            .push(t.open_escalations().count() as i32);
        self.pending_approvals.push(
            t.approvals
                .values()
                .filter(|a| a.state == ApprovalState::Pending)
                .count() as i32,
        );
        self.feedback_helpful.push(t.feedback);
        self.state
            .push(serde_json::to_string(t).expect("ticket state serialises"));
        // What the SLA monitor looks for: deadlines whose breach is still
        // to be recorded (see migration 20261125000020).
        self.first_response_breach_due
            .push(t.unrecorded_sla_due(SlaKind::FirstResponse));
        self.resolution_breach_due
            .push(t.unrecorded_sla_due(SlaKind::Resolution));
        self.handler.push(t.handler.as_str());
        self.resolved_at.push(t.resolved_at);
        self.closed_at.push(t.closed_at);
        self.previous_ticket_id.push(t.previous_ticket_id);
        self.last_customer_message_at
            .push(t.last_customer_message_at);
        true
    }

    async fn upsert(self, tx: &mut PgConnection) -> Result<(), ProjectionError> {
        if self.ticket_id.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO crm_tickets (ticket_id, customer_id, channel, subject, category, priority, status, assigned_to,
                                      created_at, updated_at, first_response_at, first_response_due, resolution_due,
                                      sla_due_at, sla_breached, messages_count, open_escalations, pending_approvals,
                                      feedback_helpful, state, first_response_breach_due, resolution_breach_due,
                                      handler, resolved_at, closed_at, previous_ticket_id, last_customer_message_at)
             SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                                  $8::text[], $9::timestamptz[], $10::timestamptz[], $11::timestamptz[],
                                  $12::timestamptz[], $13::timestamptz[], $14::timestamptz[], $15::bool[], $16::int4[],
                                  $17::int4[], $18::int4[], $19::bool[], $20::text[]::jsonb[], $21::timestamptz[],
                                  $22::timestamptz[], $23::text[], $24::timestamptz[], $25::timestamptz[], $26::uuid[],
                                  $27::timestamptz[])
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
        .bind(self.ticket_id)
        .bind(self.customer_id)
        .bind(self.channel)
        .bind(self.subject)
        .bind(self.category)
        .bind(self.priority)
        .bind(self.status)
        .bind(self.assigned_to)
        .bind(self.created_at)
        .bind(self.updated_at)
        .bind(self.first_response_at)
        .bind(self.first_response_due)
        .bind(self.resolution_due)
        .bind(self.sla_due_at)
        .bind(self.sla_breached)
        .bind(self.messages_count)
        .bind(self.open_escalations)
        .bind(self.pending_approvals)
        .bind(self.feedback_helpful)
        .bind(self.state)
        .bind(self.first_response_breach_due)
        .bind(self.resolution_breach_due)
        .bind(self.handler)
        .bind(self.resolved_at)
        .bind(self.closed_at)
        .bind(self.previous_ticket_id)
        .bind(self.last_customer_message_at)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
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

    /// Tickets, escalations and approvals are written by their ids; open
    /// escalations are found by ticket (`crm_escalations_ticket_idx` stays).
    fn reader_indexes(&self) -> &'static [&'static str] {
        &[
            "crm_tickets_customer_idx",
            "crm_tickets_status_idx",
            "crm_tickets_created_idx",
            "crm_tickets_sla_unrecorded_idx",
            "crm_tickets_assignee_idx",
            "crm_tickets_human_unassigned_idx",
            "crm_tickets_resolved_idx",
            "crm_tickets_previous_idx",
            "crm_escalations_status_idx",
            "crm_escalations_assigned_idx",
            "crm_escalations_customer_idx",
            "crm_approvals_status_idx",
            "crm_approvals_ticket_idx",
            "crm_approvals_customer_idx",
        ]
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
        apply_tickets(tx, events).await
    }

    fn shadow_filler(&self) -> Option<Box<dyn Projector>> {
        Some(Box::new(ShadowTickets::holding(STATES_IN_MEMORY)))
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
