//! Intake: a customer message from any channel becomes events, atomically.
//!
//! One unit of work records the channel message (its dedupe key), claims the
//! sender's identities for one customer (registering the customer the first
//! time), opens or continues the ticket the conversation belongs to, and
//! records the message on it. Either all of that is stored or none of it, so
//! a message that was acknowledged is never lost and a redelivered one is
//! recognised, whatever happened in between.
//!
//! Only identities a channel proves (a Twilio-signed WhatsApp number, mail
//! that arrived in our mailbox) are claimed for a customer and so join
//! earlier conversations. A web-form address is a claim: the submission
//! gets a customer of its own holding the address as `claimed`, and, when
//! the API asks for one, an `email_claim` the submitter confirms by link
//! (see `crate::claims`).
//!
//! Every field is bounded here, for every channel, before it can reach an
//! event (see [`bound`]): identifiers and bodies over their limit refuse
//! the message (cutting an id would break deduplication, cutting a body
//! would answer something the customer did not write); a display name or a
//! subject over its limit is cut at a character boundary.

use casebook_domain::channel_message::channel_message_key;
use casebook_domain::identity::{channel_proves_identity, IdentityKey, IdentityKind};
use casebook_domain::ticket::{DeliveryStatus, EmailThread};
use casebook_domain::webform::{is_replay, StoredSubmission, WebFormSubmission};
use casebook_domain::{
    Actor, ActorKind, Category, Channel, ChannelMessage, ChannelMessageCommand, Conversation,
    ConversationCommand, Customer, CustomerCommand, CustomerIdentity, CustomerIdentityCommand,
    CustomerIdentityError, Direction, EmailClaim, EmailClaimCommand, EventMetadata, Priority,
    Ticket, TicketCommand, TicketError, TicketEvent, TicketStatus,
};
use std::time::Duration;

use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use uuid::Uuid;

use crate::claims::NewClaim;
use crate::limits::Gate;
use crate::metrics::INTAKE_MESSAGES;
use crate::retry::sleep_backoff;
use crate::store::{CommandError, Committed, EventStore, StoreError, CONFLICT_BACKOFF};

/// Who wrote: every identity the channel tells us, and a display name.
#[derive(Debug, Clone, PartialEq)]
pub struct Sender {
    pub identities: Vec<IdentityKey>,
    pub name: Option<String>,
}

/// One inbound customer message, validated and sanitised by the channel
/// adapter that received it.
#[derive(Debug, Clone, PartialEq)]
pub struct InboundMessage {
    pub channel: Channel,
    /// The channel's own id for the message (Twilio `MessageSid`, Gmail
    /// message id, the web form's request key).
    pub channel_message_id: String,
    pub sender: Sender,
    /// The conversation the message continues (a WhatsApp number, a Gmail
    /// thread), if the channel has one.
    pub conversation_id: Option<String>,
    /// For email: the thread replies must join.
    pub thread: Option<EmailThread>,
    pub subject: Option<String>,
    pub body: String,
    pub attachments: u32,
    pub category: Category,
    pub priority: Priority,
    pub received_at: DateTime<Utc>,
    /// Why the message must not be answered automatically (an auto-reply, a
    /// bounce, bulk or list mail), or `None` for a person writing.
    pub automated: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntakeOutcome {
    pub ticket_id: Uuid,
    pub message_id: Uuid,
    /// The channel message was already accepted; nothing new was stored.
    pub duplicate: bool,
    pub new_ticket: bool,
}

/// Bounds of every inbound field, whatever the channel.
pub mod limits {
    /// A channel's message id (Twilio SID, Gmail id, web-form key): refused
    /// over this.
    pub const CHANNEL_MESSAGE_ID_MAX: usize = 256;
    /// A conversation id (`gmail-thread:<threadId>`, `whatsapp:+…`): refused.
    pub const CONVERSATION_ID_MAX: usize = 300;
    /// Gmail `threadId`: refused.
    pub const THREAD_ID_MAX: usize = 256;
    /// A `Message-ID` header (RFC 5322 keeps lines under 998): refused.
    pub const MESSAGE_ID_HEADER_MAX: usize = 998;
    /// A message body, in characters: refused.
    pub const BODY_MAX: usize = 32_000;
    /// A display name, in characters: cut.
    pub const NAME_MAX: usize = 100;
    /// A subject, in characters: cut.
    pub const SUBJECT_MAX: usize = 998;
    /// Identities one sender may bring: refused.
    pub const IDENTITIES_MAX: usize = 8;
    /// Attachments counted on one message: refused.
    pub const ATTACHMENTS_MAX: u32 = 100;
}

fn cut(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

/// The single gate every inbound message passes before it can become an
/// event: refuses what cannot be cut, cuts what can (see the module docs).
pub fn bound(m: &InboundMessage) -> Result<InboundMessage, IntakeError> {
    use limits::*;
    let too_long = |what: &str, max: usize| {
        Err(IntakeError::Rejected(format!(
            "{what} is longer than {max} characters"
        )))
    };
    if m.channel_message_id.len() > CHANNEL_MESSAGE_ID_MAX {
        return too_long("the channel message id", CHANNEL_MESSAGE_ID_MAX);
    }
    if m.conversation_id
        .as_ref()
        .is_some_and(|c| c.len() > CONVERSATION_ID_MAX)
    {
        return too_long("the conversation id", CONVERSATION_ID_MAX);
    }
    if let Some(thread) = &m.thread {
        if thread.thread_id.len() > THREAD_ID_MAX {
            return too_long("the thread id", THREAD_ID_MAX);
        }
        if thread
            .message_id_header
            .as_ref()
            .is_some_and(|h| h.len() > MESSAGE_ID_HEADER_MAX)
        {
            return too_long("the Message-ID header", MESSAGE_ID_HEADER_MAX);
        }
    }
    if m.body.chars().count() > BODY_MAX {
        return too_long("the message", BODY_MAX);
    }
    if m.sender.identities.len() > IDENTITIES_MAX {
        return Err(IntakeError::Rejected(format!(
            "a sender has at most {IDENTITIES_MAX} identities"
        )));
    }
    if m.attachments > ATTACHMENTS_MAX {
        return Err(IntakeError::Rejected(format!(
            "a message has at most {ATTACHMENTS_MAX} attachments"
        )));
    }
    let mut bounded = m.clone();
    bounded.sender.name = m
        .sender
        .name
        .as_deref()
        .map(|n| cut(n.trim(), NAME_MAX).trim().to_string())
        .filter(|n| !n.is_empty());
    bounded.subject = m.subject.as_deref().map(|s| cut(s, SUBJECT_MAX));
    if let Some(thread) = bounded.thread.as_mut() {
        thread.subject = thread.subject.as_deref().map(|s| cut(s, SUBJECT_MAX));
    }
    Ok(bounded)
}

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("message refused: {0}")]
    Rejected(String),
    /// The same web-form request key with a different submission.
    #[error("{0}")]
    Conflict(String),
    /// The gate's rate limit had no room: nothing was stored.
    #[error("over the rate limit; retry after {retry_after:?}")]
    Limited { retry_after: Duration },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Commits `uow` through `gate`, a limit hit being an error.
async fn commit_gated(
    uow: crate::store::UnitOfWork<'_>,
    gate: Option<&Gate>,
) -> Result<(), IntakeError> {
    match uow.commit_gated(gate).await? {
        Committed::Written(_) => Ok(()),
        Committed::Limited { retry_after } => Err(IntakeError::Limited { retry_after }),
    }
}

/// Where a web-form submission's channel key comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOrigin {
    /// Made up for this request (a fresh UUID): it names nothing stored.
    Fresh,
    /// Derived from the client's request id: a retry repeats it.
    Client,
}

impl<E: std::error::Error> From<CommandError<E>> for IntakeError {
    fn from(err: CommandError<E>) -> Self {
        match err {
            CommandError::Rejected(e) => IntakeError::Rejected(e.to_string()),
            CommandError::Store(e) => IntakeError::Store(e),
        }
    }
}

#[derive(Clone)]
pub struct Intake {
    store: EventStore,
}

impl Intake {
    pub fn new(store: EventStore) -> Self {
        Self { store }
    }

    /// Stores the message (or recognises it as a duplicate). Returns once
    /// the events are committed: the caller may acknowledge then.
    pub async fn receive(
        &self,
        message: &InboundMessage,
        correlation_id: &str,
    ) -> Result<IntakeOutcome, IntakeError> {
        self.receive_inner(message, None, None, correlation_id)
            .await
    }

    /// A web-form submission: stored like [`Intake::receive`], with the
    /// claim on its email address that the acknowledgement lets the
    /// submitter confirm. A repeated request key answers with the earlier
    /// ticket only for a byte-identical retry within the replay window;
    /// anything else is [`IntakeError::Conflict`]. With a `gate`, a new
    /// submission is stored only when the gate's rate limit has room, and
    /// its hit is counted in the same commit: a retry or a duplicate takes
    /// no hit, and a limited one stores nothing ([`IntakeError::Limited`]).
    ///
    /// A submission whose key was made up for this request
    /// ([`KeyOrigin::Fresh`]) cannot have been seen before, so nothing is
    /// read: its events are written in one round trip.
    pub async fn receive_claimed(
        &self,
        message: &InboundMessage,
        claim: &NewClaim,
        gate: Option<&Gate>,
        origin: KeyOrigin,
        correlation_id: &str,
    ) -> Result<IntakeOutcome, IntakeError> {
        self.receive_inner(message, Some((claim, origin)), gate, correlation_id)
            .await
    }

    async fn receive_inner(
        &self,
        message: &InboundMessage,
        claim: Option<(&NewClaim, KeyOrigin)>,
        gate: Option<&Gate>,
        correlation_id: &str,
    ) -> Result<IntakeOutcome, IntakeError> {
        if message.sender.identities.is_empty() {
            return Err(IntakeError::Rejected("the sender has no identity".into()));
        }
        let message = &bound(message)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.try_receive(message, claim, gate, correlation_id).await {
                Err(IntakeError::Store(StoreError::Conflict))
                    if CONFLICT_BACKOFF.should_retry(attempt) =>
                {
                    sleep_backoff(&CONFLICT_BACKOFF, attempt).await;
                }
                Ok(outcome) => {
                    let result = if outcome.duplicate {
                        "duplicate"
                    } else {
                        "accepted"
                    };
                    INTAKE_MESSAGES
                        .with_label_values(&[message.channel.as_str(), result])
                        .inc();
                    tracing::info!(
                        channel = message.channel.as_str(),
                        ticket_id = %outcome.ticket_id,
                        duplicate = outcome.duplicate,
                        new_ticket = outcome.new_ticket,
                        "message taken in"
                    );
                    return Ok(outcome);
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn try_receive(
        &self,
        m: &InboundMessage,
        claim: Option<(&NewClaim, KeyOrigin)>,
        gate: Option<&Gate>,
        correlation_id: &str,
    ) -> Result<IntakeOutcome, IntakeError> {
        let at = m.received_at;
        // What the channel proved, and what the sender only says.
        let proven = channel_proves_identity(m.channel);
        let key = channel_message_key(m.channel, Direction::Inbound, &m.channel_message_id);
        let mut meta =
            EventMetadata::new(correlation_id, Actor::system("intake")).on_channel(m.channel);
        let mut uow = self.store.unit_of_work(meta.clone());
        let (claim, origin) = claim.unzip();
        if !proven && origin == Some(KeyOrigin::Fresh) && m.conversation_id.is_none() {
            // An unproven sender joins nothing, and a key made up for this
            // request names no earlier message: there is nothing to read.
            // Should the key exist after all, the commit is a conflict.
            uow.create::<ChannelMessage>(&key);
            return self.receive_unproven(uow, meta, m, &key, claim, gate).await;
        }
        // Everything this message may touch that already exists, in one read.
        let mut wanted: Vec<(&str, String)> = vec![(ChannelMessage::TYPE, key.clone())];
        if proven {
            wanted.extend(
                m.sender
                    .identities
                    .iter()
                    .map(|i| (CustomerIdentity::TYPE, i.aggregate_id())),
            );
        }
        if let Some(conversation_id) = &m.conversation_id {
            wanted.push((Conversation::TYPE, conversation_id.clone()));
        }
        uow.prefetch(&wanted, proven).await?;

        let seen = uow.load::<ChannelMessage>(&key).await?;
        if let (Some(ticket_id), Some(message_id)) = (seen.ticket_id, seen.message_id) {
            if !proven {
                self.check_replay(m, ticket_id, message_id).await?;
            }
            return Ok(IntakeOutcome {
                ticket_id,
                message_id,
                duplicate: true,
                new_ticket: false,
            });
        }

        if !proven {
            return self.receive_unproven(uow, meta, m, &key, claim, gate).await;
        }

        // The customer: whoever owns the first identity already claimed.
        let mut owner = None;
        for identity in &m.sender.identities {
            if let Some(o) = uow
                .load::<CustomerIdentity>(&identity.aggregate_id())
                .await?
                .owner
            {
                owner.get_or_insert(o);
            }
        }
        let customer_id = owner.unwrap_or_else(Uuid::now_v7);
        meta.actor = Actor::new(ActorKind::Customer, customer_id.to_string());
        uow.set_metadata(meta);

        let mut claimed = Vec::new();
        for identity in &m.sender.identities {
            let claim = CustomerIdentityCommand::Claim {
                identity: identity.clone(),
                customer_id,
                at,
            };
            match uow
                .execute::<CustomerIdentity>(&identity.aggregate_id(), claim)
                .await
            {
                Ok(events) if !events.is_empty() => claimed.push(identity.clone()),
                Ok(_) => {}
                // Another customer owns this one (say, a shared phone): leave
                // it with them rather than merging people automatically.
                Err(CommandError::Rejected(CustomerIdentityError::ClaimedByAnother { .. })) => {
                    tracing::info!(
                        kind = identity.kind.as_str(),
                        "identity belongs to another customer; not linked"
                    );
                }
                Err(e) => return Err(e.into()),
            }
        }
        let customer_key = customer_id.to_string();
        if owner.is_none() {
            uow.create::<Customer>(&customer_key);
            uow.execute::<Customer>(
                &customer_key,
                CustomerCommand::Register {
                    customer_id,
                    name: m.sender.name.clone(),
                    identities: claimed,
                    claimed: vec![],
                    at,
                },
            )
            .await?;
        } else {
            for identity in claimed {
                uow.execute::<Customer>(
                    &customer_key,
                    CustomerCommand::LinkIdentity { identity, at },
                )
                .await?;
            }
            let customer = uow.load::<Customer>(&customer_key).await?;
            if customer.name.is_none() {
                if let Some(name) = m.sender.name.clone() {
                    uow.execute::<Customer>(
                        &customer_key,
                        CustomerCommand::UpdateName { name, at },
                    )
                    .await?;
                }
            }
        }

        // The ticket: the conversation's current one while it can take the
        // message, else a new one.
        let mut ticket_id = None;
        let mut previous_ticket_id = None;
        if let Some(conversation_id) = &m.conversation_id {
            if let Some(current) = uow
                .load::<Conversation>(conversation_id)
                .await?
                .current_ticket
            {
                let ticket = uow.load::<Ticket>(&current.to_string()).await?;
                if continues(ticket.status) {
                    ticket_id = Some(current);
                } else {
                    // Closed: a new ticket, linked to the one it follows.
                    previous_ticket_id = Some(current);
                }
            }
        }
        let new_ticket = ticket_id.is_none();
        let ticket_id = ticket_id.unwrap_or_else(Uuid::now_v7);
        if new_ticket {
            open_ticket(&mut uow, m, ticket_id, customer_id, previous_ticket_id).await?;
            if let Some(conversation_id) = &m.conversation_id {
                uow.execute::<Conversation>(
                    conversation_id,
                    ConversationCommand::LinkTicket { ticket_id, at },
                )
                .await?;
            }
        }
        let message_id = record_message(&mut uow, m, &key, ticket_id, customer_id).await?;
        commit_gated(uow, gate).await?;
        Ok(IntakeOutcome {
            ticket_id,
            message_id,
            duplicate: false,
            new_ticket,
        })
    }

    /// A repeated web-form request key: the earlier submission's ticket
    /// only for the same submission, soon after; else a conflict.
    async fn check_replay(
        &self,
        m: &InboundMessage,
        ticket_id: Uuid,
        message_id: Uuid,
    ) -> Result<(), IntakeError> {
        let events = self.store.events::<Ticket>(&ticket_id.to_string()).await?;
        let mut ticket = Ticket::default();
        let mut stored_body = None;
        for e in &events {
            if let TicketEvent::CustomerMessageReceived {
                message_id: id,
                body,
                received_at,
                ..
            } = e
            {
                if *id == message_id {
                    stored_body = Some((body.clone(), *received_at));
                }
            }
            ticket.apply_event(e.clone());
        }
        let customer = match ticket.customer_id {
            Some(c) => self.store.load::<Customer>(&c.to_string()).await?.aggregate,
            None => Customer::default(),
        };
        let Some((message, received_at)) = stored_body else {
            return Err(IntakeError::Conflict(
                "this client_request_id was already used".into(),
            ));
        };
        let stored = StoredSubmission {
            name: customer.name.clone(),
            subject: ticket.subject.clone(),
            message,
            category: ticket.category,
            priority: ticket.priority,
            received_at,
        };
        let new = WebFormSubmission {
            name: m.sender.name.clone().unwrap_or_default(),
            email: String::new(),
            subject: m.subject.clone().unwrap_or_default(),
            message: m.body.clone(),
            category: m.category,
            priority: m.priority,
            client_request_id: None,
        };
        if is_replay(&new, &stored, Utc::now()) {
            Ok(())
        } else {
            Err(IntakeError::Conflict(
                "this client_request_id was already used for another submission".into(),
            ))
        }
    }

    /// A message whose sender the channel did not prove (the web form): a
    /// customer of its own holding the addresses as claims, a ticket of its
    /// own, and the claim the acknowledgement lets the sender confirm.
    async fn receive_unproven(
        &self,
        mut uow: crate::store::UnitOfWork<'_>,
        mut meta: EventMetadata,
        m: &InboundMessage,
        key: &str,
        claim: Option<&NewClaim>,
        gate: Option<&Gate>,
    ) -> Result<IntakeOutcome, IntakeError> {
        let at = m.received_at;
        let customer_id = Uuid::now_v7();
        meta.actor = Actor::new(ActorKind::Customer, customer_id.to_string());
        uow.set_metadata(meta);
        let customer_key = customer_id.to_string();
        uow.create::<Customer>(&customer_key);
        uow.execute::<Customer>(
            &customer_key,
            CustomerCommand::Register {
                customer_id,
                name: m.sender.name.clone(),
                identities: vec![],
                claimed: m.sender.identities.clone(),
                at,
            },
        )
        .await?;
        let ticket_id = Uuid::now_v7();
        open_ticket(&mut uow, m, ticket_id, customer_id, None).await?;
        let message_id = record_message(&mut uow, m, key, ticket_id, customer_id).await?;
        let email = m
            .sender
            .identities
            .iter()
            .find(|i| i.kind == IdentityKind::Email);
        if let (Some(claim), Some(email)) = (claim, email) {
            uow.create::<EmailClaim>(&claim.aggregate_id);
            uow.execute::<EmailClaim>(
                &claim.aggregate_id,
                EmailClaimCommand::Open {
                    claim_id: claim.claim_id,
                    identity: email.clone(),
                    customer_id,
                    ticket_id,
                    at,
                },
            )
            .await?;
        }
        commit_gated(uow, gate).await?;
        Ok(IntakeOutcome {
            ticket_id,
            message_id,
            duplicate: false,
            new_ticket: true,
        })
    }

    /// Records a reply we handed to a provider under the provider's id (a
    /// Twilio `MessageSid`), so its status callbacks find the ticket.
    pub async fn record_outbound(
        &self,
        ticket_id: Uuid,
        response_id: Uuid,
        channel: Channel,
        provider_message_id: &str,
        status: DeliveryStatus,
        meta: EventMetadata,
    ) -> Result<(), IntakeError> {
        let key = channel_message_key(channel, Direction::Outbound, provider_message_id);
        let at = Utc::now();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut uow = self.store.unit_of_work(meta.clone());
            let known = uow.load::<ChannelMessage>(&key).await?.ticket_id.is_some();
            if !known {
                uow.execute::<ChannelMessage>(
                    &key,
                    ChannelMessageCommand::Accept {
                        ticket_id,
                        message_id: response_id,
                        channel,
                        direction: Direction::Outbound,
                        channel_message_id: provider_message_id.to_string(),
                        at,
                    },
                )
                .await?;
            }
            uow.execute::<Ticket>(
                &ticket_id.to_string(),
                TicketCommand::RecordDeliveryStatus {
                    response_id,
                    status,
                    provider_message_id: Some(provider_message_id.to_string()),
                    error: None,
                    at,
                },
            )
            .await?;
            match uow.commit().await {
                Err(StoreError::Conflict) if CONFLICT_BACKOFF.should_retry(attempt) => {
                    sleep_backoff(&CONFLICT_BACKOFF, attempt).await
                }
                other => return other.map(|_| ()).map_err(Into::into),
            }
        }
    }

    /// A provider's delivery report for a reply we sent. Returns the ticket
    /// it belongs to, or `None` for a provider id we never sent.
    pub async fn record_delivery_status(
        &self,
        channel: Channel,
        provider_message_id: &str,
        status: DeliveryStatus,
        error: Option<String>,
        correlation_id: &str,
    ) -> Result<Option<Uuid>, IntakeError> {
        let key = channel_message_key(channel, Direction::Outbound, provider_message_id);
        let sent = self.store.load::<ChannelMessage>(&key).await?.aggregate;
        let (Some(ticket_id), Some(response_id)) = (sent.ticket_id, sent.message_id) else {
            return Ok(None);
        };
        let meta = EventMetadata::new(
            correlation_id,
            Actor::system(&format!("{}-status", channel.as_str())),
        )
        .on_channel(channel);
        self.store
            .execute::<Ticket>(
                &ticket_id.to_string(),
                TicketCommand::RecordDeliveryStatus {
                    response_id,
                    status,
                    provider_message_id: Some(provider_message_id.to_string()),
                    error,
                    at: Utc::now(),
                },
                &meta,
            )
            .await?;
        Ok(Some(ticket_id))
    }
}

/// Opens a new ticket for the message's sender, linked to the closed
/// ticket of the same conversation it follows, if any.
async fn open_ticket(
    uow: &mut crate::store::UnitOfWork<'_>,
    m: &InboundMessage,
    ticket_id: Uuid,
    customer_id: Uuid,
    previous_ticket_id: Option<Uuid>,
) -> Result<(), IntakeError> {
    let ticket_key = ticket_id.to_string();
    uow.create::<Ticket>(&ticket_key);
    uow.execute::<Ticket>(
        &ticket_key,
        TicketCommand::Open {
            ticket_id,
            customer_id,
            channel: m.channel,
            subject: m.subject.clone(),
            category: m.category,
            priority: m.priority,
            previous_ticket_id,
            at: m.received_at,
        },
    )
    .await?;
    Ok(())
}

/// Records the message on its ticket and accepts its channel message id
/// (the dedupe key `key`). Returns the new message's id.
async fn record_message(
    uow: &mut crate::store::UnitOfWork<'_>,
    m: &InboundMessage,
    key: &str,
    ticket_id: Uuid,
    customer_id: Uuid,
) -> Result<Uuid, IntakeError> {
    let at = m.received_at;
    let message_id = Uuid::now_v7();
    let received = uow
        .execute::<Ticket>(
            &ticket_id.to_string(),
            TicketCommand::ReceiveCustomerMessage {
                message_id,
                customer_id,
                channel: m.channel,
                channel_message_id: m.channel_message_id.clone(),
                body: m.body.clone(),
                attachments: m.attachments,
                thread: m.thread.clone(),
                automated: m.automated.clone(),
                at,
            },
        )
        .await;
    match received {
        Ok(_) => {}
        Err(CommandError::Rejected(TicketError::EmptyMessage)) => {
            return Err(IntakeError::Rejected(
                "a message needs a body or an attachment".into(),
            ))
        }
        Err(e) => return Err(e.into()),
    }
    uow.execute::<ChannelMessage>(
        key,
        ChannelMessageCommand::Accept {
            ticket_id,
            message_id,
            channel: m.channel,
            direction: Direction::Inbound,
            channel_message_id: m.channel_message_id.clone(),
            at,
        },
    )
    .await?;
    Ok(message_id)
}

/// Whether a new message continues the conversation's ticket in `status`.
/// A message on a resolved ticket reopens it, on every channel (into its
/// assignee's queue, if it has one); closed is final: the message opens a
/// new ticket linked to the closed one (`previous_ticket_id`). An email
/// reply in a closed ticket's thread is treated like a WhatsApp message
/// after closure: the customer expects an answer, not silence, and the
/// person who picks it up sees which ticket it follows.
fn continues(status: TicketStatus) -> bool {
    status != TicketStatus::Closed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversations_continue_until_the_ticket_is_closed() {
        assert!(continues(TicketStatus::Responded));
        assert!(continues(TicketStatus::Escalated));
        // Resolved reopens, on WhatsApp as on email.
        assert!(continues(TicketStatus::Resolved));
        assert!(!continues(TicketStatus::Closed));
    }

    fn message() -> InboundMessage {
        InboundMessage {
            channel: Channel::Email,
            channel_message_id: "m1".into(),
            sender: Sender {
                identities: vec![IdentityKey::email("ada@example.com").unwrap()],
                name: Some("Ada".into()),
            },
            conversation_id: Some("gmail-thread:t1".into()),
            thread: Some(EmailThread {
                thread_id: "t1".into(),
                message_id_header: Some("<m1@example.com>".into()),
                subject: Some("Hi".into()),
            }),
            subject: Some("Hi".into()),
            body: "Hello".into(),
            attachments: 0,
            category: Category::General,
            priority: Priority::Medium,
            received_at: DateTime::UNIX_EPOCH,
            automated: None,
        }
    }

    #[test]
    fn a_message_within_bounds_passes_unchanged() {
        assert_eq!(bound(&message()).unwrap(), message());
    }

    #[test]
    fn oversized_ids_and_bodies_are_refused() {
        let refused = |m: InboundMessage| matches!(bound(&m), Err(IntakeError::Rejected(_)));
        let mut m = message();
        m.channel_message_id = "x".repeat(limits::CHANNEL_MESSAGE_ID_MAX + 1);
        assert!(refused(m));
        let mut m = message();
        m.conversation_id = Some("x".repeat(limits::CONVERSATION_ID_MAX + 1));
        assert!(refused(m));
        let mut m = message();
        m.thread.as_mut().unwrap().message_id_header =
            Some("x".repeat(limits::MESSAGE_ID_HEADER_MAX + 1));
        assert!(refused(m));
        let mut m = message();
        m.thread.as_mut().unwrap().thread_id = "x".repeat(limits::THREAD_ID_MAX + 1);
        assert!(refused(m));
        let mut m = message();
        m.body = "é".repeat(limits::BODY_MAX + 1);
        assert!(refused(m));
        let mut m = message();
        m.body = "é".repeat(limits::BODY_MAX);
        assert!(bound(&m).is_ok());
        let mut m = message();
        m.sender.identities = vec![IdentityKey::email("a@example.com").unwrap(); 9];
        assert!(refused(m));
    }

    #[test]
    fn long_names_and_subjects_are_cut_at_a_character() {
        let mut m = message();
        m.sender.name = Some("é".repeat(500));
        m.subject = Some("ü".repeat(5000));
        m.thread.as_mut().unwrap().subject = Some("ü".repeat(5000));
        let b = bound(&m).unwrap();
        assert_eq!(b.sender.name.unwrap().chars().count(), limits::NAME_MAX);
        assert_eq!(b.subject.unwrap().chars().count(), limits::SUBJECT_MAX);
        assert_eq!(
            b.thread.unwrap().subject.unwrap().chars().count(),
            limits::SUBJECT_MAX
        );
    }
}
