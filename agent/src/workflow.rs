//! The AI agent: answers a customer message within the guardrails, or hands
//! it to a human.
//!
//! For each `CustomerMessageReceived` it (1) makes sure the ticket exists,
//! (2) reads the customer's history across channels, (3) checks the input
//! guardrails, (4) lets the model search the knowledge base (at most twice)
//! and draft a reply through tool calls, then (5) checks the draft against
//! the output guardrails and its confidence, and sends it, asks for approval
//! or escalates. Every step is a command on the ticket; the decisions are
//! made first and their events committed together, so a message delivered
//! again after a crash is handled once (the ticket knows which messages it
//! answered).
//!
//! Once a person holds the ticket (it was escalated or assigned), the
//! agent does not answer at all: the message is queued for the person
//! (`QueueForHuman`: the assignee's queue, or the unassigned one), and the
//! ticket decides whether the customer gets the one short "a person will
//! reply" holding reply of this hand-off. The ticket refuses AI drafts and
//! answers while a person holds it, so a message that arrives while the
//! model works is queued too. Only a person handing the ticket back (or
//! resolving a ticket nobody is assigned to) lets the AI answer again.
//!
//! On WhatsApp, an answer more than 24 hours after the customer's last
//! message goes as the approved template (`TWILIO_FOLLOWUP_CONTENT_SID`),
//! or, without one, is not sent: the ticket is escalated with
//! `whatsapp_window_closed`.
//!
//! Some messages get no answer at all: one a machine wrote (an auto-reply,
//! a bounce, a mailing list, as intake marks it), and any past the ticket's
//! automatic replies for the hour (`CASEBOOK_AUTO_REPLY_CAP_PER_HOUR`). The
//! ticket records that it withheld the reply and why, and escalates once
//! for staff; nothing goes to the sender, so two helpdesks never answer
//! each other forever.
//!
//! Logs carry ids, counts and kinds only: never what the customer or the
//! model wrote. Each message is handled inside a span with the envelope's
//! `correlation_id` and `causation_id`.
//!
//! Models are tried in order: the OpenAI-compatible primary, the Anthropic
//! fallback, then the built-in local responder, which answers extractively
//! from the best passages. If even that fails, the customer gets a holding
//! reply and the ticket is escalated with the error.

use std::collections::BTreeSet;
use std::time::Instant;

use tracing::Instrument;

use casebook_domain::confidence::{draft_confidence, ConfidenceInputs, APPROVAL_THRESHOLD};
use casebook_domain::formatting::{format_reply, holding_reply, ReplyContext, HUMAN_WILL_REPLY};
use casebook_domain::guardrails::{assess_input, content_words, review_draft, sentences, support};
use casebook_domain::status_link;
use casebook_domain::ticket::{
    AiConfiguration, AutoReplyLimit, EscalationReason, HoldingReply, KnowledgeHit, ModelPrice,
    ModelUsage, WithholdReason,
};
use casebook_domain::{
    Actor, ActorKind, Channel, Customer, EventEnvelope, EventMetadata, Ticket, TicketCommand,
    TicketError, TicketEvent,
};
use chrono::Utc;
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::knowledge::{KnowledgeBase, KnowledgeError, Passage, RELEVANCE_THRESHOLD};
use crate::llm::{ChatMessage, ChatReply, LlmError, Provider, TokenUsage, ToolCall, ToolSpec};
use casebook_commands::store::{CommandError, EventStore, StoreError, CONFLICT_BACKOFF};

/// Most knowledge base searches per customer message.
pub const MAX_SEARCHES: usize = 2;
/// Automatic replies (answers and holding replies) one ticket may send in a
/// rolling hour, unless configured otherwise.
pub const DEFAULT_AUTO_REPLY_CAP_PER_HOUR: u32 = 3;
/// Most model turns per customer message before the local responder takes over.
const MAX_TURNS: usize = 6;
const PASSAGES_PER_SEARCH: usize = 5;
/// The longest escalation note the model may leave.
const MAX_NOTE_CHARS: usize = 500;
/// The reasons the model's `escalate` tool offers.
const MODEL_ESCALATION_REASONS: [EscalationReason; 6] = [
    EscalationReason::PricingInquiry,
    EscalationReason::RefundRequest,
    EscalationReason::Legal,
    EscalationReason::NegativeSentiment,
    EscalationReason::HumanRequested,
    EscalationReason::KnowledgeGap,
];

const SYSTEM_PROMPT: &str = "You are the support agent of the product described by the knowledge base. \
Answer only from passages returned by search_knowledge_base; search before answering, at most twice. \
Never quote prices, never promise or process refunds, never name internal systems. \
If the customer asks about pricing or refunds, threatens legal action, is angry, or asks for a human, call escalate. \
If the knowledge base has nothing relevant, call escalate with reason knowledge_gap. \
When you can answer, call send_response with a concise, friendly answer and your confidence between 0 and 1.";

/// The system prompt's version: the start of its SHA-256, so a changed
/// prompt is a new version without anyone remembering to bump one.
fn prompt_version() -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(SYSTEM_PROMPT.as_bytes());
    format!("p-{}", hex::encode(&digest[..6]))
}

/// The configuration label a response with no model call carries.
const NO_MODEL: &str = "none";

/// Every tool's `channel` parameter: the channel of the conversation.
fn channel_parameter() -> Value {
    json!({"type": "string", "enum": ["email", "whatsapp", "webform"],
           "description": "The channel the customer wrote on (given in their message)."})
}

fn tools() -> Vec<ToolSpec> {
    let mut tools = vec![
        ToolSpec {
            name: "create_ticket",
            description: "Make sure the conversation has a ticket; returns its id and status.",
            parameters: json!({"type": "object", "properties": {}}),
        },
        ToolSpec {
            name: "get_customer_history",
            description: "The customer's earlier messages and replies, on every channel.",
            parameters: json!({"type": "object", "properties": {}}),
        },
        ToolSpec {
            name: "search_knowledge_base",
            description: "Search the product knowledge base; returns the most relevant sections, each with its article id, title and section heading to cite.",
            parameters: json!({"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}),
        },
        ToolSpec {
            name: "send_response",
            description: "Answer the customer. Plain text; it is formatted for the channel.",
            parameters: json!({"type": "object", "properties": {
                "body": {"type": "string"},
                "confidence": {"type": "number", "minimum": 0, "maximum": 1}
            }, "required": ["body"]}),
        },
        ToolSpec {
            name: "escalate",
            description: "Hand the conversation to a human.",
            parameters: json!({"type": "object", "properties": {
                "reason": {"type": "string", "enum": ["pricing_inquiry", "refund_request", "legal", "negative_sentiment",
                                                      "human_requested", "knowledge_gap"]},
                "note": {"type": "string"}
            }, "required": ["reason"]}),
        },
    ];
    for tool in &mut tools {
        tool.parameters["properties"]["channel"] = channel_parameter();
    }
    tools
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Knowledge(#[from] KnowledgeError),
    #[error("ticket refused the agent's step: {0}")]
    Rejected(#[from] TicketError),
    #[error("event {0} is not a readable customer message")]
    NotAMessage(Uuid),
}

impl AgentError {
    /// What kind of failure, for logs and notes: never its text, which can
    /// quote what the customer or a provider wrote.
    pub fn kind(&self) -> &'static str {
        match self {
            AgentError::Store(_) => "store",
            AgentError::Knowledge(KnowledgeError::Embed(_)) => "embedding",
            AgentError::Knowledge(KnowledgeError::Database(_)) => "knowledge_base_database",
            AgentError::Knowledge(_) => "knowledge_base",
            AgentError::Rejected(_) => "rejected_by_ticket",
            AgentError::NotAMessage(_) => "not_a_message",
        }
    }
}

/// What kind of model failure, for logs: provider error bodies can quote
/// the conversation.
fn llm_error_kind(e: &LlmError) -> &'static str {
    match e {
        LlmError::Transient { .. } => "transient",
        LlmError::Permanent { .. } => "permanent",
        LlmError::CircuitOpen(_) => "circuit_open",
    }
}

impl From<CommandError<TicketError>> for AgentError {
    fn from(e: CommandError<TicketError>) -> Self {
        match e {
            CommandError::Rejected(e) => AgentError::Rejected(e),
            CommandError::Store(e) => AgentError::Store(e),
        }
    }
}

/// What the agent did with a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Sent {
        confidence: f64,
    },
    AwaitingApproval {
        confidence: f64,
        reasons: Vec<String>,
    },
    Escalated(EscalationReason),
    /// Deliberately not answered (a machine wrote it, or the ticket used up
    /// its automatic replies for the hour).
    Withheld(WithholdReason),
    /// A person holds the ticket: the message waits in their queue; the
    /// holding reply went out with it if the hand-off had none yet.
    QueuedForHuman {
        acknowledged: bool,
    },
    /// Handled before (a redelivery), or no longer the agent's to handle.
    Skipped,
}

impl Outcome {
    /// The outcome's name, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Outcome::Sent { .. } => "sent",
            Outcome::AwaitingApproval { .. } => "awaiting_approval",
            Outcome::Escalated(_) => "escalated",
            Outcome::Withheld(_) => "withheld",
            Outcome::QueuedForHuman { .. } => "queued_for_human",
            Outcome::Skipped => "skipped",
        }
    }
}

#[derive(Debug, Clone)]
enum Decision {
    Draft {
        body: String,
        model_confidence: Option<f64>,
        generated_by: String,
    },
    Escalate {
        reason: EscalationReason,
        note: Option<String>,
    },
}

struct Search {
    query: String,
    passages: Vec<Passage>,
}

/// One message being handled.
struct Run {
    ticket_id: Uuid,
    message_id: Uuid,
    text: String,
    /// The channel the message came on, and the reply goes out on.
    channel: Channel,
    searches: Vec<Search>,
    history: History,
    /// What the models called for this message reported, per provider.
    usage: Vec<(ModelUsage, ModelPrice)>,
    /// The model whose answer or escalation was taken (`local` for the
    /// built-in responder).
    decided_by: Option<String>,
}

impl Run {
    fn count_call(&mut self, provider: &Provider, usage: Option<TokenUsage>) {
        let usage = usage.unwrap_or_default();
        let entry = match self
            .usage
            .iter_mut()
            .position(|(u, _)| u.provider == provider.name() && u.model == provider.model())
        {
            Some(i) => &mut self.usage[i],
            None => {
                self.usage.push((
                    ModelUsage {
                        provider: provider.name().to_string(),
                        model: provider.model().to_string(),
                        calls: 0,
                        tokens_in: 0,
                        tokens_out: 0,
                        cost_micro_usd: 0,
                    },
                    provider.price(),
                ));
                self.usage.last_mut().expect("just pushed")
            }
        };
        let (u, price) = entry;
        u.calls = u.calls.saturating_add(1);
        u.tokens_in = u.tokens_in.saturating_add(usage.tokens_in);
        u.tokens_out = u.tokens_out.saturating_add(usage.tokens_out);
        // Priced on the totals, so rounding happens once per provider.
        u.cost_micro_usd = price.cost_micro_usd(u.tokens_in, u.tokens_out);
    }
}

impl Run {
    fn relevant(&self) -> Vec<&Passage> {
        let mut seen = BTreeSet::new();
        self.searches
            .iter()
            .flat_map(|s| s.passages.iter())
            .filter(|p| seen.insert(p.chunk_id.clone()))
            .collect()
    }

    fn top_score(&self) -> Option<f64> {
        self.relevant().iter().map(|p| p.score).reduce(f64::max)
    }
}

#[derive(Debug, Clone, Default)]
struct History {
    previous_tickets: u32,
    messages: Vec<(String, String, String)>,
    channels: Vec<Channel>,
}

pub struct Agent {
    store: EventStore,
    pool: PgPool,
    kb: KnowledgeBase,
    providers: Vec<Provider>,
    signature: String,
    auto_replies: AutoReplyLimit,
    /// `CASEBOOK_PUBLIC_URL`: the first reply links to the status page.
    public_url: Option<String>,
    followup_template: Option<String>,
    /// `CASEBOOK_EXPERIMENT`: the label every response's configuration carries.
    experiment: Option<String>,
    prompt_version: String,
    /// The knowledge base's version as last read, and when.
    kb_version: std::sync::Mutex<Option<(Instant, String)>>,
}

/// How long a read knowledge-base version is reused: a configuration tag
/// may name the previous version for this long after an ingest.
const KB_VERSION_TTL: std::time::Duration = std::time::Duration::from_secs(30);

impl Agent {
    /// `providers` in the order they are tried (primary, fallback); the
    /// local responder always comes last.
    pub fn new(
        store: EventStore,
        kb: KnowledgeBase,
        providers: Vec<Provider>,
        signature: impl Into<String>,
    ) -> Self {
        Self {
            pool: store.pool().clone(),
            store,
            kb,
            providers,
            signature: signature.into(),
            auto_replies: AutoReplyLimit {
                per_hour: DEFAULT_AUTO_REPLY_CAP_PER_HOUR,
            },
            public_url: None,
            followup_template: None,
            experiment: None,
            prompt_version: prompt_version(),
            kb_version: std::sync::Mutex::new(None),
        }
    }

    /// Labels every response's configuration with `CASEBOOK_EXPERIMENT`.
    pub fn with_experiment(mut self, experiment: Option<String>) -> Self {
        self.experiment = experiment.filter(|e| !e.trim().is_empty());
        self
    }

    /// The knowledge base's version: a digest of every document's content
    /// hash, so an ingest that changed something is a new version (read
    /// again at most every `KB_VERSION_TTL`).
    async fn kb_version(&self) -> String {
        if let Some((at, v)) = self.kb_version.lock().expect("not poisoned").as_ref() {
            if at.elapsed() < KB_VERSION_TTL {
                return v.clone();
            }
        }
        let version: Result<Option<String>, sqlx::Error> = sqlx::query_scalar(
            "SELECT left(md5(string_agg(document_id || ':' || content_hash, ',' ORDER BY document_id)), 12)
               FROM kb_documents",
        )
        .fetch_one(&self.pool)
        .await;
        let version = match version {
            Ok(Some(v)) => format!("kb-{v}"),
            Ok(None) => "kb-empty".into(),
            // Not remembered: the next message reads it again.
            Err(_) => return "kb-unknown".into(),
        };
        *self.kb_version.lock().expect("not poisoned") = Some((Instant::now(), version.clone()));
        version
    }

    /// The ticket's first reply carries the status link under `public_url`
    /// (`casebook_domain::status_link`).
    pub fn with_public_url(mut self, public_url: impl Into<String>) -> Self {
        self.public_url = Some(public_url.into());
        self
    }

    /// The approved WhatsApp template answers go out as more than 24 hours
    /// after the customer's last message (`TWILIO_FOLLOWUP_CONTENT_SID`).
    pub fn with_followup_template(mut self, content_sid: Option<String>) -> Self {
        self.followup_template = content_sid.filter(|s| !s.trim().is_empty());
        self
    }

    /// At most `per_hour` automatic replies per ticket in a rolling hour;
    /// past it the agent stays silent and escalates once.
    pub fn with_auto_reply_cap(mut self, per_hour: u32) -> Self {
        self.auto_replies = AutoReplyLimit { per_hour };
        self
    }

    /// Handles one `CustomerMessageReceived` event.
    pub async fn handle(&self, envelope: &EventEnvelope) -> Result<Outcome, AgentError> {
        let Ok(TicketEvent::CustomerMessageReceived {
            message_id,
            channel,
            body,
            automated,
            ..
        }) = envelope.decode::<TicketEvent>()
        else {
            return Err(AgentError::NotAMessage(envelope.event_id));
        };
        let ticket_id: Uuid = envelope
            .aggregate_id
            .parse()
            .map_err(|_| AgentError::NotAMessage(envelope.event_id))?;
        // 1. The ticket exists (intake opened it with the message).
        let ticket = self
            .store
            .load::<Ticket>(&ticket_id.to_string())
            .await?
            .aggregate;
        let Some(customer_id) = ticket.customer_id else {
            return Err(AgentError::Rejected(TicketError::NotFound));
        };
        if ticket.is_handled(message_id) || !ticket.status.is_open() {
            return Ok(Outcome::Skipped);
        }
        let started = Instant::now();
        let meta = EventMetadata::new(
            envelope.correlation_id.clone(),
            Actor::new(ActorKind::Ai, "agent"),
        )
        .caused_by(envelope.event_id.to_string())
        .on_channel(channel);
        // A person holds the ticket: their queue, not the model.
        if automated.is_none() && ticket.with_human() {
            if let Some(outcome) = self
                .queue_for_human(ticket_id, message_id, channel, customer_id, &meta)
                .await?
            {
                tracing::info!(%ticket_id, %message_id, outcome = outcome.kind(), "customer message queued for a person");
                return Ok(outcome);
            }
        }
        // Nobody to answer, or answered enough this hour: say nothing.
        let withhold = if automated.is_some() {
            Some(WithholdReason::AutomatedMessage)
        } else if !ticket.may_reply_automatically(Utc::now(), self.auto_replies) {
            Some(WithholdReason::AutoReplyLimit)
        } else {
            None
        };
        if let Some(reason) = withhold {
            let outcome = self.withhold(ticket_id, message_id, reason, &meta).await?;
            tracing::info!(
                %ticket_id,
                %message_id,
                outcome = outcome.kind(),
                reason = reason.as_str(),
                "customer message not answered"
            );
            return Ok(outcome);
        }
        // 2. What the customer wrote before, on every channel.
        let history = self.history(customer_id, ticket_id).await?;
        let mut run = Run {
            ticket_id,
            message_id,
            text: body.clone(),
            channel,
            searches: Vec::new(),
            history,
            usage: Vec::new(),
            decided_by: None,
        };
        // 3. Input guardrails: some messages are never the AI's to answer.
        let assessment = assess_input(&body, channel);
        let decision = match assessment.escalate {
            Some(reason) => Decision::Escalate {
                reason,
                note: Some(format!(
                    "input guardrail (sentiment {:.2})",
                    assessment.sentiment.score
                )),
            },
            // 4. The model, with the knowledge base.
            None => self.converse(&mut run, channel).await,
        };
        let outcome = self
            .commit(&run, channel, customer_id, decision, &meta)
            .await?;
        // Ids, counts and kinds only: the outcome's reasons can quote the
        // draft.
        let (confidence, findings, reason) = match &outcome {
            Outcome::Sent { confidence } => (Some(*confidence), 0, None),
            Outcome::AwaitingApproval {
                confidence,
                reasons,
            } => (Some(*confidence), reasons.len(), None),
            Outcome::Escalated(reason) => (None, 0, Some(reason.as_str())),
            Outcome::Withheld(reason) => (None, 0, Some(reason.as_str())),
            Outcome::QueuedForHuman { .. } | Outcome::Skipped => (None, 0, None),
        };
        tracing::info!(
            %ticket_id,
            %message_id,
            outcome = outcome.kind(),
            confidence,
            findings,
            reason,
            searches = run.searches.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "customer message handled"
        );
        Ok(outcome)
    }

    /// Records that the message gets no answer, and why; the ticket
    /// escalates it for staff unless they already hold an escalation.
    async fn withhold(
        &self,
        ticket_id: Uuid,
        message_id: Uuid,
        reason: WithholdReason,
        meta: &EventMetadata,
    ) -> Result<Outcome, AgentError> {
        let key = ticket_id.to_string();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut uow = self.store.unit_of_work(meta.clone());
            let ticket = uow.load::<Ticket>(&key).await?;
            if ticket.is_handled(message_id) {
                return Ok(Outcome::Skipped);
            }
            uow.execute::<Ticket>(
                &key,
                TicketCommand::WithholdReply {
                    in_reply_to: message_id,
                    reason,
                    escalation_id: Uuid::now_v7(),
                    at: Utc::now(),
                },
            )
            .await?;
            match uow.commit().await {
                Ok(_) => return Ok(Outcome::Withheld(reason)),
                Err(StoreError::Conflict) if CONFLICT_BACKOFF.should_retry(attempt) => {
                    casebook_commands::retry::sleep_backoff(&CONFLICT_BACKOFF, attempt).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Queues the message for the person who holds the ticket, offering
    /// the ticket the holding reply (it sends it once per hand-off).
    /// `None` when no person holds the ticket (any more): the AI answers.
    async fn queue_for_human(
        &self,
        ticket_id: Uuid,
        message_id: Uuid,
        channel: Channel,
        customer_id: Uuid,
        meta: &EventMetadata,
    ) -> Result<Option<Outcome>, AgentError> {
        let customer = self
            .store
            .load::<Customer>(&customer_id.to_string())
            .await?
            .aggregate;
        let ctx = ReplyContext::new(customer.name, ticket_id, &self.signature);
        let reply = format_reply(channel, HUMAN_WILL_REPLY, &ctx);
        let key = ticket_id.to_string();
        let response_id = Uuid::now_v7();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut uow = self.store.unit_of_work(meta.clone());
            let ticket = uow.load::<Ticket>(&key).await?;
            if ticket.is_handled(message_id) {
                return Ok(Some(Outcome::Skipped));
            }
            if !ticket.with_human() {
                return Ok(None);
            }
            let events = uow
                .execute::<Ticket>(
                    &key,
                    TicketCommand::QueueForHuman {
                        in_reply_to: message_id,
                        acknowledgement: Some(HoldingReply {
                            response_id,
                            body: reply.body.clone(),
                            parts: reply.parts.clone(),
                        }),
                        limit: self.auto_replies,
                        at: Utc::now(),
                    },
                )
                .await?;
            let acknowledged = events
                .iter()
                .any(|e| matches!(e, TicketEvent::ResponseSent { .. }));
            match uow.commit().await {
                Ok(_) => return Ok(Some(Outcome::QueuedForHuman { acknowledged })),
                Err(StoreError::Conflict) if CONFLICT_BACKOFF.should_retry(attempt) => {
                    casebook_commands::retry::sleep_backoff(&CONFLICT_BACKOFF, attempt).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn history(&self, customer_id: Uuid, ticket_id: Uuid) -> Result<History, AgentError> {
        // The CRM read models: eventually consistent, which is all context
        // needs.
        // Only identities a channel proved share history (casebook_commands::claims).
        let customers =
            casebook_commands::claims::history_customers(&self.store, customer_id).await?;
        let tickets: Vec<(Uuid, String)> =
            sqlx::query_as("SELECT ticket_id, channel FROM crm_tickets WHERE customer_id = ANY($1) ORDER BY created_at DESC LIMIT 50")
                .bind(&customers)
                .fetch_all(&self.pool)
                .await
                .map_err(StoreError::from)?;
        let ids: Vec<Uuid> = tickets.iter().map(|t| t.0).collect();
        let messages: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT direction, channel, body FROM crm_messages WHERE ticket_id = ANY($1) ORDER BY at DESC LIMIT 10",
        )
        .bind(&ids)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::from)?;
        let mut channels: Vec<Channel> = tickets.iter().filter_map(|t| t.1.parse().ok()).collect();
        channels.extend(messages.iter().filter_map(|m| m.1.parse::<Channel>().ok()));
        channels.sort();
        channels.dedup();
        Ok(History {
            previous_tickets: tickets.iter().filter(|t| t.0 != ticket_id).count() as u32,
            messages,
            channels,
        })
    }

    async fn converse(&self, run: &mut Run, channel: Channel) -> Decision {
        let mut messages = vec![ChatMessage::User(format!(
            "Channel: {}. Customer message:\n{}",
            channel.as_str(),
            run.text
        ))];
        let tools = tools();
        for provider in &self.providers {
            let mut turns = 0;
            while turns < MAX_TURNS {
                turns += 1;
                let reply = match provider.chat(SYSTEM_PROMPT, &messages, &tools).await {
                    Ok(reply) => {
                        run.count_call(provider, reply.usage);
                        reply
                    }
                    Err(e) => {
                        tracing::warn!(
                            provider = provider.name(),
                            error_kind = llm_error_kind(&e),
                            "model unavailable; falling back"
                        );
                        break;
                    }
                };
                match self
                    .follow(run, reply, provider.model(), &mut messages)
                    .await
                {
                    Ok(Some(decision)) => {
                        run.decided_by = Some(provider.model().to_string());
                        return self.grounded(run, decision).await;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error_kind = e.kind(), "a tool failed; falling back");
                        break;
                    }
                }
            }
        }
        run.decided_by = Some("local".into());
        match self.local(run).await {
            Ok(decision) => decision,
            Err(e) => Decision::Escalate {
                reason: EscalationReason::ModelUnavailable,
                note: Some(format!("every model failed; last error: {}", e.kind())),
            },
        }
    }

    /// Executes the model's tool calls; returns the decision once it made one.
    async fn follow(
        &self,
        run: &mut Run,
        reply: ChatReply,
        model: &str,
        messages: &mut Vec<ChatMessage>,
    ) -> Result<Option<Decision>, AgentError> {
        messages.push(ChatMessage::Assistant {
            text: reply.text.clone(),
            tool_calls: reply.tool_calls.clone(),
        });
        if reply.tool_calls.is_empty() {
            // A plain answer counts as send_response.
            return Ok(reply.text.map(|body| Decision::Draft {
                body,
                model_confidence: None,
                generated_by: model.to_string(),
            }));
        }
        let mut decision = None;
        for call in &reply.tool_calls {
            let (result, decided) = self.tool(run, call, model).await?;
            messages.push(ChatMessage::ToolResult {
                call_id: call.id.clone(),
                name: call.name.clone(),
                content: result.to_string(),
            });
            decision = decision.or(decided);
        }
        Ok(decision)
    }

    async fn search<'r>(&self, run: &'r mut Run, query: &str) -> Result<&'r Search, AgentError> {
        let passages = self
            .kb
            .search(query, PASSAGES_PER_SEARCH, RELEVANCE_THRESHOLD)
            .await?;
        run.searches.push(Search {
            query: query.to_string(),
            passages,
        });
        Ok(run.searches.last().expect("just pushed"))
    }

    async fn tool(
        &self,
        run: &mut Run,
        call: &ToolCall,
        model: &str,
    ) -> Result<(Value, Option<Decision>), AgentError> {
        let args = &call.arguments;
        if let Some(asked) = args["channel"].as_str() {
            if asked != run.channel.as_str() {
                return Ok((
                    json!({"error": format!("this conversation is on {}", run.channel.as_str())}),
                    None,
                ));
            }
        }
        Ok(match call.name.as_str() {
            "create_ticket" => (json!({"ticket_id": run.ticket_id, "created": false}), None),
            "get_customer_history" => (
                json!({
                    "previous_tickets": run.history.previous_tickets,
                    "channels": run.history.channels,
                    "recent_messages": run.history.messages.iter()
                        .map(|(d, c, b)| json!({"direction": d, "channel": c, "body": b})).collect::<Vec<_>>(),
                }),
                None,
            ),
            "search_knowledge_base" => {
                if run.searches.len() >= MAX_SEARCHES {
                    (
                        json!({"error": "no searches left for this message; escalate with reason knowledge_gap"}),
                        None,
                    )
                } else {
                    let query = args["query"]
                        .as_str()
                        .filter(|q| !q.trim().is_empty())
                        .unwrap_or(&run.text)
                        .to_string();
                    let search = self.search(run, &query).await?;
                    let passages: Vec<Value> = search
                        .passages
                        .iter()
                        .map(|p| json!({"article_id": p.document_id, "title": p.title, "section": p.section,
                                        "text": p.body, "score": (p.score * 1000.0).round() / 1000.0}))
                        .collect();
                    (json!({"passages": passages}), None)
                }
            }
            "send_response" => {
                if run.searches.is_empty() {
                    (json!({"error": "search the knowledge base first"}), None)
                } else {
                    match args["body"].as_str().filter(|b| !b.trim().is_empty()) {
                        Some(body) => (
                            json!({"status": "accepted"}),
                            Some(Decision::Draft {
                                body: body.to_string(),
                                model_confidence: args["confidence"].as_f64(),
                                generated_by: model.to_string(),
                            }),
                        ),
                        None => (json!({"error": "body is required"}), None),
                    }
                }
            }
            "escalate" => {
                // Only the reasons the tool offers: the model cannot claim
                // the reasons the desk itself records (an automated message,
                // the reply limit, a failed delivery or model).
                let reason = args["reason"]
                    .as_str()
                    .and_then(|r| serde_json::from_value::<EscalationReason>(json!(r)).ok())
                    .filter(|r| MODEL_ESCALATION_REASONS.contains(r))
                    .unwrap_or(EscalationReason::Manual);
                (
                    json!({"status": "escalated"}),
                    Some(Decision::Escalate {
                        reason,
                        note: args["note"]
                            .as_str()
                            .map(|n| n.chars().take(MAX_NOTE_CHARS).collect()),
                    }),
                )
            }
            other => (json!({"error": format!("unknown tool {other}")}), None),
        })
    }

    /// A draft needs passages behind it: make sure the knowledge base was
    /// searched, and escalate when it has nothing relevant.
    async fn grounded(&self, run: &mut Run, decision: Decision) -> Decision {
        if let Decision::Draft { .. } = decision {
            if run.searches.is_empty() {
                let text = run.text.clone();
                if let Err(e) = self.search(run, &text).await {
                    return Decision::Escalate {
                        reason: EscalationReason::ModelUnavailable,
                        note: Some(format!("knowledge base unavailable: {}", e.kind())),
                    };
                }
            }
            if run.relevant().is_empty() {
                return Decision::Escalate {
                    reason: EscalationReason::KnowledgeGap,
                    note: Some("no relevant passage in the knowledge base".into()),
                };
            }
        }
        decision
    }

    /// The built-in responder: search (the message, then its key words),
    /// and answer from the best section (`crate::responder`).
    async fn local(&self, run: &mut Run) -> Result<Decision, AgentError> {
        while run.relevant().is_empty() && run.searches.len() < MAX_SEARCHES {
            let query = if run.searches.is_empty() {
                run.text.clone()
            } else {
                content_words(&run.text).join(" ")
            };
            self.search(run, &query).await?;
        }
        let Some(answer) = crate::responder::respond(&run.relevant(), run.channel) else {
            return Ok(Decision::Escalate {
                reason: EscalationReason::KnowledgeGap,
                note: Some(format!(
                    "{} searches found nothing relevant",
                    run.searches.len()
                )),
            });
        };
        Ok(Decision::Draft {
            body: answer.body().to_string(),
            model_confidence: None,
            generated_by: "local".into(),
        })
    }

    async fn commit(
        &self,
        run: &Run,
        channel: Channel,
        customer_id: Uuid,
        decision: Decision,
        meta: &EventMetadata,
    ) -> Result<Outcome, AgentError> {
        let customer = self
            .store
            .load::<Customer>(&customer_id.to_string())
            .await?
            .aggregate;
        let ctx = ReplyContext::new(customer.name.clone(), run.ticket_id, &self.signature);
        let relevant = run.relevant();
        let grounding: Vec<String> = relevant.iter().map(|p| p.grounding_text()).collect();
        let passages: Vec<&str> = grounding.iter().map(String::as_str).collect();
        // 5. Judge the draft.
        let verdict = match &decision {
            Decision::Draft {
                body,
                model_confidence,
                ..
            } => {
                let support = support(body, &passages);
                let confidence = draft_confidence(&ConfidenceInputs {
                    top_similarity: run.top_score(),
                    supported_sentences: support.supported,
                    judged_sentences: support.judged,
                    model_confidence: *model_confidence,
                });
                let mut reasons: Vec<String> = review_draft(body, &passages)
                    .iter()
                    .map(|i| i.describe())
                    .collect();
                if confidence < APPROVAL_THRESHOLD {
                    reasons.insert(
                        0,
                        format!("confidence {confidence:.2} is below {APPROVAL_THRESHOLD}"),
                    );
                }
                Some((confidence, reasons))
            }
            Decision::Escalate { .. } => None,
        };
        let configuration = AiConfiguration {
            model: run.decided_by.clone().unwrap_or_else(|| NO_MODEL.into()),
            prompt_version: self.prompt_version.clone(),
            kb_version: self.kb_version().await,
            experiment: self.experiment.clone(),
        };
        let usage: Vec<ModelUsage> = run.usage.iter().map(|(u, _)| u.clone()).collect();
        let at = Utc::now();
        let ticket_key = run.ticket_id.to_string();
        let draft_id = Uuid::now_v7();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut uow = self.store.unit_of_work(meta.clone());
            let ticket = uow.load::<Ticket>(&ticket_key).await?;
            if ticket.is_handled(run.message_id) {
                return Ok(Outcome::Skipped);
            }
            if ticket.with_human() {
                // A person took the ticket while the model worked: what
                // the model made is dropped, the message is theirs.
                drop(uow);
                return Ok(self
                    .queue_for_human(run.ticket_id, run.message_id, channel, customer_id, meta)
                    .await?
                    .unwrap_or(Outcome::Skipped));
            }
            // Decided again on the ticket as it is now: replies sent while
            // the model worked count.
            let may_reply = ticket.may_reply_automatically(at, self.auto_replies);
            let ctx = ctx.clone().with_status_link(
                self.public_url
                    .as_deref()
                    .filter(|_| status_link::is_first_reply(ticket))
                    .map(|url| status_link::status_link(url, run.ticket_id)),
            );
            let free_form = ticket.free_form_allowed(at);
            let template = casebook_commands::staff::reply_template(
                ticket,
                at,
                self.followup_template.as_deref(),
            );
            uow.execute::<Ticket>(
                &ticket_key,
                TicketCommand::RecordHistoryReview {
                    previous_tickets: run.history.previous_tickets,
                    previous_messages: run.history.messages.len() as u32,
                    channels: run.history.channels.clone(),
                    at,
                },
            )
            .await?;
            for search in &run.searches {
                uow.execute::<Ticket>(
                    &ticket_key,
                    TicketCommand::RecordKnowledgeSearch {
                        in_reply_to: Some(run.message_id),
                        query: search.query.clone(),
                        hits: search
                            .passages
                            .iter()
                            .map(|p| KnowledgeHit {
                                document_id: p.document_id.clone(),
                                chunk_id: p.chunk_id.clone(),
                                title: p.title.clone(),
                                score: p.score,
                            })
                            .collect(),
                        at,
                    },
                )
                .await?;
            }
            uow.execute::<Ticket>(
                &ticket_key,
                TicketCommand::RecordModelUsage {
                    in_reply_to: run.message_id,
                    usage: usage.clone(),
                    configuration: configuration.clone(),
                    at,
                },
            )
            .await?;
            let outcome = match (&decision, &verdict) {
                (Decision::Draft { .. }, Some(_)) if !may_reply => {
                    uow.execute::<Ticket>(
                        &ticket_key,
                        TicketCommand::WithholdReply {
                            in_reply_to: run.message_id,
                            reason: WithholdReason::AutoReplyLimit,
                            escalation_id: Uuid::now_v7(),
                            at,
                        },
                    )
                    .await?;
                    Outcome::Withheld(WithholdReason::AutoReplyLimit)
                }
                (
                    Decision::Draft {
                        body, generated_by, ..
                    },
                    Some((confidence, reasons)),
                ) => {
                    uow.execute::<Ticket>(
                        &ticket_key,
                        TicketCommand::DraftResponse {
                            draft_id,
                            in_reply_to: Some(run.message_id),
                            body: body.clone(),
                            confidence: *confidence,
                            sources: relevant.iter().map(|p| p.chunk_id.clone()).collect(),
                            generated_by: generated_by.clone(),
                            at,
                        },
                    )
                    .await?;
                    if reasons.is_empty() && template.is_err() {
                        // WhatsApp takes no free-form answer this late, and
                        // there is no template: a person decides.
                        uow.execute::<Ticket>(
                            &ticket_key,
                            TicketCommand::Escalate {
                                escalation_id: Uuid::now_v7(),
                                in_reply_to: None,
                                reason: EscalationReason::WhatsappWindowClosed,
                                note: Some(
                                    "the answer was drafted more than 24 hours after the customer's last message and TWILIO_FOLLOWUP_CONTENT_SID is not set; the draft was not sent".into(),
                                ),
                                at,
                            },
                        )
                        .await?;
                        Outcome::Escalated(EscalationReason::WhatsappWindowClosed)
                    } else if reasons.is_empty() {
                        let reply = format_reply(channel, body, &ctx);
                        uow.execute::<Ticket>(
                            &ticket_key,
                            TicketCommand::SendResponse {
                                response_id: Uuid::now_v7(),
                                draft_id: Some(draft_id),
                                channel,
                                body: reply.body,
                                parts: reply.parts,
                                in_reply_to: Some(run.message_id),
                                automatic: Some(self.auto_replies),
                                holding: false,
                                template: template.clone().unwrap_or_default(),
                                at,
                            },
                        )
                        .await?;
                        Outcome::Sent {
                            confidence: *confidence,
                        }
                    } else {
                        uow.execute::<Ticket>(
                            &ticket_key,
                            TicketCommand::RequestApproval {
                                approval_id: Uuid::now_v7(),
                                draft_id,
                                reasons: reasons.clone(),
                                at,
                            },
                        )
                        .await?;
                        Outcome::AwaitingApproval {
                            confidence: *confidence,
                            reasons: reasons.clone(),
                        }
                    }
                }
                (Decision::Escalate { reason, note }, _) => {
                    // Marks the message handled, unless staff already hold
                    // an escalation for this reason: then the holding reply
                    // (or the withheld one) does.
                    let escalated = uow
                        .execute::<Ticket>(
                            &ticket_key,
                            TicketCommand::Escalate {
                                escalation_id: Uuid::now_v7(),
                                in_reply_to: Some(run.message_id),
                                reason: *reason,
                                note: note.clone(),
                                at,
                            },
                        )
                        .await?;
                    if may_reply && free_form {
                        let reply = format_reply(channel, holding_reply(*reason), &ctx);
                        uow.execute::<Ticket>(
                            &ticket_key,
                            TicketCommand::SendResponse {
                                response_id: Uuid::now_v7(),
                                draft_id: None,
                                channel,
                                body: reply.body,
                                parts: reply.parts,
                                in_reply_to: Some(run.message_id),
                                automatic: Some(self.auto_replies),
                                // Says a person will answer: not a response.
                                holding: true,
                                template: None,
                                at,
                            },
                        )
                        .await?;
                    } else if escalated.is_empty() {
                        uow.execute::<Ticket>(
                            &ticket_key,
                            TicketCommand::WithholdReply {
                                in_reply_to: run.message_id,
                                reason: WithholdReason::AutoReplyLimit,
                                escalation_id: Uuid::now_v7(),
                                at,
                            },
                        )
                        .await?;
                    }
                    Outcome::Escalated(*reason)
                }
                (Decision::Draft { .. }, None) => unreachable!("every draft has a verdict"),
            };
            match uow.commit().await {
                Ok(_) => return Ok(outcome),
                Err(StoreError::Conflict) if CONFLICT_BACKOFF.should_retry(attempt) => {
                    casebook_commands::retry::sleep_backoff(&CONFLICT_BACKOFF, attempt).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Up to three sentences of the best passages, those sharing most words
/// with the question, in the order the passage has them.
pub fn extractive_answer(question: &str, passages: &[&Passage]) -> String {
    let wanted: BTreeSet<String> = content_words(question).into_iter().collect();
    let best = passages.iter().map(|p| p.score).fold(f64::MIN, f64::max);
    let mut candidates: Vec<(usize, usize, String)> = Vec::new();
    for (pi, passage) in passages
        .iter()
        .filter(|p| p.score >= best - 0.1)
        .take(2)
        .enumerate()
    {
        // The chunk's first line is the document title.
        let text = passage
            .body
            .split_once('\n')
            .map(|(_, rest)| rest)
            .unwrap_or(&passage.body);
        for (si, sentence) in sentences(text).into_iter().enumerate() {
            let overlap = content_words(&sentence)
                .iter()
                .filter(|w| wanted.contains(*w))
                .count();
            candidates.push((overlap, pi * 1000 + si, sentence));
        }
    }
    candidates.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut chosen: Vec<(usize, String)> = candidates
        .into_iter()
        .take(3)
        .map(|(_, order, s)| (order, s))
        .collect();
    chosen.sort_by_key(|c| c.0);
    chosen
        .into_iter()
        .map(|c| c.1)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The agent worker's handler for `<prefix>.tickets.incoming`.
pub struct AgentHandler(pub std::sync::Arc<Agent>);

#[async_trait::async_trait]
impl casebook_commands::worker::Handler for AgentHandler {
    async fn handle(
        &self,
        message: &casebook_commands::worker::Incoming,
    ) -> Result<(), casebook_commands::worker::HandlerError> {
        use casebook_commands::worker::HandlerError;
        let envelope: EventEnvelope = serde_json::from_slice(&message.payload)
            .map_err(|e| HandlerError::Poison(format!("not an event envelope: {e}")))?;
        if envelope.event_type != "CustomerMessageReceived" {
            return Ok(());
        }
        // Every line the agent logs for this message carries the ids that
        // tie it to the request that brought the message in.
        let span = tracing::info_span!(
            "agent_message",
            correlation_id = %envelope.correlation_id,
            causation_id = %envelope.causation_id,
            event_id = %envelope.event_id,
            ticket_id = %envelope.aggregate_id,
        );
        let started = std::time::Instant::now();
        let result = self.0.handle(&envelope).instrument(span).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(AgentError::Rejected(TicketError::AlreadyHandled(_) | TicketError::Closed)) => {
                "skipped"
            }
            Err(_) => "error",
        };
        casebook_commands::metrics::AGENT_SECONDS
            .with_label_values(&[outcome])
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(_) => Ok(()),
            Err(AgentError::NotAMessage(id)) => Err(HandlerError::Poison(format!(
                "event {id} is not a customer message"
            ))),
            // Handled already, or closed while the agent worked: nothing to do.
            Err(AgentError::Rejected(TicketError::AlreadyHandled(_) | TicketError::Closed)) => {
                Ok(())
            }
            Err(AgentError::Rejected(e)) => Err(HandlerError::Poison(e.to_string())),
            Err(e) => Err(HandlerError::Retry(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passage(body: &str, score: f64) -> Passage {
        Passage {
            chunk_id: "c".into(),
            document_id: "d".into(),
            title: "t".into(),
            body: body.into(),
            score,
            section: None,
        }
    }

    #[test]
    fn the_local_answer_takes_the_sentences_that_match_the_question() {
        let p = passage(
            "How do I export?\nExports run in the background. To export a project, open Settings > Workspace > Export. \
             Choose CSV or JSON and press Export. Our offices are in Lisbon.",
            0.8,
        );
        let answer = extractive_answer("How do I export a project as CSV?", &[&p]);
        assert!(
            answer.contains("open Settings > Workspace > Export"),
            "{answer}"
        );
        assert!(answer.contains("Choose CSV"), "{answer}");
        assert!(!answer.contains("Lisbon"), "{answer}");
    }
}
