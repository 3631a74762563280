//! Human decisions on drafts the agent was not sure enough of: approve
//! (optionally edited), which sends the reply, or reject, which never does.

use casebook_domain::formatting::{format_reply, ReplyContext};
use casebook_domain::status_link;
use casebook_domain::{
    Actor, ActorKind, Customer, EventMetadata, Ticket, TicketCommand, TicketError,
};
use chrono::Utc;
use uuid::Uuid;

use crate::store::{CommandError, EventStore, StoreError, CONFLICT_BACKOFF};

#[derive(Clone)]
pub struct Approvals {
    store: EventStore,
    signature: String,
    /// `CASEBOOK_PUBLIC_URL`: the first reply links to the status page.
    public_url: Option<String>,
}

impl Approvals {
    pub fn new(store: EventStore, signature: impl Into<String>) -> Self {
        Self {
            store,
            signature: signature.into(),
            public_url: None,
        }
    }

    /// An approved draft that is the ticket's first reply carries the
    /// status link under `public_url` (`casebook_domain::status_link`).
    pub fn with_public_url(mut self, public_url: impl Into<String>) -> Self {
        self.public_url = Some(public_url.into());
        self
    }

    /// Approves a pending draft and sends it (or the agent's edit of it),
    /// formatted for the ticket's channel. Returns the reply's id.
    pub async fn approve(
        &self,
        ticket_id: Uuid,
        approval_id: Uuid,
        agent: &str,
        edited_body: Option<String>,
        correlation_id: &str,
    ) -> Result<Uuid, CommandError<TicketError>> {
        let meta = EventMetadata::new(correlation_id, Actor::new(ActorKind::Agent, agent));
        let key = ticket_id.to_string();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut uow = self.store.unit_of_work(meta.clone());
            let ticket = uow.load::<Ticket>(&key).await?;
            let (Some(channel), Some(customer_id)) = (ticket.channel, ticket.customer_id) else {
                return Err(CommandError::Rejected(TicketError::NotFound));
            };
            let approval =
                ticket
                    .approvals
                    .get(&approval_id)
                    .cloned()
                    .ok_or(CommandError::Rejected(TicketError::UnknownApproval(
                        approval_id,
                    )))?;
            let link = self
                .public_url
                .as_deref()
                .filter(|_| status_link::is_first_reply(ticket))
                .map(|url| status_link::status_link(url, ticket_id));
            let customer = self
                .store
                .load::<Customer>(&customer_id.to_string())
                .await?
                .aggregate;
            let at = Utc::now();
            uow.execute::<Ticket>(
                &key,
                TicketCommand::ApproveResponse {
                    approval_id,
                    approved_by: agent.to_string(),
                    edited_body: edited_body.clone(),
                    at,
                },
            )
            .await?;
            let text = edited_body.clone().unwrap_or(approval.body);
            let reply = format_reply(
                channel,
                &text,
                &ReplyContext::new(customer.name, ticket_id, &self.signature)
                    .with_status_link(link.clone()),
            );
            let response_id = Uuid::now_v7();
            uow.execute::<Ticket>(
                &key,
                TicketCommand::SendResponse {
                    response_id,
                    draft_id: Some(approval.draft_id),
                    channel,
                    body: reply.body,
                    parts: reply.parts,
                    // The draft names the message it answers; a person
                    // approved it, so it is not an automatic reply.
                    in_reply_to: None,
                    automatic: None,
                    at,
                },
            )
            .await?;
            match uow.commit().await {
                Ok(_) => return Ok(response_id),
                Err(StoreError::Conflict) if CONFLICT_BACKOFF.should_retry(attempt) => {
                    crate::retry::sleep_backoff(&CONFLICT_BACKOFF, attempt).await
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Rejects a pending draft: it is never sent.
    pub async fn reject(
        &self,
        ticket_id: Uuid,
        approval_id: Uuid,
        agent: &str,
        reason: &str,
        correlation_id: &str,
    ) -> Result<(), CommandError<TicketError>> {
        let meta = EventMetadata::new(correlation_id, Actor::new(ActorKind::Agent, agent));
        self.store
            .execute::<Ticket>(
                &ticket_id.to_string(),
                TicketCommand::RejectResponse {
                    approval_id,
                    rejected_by: agent.to_string(),
                    reason: reason.to_string(),
                    at: Utc::now(),
                },
                &meta,
            )
            .await
            .map(|_| ())
    }
}
