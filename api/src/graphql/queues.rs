//! The escalation and approval queues.

use async_graphql::{Context, Object, ID};
use casebook_projections::staff::{self, ApprovalRow, EscalationRow};
use chrono::{DateTime, Utc};

use super::context::{db, internal, require_staff};
use super::loaders::loaders;
use super::tickets::Ticket;
use super::types::{ApprovalStatus, EscalationStatus};

/// The longest queue a query returns.
const QUEUE_MAX: i64 = 500;

/// A hand-off to a person.
#[derive(Clone, Debug)]
pub struct Escalation(pub EscalationRow);

#[Object]
impl Escalation {
    async fn id(&self) -> ID {
        ID(self.0.escalation_id.to_string())
    }

    /// Why: `human_requested`, `legal`, `pricing_inquiry`, `knowledge_gap`…
    async fn reason(&self) -> &str {
        &self.0.reason
    }

    async fn note(&self) -> Option<&str> {
        self.0.note.as_deref()
    }

    async fn status(&self) -> EscalationStatus {
        if self.0.status == "resolved" {
            EscalationStatus::Resolved
        } else {
            EscalationStatus::Open
        }
    }

    /// The staff member it is assigned to (its ticket's assignee).
    async fn assigned_to(&self) -> Option<ID> {
        self.0.assigned_to.clone().map(ID)
    }

    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }

    async fn resolved_at(&self) -> Option<DateTime<Utc>> {
        self.0.resolved_at
    }

    async fn ticket(&self, ctx: &Context<'_>) -> async_graphql::Result<Option<Ticket>> {
        let loaders = loaders(ctx)?;
        Ok(loaders
            .tickets
            .load_one(self.0.ticket_id)
            .await
            .map_err(internal)?
            .map(Ticket::from))
    }
}

/// A draft the AI was not sure enough of, held for a person.
#[derive(Clone, Debug)]
pub struct Approval(pub ApprovalRow);

#[Object]
impl Approval {
    async fn id(&self) -> ID {
        ID(self.0.approval_id.to_string())
    }

    async fn status(&self) -> ApprovalStatus {
        ApprovalStatus::from_db(&self.0.status).unwrap_or(ApprovalStatus::Pending)
    }

    /// The AI's draft, as it would be sent.
    async fn draft_body(&self) -> &str {
        &self.0.draft_body
    }

    /// The text a person approved instead of the draft.
    async fn edited_body(&self) -> Option<&str> {
        self.0.edited_body.as_deref()
    }

    async fn confidence(&self) -> f64 {
        self.0.confidence
    }

    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }

    async fn decided_at(&self) -> Option<DateTime<Utc>> {
        self.0.decided_at
    }

    async fn decided_by(&self) -> Option<ID> {
        self.0.decided_by.clone().map(ID)
    }

    /// Why it was rejected.
    async fn reason(&self) -> Option<&str> {
        self.0.reason.as_deref()
    }

    async fn ticket(&self, ctx: &Context<'_>) -> async_graphql::Result<Option<Ticket>> {
        let loaders = loaders(ctx)?;
        Ok(loaders
            .tickets
            .load_one(self.0.ticket_id)
            .await
            .map_err(internal)?
            .map(Ticket::from))
    }
}

#[derive(Default)]
pub struct QueueQuery;

#[Object]
impl QueueQuery {
    /// Escalations, longest waiting first.
    async fn escalations(
        &self,
        ctx: &Context<'_>,
        status: Option<EscalationStatus>,
        assigned_to: Option<ID>,
    ) -> async_graphql::Result<Vec<Escalation>> {
        require_staff(ctx, "read the escalation queue")?;
        let db = db(ctx)?;
        let mut tx = db.begin().await.map_err(internal)?;
        let rows = staff::escalations(
            &mut tx,
            status.map(EscalationStatus::as_db),
            assigned_to.as_ref().map(|a| a.as_str()),
            QUEUE_MAX,
        )
        .await
        .map_err(internal)?;
        tx.commit().await.map_err(internal)?;
        Ok(rows.into_iter().map(Escalation).collect())
    }

    /// Drafts held for approval, longest waiting first.
    async fn approvals(
        &self,
        ctx: &Context<'_>,
        status: Option<ApprovalStatus>,
    ) -> async_graphql::Result<Vec<Approval>> {
        require_staff(ctx, "read the approval queue")?;
        let db = db(ctx)?;
        let mut tx = db.begin().await.map_err(internal)?;
        let rows = staff::approvals(&mut tx, status.map(ApprovalStatus::as_db), QUEUE_MAX)
            .await
            .map_err(internal)?;
        tx.commit().await.map_err(internal)?;
        Ok(rows.into_iter().map(Approval).collect())
    }
}
