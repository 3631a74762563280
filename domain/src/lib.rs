//! Casebook's domain: aggregates, commands, events, value types and the pure
//! policies (validation, sanitising, masking, SLA rules, the audit hash chain).
//!
//! Nothing here does I/O or knows about a runtime: time, ids and content come
//! in through commands, so every rule can be tested with given/when/then.

pub mod audit;
pub mod channel_message;
pub mod checkpoint;
pub mod confidence;
pub mod conversation;
pub mod customer;
pub mod email;
pub mod envelope;
pub mod formatting;
pub mod guardrails;
pub mod identity;
pub mod knowledge;
pub mod markdown;
pub mod masking;
pub mod merkle;
pub mod metadata;
pub mod retention;
pub mod retrieval;
pub mod retry;
pub mod sanitize;
pub mod sentiment;
pub mod sla;
pub mod spelling;
pub mod status_link;
pub mod ticket;
pub mod topics;
pub mod trail;
pub mod upcast;
pub mod values;
pub mod webform;

pub use channel_message::{
    ChannelMessage, ChannelMessageCommand, ChannelMessageError, ChannelMessageEvent,
};
pub use conversation::{Conversation, ConversationCommand, ConversationError, ConversationEvent};
pub use customer::{
    Customer, CustomerCommand, CustomerError, CustomerEvent, CustomerIdentity,
    CustomerIdentityCommand, CustomerIdentityError, CustomerIdentityEvent,
};
pub use envelope::{Actor, ActorKind, EventEnvelope, StoredEvent};
pub use identity::{
    EmailClaim, EmailClaimCommand, EmailClaimError, EmailClaimEvent, IdentityError, IdentityKey,
    IdentityKind,
};
pub use metadata::EventMetadata;
pub use ticket::{Ticket, TicketCommand, TicketError, TicketEvent};
pub use values::{Category, Channel, Direction, Priority, TicketStatus};

/// Implements `cqrs_es::Aggregate` for a type with a pure
/// `decide(&self, command) -> Result<Vec<Event>, Error>` and
/// `apply_event(&mut self, event)`: the aggregate's rules stay plain
/// functions, cqrs-es drives them.
#[macro_export]
macro_rules! impl_aggregate {
    ($agg:ty, $name:literal, $cmd:ty, $evt:ty, $err:ty) => {
        impl ::cqrs_es::Aggregate for $agg {
            const TYPE: &'static str = $name;
            type Command = $cmd;
            type Event = $evt;
            type Error = $err;
            type Services = ();

            async fn handle(
                &mut self,
                command: Self::Command,
                _services: &Self::Services,
                sink: &::cqrs_es::event_sink::EventSink<Self>,
            ) -> Result<(), Self::Error> {
                for event in self.decide(command)? {
                    sink.write(event, self).await;
                }
                Ok(())
            }

            fn apply(&mut self, event: Self::Event) {
                self.apply_event(event)
            }
        }
    };
}
