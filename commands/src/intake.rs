//! Intake: a customer message from any channel becomes events, atomically.
//!
//! One unit of work records the channel message (its dedupe key), claims the
//! sender's identities for one customer (registering the customer the first
//! time), opens or continues the ticket the conversation belongs to, and
//! records the message on it. Either all of that is stored or none of it, so
//! a message that was acknowledged is never lost and a redelivered one is
//! recognised, whatever happened in between.

use casebook_domain::channel_message::channel_message_key;
use casebook_domain::identity::IdentityKey;
use casebook_domain::ticket::{DeliveryStatus, EmailThread};
use casebook_domain::{
    Actor, ActorKind, Category, Channel, ChannelMessage, ChannelMessageCommand, Conversation,
    ConversationCommand, Customer, CustomerCommand, CustomerIdentity, CustomerIdentityCommand,
    CustomerIdentityError, Direction, EventMetadata, Priority, Ticket, TicketCommand, TicketError,
    TicketStatus,
};
use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use uuid::Uuid;

use crate::metrics::INTAKE_MESSAGES;
use crate::retry::sleep_backoff;
use crate::store::{CommandError, EventStore, StoreError, CONFLICT_BACKOFF};

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

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("message refused: {0}")]
    Rejected(String),
    #[error(transparent)]
    Store(#[from] StoreError),
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
        if message.sender.identities.is_empty() {
            return Err(IntakeError::Rejected("the sender has no identity".into()));
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.try_receive(message, correlation_id).await {
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
        correlation_id: &str,
    ) -> Result<IntakeOutcome, IntakeError> {
        let at = m.received_at;
        let key = channel_message_key(m.channel, Direction::Inbound, &m.channel_message_id);
        let mut meta =
            EventMetadata::new(correlation_id, Actor::system("intake")).on_channel(m.channel);
        let mut uow = self.store.unit_of_work(meta.clone());
        // Everything this message may touch that already exists, in one read.
        let mut wanted: Vec<(&str, String)> = vec![(ChannelMessage::TYPE, key.clone())];
        wanted.extend(
            m.sender
                .identities
                .iter()
                .map(|i| (CustomerIdentity::TYPE, i.aggregate_id())),
        );
        if let Some(conversation_id) = &m.conversation_id {
            wanted.push((Conversation::TYPE, conversation_id.clone()));
        }
        uow.prefetch(&wanted, true).await?;

        let seen = uow.load::<ChannelMessage>(&key).await?;
        if let (Some(ticket_id), Some(message_id)) = (seen.ticket_id, seen.message_id) {
            return Ok(IntakeOutcome {
                ticket_id,
                message_id,
                duplicate: true,
                new_ticket: false,
            });
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
        if let Some(conversation_id) = &m.conversation_id {
            if let Some(current) = uow
                .load::<Conversation>(conversation_id)
                .await?
                .current_ticket
            {
                let ticket = uow.load::<Ticket>(&current.to_string()).await?;
                if continues(ticket.status, m.channel) {
                    ticket_id = Some(current);
                }
            }
        }
        let new_ticket = ticket_id.is_none();
        let ticket_id = ticket_id.unwrap_or_else(Uuid::now_v7);
        let ticket_key = ticket_id.to_string();
        if new_ticket {
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
                    at,
                },
            )
            .await?;
            if let Some(conversation_id) = &m.conversation_id {
                uow.execute::<Conversation>(
                    conversation_id,
                    ConversationCommand::LinkTicket { ticket_id, at },
                )
                .await?;
            }
        }
        let message_id = Uuid::now_v7();
        let received = uow
            .execute::<Ticket>(
                &ticket_key,
                TicketCommand::ReceiveCustomerMessage {
                    message_id,
                    customer_id,
                    channel: m.channel,
                    channel_message_id: m.channel_message_id.clone(),
                    body: m.body.clone(),
                    attachments: m.attachments,
                    thread: m.thread.clone(),
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
            &key,
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
        uow.commit().await?;
        Ok(IntakeOutcome {
            ticket_id,
            message_id,
            duplicate: false,
            new_ticket,
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

/// Whether a new message on `channel` continues a ticket in `status`.
/// A WhatsApp message starts a new ticket once the last one is resolved; an
/// email reply in a resolved ticket's thread reopens it. Closed is final.
fn continues(status: TicketStatus, channel: Channel) -> bool {
    match status {
        TicketStatus::Closed => false,
        TicketStatus::Resolved => channel == Channel::Email,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversations_continue_open_tickets_only() {
        assert!(continues(TicketStatus::Responded, Channel::Whatsapp));
        assert!(!continues(TicketStatus::Resolved, Channel::Whatsapp));
        assert!(continues(TicketStatus::Resolved, Channel::Email));
        assert!(!continues(TicketStatus::Closed, Channel::Email));
    }
}
