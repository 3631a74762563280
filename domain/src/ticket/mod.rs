//! The ticket: one customer issue from first message to closure.
//!
//! Every step the desk takes on a ticket (the AI's searches, drafts and
//! confidence, approvals, replies and their delivery, escalations, human
//! actions, SLA breaches, feedback) is an event of this aggregate, so the
//! stream is the complete, replayable record an auditor reads.

mod aggregate;
#[cfg(test)]
mod handoff_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod usage_tests;

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use aggregate::{
    Approval, ApprovalState, Draft, Escalation, Handler, MessageWork, Response, Ticket,
    AUTO_CLOSE_AFTER, AUTO_REPLY_WINDOW, MAX_AUTOMATED_REASON_LEN, MAX_AUTO_REPLIES_PER_HOUR,
    MAX_SEARCHES_PER_MESSAGE, WHATSAPP_WINDOW,
};

use crate::sla::SlaKind;
use crate::{Category, Channel, Priority};

/// Why a ticket went to a human.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EscalationReason {
    PricingInquiry,
    RefundRequest,
    Legal,
    NegativeSentiment,
    HumanRequested,
    KnowledgeGap,
    DeliveryFailed,
    ModelUnavailable,
    /// A member of staff escalated it by hand.
    Manual,
    /// The message was written by a machine (an auto-reply, a bounce, a
    /// mailing list): nothing is sent back, staff take a look.
    AutomatedMessage,
    /// The ticket used up its automatic replies for the hour: the agent
    /// stays silent so two helpdesks never answer each other forever.
    AutoReplyLimit,
    /// The AI's answer would go out on WhatsApp more than 24 hours after
    /// the customer's last message, and no approved template is
    /// configured (`TWILIO_FOLLOWUP_CONTENT_SID`).
    WhatsappWindowClosed,
}

impl EscalationReason {
    pub const ALL: [EscalationReason; 12] = [
        EscalationReason::PricingInquiry,
        EscalationReason::RefundRequest,
        EscalationReason::Legal,
        EscalationReason::NegativeSentiment,
        EscalationReason::HumanRequested,
        EscalationReason::KnowledgeGap,
        EscalationReason::DeliveryFailed,
        EscalationReason::ModelUnavailable,
        EscalationReason::Manual,
        EscalationReason::AutomatedMessage,
        EscalationReason::AutoReplyLimit,
        EscalationReason::WhatsappWindowClosed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EscalationReason::PricingInquiry => "pricing_inquiry",
            EscalationReason::RefundRequest => "refund_request",
            EscalationReason::Legal => "legal",
            EscalationReason::NegativeSentiment => "negative_sentiment",
            EscalationReason::HumanRequested => "human_requested",
            EscalationReason::KnowledgeGap => "knowledge_gap",
            EscalationReason::DeliveryFailed => "delivery_failed",
            EscalationReason::ModelUnavailable => "model_unavailable",
            EscalationReason::Manual => "manual",
            EscalationReason::AutomatedMessage => "automated_message",
            EscalationReason::AutoReplyLimit => "auto_reply_limit",
            EscalationReason::WhatsappWindowClosed => "whatsapp_window_closed",
        }
    }
}

/// What the channel provider reports about a reply we sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    Queued,
    Sent,
    Delivered,
    Read,
    Failed,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Queued => "queued",
            DeliveryStatus::Sent => "sent",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Read => "read",
            DeliveryStatus::Failed => "failed",
        }
    }

    /// Whether a report of `next` after `self` moves the delivery forward.
    /// Providers deliver callbacks out of order; a late `sent` after
    /// `delivered` says nothing new, and a failure after delivery is noise.
    pub fn advances_to(self, next: DeliveryStatus) -> bool {
        use DeliveryStatus::*;
        match (self, next) {
            (Failed, _) => false,
            (Delivered | Read, Failed) => false,
            (_, Failed) => true,
            (a, b) => b > a,
        }
    }
}

impl std::str::FromStr for DeliveryStatus {
    type Err = crate::values::UnknownValue;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Twilio also reports `accepted`, `scheduled`, `sending` and
        // `undelivered`; they fold into the five states we track.
        Ok(match s {
            "queued" | "accepted" | "scheduled" => DeliveryStatus::Queued,
            "sending" | "sent" => DeliveryStatus::Sent,
            "delivered" => DeliveryStatus::Delivered,
            "read" => DeliveryStatus::Read,
            "failed" | "undelivered" | "canceled" => DeliveryStatus::Failed,
            other => {
                return Err(crate::values::UnknownValue {
                    what: "delivery status",
                    value: other.chars().take(40).collect(),
                })
            }
        })
    }
}

/// Where an email conversation lives, so replies join it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmailThread {
    /// Gmail's `threadId`.
    pub thread_id: String,
    /// The customer message's `Message-ID` header, for `In-Reply-To`.
    pub message_id_header: Option<String>,
    pub subject: Option<String>,
}

/// One passage the knowledge base returned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KnowledgeHit {
    pub document_id: String,
    pub chunk_id: String,
    pub title: String,
    pub score: f64,
}

/// Why the agent answers a customer message with nothing at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WithholdReason {
    /// A machine wrote it (auto-reply, bounce, mailing list).
    AutomatedMessage,
    /// The ticket's automatic replies for the rolling hour are used up.
    AutoReplyLimit,
}

impl WithholdReason {
    pub fn as_str(self) -> &'static str {
        self.escalation_reason().as_str()
    }

    /// The reason staff see when the withheld message is escalated.
    pub fn escalation_reason(self) -> EscalationReason {
        match self {
            WithholdReason::AutomatedMessage => EscalationReason::AutomatedMessage,
            WithholdReason::AutoReplyLimit => EscalationReason::AutoReplyLimit,
        }
    }
}

/// A holding reply ready for the channel, offered to `QueueForHuman`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldingReply {
    pub response_id: Uuid,
    pub body: String,
    pub parts: Vec<String>,
}

/// The most automatic replies (AI answers and holding replies) one ticket
/// may send in a rolling hour. A reply sent under a limit counts against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoReplyLimit {
    pub per_hour: u32,
}

/// What one model reported for the calls the agent made on one customer
/// message: successful calls, tokens in and out, and their price.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelUsage {
    /// `openai` or `anthropic`.
    pub provider: String,
    pub model: String,
    pub calls: u32,
    pub tokens_in: u64,
    pub tokens_out: u64,
    /// The cost in millionths of a US dollar, from the configured prices.
    pub cost_micro_usd: u64,
}

/// The configuration an AI response was made with, so that two
/// configurations can be compared on their outcomes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AiConfiguration {
    /// The model that decided (`local` for the built-in responder).
    pub model: String,
    pub prompt_version: String,
    pub kb_version: String,
    /// `CASEBOOK_EXPERIMENT`, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experiment: Option<String>,
}

impl AiConfiguration {
    /// The configuration as one label: `model/prompt/kb[/experiment]`.
    pub fn tag(&self) -> String {
        let mut tag = format!("{}/{}/{}", self.model, self.prompt_version, self.kb_version);
        if let Some(e) = &self.experiment {
            tag.push('/');
            tag.push_str(e);
        }
        tag
    }
}

/// A model's prices in US dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct ModelPrice {
    pub usd_per_mtok_in: f64,
    pub usd_per_mtok_out: f64,
}

impl ModelPrice {
    /// The price of `tokens_in` and `tokens_out` in millionths of a dollar
    /// (a dollar per million tokens is a micro-dollar per token), rounded.
    pub fn cost_micro_usd(&self, tokens_in: u64, tokens_out: u64) -> u64 {
        let micro = tokens_in as f64 * self.usd_per_mtok_in.max(0.0)
            + tokens_out as f64 * self.usd_per_mtok_out.max(0.0);
        if micro.is_finite() {
            micro.round().min(u64::MAX as f64) as u64
        } else {
            0
        }
    }
}

/// Most providers one usage record names, and the longest name or label.
pub const MAX_USAGE_ENTRIES: usize = 8;
pub const MAX_USAGE_LABEL_CHARS: usize = 100;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TicketCommand {
    Open {
        ticket_id: Uuid,
        customer_id: Uuid,
        channel: Channel,
        subject: Option<String>,
        category: Category,
        priority: Priority,
        /// The closed ticket this one follows on from (a customer who wrote
        /// again on the same conversation after it was closed).
        #[serde(default)]
        previous_ticket_id: Option<Uuid>,
        at: DateTime<Utc>,
    },
    /// A customer wrote. On a resolved ticket this reopens it first.
    ReceiveCustomerMessage {
        message_id: Uuid,
        customer_id: Uuid,
        channel: Channel,
        channel_message_id: String,
        body: String,
        attachments: u32,
        thread: Option<EmailThread>,
        /// Why a machine, not a person, wrote this (`auto_submitted`,
        /// `bulk`, `mailing_list`, `bounce`, …); `None` for a person.
        #[serde(default)]
        automated: Option<String>,
        at: DateTime<Utc>,
    },
    /// The agent read the customer's earlier conversations.
    RecordHistoryReview {
        previous_tickets: u32,
        previous_messages: u32,
        channels: Vec<Channel>,
        at: DateTime<Utc>,
    },
    RecordKnowledgeSearch {
        /// The customer message the search is for (default: the latest).
        #[serde(default)]
        in_reply_to: Option<Uuid>,
        query: String,
        hits: Vec<KnowledgeHit>,
        at: DateTime<Utc>,
    },
    DraftResponse {
        draft_id: Uuid,
        /// The customer message the draft answers.
        in_reply_to: Option<Uuid>,
        body: String,
        confidence: f64,
        sources: Vec<String>,
        generated_by: String,
        at: DateTime<Utc>,
    },
    RequestApproval {
        approval_id: Uuid,
        draft_id: Uuid,
        reasons: Vec<String>,
        at: DateTime<Utc>,
    },
    ApproveResponse {
        approval_id: Uuid,
        approved_by: String,
        edited_body: Option<String>,
        at: DateTime<Utc>,
    },
    RejectResponse {
        approval_id: Uuid,
        rejected_by: String,
        reason: String,
        at: DateTime<Utc>,
    },
    SendResponse {
        response_id: Uuid,
        draft_id: Option<Uuid>,
        channel: Channel,
        body: String,
        parts: Vec<String>,
        /// The customer message it answers: the draft's when there is
        /// one, else this, else the latest message.
        #[serde(default)]
        in_reply_to: Option<Uuid>,
        /// Set for replies nobody on the staff wrote or approved (AI
        /// answers, holding replies): they count against the limit, and
        /// one past it is refused.
        #[serde(default)]
        automatic: Option<AutoReplyLimit>,
        /// A holding reply ("a person will reply"): not a response for the
        /// first-response SLA, and at most one per hand-off to a person.
        #[serde(default)]
        holding: bool,
        /// The approved WhatsApp template (Twilio content SID) the reply
        /// goes out as: required on WhatsApp more than 24 hours after the
        /// customer's last message.
        #[serde(default)]
        template: Option<String>,
        at: DateTime<Utc>,
    },
    RecordDeliveryStatus {
        response_id: Uuid,
        status: DeliveryStatus,
        provider_message_id: Option<String>,
        error: Option<String>,
        at: DateTime<Utc>,
    },
    Escalate {
        escalation_id: Uuid,
        /// The customer message that led to it, if one did.
        in_reply_to: Option<Uuid>,
        reason: EscalationReason,
        note: Option<String>,
        at: DateTime<Utc>,
    },
    /// The agent will not answer this customer message. Unless staff
    /// already hold an open escalation, the ticket is escalated for them,
    /// silently: nothing goes to the sender.
    WithholdReply {
        in_reply_to: Uuid,
        reason: WithholdReason,
        escalation_id: Uuid,
        at: DateTime<Utc>,
    },
    ResolveEscalation {
        escalation_id: Uuid,
        resolved_by: String,
        note: Option<String>,
        at: DateTime<Utc>,
    },
    /// A person takes the ticket (claims it, or is given it): from now on
    /// the AI stays silent on it.
    Assign {
        agent_id: String,
        assigned_by: String,
        at: DateTime<Utc>,
    },
    /// The ticket goes back to the unassigned human queue; the AI stays
    /// silent. Refused with `NotAssigned` when nobody holds it.
    Unassign {
        unassigned_by: String,
        at: DateTime<Utc>,
    },
    /// A person gives the ticket back to the AI: open escalations are
    /// resolved, the assignment ends, the AI answers the next message.
    HandBackToAi {
        handed_back_by: String,
        at: DateTime<Utc>,
    },
    /// The agent worker saw a customer message on a ticket a person holds:
    /// it goes to the person's queue, not the model. `acknowledgement`
    /// is the short "a person will reply" text, sent only if this
    /// hand-off has not acknowledged one already (and the automatic reply
    /// limit allows).
    QueueForHuman {
        in_reply_to: Uuid,
        acknowledgement: Option<HoldingReply>,
        limit: AutoReplyLimit,
        at: DateTime<Utc>,
    },
    Resolve {
        resolved_by: String,
        resolution: Option<String>,
        at: DateTime<Utc>,
    },
    Reopen {
        reopened_by: String,
        reason: Option<String>,
        at: DateTime<Utc>,
    },
    Close {
        closed_by: String,
        at: DateTime<Utc>,
    },
    /// The periodic job: a ticket resolved for `AUTO_CLOSE_AFTER` without
    /// the customer writing again is closed.
    CloseStale {
        at: DateTime<Utc>,
    },
    RecordFeedback {
        helpful: bool,
        comment: Option<String>,
        at: DateTime<Utc>,
    },
    /// The agent records what the models it called on a customer message
    /// reported (tokens, price) and the configuration that answered.
    RecordModelUsage {
        in_reply_to: Uuid,
        usage: Vec<ModelUsage>,
        configuration: AiConfiguration,
        at: DateTime<Utc>,
    },
    RecordSlaBreach {
        kind: SlaKind,
        at: DateTime<Utc>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum TicketEvent {
    TicketOpened {
        ticket_id: Uuid,
        customer_id: Uuid,
        channel: Channel,
        subject: Option<String>,
        category: Category,
        priority: Priority,
        opened_at: DateTime<Utc>,
        first_response_due: DateTime<Utc>,
        resolution_due: DateTime<Utc>,
        /// The closed ticket of the same conversation this one follows.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        previous_ticket_id: Option<Uuid>,
    },
    CustomerMessageReceived {
        message_id: Uuid,
        customer_id: Uuid,
        channel: Channel,
        channel_message_id: String,
        body: String,
        attachments: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        thread: Option<EmailThread>,
        /// Why a machine wrote it; absent for a person.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        automated: Option<String>,
        received_at: DateTime<Utc>,
    },
    CustomerHistoryReviewed {
        previous_tickets: u32,
        previous_messages: u32,
        channels: Vec<Channel>,
        reviewed_at: DateTime<Utc>,
    },
    KnowledgeSearched {
        /// The customer message searched for; absent in events from before
        /// it was recorded, which meant the latest message.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        in_reply_to: Option<Uuid>,
        query: String,
        attempt: u32,
        hits: Vec<KnowledgeHit>,
        searched_at: DateTime<Utc>,
    },
    ResponseDrafted {
        draft_id: Uuid,
        #[serde(default)]
        in_reply_to: Option<Uuid>,
        body: String,
        confidence: f64,
        sources: Vec<String>,
        generated_by: String,
        drafted_at: DateTime<Utc>,
    },
    ApprovalRequested {
        approval_id: Uuid,
        draft_id: Uuid,
        reasons: Vec<String>,
        requested_at: DateTime<Utc>,
    },
    ResponseApproved {
        approval_id: Uuid,
        draft_id: Uuid,
        approved_by: String,
        edited_body: Option<String>,
        approved_at: DateTime<Utc>,
    },
    ResponseRejected {
        approval_id: Uuid,
        draft_id: Uuid,
        rejected_by: String,
        reason: String,
        rejected_at: DateTime<Utc>,
    },
    ResponseSent {
        response_id: Uuid,
        draft_id: Option<Uuid>,
        channel: Channel,
        body: String,
        parts: Vec<String>,
        in_reply_to: Option<Uuid>,
        /// An AI answer or holding reply, counted against the ticket's
        /// automatic replies per hour.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        automatic: bool,
        /// A holding reply: it does not stop the first-response SLA.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        holding: bool,
        /// Sent as this approved WhatsApp template (Twilio content SID),
        /// with the status link, instead of the free-form body (outside
        /// WhatsApp's 24-hour window). The body stays the reply the
        /// customer reads on the status page.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        template: Option<String>,
        sent_at: DateTime<Utc>,
    },
    DeliveryStatusChanged {
        response_id: Uuid,
        status: DeliveryStatus,
        provider_message_id: Option<String>,
        error: Option<String>,
        changed_at: DateTime<Utc>,
    },
    TicketEscalated {
        escalation_id: Uuid,
        #[serde(default)]
        in_reply_to: Option<Uuid>,
        reason: EscalationReason,
        note: Option<String>,
        escalated_at: DateTime<Utc>,
    },
    /// The agent answered this customer message with nothing.
    AutoReplyWithheld {
        in_reply_to: Uuid,
        reason: WithholdReason,
        withheld_at: DateTime<Utc>,
    },
    EscalationResolved {
        escalation_id: Uuid,
        resolved_by: String,
        note: Option<String>,
        resolved_at: DateTime<Utc>,
    },
    TicketAssigned {
        agent_id: String,
        assigned_by: String,
        assigned_at: DateTime<Utc>,
    },
    /// Version 2: the person who held it is `previous_assignee` (as in
    /// `TicketHandedBackToAi`); version 1 called it `agent_id`, and
    /// `crate::upcast` reads those as version 2.
    TicketUnassigned {
        /// Who held it.
        previous_assignee: String,
        unassigned_by: String,
        unassigned_at: DateTime<Utc>,
    },
    TicketHandedBackToAi {
        handed_back_by: String,
        /// Who held it, if anyone.
        previous_assignee: Option<String>,
        handed_back_at: DateTime<Utc>,
    },
    /// A customer message on a ticket a person holds: it waits in their
    /// queue (the assignee's, or the unassigned queue), the AI is silent.
    CustomerMessageQueuedForHuman {
        in_reply_to: Uuid,
        assignee: Option<String>,
        queued_at: DateTime<Utc>,
    },
    TicketResolved {
        resolved_by: String,
        resolution: Option<String>,
        resolved_at: DateTime<Utc>,
    },
    TicketReopened {
        reopened_by: String,
        reason: Option<String>,
        reopened_at: DateTime<Utc>,
    },
    TicketClosed {
        closed_by: String,
        closed_at: DateTime<Utc>,
    },
    /// The customer said whether the answers helped (the status page's
    /// "was this helpful?"). The actor of the event is the customer.
    /// Called `FeedbackRecorded` before; nothing was stored under that name,
    /// and the alias reads it all the same.
    #[serde(alias = "FeedbackRecorded")]
    FeedbackReceived {
        helpful: bool,
        comment: Option<String>,
        #[serde(alias = "recorded_at")]
        received_at: DateTime<Utc>,
    },
    SlaBreached {
        kind: SlaKind,
        due_at: DateTime<Utc>,
        breached_at: DateTime<Utc>,
    },
    /// The models the agent called on a customer message, what they
    /// reported using and cost, and the configuration that answered.
    ModelUsageRecorded {
        in_reply_to: Uuid,
        usage: Vec<ModelUsage>,
        configuration: AiConfiguration,
        recorded_at: DateTime<Utc>,
    },
}

impl TicketEvent {
    /// When the event happened.
    pub fn at(&self) -> DateTime<Utc> {
        match self {
            TicketEvent::TicketOpened { opened_at: at, .. }
            | TicketEvent::CustomerMessageReceived {
                received_at: at, ..
            }
            | TicketEvent::CustomerHistoryReviewed {
                reviewed_at: at, ..
            }
            | TicketEvent::KnowledgeSearched {
                searched_at: at, ..
            }
            | TicketEvent::ResponseDrafted { drafted_at: at, .. }
            | TicketEvent::ApprovalRequested {
                requested_at: at, ..
            }
            | TicketEvent::ResponseApproved {
                approved_at: at, ..
            }
            | TicketEvent::ResponseRejected {
                rejected_at: at, ..
            }
            | TicketEvent::ResponseSent { sent_at: at, .. }
            | TicketEvent::DeliveryStatusChanged { changed_at: at, .. }
            | TicketEvent::TicketEscalated {
                escalated_at: at, ..
            }
            | TicketEvent::AutoReplyWithheld {
                withheld_at: at, ..
            }
            | TicketEvent::EscalationResolved {
                resolved_at: at, ..
            }
            | TicketEvent::TicketAssigned {
                assigned_at: at, ..
            }
            | TicketEvent::TicketUnassigned {
                unassigned_at: at, ..
            }
            | TicketEvent::TicketHandedBackToAi {
                handed_back_at: at, ..
            }
            | TicketEvent::CustomerMessageQueuedForHuman { queued_at: at, .. }
            | TicketEvent::TicketResolved {
                resolved_at: at, ..
            }
            | TicketEvent::TicketReopened {
                reopened_at: at, ..
            }
            | TicketEvent::TicketClosed { closed_at: at, .. }
            | TicketEvent::FeedbackReceived {
                received_at: at, ..
            }
            | TicketEvent::SlaBreached {
                breached_at: at, ..
            }
            | TicketEvent::ModelUsageRecorded {
                recorded_at: at, ..
            } => *at,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            TicketEvent::TicketOpened { .. } => "TicketOpened",
            TicketEvent::CustomerMessageReceived { .. } => "CustomerMessageReceived",
            TicketEvent::CustomerHistoryReviewed { .. } => "CustomerHistoryReviewed",
            TicketEvent::KnowledgeSearched { .. } => "KnowledgeSearched",
            TicketEvent::ResponseDrafted { .. } => "ResponseDrafted",
            TicketEvent::ApprovalRequested { .. } => "ApprovalRequested",
            TicketEvent::ResponseApproved { .. } => "ResponseApproved",
            TicketEvent::ResponseRejected { .. } => "ResponseRejected",
            TicketEvent::ResponseSent { .. } => "ResponseSent",
            TicketEvent::DeliveryStatusChanged { .. } => "DeliveryStatusChanged",
            TicketEvent::TicketEscalated { .. } => "TicketEscalated",
            TicketEvent::AutoReplyWithheld { .. } => "AutoReplyWithheld",
            TicketEvent::EscalationResolved { .. } => "EscalationResolved",
            TicketEvent::TicketAssigned { .. } => "TicketAssigned",
            TicketEvent::TicketUnassigned { .. } => "TicketUnassigned",
            TicketEvent::TicketHandedBackToAi { .. } => "TicketHandedBackToAi",
            TicketEvent::CustomerMessageQueuedForHuman { .. } => "CustomerMessageQueuedForHuman",
            TicketEvent::TicketResolved { .. } => "TicketResolved",
            TicketEvent::TicketReopened { .. } => "TicketReopened",
            TicketEvent::TicketClosed { .. } => "TicketClosed",
            TicketEvent::FeedbackReceived { .. } => "FeedbackReceived",
            TicketEvent::SlaBreached { .. } => "SlaBreached",
            TicketEvent::ModelUsageRecorded { .. } => "ModelUsageRecorded",
        }
    }
}

impl DomainEvent for TicketEvent {
    fn event_type(&self) -> String {
        self.name().to_string()
    }

    fn event_version(&self) -> String {
        crate::upcast::current_version("ticket", self.name()).to_string()
    }
}

/// One message of a ticket's conversation, as the customer sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TranscriptEntry {
    pub direction: crate::Direction,
    pub channel: Channel,
    pub body: String,
    pub at: DateTime<Utc>,
}

/// The conversation a ticket's events record: customer messages and the
/// replies sent, in order.
pub fn transcript(events: &[TicketEvent]) -> Vec<TranscriptEntry> {
    events
        .iter()
        .filter_map(|e| match e {
            TicketEvent::CustomerMessageReceived {
                channel,
                body,
                received_at,
                ..
            } => Some(TranscriptEntry {
                direction: crate::Direction::Inbound,
                channel: *channel,
                body: body.clone(),
                at: *received_at,
            }),
            TicketEvent::ResponseSent {
                channel,
                body,
                sent_at,
                ..
            } => Some(TranscriptEntry {
                direction: crate::Direction::Outbound,
                channel: *channel,
                body: body.clone(),
                at: *sent_at,
            }),
            _ => None,
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("ticket does not exist")]
    NotFound,
    #[error("ticket is already open")]
    AlreadyOpened,
    #[error("ticket is closed")]
    Closed,
    #[error("channel message {channel_message_id} is already on this ticket")]
    DuplicateMessage { channel_message_id: String },
    #[error("a message needs a body or an attachment")]
    EmptyMessage,
    #[error("knowledge base searched {attempts} times for this message already")]
    TooManySearches { attempts: u32 },
    #[error("customer message {0} is not on this ticket")]
    UnknownMessage(Uuid),
    #[error("an automated-message reason is 1 to {max} characters of a-z, 0-9 and _")]
    InvalidAutomatedReason { max: usize },
    #[error("the ticket sent {sent} automatic replies in the last hour; the limit is {limit}")]
    AutoReplyLimitReached { sent: u32, limit: u32 },
    #[error("confidence must be between 0 and 1")]
    InvalidConfidence,
    #[error("a response needs a body")]
    EmptyResponse,
    #[error("customer message {0} was already handled")]
    AlreadyHandled(Uuid),
    #[error("draft {0} already exists")]
    DuplicateDraft(Uuid),
    #[error("draft {0} does not exist")]
    UnknownDraft(Uuid),
    #[error("draft {0} is already waiting for approval")]
    ApprovalAlreadyRequested(Uuid),
    #[error("approval {0} does not exist")]
    UnknownApproval(Uuid),
    #[error("approval {0} was already decided")]
    ApprovalAlreadyDecided(Uuid),
    #[error("draft {0} needs an approval before it can be sent")]
    ApprovalRequired(Uuid),
    #[error("draft {0} was rejected")]
    DraftRejected(Uuid),
    #[error("a rejection needs a reason")]
    EmptyReason,
    #[error("response {0} was already sent")]
    DuplicateResponse(Uuid),
    #[error("response {0} does not exist")]
    UnknownResponse(Uuid),
    #[error("escalation {0} already exists")]
    DuplicateEscalation(Uuid),
    #[error("escalation {0} does not exist")]
    UnknownEscalation(Uuid),
    #[error("escalation {0} is already resolved")]
    EscalationAlreadyResolved(Uuid),
    #[error("an assignment needs an agent")]
    EmptyAgent,
    #[error("ticket is already resolved")]
    AlreadyResolved,
    #[error("only a resolved ticket can be reopened")]
    NotResolved,
    #[error("feedback needs a response to rate")]
    NoResponseYet,
    #[error("feedback was already recorded")]
    FeedbackAlreadyRecorded,
    #[error("the {0} SLA is not breached")]
    SlaNotBreached(&'static str),
    #[error("the {0} SLA breach was already recorded")]
    SlaAlreadyBreached(&'static str),
    #[error("a person holds this ticket: the AI stays silent until it is handed back or resolved")]
    WithHuman,
    #[error("the AI handles this ticket: no person holds it")]
    NotWithHuman,
    #[error("nobody is assigned to this ticket")]
    NotAssigned,
    #[error("the ticket was resolved less than 7 days ago (at {resolved_at})")]
    NotStale { resolved_at: DateTime<Utc> },
    #[error(
        "WhatsApp allows no free-form reply more than 24 hours after the customer's last message; \
         it must go as the approved template TWILIO_FOLLOWUP_CONTENT_SID, which is not configured"
    )]
    WhatsappWindowClosed,
    #[error("a template reply needs a content SID")]
    EmptyTemplate,
    #[error("a reply is at most {max} characters")]
    ResponseTooLong { max: usize },
    #[error("an idempotency key is 1 to {max} bytes")]
    InvalidIdempotencyKey { max: usize },
    #[error("a model usage record names 1 to {max_entries} models with labels of 1 to {max_chars} characters")]
    InvalidModelUsage {
        max_entries: usize,
        max_chars: usize,
    },
}
