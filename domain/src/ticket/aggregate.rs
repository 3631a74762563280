use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{
    AutoReplyLimit, DeliveryStatus, EscalationReason, HoldingReply, TicketCommand, TicketError,
    TicketEvent, WithholdReason,
};
use crate::sla::{SlaDeadlines, SlaKind};
use crate::{Category, Channel, Priority, TicketStatus};

/// The most knowledge-base searches the agent may run for one customer
/// message before it must escalate with `knowledge_gap`.
pub const MAX_SEARCHES_PER_MESSAGE: u32 = 2;

/// The rolling window automatic replies are counted over.
pub const AUTO_REPLY_WINDOW: TimeDelta = TimeDelta::hours(1);

/// The highest automatic-reply limit a ticket can enforce: it remembers the
/// times of this many automatic replies, no more.
pub const MAX_AUTO_REPLIES_PER_HOUR: u32 = 50;

/// WhatsApp's customer service window: a free-form reply is allowed only
/// this long after the customer's last message; later, only an approved
/// template.
pub const WHATSAPP_WINDOW: TimeDelta = TimeDelta::hours(24);

/// A ticket resolved this long without the customer writing again is
/// closed by the periodic job.
pub const AUTO_CLOSE_AFTER: TimeDelta = TimeDelta::days(7);

/// Who answers the ticket's customer messages.
///
/// `Ai` until the ticket is escalated or assigned to a person; then
/// `Human`, and the AI stays silent (the agent worker may only queue a
/// message for the person, with at most one holding reply per hand-off)
/// until a person hands it back (`HandBackToAi`) or resolves it. Resolving
/// a ticket nobody is assigned to gives it back to the AI; resolving an
/// assigned ticket keeps it with its assignee, so a customer who writes
/// again reopens it into the same person's queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Handler {
    #[default]
    Ai,
    Human,
}

impl Handler {
    pub fn as_str(self) -> &'static str {
        match self {
            Handler::Ai => "ai",
            Handler::Human => "human",
        }
    }
}

/// The longest reason intake may give for a machine-written message.
pub const MAX_AUTOMATED_REASON_LEN: usize = 64;

fn valid_automated_reason(reason: &str) -> bool {
    (1..=MAX_AUTOMATED_REASON_LEN).contains(&reason.len())
        && reason
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Draft {
    pub body: String,
    pub confidence: f64,
    pub approval: Option<Uuid>,
    /// The customer message it answers.
    #[serde(default)]
    pub in_reply_to: Option<Uuid>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApprovalState {
    Pending,
    Approved,
    Rejected,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Approval {
    pub draft_id: Uuid,
    pub state: ApprovalState,
    /// The text to send once approved: the draft, or the agent's edit.
    pub body: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub channel: Channel,
    pub delivery: Option<DeliveryStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Escalation {
    pub reason: EscalationReason,
    pub open: bool,
}

/// One customer message's own workflow: its knowledge searches and what
/// became of it. Each message has its own, so a second message that
/// arrives before the first is answered neither shares nor uses up the
/// first one's budget.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MessageWork {
    /// Why a machine wrote it, if one did.
    pub automated: Option<String>,
    pub searches: u32,
    pub draft: Option<Uuid>,
    pub escalation: Option<Uuid>,
    /// Replies sent that answer it.
    pub replies: u32,
    pub withheld: Option<WithholdReason>,
}

/// The ticket's state, rebuilt from its events.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Ticket {
    pub id: Option<Uuid>,
    pub customer_id: Option<Uuid>,
    pub channel: Option<Channel>,
    pub subject: Option<String>,
    pub category: Category,
    pub priority: Priority,
    pub status: TicketStatus,
    pub opened_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    pub first_response_at: Option<DateTime<Utc>>,
    pub deadlines: Option<SlaDeadlines>,
    pub assigned_to: Option<String>,
    pub channel_message_ids: BTreeSet<String>,
    pub messages_count: u32,
    pub last_message_id: Option<Uuid>,
    /// Every customer message's workflow, by message id.
    pub messages: BTreeMap<Uuid, MessageWork>,
    /// When the latest automatic replies were sent (oldest first, at most
    /// `MAX_AUTO_REPLIES_PER_HOUR`).
    pub automatic_replies: Vec<DateTime<Utc>>,
    pub drafts: BTreeMap<Uuid, Draft>,
    pub approvals: BTreeMap<Uuid, Approval>,
    pub responses: BTreeMap<Uuid, Response>,
    pub escalations: BTreeMap<Uuid, Escalation>,
    pub sla_breaches: BTreeSet<String>,
    pub feedback: Option<bool>,
    /// Customer messages that were drafted an answer to, escalated,
    /// replied to or deliberately left unanswered: the agent never takes
    /// them up again.
    pub handled_messages: BTreeSet<Uuid>,
    /// The email conversation replies join (Gmail thread), if any.
    pub email_thread: Option<super::EmailThread>,
    /// Who answers customer messages: the AI or a person.
    pub handler: Handler,
    /// Whether the current hand-off to a person already sent its holding
    /// reply (or a person replied): at most one per hand-off.
    pub hand_off_acknowledged: bool,
    /// When the customer last wrote (WhatsApp's 24-hour window).
    pub last_customer_message_at: Option<DateTime<Utc>>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub closed_at: Option<DateTime<Utc>>,
    /// The closed ticket this one follows on from.
    pub previous_ticket_id: Option<Uuid>,
}

impl Ticket {
    pub fn exists(&self) -> bool {
        self.id.is_some()
    }

    /// The deadline that matters next (first response, then resolution).
    pub fn sla_due_at(&self) -> Option<DateTime<Utc>> {
        self.deadlines.map(|d| d.next_due(self.first_response_at))
    }

    /// Whether a person holds the ticket: the AI must stay silent.
    pub fn with_human(&self) -> bool {
        self.handler == Handler::Human
    }

    /// Whether a free-form reply at `at` is allowed by the channel: always,
    /// except on WhatsApp more than [`WHATSAPP_WINDOW`] after the
    /// customer's last message.
    pub fn free_form_allowed(&self, at: DateTime<Utc>) -> bool {
        self.channel != Some(Channel::Whatsapp)
            || self
                .last_customer_message_at
                .is_none_or(|last| at - last <= WHATSAPP_WINDOW)
    }

    /// Whether the periodic job may close the ticket at `at`.
    pub fn is_stale(&self, at: DateTime<Utc>) -> bool {
        self.status == TicketStatus::Resolved
            && self
                .resolved_at
                .is_some_and(|resolved| at - resolved >= AUTO_CLOSE_AFTER)
    }

    pub fn is_handled(&self, message_id: Uuid) -> bool {
        self.handled_messages.contains(&message_id)
    }

    pub fn open_escalations(&self) -> impl Iterator<Item = (&Uuid, &Escalation)> {
        self.escalations.iter().filter(|(_, e)| e.open)
    }

    /// Automatic replies sent in the hour up to `at`.
    pub fn automatic_replies_within_hour(&self, at: DateTime<Utc>) -> u32 {
        let since = at - AUTO_REPLY_WINDOW;
        self.automatic_replies
            .iter()
            .filter(|t| **t > since)
            .count() as u32
    }

    /// Whether one more automatic reply at `at` stays within `limit`.
    pub fn may_reply_automatically(&self, at: DateTime<Utc>, limit: AutoReplyLimit) -> bool {
        self.automatic_replies_within_hour(at) < limit.per_hour.min(MAX_AUTO_REPLIES_PER_HOUR)
    }

    /// The deadline of `kind` whose breach is still to be recorded: none
    /// once it was recorded, met (a first response), or the ticket is
    /// resolved or closed.
    pub fn unrecorded_sla_due(&self, kind: SlaKind) -> Option<DateTime<Utc>> {
        let deadlines = self.deadlines?;
        if matches!(self.status, TicketStatus::Resolved | TicketStatus::Closed)
            || self.sla_breaches.contains(kind.as_str())
        {
            return None;
        }
        match kind {
            SlaKind::FirstResponse => self
                .first_response_at
                .is_none()
                .then_some(deadlines.first_response_due),
            SlaKind::Resolution => Some(deadlines.resolution_due),
        }
    }

    /// The customer message a step is for: the one named, which must be on
    /// this ticket, else the latest.
    fn message_for(&self, named: Option<Uuid>) -> Result<Option<Uuid>, TicketError> {
        match named {
            Some(m) if !self.messages.contains_key(&m) => Err(TicketError::UnknownMessage(m)),
            Some(m) => Ok(Some(m)),
            None => Ok(self.last_message_id),
        }
    }

    pub fn decide(&self, command: TicketCommand) -> Result<Vec<TicketEvent>, TicketError> {
        use TicketCommand as C;
        use TicketEvent as E;

        if let C::Open {
            ticket_id,
            customer_id,
            channel,
            subject,
            category,
            priority,
            previous_ticket_id,
            at,
        } = command
        {
            if self.exists() {
                return Err(TicketError::AlreadyOpened);
            }
            let deadlines = SlaDeadlines::for_ticket(channel, at);
            return Ok(vec![E::TicketOpened {
                ticket_id,
                customer_id,
                channel,
                subject,
                category,
                priority,
                opened_at: at,
                first_response_due: deadlines.first_response_due,
                resolution_due: deadlines.resolution_due,
                previous_ticket_id,
            }]);
        }
        if !self.exists() {
            return Err(TicketError::NotFound);
        }
        let closed = self.status == TicketStatus::Closed;
        // Commands that still make sense on a closed ticket.
        let allowed_when_closed = matches!(
            command,
            C::RecordDeliveryStatus { .. } | C::RecordFeedback { .. } | C::Close { .. }
        );
        if closed && !allowed_when_closed {
            return Err(TicketError::Closed);
        }

        match command {
            C::Open { .. } => unreachable!("handled above"),
            C::ReceiveCustomerMessage {
                message_id,
                customer_id,
                channel,
                channel_message_id,
                body,
                attachments,
                thread,
                automated,
                at,
            } => {
                if automated
                    .as_deref()
                    .is_some_and(|r| !valid_automated_reason(r))
                {
                    return Err(TicketError::InvalidAutomatedReason {
                        max: MAX_AUTOMATED_REASON_LEN,
                    });
                }
                if self.channel_message_ids.contains(&channel_message_id) {
                    return Err(TicketError::DuplicateMessage { channel_message_id });
                }
                if body.trim().is_empty() && attachments == 0 {
                    return Err(TicketError::EmptyMessage);
                }
                let mut events = Vec::with_capacity(2);
                if self.status == TicketStatus::Resolved {
                    events.push(E::TicketReopened {
                        reopened_by: format!("customer:{customer_id}"),
                        reason: Some("customer wrote again".into()),
                        reopened_at: at,
                    });
                }
                events.push(E::CustomerMessageReceived {
                    message_id,
                    customer_id,
                    channel,
                    channel_message_id,
                    body,
                    attachments,
                    thread,
                    automated,
                    received_at: at,
                });
                Ok(events)
            }
            C::RecordHistoryReview {
                previous_tickets,
                previous_messages,
                channels,
                at,
            } => Ok(vec![E::CustomerHistoryReviewed {
                previous_tickets,
                previous_messages,
                channels,
                reviewed_at: at,
            }]),
            C::RecordKnowledgeSearch {
                in_reply_to,
                query,
                hits,
                at,
            } => {
                let message = self.message_for(in_reply_to)?;
                if let Some(m) = message.filter(|m| self.is_handled(*m)) {
                    return Err(TicketError::AlreadyHandled(m));
                }
                let searches = message
                    .and_then(|m| self.messages.get(&m))
                    .map_or(0, |w| w.searches);
                if searches >= MAX_SEARCHES_PER_MESSAGE {
                    return Err(TicketError::TooManySearches { attempts: searches });
                }
                Ok(vec![E::KnowledgeSearched {
                    in_reply_to: message,
                    query,
                    attempt: searches + 1,
                    hits,
                    searched_at: at,
                }])
            }
            C::DraftResponse {
                draft_id,
                in_reply_to,
                body,
                confidence,
                sources,
                generated_by,
                at,
            } => {
                if let Some(m) = in_reply_to {
                    if !self.messages.contains_key(&m) {
                        return Err(TicketError::UnknownMessage(m));
                    }
                    if self.is_handled(m) {
                        return Err(TicketError::AlreadyHandled(m));
                    }
                }
                // The AI drafts only while it handles the ticket.
                if self.with_human() {
                    return Err(TicketError::WithHuman);
                }
                if self.drafts.contains_key(&draft_id) {
                    return Err(TicketError::DuplicateDraft(draft_id));
                }
                if body.trim().is_empty() {
                    return Err(TicketError::EmptyResponse);
                }
                if !(0.0..=1.0).contains(&confidence) {
                    return Err(TicketError::InvalidConfidence);
                }
                Ok(vec![E::ResponseDrafted {
                    draft_id,
                    in_reply_to,
                    body,
                    confidence,
                    sources,
                    generated_by,
                    drafted_at: at,
                }])
            }
            C::RequestApproval {
                approval_id,
                draft_id,
                reasons,
                at,
            } => {
                let draft = self
                    .drafts
                    .get(&draft_id)
                    .ok_or(TicketError::UnknownDraft(draft_id))?;
                if draft.approval.is_some() {
                    return Err(TicketError::ApprovalAlreadyRequested(draft_id));
                }
                Ok(vec![E::ApprovalRequested {
                    approval_id,
                    draft_id,
                    reasons,
                    requested_at: at,
                }])
            }
            C::ApproveResponse {
                approval_id,
                approved_by,
                edited_body,
                at,
            } => {
                let approval = self.pending_approval(approval_id)?;
                if edited_body.as_deref().is_some_and(|b| b.trim().is_empty()) {
                    return Err(TicketError::EmptyResponse);
                }
                Ok(vec![E::ResponseApproved {
                    approval_id,
                    draft_id: approval.draft_id,
                    approved_by,
                    edited_body,
                    approved_at: at,
                }])
            }
            C::RejectResponse {
                approval_id,
                rejected_by,
                reason,
                at,
            } => {
                let approval = self.pending_approval(approval_id)?;
                if reason.trim().is_empty() {
                    return Err(TicketError::EmptyReason);
                }
                Ok(vec![E::ResponseRejected {
                    approval_id,
                    draft_id: approval.draft_id,
                    rejected_by,
                    reason,
                    rejected_at: at,
                }])
            }
            C::SendResponse {
                response_id,
                draft_id,
                channel,
                body,
                parts,
                in_reply_to,
                automatic,
                holding,
                template,
                at,
            } => {
                if self.responses.contains_key(&response_id) {
                    return Err(TicketError::DuplicateResponse(response_id));
                }
                if body.trim().is_empty() {
                    return Err(TicketError::EmptyResponse);
                }
                if template.as_deref().is_some_and(|t| t.trim().is_empty()) {
                    return Err(TicketError::EmptyTemplate);
                }
                if holding {
                    // A holding reply says a person will answer: only
                    // while one holds the ticket, once per hand-off.
                    if !self.with_human() {
                        return Err(TicketError::NotWithHuman);
                    }
                    if self.hand_off_acknowledged {
                        return Ok(vec![]);
                    }
                } else if automatic.is_some() && self.with_human() {
                    // An AI answer on a ticket a person holds.
                    return Err(TicketError::WithHuman);
                }
                if template.is_none() && !self.free_form_allowed(at) {
                    return Err(TicketError::WhatsappWindowClosed);
                }
                let mut answers = self.message_for(in_reply_to)?;
                if let Some(draft_id) = draft_id {
                    let draft = self
                        .drafts
                        .get(&draft_id)
                        .ok_or(TicketError::UnknownDraft(draft_id))?;
                    answers = draft.in_reply_to.or(answers);
                    if let Some(approval_id) = draft.approval {
                        match self.approvals.get(&approval_id).map(|a| a.state) {
                            Some(ApprovalState::Approved) => {}
                            Some(ApprovalState::Rejected) => {
                                return Err(TicketError::DraftRejected(draft_id))
                            }
                            _ => return Err(TicketError::ApprovalRequired(draft_id)),
                        }
                    }
                }
                if let Some(limit) = automatic {
                    if !self.may_reply_automatically(at, limit) {
                        return Err(TicketError::AutoReplyLimitReached {
                            sent: self.automatic_replies_within_hour(at),
                            limit: limit.per_hour,
                        });
                    }
                }
                Ok(vec![E::ResponseSent {
                    response_id,
                    draft_id,
                    channel,
                    body,
                    parts,
                    in_reply_to: answers,
                    automatic: automatic.is_some(),
                    holding,
                    template,
                    sent_at: at,
                }])
            }
            C::RecordDeliveryStatus {
                response_id,
                status,
                provider_message_id,
                error,
                at,
            } => {
                let response = self
                    .responses
                    .get(&response_id)
                    .ok_or(TicketError::UnknownResponse(response_id))?;
                let advances = match response.delivery {
                    None => true,
                    Some(current) => current.advances_to(status),
                };
                if !advances {
                    return Ok(vec![]);
                }
                Ok(vec![E::DeliveryStatusChanged {
                    response_id,
                    status,
                    provider_message_id,
                    error,
                    changed_at: at,
                }])
            }
            C::Escalate {
                escalation_id,
                in_reply_to,
                reason,
                note,
                at,
            } => {
                if let Some(m) = in_reply_to {
                    if !self.messages.contains_key(&m) {
                        return Err(TicketError::UnknownMessage(m));
                    }
                    if self.is_handled(m) {
                        return Err(TicketError::AlreadyHandled(m));
                    }
                }
                if self.escalations.contains_key(&escalation_id) {
                    return Err(TicketError::DuplicateEscalation(escalation_id));
                }
                if self.open_escalations().any(|(_, e)| e.reason == reason) {
                    // Already with a human for this reason.
                    return Ok(vec![]);
                }
                Ok(vec![E::TicketEscalated {
                    escalation_id,
                    in_reply_to,
                    reason,
                    note,
                    escalated_at: at,
                }])
            }
            C::WithholdReply {
                in_reply_to,
                reason,
                escalation_id,
                at,
            } => {
                let work = self
                    .messages
                    .get(&in_reply_to)
                    .ok_or(TicketError::UnknownMessage(in_reply_to))?;
                if self.is_handled(in_reply_to) {
                    return Err(TicketError::AlreadyHandled(in_reply_to));
                }
                if self.escalations.contains_key(&escalation_id) {
                    return Err(TicketError::DuplicateEscalation(escalation_id));
                }
                let mut events = vec![E::AutoReplyWithheld {
                    in_reply_to,
                    reason,
                    withheld_at: at,
                }];
                // Staff hear of it once: not while they hold the ticket.
                if self.open_escalations().next().is_none() {
                    let note = match reason {
                        WithholdReason::AutomatedMessage => format!(
                            "automated message ({}); nothing was sent back",
                            work.automated.as_deref().unwrap_or("unspecified")
                        ),
                        WithholdReason::AutoReplyLimit => format!(
                            "{} automatic replies in the last hour; the agent stays silent",
                            self.automatic_replies_within_hour(at)
                        ),
                    };
                    events.push(E::TicketEscalated {
                        escalation_id,
                        in_reply_to: Some(in_reply_to),
                        reason: reason.escalation_reason(),
                        note: Some(note),
                        escalated_at: at,
                    });
                }
                Ok(events)
            }
            C::ResolveEscalation {
                escalation_id,
                resolved_by,
                note,
                at,
            } => {
                let escalation = self
                    .escalations
                    .get(&escalation_id)
                    .ok_or(TicketError::UnknownEscalation(escalation_id))?;
                if !escalation.open {
                    return Err(TicketError::EscalationAlreadyResolved(escalation_id));
                }
                Ok(vec![E::EscalationResolved {
                    escalation_id,
                    resolved_by,
                    note,
                    resolved_at: at,
                }])
            }
            C::Assign {
                agent_id,
                assigned_by,
                at,
            } => {
                if agent_id.trim().is_empty() {
                    return Err(TicketError::EmptyAgent);
                }
                if self.assigned_to.as_deref() == Some(agent_id.as_str()) {
                    return Ok(vec![]);
                }
                Ok(vec![E::TicketAssigned {
                    agent_id,
                    assigned_by,
                    assigned_at: at,
                }])
            }
            C::Unassign { unassigned_by, at } => {
                let previous_assignee = self.assigned_to.clone().ok_or(TicketError::NotAssigned)?;
                Ok(vec![E::TicketUnassigned {
                    previous_assignee,
                    unassigned_by,
                    unassigned_at: at,
                }])
            }
            C::HandBackToAi { handed_back_by, at } => {
                if !self.with_human() {
                    return Err(TicketError::NotWithHuman);
                }
                let mut events: Vec<TicketEvent> = self
                    .open_escalations()
                    .map(|(id, _)| E::EscalationResolved {
                        escalation_id: *id,
                        resolved_by: handed_back_by.clone(),
                        note: Some("handed back to the AI".into()),
                        resolved_at: at,
                    })
                    .collect();
                events.push(E::TicketHandedBackToAi {
                    handed_back_by,
                    previous_assignee: self.assigned_to.clone(),
                    handed_back_at: at,
                });
                Ok(events)
            }
            C::QueueForHuman {
                in_reply_to,
                acknowledgement,
                limit,
                at,
            } => {
                if !self.messages.contains_key(&in_reply_to) {
                    return Err(TicketError::UnknownMessage(in_reply_to));
                }
                if self.is_handled(in_reply_to) {
                    return Err(TicketError::AlreadyHandled(in_reply_to));
                }
                if !self.with_human() {
                    return Err(TicketError::NotWithHuman);
                }
                let mut events = vec![E::CustomerMessageQueuedForHuman {
                    in_reply_to,
                    assignee: self.assigned_to.clone(),
                    queued_at: at,
                }];
                let acknowledge = !self.hand_off_acknowledged
                    && self.may_reply_automatically(at, limit)
                    && self.free_form_allowed(at);
                if let Some(HoldingReply {
                    response_id,
                    body,
                    parts,
                }) = acknowledgement.filter(|_| acknowledge)
                {
                    if self.responses.contains_key(&response_id) {
                        return Err(TicketError::DuplicateResponse(response_id));
                    }
                    if body.trim().is_empty() {
                        return Err(TicketError::EmptyResponse);
                    }
                    events.push(E::ResponseSent {
                        response_id,
                        draft_id: None,
                        channel: self.channel.expect("an opened ticket has a channel"),
                        body,
                        parts,
                        in_reply_to: Some(in_reply_to),
                        automatic: true,
                        holding: true,
                        template: None,
                        sent_at: at,
                    });
                }
                Ok(events)
            }
            C::Resolve {
                resolved_by,
                resolution,
                at,
            } => {
                if self.status == TicketStatus::Resolved {
                    return Err(TicketError::AlreadyResolved);
                }
                // Resolving the ticket settles whatever was escalated on it.
                let mut events: Vec<TicketEvent> = self
                    .open_escalations()
                    .map(|(id, _)| E::EscalationResolved {
                        escalation_id: *id,
                        resolved_by: resolved_by.clone(),
                        note: Some("ticket resolved".into()),
                        resolved_at: at,
                    })
                    .collect();
                events.push(E::TicketResolved {
                    resolved_by,
                    resolution,
                    resolved_at: at,
                });
                Ok(events)
            }
            C::Reopen {
                reopened_by,
                reason,
                at,
            } => {
                if self.status != TicketStatus::Resolved {
                    return Err(TicketError::NotResolved);
                }
                Ok(vec![E::TicketReopened {
                    reopened_by,
                    reason,
                    reopened_at: at,
                }])
            }
            C::Close { closed_by, at } => {
                if closed {
                    return Err(TicketError::Closed);
                }
                Ok(vec![E::TicketClosed {
                    closed_by,
                    closed_at: at,
                }])
            }
            C::CloseStale { at } => {
                if self.status != TicketStatus::Resolved {
                    return Err(TicketError::NotResolved);
                }
                let resolved_at = self.resolved_at.unwrap_or(at);
                if !self.is_stale(at) {
                    return Err(TicketError::NotStale { resolved_at });
                }
                Ok(vec![E::TicketClosed {
                    closed_by: "system:auto-close".into(),
                    closed_at: at,
                }])
            }
            C::RecordFeedback {
                helpful,
                comment,
                at,
            } => {
                if self.responses.is_empty() {
                    return Err(TicketError::NoResponseYet);
                }
                if self.feedback.is_some() {
                    return Err(TicketError::FeedbackAlreadyRecorded);
                }
                Ok(vec![E::FeedbackReceived {
                    helpful,
                    comment,
                    received_at: at,
                }])
            }
            C::RecordModelUsage {
                in_reply_to,
                usage,
                configuration,
                at,
            } => {
                if !self.messages.contains_key(&in_reply_to) {
                    return Err(TicketError::UnknownMessage(in_reply_to));
                }
                let label_ok = |s: &str| {
                    !s.trim().is_empty() && s.chars().count() <= super::MAX_USAGE_LABEL_CHARS
                };
                let labels_ok = usage
                    .iter()
                    .all(|u| label_ok(&u.provider) && label_ok(&u.model))
                    && label_ok(&configuration.model)
                    && label_ok(&configuration.prompt_version)
                    && label_ok(&configuration.kb_version)
                    && configuration.experiment.as_deref().is_none_or(label_ok);
                if usage.len() > super::MAX_USAGE_ENTRIES || !labels_ok {
                    return Err(TicketError::InvalidModelUsage {
                        max_entries: super::MAX_USAGE_ENTRIES,
                        max_chars: super::MAX_USAGE_LABEL_CHARS,
                    });
                }
                Ok(vec![E::ModelUsageRecorded {
                    in_reply_to,
                    usage,
                    configuration,
                    recorded_at: at,
                }])
            }
            C::RecordSlaBreach { kind, at } => {
                let deadlines = self.deadlines.expect("an opened ticket has deadlines");
                if self.sla_breaches.contains(kind.as_str()) {
                    return Err(TicketError::SlaAlreadyBreached(kind.as_str()));
                }
                let due_at = match kind {
                    SlaKind::FirstResponse => {
                        if self.first_response_at.is_some() {
                            return Err(TicketError::SlaNotBreached(kind.as_str()));
                        }
                        deadlines.first_response_due
                    }
                    SlaKind::Resolution => {
                        if self.status == TicketStatus::Resolved {
                            return Err(TicketError::SlaNotBreached(kind.as_str()));
                        }
                        deadlines.resolution_due
                    }
                };
                if at <= due_at {
                    return Err(TicketError::SlaNotBreached(kind.as_str()));
                }
                Ok(vec![E::SlaBreached {
                    kind,
                    due_at,
                    breached_at: at,
                }])
            }
        }
    }

    fn pending_approval(&self, approval_id: Uuid) -> Result<&Approval, TicketError> {
        let approval = self
            .approvals
            .get(&approval_id)
            .ok_or(TicketError::UnknownApproval(approval_id))?;
        if approval.state != ApprovalState::Pending {
            return Err(TicketError::ApprovalAlreadyDecided(approval_id));
        }
        Ok(approval)
    }

    /// Moves to `status` unless a human already holds the ticket.
    fn progress(&mut self, status: TicketStatus) {
        if !matches!(
            self.status,
            TicketStatus::Escalated | TicketStatus::AwaitingApproval
        ) {
            self.status = status;
        }
    }

    pub fn apply_event(&mut self, event: TicketEvent) {
        use TicketEvent as E;
        self.updated_at = Some(event.at());
        match event {
            E::TicketOpened {
                ticket_id,
                customer_id,
                channel,
                subject,
                category,
                priority,
                opened_at,
                first_response_due,
                resolution_due,
                previous_ticket_id,
            } => {
                self.previous_ticket_id = previous_ticket_id;
                self.id = Some(ticket_id);
                self.customer_id = Some(customer_id);
                self.channel = Some(channel);
                self.subject = subject;
                self.category = category;
                self.priority = priority;
                self.status = TicketStatus::Received;
                self.opened_at = Some(opened_at);
                self.deadlines = Some(SlaDeadlines {
                    first_response_due,
                    resolution_due,
                });
            }
            E::CustomerMessageReceived {
                message_id,
                channel_message_id,
                thread,
                automated,
                received_at,
                ..
            } => {
                if thread.is_some() {
                    self.email_thread = thread;
                }
                self.last_customer_message_at = Some(received_at);
                self.channel_message_ids.insert(channel_message_id);
                self.messages_count += 1;
                self.last_message_id = Some(message_id);
                self.messages.insert(
                    message_id,
                    MessageWork {
                        automated,
                        ..MessageWork::default()
                    },
                );
                if matches!(
                    self.status,
                    TicketStatus::Responded | TicketStatus::InProgress
                ) {
                    self.status = TicketStatus::Received;
                }
            }
            E::CustomerHistoryReviewed { .. } => self.progress(TicketStatus::InProgress),
            E::KnowledgeSearched {
                in_reply_to,
                attempt,
                ..
            } => {
                // Events from before the message was named were for the
                // latest one.
                if let Some(m) = in_reply_to.or(self.last_message_id) {
                    self.messages.entry(m).or_default().searches = attempt;
                }
                self.progress(TicketStatus::InProgress);
            }
            E::ResponseDrafted {
                draft_id,
                in_reply_to,
                body,
                confidence,
                ..
            } => {
                if let Some(m) = in_reply_to {
                    self.handled_messages.insert(m);
                    self.messages.entry(m).or_default().draft = Some(draft_id);
                }
                self.drafts.insert(
                    draft_id,
                    Draft {
                        body,
                        confidence,
                        approval: None,
                        in_reply_to,
                    },
                );
                self.progress(TicketStatus::InProgress);
            }
            E::ApprovalRequested {
                approval_id,
                draft_id,
                ..
            } => {
                let body = match self.drafts.get_mut(&draft_id) {
                    Some(draft) => {
                        draft.approval = Some(approval_id);
                        draft.body.clone()
                    }
                    None => String::new(),
                };
                self.approvals.insert(
                    approval_id,
                    Approval {
                        draft_id,
                        state: ApprovalState::Pending,
                        body,
                    },
                );
                if self.status != TicketStatus::Escalated {
                    self.status = TicketStatus::AwaitingApproval;
                }
            }
            E::ResponseApproved {
                approval_id,
                edited_body,
                ..
            } => {
                if let Some(approval) = self.approvals.get_mut(&approval_id) {
                    approval.state = ApprovalState::Approved;
                    if let Some(body) = edited_body {
                        approval.body = body;
                    }
                }
                self.leave_approval();
            }
            E::ResponseRejected { approval_id, .. } => {
                if let Some(approval) = self.approvals.get_mut(&approval_id) {
                    approval.state = ApprovalState::Rejected;
                }
                self.leave_approval();
            }
            E::ResponseSent {
                response_id,
                channel,
                in_reply_to,
                automatic,
                holding,
                sent_at,
                ..
            } => {
                if holding || !automatic {
                    // The customer heard from (or of) a person.
                    self.hand_off_acknowledged = true;
                }
                if let Some(m) = in_reply_to {
                    self.handled_messages.insert(m);
                    self.messages.entry(m).or_default().replies += 1;
                }
                if automatic {
                    self.automatic_replies.push(sent_at);
                    let excess = self
                        .automatic_replies
                        .len()
                        .saturating_sub(MAX_AUTO_REPLIES_PER_HOUR as usize);
                    self.automatic_replies.drain(..excess);
                }
                self.responses.insert(
                    response_id,
                    Response {
                        channel,
                        delivery: None,
                    },
                );
                self.messages_count += 1;
                // A holding reply is not a response.
                if !holding {
                    self.first_response_at.get_or_insert(sent_at);
                }
                // A holding reply answers nothing: the customer still waits.
                if !holding
                    && !matches!(
                        self.status,
                        TicketStatus::Escalated | TicketStatus::AwaitingApproval
                    )
                {
                    self.status = TicketStatus::Responded;
                }
            }
            E::DeliveryStatusChanged {
                response_id,
                status,
                ..
            } => {
                if let Some(response) = self.responses.get_mut(&response_id) {
                    response.delivery = Some(status);
                }
            }
            E::TicketEscalated {
                escalation_id,
                in_reply_to,
                reason,
                ..
            } => {
                if let Some(m) = in_reply_to {
                    self.handled_messages.insert(m);
                    self.messages.entry(m).or_default().escalation = Some(escalation_id);
                }
                self.escalations
                    .insert(escalation_id, Escalation { reason, open: true });
                self.status = TicketStatus::Escalated;
                self.hand_to_human();
            }
            E::AutoReplyWithheld {
                in_reply_to,
                reason,
                ..
            } => {
                self.handled_messages.insert(in_reply_to);
                self.messages.entry(in_reply_to).or_default().withheld = Some(reason);
            }
            E::EscalationResolved { escalation_id, .. } => {
                if let Some(escalation) = self.escalations.get_mut(&escalation_id) {
                    escalation.open = false;
                }
                if self.status == TicketStatus::Escalated
                    && self.open_escalations().next().is_none()
                {
                    self.status = TicketStatus::InProgress;
                }
            }
            E::TicketAssigned { agent_id, .. } => {
                self.assigned_to = Some(agent_id);
                self.hand_to_human();
                if self.status == TicketStatus::Received {
                    self.status = TicketStatus::InProgress;
                }
            }
            E::TicketUnassigned { .. } => self.assigned_to = None,
            E::TicketHandedBackToAi { .. } => {
                self.assigned_to = None;
                self.handler = Handler::Ai;
                self.hand_off_acknowledged = false;
            }
            E::CustomerMessageQueuedForHuman { in_reply_to, .. } => {
                self.handled_messages.insert(in_reply_to);
            }
            E::TicketResolved { resolved_at, .. } => {
                self.status = TicketStatus::Resolved;
                self.resolved_at = Some(resolved_at);
                // Nobody holds it: the AI answers if the customer writes
                // again. An assignee keeps it.
                if self.assigned_to.is_none() {
                    self.handler = Handler::Ai;
                    self.hand_off_acknowledged = false;
                }
            }
            E::TicketReopened { .. } => {
                self.status = TicketStatus::Received;
                self.resolved_at = None;
                if self.assigned_to.is_some() {
                    // Back into the same person's queue: a new hand-off.
                    self.handler = Handler::Human;
                    self.hand_off_acknowledged = false;
                }
            }
            E::TicketClosed { closed_at, .. } => {
                self.status = TicketStatus::Closed;
                self.closed_at = Some(closed_at);
            }
            E::FeedbackReceived { helpful, .. } => self.feedback = Some(helpful),
            E::SlaBreached { kind, .. } => {
                self.sla_breaches.insert(kind.as_str().to_string());
            }
            // A record of cost and configuration: the ticket's state is unchanged.
            E::ModelUsageRecorded { .. } => {}
        }
    }

    /// A person takes over (escalation or assignment); a new hand-off
    /// when the AI had it.
    fn hand_to_human(&mut self) {
        if self.handler == Handler::Ai {
            self.handler = Handler::Human;
            self.hand_off_acknowledged = false;
        }
    }

    fn leave_approval(&mut self) {
        let pending = self
            .approvals
            .values()
            .any(|a| a.state == ApprovalState::Pending);
        if self.status == TicketStatus::AwaitingApproval && !pending {
            self.status = TicketStatus::InProgress;
        }
    }
}

crate::impl_aggregate!(Ticket, "ticket", TicketCommand, TicketEvent, TicketError);
