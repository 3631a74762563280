//! What people do on tickets: the command service the staff GraphQL API
//! calls. Every method is one human act, recorded as commands on the
//! ticket with the person as the actor (`ActorKind::Agent`, id = the staff
//! user's `sub`), so the audit trail shows who did what. Who may call which
//! method is the API's business; what makes sense on a ticket is the
//! ticket's (see `casebook_domain::ticket`).
//!
//! # The API
//!
//! Every method takes the ids it acts on, its arguments, the acting
//! person's `sub` and the request's correlation id, and returns
//! [`Acted`] (the ticket it acted on, and the reply, escalation or
//! approval it made or decided) or `CommandError<TicketError>`:
//! `Rejected` when the ticket refused (its `Display` is a sentence fit for
//! the caller), `Store` when the database failed. Optimistic conflicts with
//! concurrent writers are retried against the fresh state.
//!
//! | method | does | refused with |
//! | --- | --- | --- |
//! | [`Staff::assign`] | claims the ticket (no agent: the caller); the AI stays silent from now on. Assigning the current assignee again changes nothing | `EmptyAgent`, `Closed` |
//! | [`Staff::unassign`] | back to the unassigned human queue (the AI stays silent) | `NotAssigned` (an error, not a no-op: the caller's view was stale) |
//! | [`Staff::reply`] | a person's reply, formatted for the channel, delivered by the delivery worker; on WhatsApp more than 24 h after the customer's last message it goes as the `TWILIO_FOLLOWUP_CONTENT_SID` template | `WhatsappWindowClosed` (names the setting), `EmptyResponse`, `ResponseTooLong`, `Closed` |
//! | [`Staff::approve`] | approves a held draft, optionally edited, and sends it (the edit, if any) | `UnknownApproval`, `ApprovalAlreadyDecided`, as `reply` |
//! | [`Staff::reject`] | rejects a held draft with a reason; nothing is sent | `UnknownApproval`, `ApprovalAlreadyDecided`, `EmptyReason` |
//! | [`Staff::escalate`] | escalates by hand (`manual`, the reason as its note); nothing if a manual escalation is open | `EmptyReason` |
//! | [`Staff::resolve_escalation`] | settles one escalation (the ticket stays with people) | `UnknownEscalation`, `EscalationAlreadyResolved` |
//! | [`Staff::hand_back_to_ai`] | settles the open escalations, ends the assignment; the AI answers the next message | `NotWithHuman` |
//! | [`Staff::resolve`] | resolves the ticket and its open escalations; an assignee keeps it (a customer who writes again reopens it into their queue) | `AlreadyResolved` |
//! | [`Staff::reopen`] | reopens a resolved ticket | `NotResolved` |
//! | [`Staff::close_stale`] | the periodic job: closes tickets resolved at least 7 days before `now` | |
//!
//! Escalations and approvals are found by their id through the read
//! models ([`Staff::ticket_of_escalation`], [`Staff::ticket_of_approval`]):
//! an id the read model does not show yet (it lags the store by the
//! projector's batch, typically well under a second) is `UnknownEscalation`
//! / `UnknownApproval`, exactly as an id that does not exist.

use std::time::Duration;

use casebook_domain::formatting::{format_reply, ReplyContext};
use casebook_domain::status_link;
use casebook_domain::ticket::EscalationReason;
use casebook_domain::{
    Actor, ActorKind, Customer, EventMetadata, Ticket, TicketCommand, TicketError, TicketEvent,
};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::store::{CommandError, EventStore, StoreError, CONFLICT_BACKOFF};

/// The longest text a person may send (or edit a draft to), in characters.
pub const MAX_REPLY_CHARS: usize = 4000;
/// The longest idempotency key a reply may carry.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 200;

/// The id of the reply `actor` sends on `ticket_id` under `key`: the same
/// for a retry, different for another ticket, person or key.
pub fn reply_id_for(ticket_id: Uuid, actor: &str, key: &str) -> Uuid {
    let name = format!("{ticket_id}\u{0}{actor}\u{0}{key}");
    Uuid::new_v5(&REPLY_NAMESPACE, name.as_bytes())
}

/// The UUID namespace of idempotent replies.
const REPLY_NAMESPACE: Uuid = Uuid::from_u128(0x5c1b_7a42_9e0d_4f63_a8b1_2d7e_6c90_f3a5);
/// The longest reason or note, in characters.
pub const MAX_NOTE_CHARS: usize = 1000;
/// Most tickets one auto-close pass closes; the rest wait for the next.
pub const CLOSE_BATCH: i64 = 500;

/// What a method did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acted {
    pub ticket_id: Uuid,
    /// The reply sent, if the act sent one.
    pub response_id: Option<Uuid>,
    /// The escalation opened or resolved, if any.
    pub escalation_id: Option<Uuid>,
    /// The approval decided, if any.
    pub approval_id: Option<Uuid>,
    /// Whether anything was recorded (assigning the same person again, or
    /// escalating what is already escalated by hand, records nothing).
    pub changed: bool,
}

impl Acted {
    fn on(ticket_id: Uuid, events: &[TicketEvent]) -> Self {
        Self {
            ticket_id,
            response_id: None,
            escalation_id: None,
            approval_id: None,
            changed: !events.is_empty(),
        }
    }
}

/// The template a reply on `ticket` at `at` must go out as: none while the
/// channel takes free-form text; else the configured one, and without one
/// the reply is refused (`WhatsappWindowClosed`, naming
/// `TWILIO_FOLLOWUP_CONTENT_SID`).
pub fn reply_template(
    ticket: &Ticket,
    at: DateTime<Utc>,
    configured: Option<&str>,
) -> Result<Option<String>, TicketError> {
    if ticket.free_form_allowed(at) {
        return Ok(None);
    }
    configured
        .filter(|sid| !sid.trim().is_empty())
        .map(|sid| Some(sid.to_string()))
        .ok_or(TicketError::WhatsappWindowClosed)
}

fn bounded(text: &str, max: usize) -> Result<(), TicketError> {
    if text.chars().count() > max {
        return Err(TicketError::ResponseTooLong { max });
    }
    Ok(())
}

fn note(text: Option<&str>) -> Option<String> {
    text.map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| t.chars().take(MAX_NOTE_CHARS).collect())
}

#[derive(Clone)]
pub struct Staff {
    store: EventStore,
    pool: PgPool,
    signature: String,
    followup_template: Option<String>,
    /// `CASEBOOK_PUBLIC_URL`: the ticket's first reply links to its status
    /// page.
    public_url: Option<String>,
}

impl Staff {
    /// `signature` signs email replies (`CASEBOOK_SUPPORT_SIGNATURE`).
    pub fn new(store: EventStore, signature: impl Into<String>) -> Self {
        Self {
            pool: store.pool().clone(),
            store,
            signature: signature.into(),
            followup_template: None,
            public_url: None,
        }
    }

    /// A reply that is the ticket's first carries the status link under
    /// `public_url` (`casebook_domain::status_link`).
    pub fn with_public_url(mut self, public_url: impl Into<String>) -> Self {
        self.public_url = Some(public_url.into());
        self
    }

    /// The approved WhatsApp template for replies outside the 24-hour
    /// window (`TWILIO_FOLLOWUP_CONTENT_SID`).
    pub fn with_followup_template(mut self, content_sid: Option<String>) -> Self {
        self.followup_template = content_sid.filter(|s| !s.trim().is_empty());
        self
    }

    fn meta(actor: &str, correlation_id: &str) -> EventMetadata {
        EventMetadata::new(correlation_id, Actor::new(ActorKind::Agent, actor))
    }

    /// Plans commands on the ticket as it is now and commits them, again
    /// on a conflict. Returns the events recorded.
    /// [`Staff::act`] with one command whatever the ticket holds (the
    /// ticket decides whether it applies), made afresh on each attempt.
    async fn act_alone(
        &self,
        ticket_id: Uuid,
        actor: &str,
        correlation_id: &str,
        command: impl Fn() -> TicketCommand,
    ) -> Result<Vec<TicketEvent>, CommandError<TicketError>> {
        self.act(ticket_id, &Self::meta(actor, correlation_id), |_| {
            Ok(vec![command()])
        })
        .await
    }

    async fn act<F>(
        &self,
        ticket_id: Uuid,
        meta: &EventMetadata,
        mut plan: F,
    ) -> Result<Vec<TicketEvent>, CommandError<TicketError>>
    where
        F: FnMut(&Ticket) -> Result<Vec<TicketCommand>, TicketError>,
    {
        let key = ticket_id.to_string();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut uow = self.store.unit_of_work(meta.clone());
            let ticket = uow.load::<Ticket>(&key).await?;
            if !ticket.exists() {
                return Err(CommandError::Rejected(TicketError::NotFound));
            }
            let commands = plan(ticket).map_err(CommandError::Rejected)?;
            let mut events = Vec::new();
            for command in commands {
                events.extend(uow.execute::<Ticket>(&key, command).await?);
            }
            if events.is_empty() {
                return Ok(events);
            }
            match uow.commit().await {
                Ok(_) => return Ok(events),
                Err(StoreError::Conflict) if CONFLICT_BACKOFF.should_retry(attempt) => {
                    crate::retry::sleep_backoff(&CONFLICT_BACKOFF, attempt).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// How replies on the ticket are addressed and signed.
    async fn reply_context(
        &self,
        ticket_id: Uuid,
    ) -> Result<ReplyContext, CommandError<TicketError>> {
        let ticket = self
            .store
            .load::<Ticket>(&ticket_id.to_string())
            .await?
            .aggregate;
        let customer_id = ticket
            .customer_id
            .ok_or(CommandError::Rejected(TicketError::NotFound))?;
        let customer = self
            .store
            .load::<Customer>(&customer_id.to_string())
            .await?
            .aggregate;
        Ok(ReplyContext::new(customer.name, ticket_id, &self.signature))
    }

    /// A person's reply to send on the ticket now.
    fn send(
        &self,
        ticket: &Ticket,
        response_id: Uuid,
        draft_id: Option<Uuid>,
        text: &str,
        ctx: &ReplyContext,
        at: DateTime<Utc>,
    ) -> Result<TicketCommand, TicketError> {
        let channel = ticket.channel.ok_or(TicketError::NotFound)?;
        let template = reply_template(ticket, at, self.followup_template.as_deref())?;
        let link = self
            .public_url
            .as_deref()
            .zip(ticket.id)
            .filter(|_| status_link::is_first_reply(ticket))
            .map(|(url, id)| status_link::status_link(url, id));
        let reply = format_reply(channel, text, &ctx.clone().with_status_link(link));
        Ok(TicketCommand::SendResponse {
            response_id,
            draft_id,
            channel,
            body: reply.body,
            parts: reply.parts,
            // The draft's message when there is one, else the latest.
            in_reply_to: None,
            // A person wrote or approved it.
            automatic: None,
            holding: false,
            template,
            at,
        })
    }

    /// Claims the ticket for `agent_id`, or for the caller.
    pub async fn assign(
        &self,
        ticket_id: Uuid,
        agent_id: Option<&str>,
        actor: &str,
        correlation_id: &str,
    ) -> Result<Acted, CommandError<TicketError>> {
        let agent = agent_id.unwrap_or(actor).trim().to_string();
        let events = self
            .act_alone(ticket_id, actor, correlation_id, || TicketCommand::Assign {
                agent_id: agent.clone(),
                assigned_by: actor.to_string(),
                at: Utc::now(),
            })
            .await?;
        Ok(Acted::on(ticket_id, &events))
    }

    pub async fn unassign(
        &self,
        ticket_id: Uuid,
        actor: &str,
        correlation_id: &str,
    ) -> Result<Acted, CommandError<TicketError>> {
        let events = self
            .act_alone(ticket_id, actor, correlation_id, || {
                TicketCommand::Unassign {
                    unassigned_by: actor.to_string(),
                    at: Utc::now(),
                }
            })
            .await?;
        Ok(Acted::on(ticket_id, &events))
    }

    /// Sends `body`, written by the caller, to the customer.
    pub async fn reply(
        &self,
        ticket_id: Uuid,
        body: &str,
        actor: &str,
        correlation_id: &str,
    ) -> Result<Acted, CommandError<TicketError>> {
        self.reply_once(ticket_id, body, None, actor, correlation_id)
            .await
    }

    /// A person's reply that is sent at most once per `idempotency_key`:
    /// the key (with the ticket and the person) fixes the reply's id, so a
    /// retried request whose first attempt was recorded finds that reply
    /// and records, and sends, nothing more. Without a key every call is a
    /// new reply.
    pub async fn reply_once(
        &self,
        ticket_id: Uuid,
        body: &str,
        idempotency_key: Option<&str>,
        actor: &str,
        correlation_id: &str,
    ) -> Result<Acted, CommandError<TicketError>> {
        bounded(body, MAX_REPLY_CHARS).map_err(CommandError::Rejected)?;
        if body.trim().is_empty() {
            return Err(CommandError::Rejected(TicketError::EmptyResponse));
        }
        let response_id = match idempotency_key {
            Some(key) => {
                if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
                    return Err(CommandError::Rejected(TicketError::InvalidIdempotencyKey {
                        max: MAX_IDEMPOTENCY_KEY_BYTES,
                    }));
                }
                reply_id_for(ticket_id, actor, key)
            }
            None => Uuid::now_v7(),
        };
        let ctx = self.reply_context(ticket_id).await?;
        let result = self
            .act(ticket_id, &Self::meta(actor, correlation_id), |ticket| {
                Ok(vec![self.send(
                    ticket,
                    response_id,
                    None,
                    body.trim(),
                    &ctx,
                    Utc::now(),
                )?])
            })
            .await;
        let events = match result {
            Ok(events) => events,
            // The same key again: the reply is already recorded.
            Err(CommandError::Rejected(TicketError::DuplicateResponse(id)))
                if idempotency_key.is_some() && id == response_id =>
            {
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        Ok(Acted {
            response_id: Some(response_id),
            ..Acted::on(ticket_id, &events)
        })
    }

    /// Approves a held draft and sends it, or `edited_body` instead.
    pub async fn approve(
        &self,
        approval_id: Uuid,
        edited_body: Option<&str>,
        actor: &str,
        correlation_id: &str,
    ) -> Result<Acted, CommandError<TicketError>> {
        let ticket_id =
            self.ticket_of_approval(approval_id)
                .await?
                .ok_or(CommandError::Rejected(TicketError::UnknownApproval(
                    approval_id,
                )))?;
        self.approve_on(ticket_id, approval_id, edited_body, actor, correlation_id)
            .await
    }

    /// [`Staff::approve`] when the caller knows the ticket.
    pub async fn approve_on(
        &self,
        ticket_id: Uuid,
        approval_id: Uuid,
        edited_body: Option<&str>,
        actor: &str,
        correlation_id: &str,
    ) -> Result<Acted, CommandError<TicketError>> {
        let edited = edited_body.map(str::trim).filter(|b| !b.is_empty());
        if let Some(text) = edited {
            bounded(text, MAX_REPLY_CHARS).map_err(CommandError::Rejected)?;
        }
        let ctx = self.reply_context(ticket_id).await?;
        let response_id = Uuid::now_v7();
        let events = self
            .act(ticket_id, &Self::meta(actor, correlation_id), |ticket| {
                let approval = ticket
                    .approvals
                    .get(&approval_id)
                    .ok_or(TicketError::UnknownApproval(approval_id))?;
                let at = Utc::now();
                let text = edited.unwrap_or(&approval.body);
                let send =
                    self.send(ticket, response_id, Some(approval.draft_id), text, &ctx, at)?;
                Ok(vec![
                    TicketCommand::ApproveResponse {
                        approval_id,
                        approved_by: actor.to_string(),
                        edited_body: edited.map(str::to_string),
                        at,
                    },
                    send,
                ])
            })
            .await?;
        Ok(Acted {
            response_id: Some(response_id),
            approval_id: Some(approval_id),
            ..Acted::on(ticket_id, &events)
        })
    }

    /// Rejects a held draft: it is never sent.
    pub async fn reject(
        &self,
        approval_id: Uuid,
        reason: &str,
        actor: &str,
        correlation_id: &str,
    ) -> Result<Acted, CommandError<TicketError>> {
        let ticket_id =
            self.ticket_of_approval(approval_id)
                .await?
                .ok_or(CommandError::Rejected(TicketError::UnknownApproval(
                    approval_id,
                )))?;
        self.reject_on(ticket_id, approval_id, reason, actor, correlation_id)
            .await
    }

    /// [`Staff::reject`] when the caller knows the ticket.
    pub async fn reject_on(
        &self,
        ticket_id: Uuid,
        approval_id: Uuid,
        reason: &str,
        actor: &str,
        correlation_id: &str,
    ) -> Result<Acted, CommandError<TicketError>> {
        let reason = note(Some(reason)).ok_or(CommandError::Rejected(TicketError::EmptyReason))?;
        let events = self
            .act_alone(ticket_id, actor, correlation_id, || {
                TicketCommand::RejectResponse {
                    approval_id,
                    rejected_by: actor.to_string(),
                    reason: reason.clone(),
                    at: Utc::now(),
                }
            })
            .await?;
        Ok(Acted {
            approval_id: Some(approval_id),
            ..Acted::on(ticket_id, &events)
        })
    }

    /// Escalates by hand; `reason` becomes the escalation's note.
    pub async fn escalate(
        &self,
        ticket_id: Uuid,
        reason: &str,
        actor: &str,
        correlation_id: &str,
    ) -> Result<Acted, CommandError<TicketError>> {
        let note = note(Some(reason)).ok_or(CommandError::Rejected(TicketError::EmptyReason))?;
        let escalation_id = Uuid::now_v7();
        let events = self
            .act_alone(ticket_id, actor, correlation_id, || {
                TicketCommand::Escalate {
                    escalation_id,
                    in_reply_to: None,
                    reason: EscalationReason::Manual,
                    note: Some(note.clone()),
                    at: Utc::now(),
                }
            })
            .await?;
        Ok(Acted {
            escalation_id: (!events.is_empty()).then_some(escalation_id),
            ..Acted::on(ticket_id, &events)
        })
    }

    pub async fn resolve_escalation(
        &self,
        escalation_id: Uuid,
        resolution_note: Option<&str>,
        actor: &str,
        correlation_id: &str,
    ) -> Result<Acted, CommandError<TicketError>> {
        let ticket_id =
            self.ticket_of_escalation(escalation_id)
                .await?
                .ok_or(CommandError::Rejected(TicketError::UnknownEscalation(
                    escalation_id,
                )))?;
        let note = note(resolution_note);
        let events = self
            .act_alone(ticket_id, actor, correlation_id, || {
                TicketCommand::ResolveEscalation {
                    escalation_id,
                    resolved_by: actor.to_string(),
                    note: note.clone(),
                    at: Utc::now(),
                }
            })
            .await?;
        Ok(Acted {
            escalation_id: Some(escalation_id),
            ..Acted::on(ticket_id, &events)
        })
    }

    pub async fn hand_back_to_ai(
        &self,
        ticket_id: Uuid,
        actor: &str,
        correlation_id: &str,
    ) -> Result<Acted, CommandError<TicketError>> {
        let events = self
            .act_alone(ticket_id, actor, correlation_id, || {
                TicketCommand::HandBackToAi {
                    handed_back_by: actor.to_string(),
                    at: Utc::now(),
                }
            })
            .await?;
        Ok(Acted::on(ticket_id, &events))
    }

    pub async fn resolve(
        &self,
        ticket_id: Uuid,
        resolution: Option<&str>,
        actor: &str,
        correlation_id: &str,
    ) -> Result<Acted, CommandError<TicketError>> {
        let resolution = note(resolution);
        let events = self
            .act_alone(ticket_id, actor, correlation_id, || {
                TicketCommand::Resolve {
                    resolved_by: actor.to_string(),
                    resolution: resolution.clone(),
                    at: Utc::now(),
                }
            })
            .await?;
        Ok(Acted::on(ticket_id, &events))
    }

    pub async fn reopen(
        &self,
        ticket_id: Uuid,
        actor: &str,
        correlation_id: &str,
    ) -> Result<Acted, CommandError<TicketError>> {
        let events = self
            .act_alone(ticket_id, actor, correlation_id, || TicketCommand::Reopen {
                reopened_by: actor.to_string(),
                reason: None,
                at: Utc::now(),
            })
            .await?;
        Ok(Acted::on(ticket_id, &events))
    }

    /// One auto-close pass as of `now`: every ticket the read model shows
    /// resolved at least 7 days before `now` (at most [`CLOSE_BATCH`]) is
    /// offered `CloseStale`; the ticket decides (one the customer wrote to
    /// meanwhile is no longer resolved). Returns how many were closed.
    pub async fn close_stale(&self, now: DateTime<Utc>) -> Result<usize, StoreError> {
        let cutoff = now - casebook_domain::ticket::AUTO_CLOSE_AFTER;
        let due: Vec<Uuid> = sqlx::query_scalar(
            "SELECT ticket_id FROM crm_tickets
              WHERE status = 'resolved' AND resolved_at <= $1
              ORDER BY resolved_at
              LIMIT $2",
        )
        .bind(cutoff)
        .bind(CLOSE_BATCH)
        .fetch_all(&self.pool)
        .await?;
        let meta = EventMetadata::new(Uuid::now_v7().to_string(), Actor::system("auto-close"));
        let mut closed = 0;
        for ticket_id in due {
            match self
                .store
                .execute::<Ticket>(
                    &ticket_id.to_string(),
                    TicketCommand::CloseStale { at: now },
                    &meta,
                )
                .await
            {
                Ok(events) if !events.is_empty() => {
                    closed += 1;
                    tracing::info!(%ticket_id, "resolved ticket closed after 7 quiet days");
                }
                Ok(_)
                | Err(CommandError::Rejected(
                    TicketError::NotResolved | TicketError::NotStale { .. } | TicketError::Closed,
                )) => {}
                Err(CommandError::Rejected(e)) => {
                    tracing::warn!(%ticket_id, error = %e, "could not close a stale ticket")
                }
                Err(CommandError::Store(e)) => return Err(e),
            }
        }
        Ok(closed)
    }

    /// The ticket an escalation belongs to, from the read model.
    pub async fn ticket_of_escalation(
        &self,
        escalation_id: Uuid,
    ) -> Result<Option<Uuid>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT ticket_id FROM crm_escalations WHERE escalation_id = $1")
                .bind(escalation_id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// The ticket an approval belongs to, from the read model.
    pub async fn ticket_of_approval(&self, approval_id: Uuid) -> Result<Option<Uuid>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT ticket_id FROM crm_approvals WHERE approval_id = $1")
                .bind(approval_id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }
}

/// Runs [`Staff::close_stale`] every `every` until `shutdown`.
pub async fn run_auto_close(staff: Staff, every: Duration, shutdown: CancellationToken) {
    loop {
        if let Err(e) = staff.close_stale(Utc::now()).await {
            tracing::warn!(error = %e, "auto-close pass failed");
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use casebook_domain::{Category, Channel, Priority};
    use chrono::TimeDelta;
    use cqrs_es::Aggregate;

    fn whatsapp_ticket(last_message: DateTime<Utc>) -> Ticket {
        let mut t = Ticket::default();
        t.apply(TicketEvent::TicketOpened {
            ticket_id: Uuid::nil(),
            customer_id: Uuid::nil(),
            channel: Channel::Whatsapp,
            subject: None,
            category: Category::General,
            priority: Priority::Medium,
            opened_at: last_message,
            first_response_due: last_message,
            resolution_due: last_message,
            previous_ticket_id: None,
        });
        t.apply(TicketEvent::CustomerMessageReceived {
            message_id: Uuid::nil(),
            customer_id: Uuid::nil(),
            channel: Channel::Whatsapp,
            channel_message_id: "SM1".into(),
            body: "hi".into(),
            attachments: 0,
            thread: None,
            automated: None,
            received_at: last_message,
        });
        t
    }

    #[test]
    fn a_late_whatsapp_reply_needs_the_configured_template() {
        let t0 = Utc::now();
        let ticket = whatsapp_ticket(t0);
        assert_eq!(reply_template(&ticket, t0, None), Ok(None));
        let late = t0 + TimeDelta::hours(25);
        assert_eq!(
            reply_template(&ticket, late, Some("HX1")),
            Ok(Some("HX1".into()))
        );
        let refused = reply_template(&ticket, late, None).unwrap_err();
        assert_eq!(refused, TicketError::WhatsappWindowClosed);
        assert!(refused.to_string().contains("TWILIO_FOLLOWUP_CONTENT_SID"));
        assert!(reply_template(&ticket, late, Some(" ")).is_err());
    }
}
