//! Human decisions on drafts the agent was not sure enough of, when the
//! caller knows the ticket: approve (optionally edited), which sends the
//! reply, or reject, which never does. The staff service
//! ([`crate::staff::Staff`]) does the work; this is its ticket-addressed
//! form, kept for callers that hold the ticket id.

use casebook_domain::TicketError;
use uuid::Uuid;

use crate::staff::Staff;
use crate::store::{CommandError, EventStore};

#[derive(Clone)]
pub struct Approvals {
    staff: Staff,
}

impl Approvals {
    pub fn new(store: EventStore, signature: impl Into<String>) -> Self {
        Self {
            staff: Staff::new(store, signature),
        }
    }

    /// An approved draft that is the ticket's first reply carries the
    /// status link under `public_url` (`casebook_domain::status_link`).
    pub fn with_public_url(mut self, public_url: impl Into<String>) -> Self {
        self.staff = self.staff.with_public_url(public_url);
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
        let acted = self
            .staff
            .approve_on(
                ticket_id,
                approval_id,
                edited_body.as_deref(),
                agent,
                correlation_id,
            )
            .await?;
        Ok(acted.response_id.expect("an approval sends a reply"))
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
        self.staff
            .reject_on(ticket_id, approval_id, reason, agent, correlation_id)
            .await
            .map(|_| ())
    }
}
