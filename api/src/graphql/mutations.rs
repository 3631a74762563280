//! The desk's acts, each a command on the ticket with the caller as its
//! actor (see `casebook_commands::staff`): claim, unassign, reply, approve
//! or reject a held draft, escalate, resolve an escalation, hand back to the
//! AI, resolve, reopen; and a customer's feedback. Agents and supervisors
//! act; analysts and auditors only read (`FORBIDDEN`); a customer may only
//! give feedback on their own ticket.

use async_graphql::{Context, Object, ID};
use casebook_commands::feedback::{self, FeedbackError};
use casebook_commands::staff::Acted;
use casebook_commands::CommandError;
use casebook_domain::{Ticket as TicketState, TicketError};
use casebook_projections::staff::{self as reads, ApprovalRow, TicketRow};
use chrono::Utc;
use uuid::Uuid;

use super::context::{bad_input, coded, db, internal, not_found, require_actor, uuid_arg, viewer};
use super::queues::Approval;
use super::tickets::Ticket;
use crate::state::AppState;

/// The request's correlation id, carried by every command it issues.
#[derive(Debug, Clone)]
pub struct Correlation(pub String);

/// A refused command as the caller should read it.
fn refused(e: CommandError<TicketError>) -> async_graphql::Error {
    match e {
        CommandError::Rejected(e) => {
            let code = match e {
                TicketError::NotFound
                | TicketError::UnknownApproval(_)
                | TicketError::UnknownEscalation(_) => "NOT_FOUND",
                TicketError::WhatsappWindowClosed => "WHATSAPP_WINDOW_CLOSED",
                TicketError::InvalidIdempotencyKey { .. } => "BAD_USER_INPUT",
                _ => "REJECTED",
            };
            coded(e.to_string(), code)
        }
        CommandError::Store(e) => internal(e),
    }
}

/// The ticket as it stands after an act, folded from its own events (the
/// read model may not have the act yet).
async fn ticket_after(app: &AppState, ticket_id: Uuid) -> async_graphql::Result<Ticket> {
    let state = app
        .store
        .load::<TicketState>(&ticket_id.to_string())
        .await
        .map_err(internal)?
        .aggregate;
    row_of(&state)
        .map(Ticket::from)
        .ok_or_else(|| not_found("no such ticket"))
}

fn row_of(t: &TicketState) -> Option<TicketRow> {
    let opened_at = t.opened_at?;
    Some(TicketRow {
        ticket_id: t.id?,
        customer_id: t.customer_id?,
        channel: t.channel?.as_str().to_string(),
        subject: t.subject.clone(),
        category: t.category.as_str().to_string(),
        priority: t.priority.as_str().to_string(),
        status: t.status.as_str().to_string(),
        assigned_to: t.assigned_to.clone(),
        created_at: opened_at,
        updated_at: t.updated_at.unwrap_or(opened_at),
        first_response_at: t.first_response_at,
        sla_due_at: t.sla_due_at()?,
        sla_breached: !t.sla_breaches.is_empty(),
        messages_count: t.messages_count as i32,
    })
}

async fn acted(
    app: &AppState,
    result: Result<Acted, CommandError<TicketError>>,
) -> async_graphql::Result<Ticket> {
    let acted = result.map_err(refused)?;
    ticket_after(app, acted.ticket_id).await
}

/// The approval as decided: its row, with what the act just recorded.
async fn approval_after(
    ctx: &Context<'_>,
    approval_id: Uuid,
    decide: impl FnOnce(&mut ApprovalRow),
) -> async_graphql::Result<Approval> {
    let db = db(ctx)?;
    let mut tx = db.begin().await.map_err(internal)?;
    let row = reads::approval(&mut tx, approval_id)
        .await
        .map_err(internal)?;
    tx.commit().await.map_err(internal)?;
    let mut row = row.ok_or_else(|| not_found("no such approval"))?;
    decide(&mut row);
    Ok(Approval(row))
}

/// Who acts, on what service, under which correlation id.
struct Act<'a> {
    app: &'a AppState,
    sub: &'a str,
    correlation: &'a str,
}

/// The caller as an actor: agents and supervisors only.
fn act<'a>(ctx: &'a Context<'_>, what: &str) -> async_graphql::Result<Act<'a>> {
    let v = require_actor(ctx, what)?;
    Ok(Act {
        app: ctx.data::<AppState>()?,
        sub: &v.sub,
        correlation: &ctx.data::<Correlation>()?.0,
    })
}

fn ticket_id(id: &ID) -> async_graphql::Result<Uuid> {
    uuid_arg(id, "ticketId")
}

#[derive(Default)]
pub struct TicketMutation;

#[Object]
impl TicketMutation {
    /// Sends a held draft, or the caller's edit of it.
    async fn approve_response(
        &self,
        ctx: &Context<'_>,
        approval_id: ID,
        edited_body: Option<String>,
    ) -> async_graphql::Result<Approval> {
        let a = act(ctx, "approve responses")?;
        let id = uuid_arg(&approval_id, "approvalId")?;
        a.app
            .staff
            .approve(id, edited_body.as_deref(), a.sub, a.correlation)
            .await
            .map_err(refused)?;
        let edited = edited_body
            .map(|b| b.trim().to_string())
            .filter(|b| !b.is_empty());
        let sub = a.sub.to_string();
        approval_after(ctx, id, move |a| {
            a.status = "approved".into();
            a.edited_body = edited;
            a.decided_by = Some(sub);
            a.decided_at.get_or_insert_with(Utc::now);
        })
        .await
    }

    /// Turns down a held draft; nothing is sent for it.
    async fn reject_response(
        &self,
        ctx: &Context<'_>,
        approval_id: ID,
        reason: String,
    ) -> async_graphql::Result<Approval> {
        let a = act(ctx, "reject responses")?;
        let id = uuid_arg(&approval_id, "approvalId")?;
        a.app
            .staff
            .reject(id, &reason, a.sub, a.correlation)
            .await
            .map_err(refused)?;
        let sub = a.sub.to_string();
        approval_after(ctx, id, move |a| {
            a.status = "rejected".into();
            a.reason = Some(reason.trim().to_string());
            a.decided_by = Some(sub);
            a.decided_at.get_or_insert_with(Utc::now);
        })
        .await
    }

    /// Claims a ticket for an agent (none: the caller). From then on the
    /// AI stays silent on it.
    async fn assign_ticket(
        &self,
        ctx: &Context<'_>,
        ticket_id: ID,
        agent_id: Option<ID>,
    ) -> async_graphql::Result<Ticket> {
        let a = act(ctx, "assign tickets")?;
        let id = self::ticket_id(&ticket_id)?;
        acted(
            a.app,
            a.app
                .staff
                .assign(
                    id,
                    agent_id.as_ref().map(|agent| agent.as_str()),
                    a.sub,
                    a.correlation,
                )
                .await,
        )
        .await
    }

    async fn unassign_ticket(
        &self,
        ctx: &Context<'_>,
        ticket_id: ID,
    ) -> async_graphql::Result<Ticket> {
        let a = act(ctx, "unassign tickets")?;
        let id = self::ticket_id(&ticket_id)?;
        acted(a.app, a.app.staff.unassign(id, a.sub, a.correlation).await).await
    }

    /// A person's reply, formatted for the ticket's channel and delivered.
    /// With an `idempotencyKey` (up to 200 bytes, unique per reply) a
    /// retried request sends nothing more once the first was recorded.
    async fn reply_to_ticket(
        &self,
        ctx: &Context<'_>,
        ticket_id: ID,
        body: String,
        idempotency_key: Option<String>,
    ) -> async_graphql::Result<Ticket> {
        let a = act(ctx, "reply to customers")?;
        let id = self::ticket_id(&ticket_id)?;
        acted(
            a.app,
            a.app
                .staff
                .reply_once(id, &body, idempotency_key.as_deref(), a.sub, a.correlation)
                .await,
        )
        .await
    }

    async fn escalate_ticket(
        &self,
        ctx: &Context<'_>,
        ticket_id: ID,
        reason: String,
    ) -> async_graphql::Result<Ticket> {
        let a = act(ctx, "escalate tickets")?;
        let id = self::ticket_id(&ticket_id)?;
        acted(
            a.app,
            a.app
                .staff
                .escalate(id, &reason, a.sub, a.correlation)
                .await,
        )
        .await
    }

    async fn resolve_escalation(
        &self,
        ctx: &Context<'_>,
        escalation_id: ID,
        note: Option<String>,
    ) -> async_graphql::Result<Ticket> {
        let a = act(ctx, "resolve escalations")?;
        let id = uuid_arg(&escalation_id, "escalationId")?;
        acted(
            a.app,
            a.app
                .staff
                .resolve_escalation(id, note.as_deref(), a.sub, a.correlation)
                .await,
        )
        .await
    }

    /// Ends the hand-off: the AI answers the customer's next message.
    async fn hand_back_to_ai(
        &self,
        ctx: &Context<'_>,
        ticket_id: ID,
    ) -> async_graphql::Result<Ticket> {
        let a = act(ctx, "hand tickets back to the AI")?;
        let id = self::ticket_id(&ticket_id)?;
        acted(
            a.app,
            a.app.staff.hand_back_to_ai(id, a.sub, a.correlation).await,
        )
        .await
    }

    async fn resolve_ticket(
        &self,
        ctx: &Context<'_>,
        ticket_id: ID,
        note: Option<String>,
    ) -> async_graphql::Result<Ticket> {
        let a = act(ctx, "resolve tickets")?;
        let id = self::ticket_id(&ticket_id)?;
        acted(
            a.app,
            a.app
                .staff
                .resolve(id, note.as_deref(), a.sub, a.correlation)
                .await,
        )
        .await
    }

    async fn reopen_ticket(
        &self,
        ctx: &Context<'_>,
        ticket_id: ID,
    ) -> async_graphql::Result<Ticket> {
        let a = act(ctx, "reopen tickets")?;
        let id = self::ticket_id(&ticket_id)?;
        acted(a.app, a.app.staff.reopen(id, a.sub, a.correlation).await).await
    }

    /// "Was this helpful?": the ticket's customer only.
    async fn submit_feedback(
        &self,
        ctx: &Context<'_>,
        ticket_id: ID,
        helpful: bool,
        comment: Option<String>,
    ) -> async_graphql::Result<Ticket> {
        let v = viewer(ctx)?;
        let Some(customer) = v.customer_id.filter(|_| !v.is_staff()) else {
            return Err(super::context::forbidden("give a customer's feedback"));
        };
        let app = ctx.data::<AppState>()?;
        let correlation = &ctx.data::<Correlation>()?.0;
        let id = self::ticket_id(&ticket_id)?;
        feedback::record(
            &app.store,
            id,
            Some(customer),
            helpful,
            comment.as_deref(),
            correlation,
        )
        .await
        .map_err(|e| match e {
            FeedbackError::NotFound => not_found("no such ticket"),
            FeedbackError::Store(e) => internal(e),
            other => bad_input(other.to_string()),
        })?;
        ticket_after(app, id).await
    }
}
