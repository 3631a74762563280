//! A channel conversation (a WhatsApp number, a Gmail thread) and the ticket
//! it currently feeds. New messages on the conversation continue that ticket
//! while it is open.
//!
//! A web-form ticket is answered by email: the Gmail thread of its first
//! outbound email (the acknowledgement) is recorded on the ticket's mail
//! conversation (`webform-mail:<ticket id>`) so every later reply joins that
//! thread, and the thread's own conversation (`gmail-thread:<threadId>`)
//! links the ticket, so the customer's emailed reply continues it.

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ticket::EmailThread;

/// `whatsapp:+15551234567`: every message from that number.
pub fn whatsapp_conversation_id(number: &str) -> String {
    format!("whatsapp:{number}")
}

/// `gmail-thread:<threadId>`: every message of that Gmail thread.
pub fn gmail_thread_conversation_id(thread_id: &str) -> String {
    format!("gmail-thread:{thread_id}")
}

/// `webform-mail:<ticket id>`: the email thread a web-form ticket's
/// replies go out on.
pub fn webform_mail_conversation_id(ticket_id: Uuid) -> String {
    format!("webform-mail:{ticket_id}")
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ConversationCommand {
    LinkTicket {
        ticket_id: Uuid,
        at: DateTime<Utc>,
    },
    /// The first outbound email of the conversation opened this thread; the
    /// first one recorded stays.
    RecordMailThread {
        thread: EmailThread,
        at: DateTime<Utc>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ConversationEvent {
    ConversationTicketLinked {
        ticket_id: Uuid,
        linked_at: DateTime<Utc>,
    },
    MailThreadRecorded {
        thread: EmailThread,
        recorded_at: DateTime<Utc>,
    },
}

impl DomainEvent for ConversationEvent {
    fn event_type(&self) -> String {
        match self {
            ConversationEvent::ConversationTicketLinked { .. } => "ConversationTicketLinked",
            ConversationEvent::MailThreadRecorded { .. } => "MailThreadRecorded",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        "1".to_string()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConversationError {}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    pub current_ticket: Option<Uuid>,
    pub mail_thread: Option<EmailThread>,
}

impl Conversation {
    pub fn decide(
        &self,
        command: ConversationCommand,
    ) -> Result<Vec<ConversationEvent>, ConversationError> {
        match command {
            ConversationCommand::LinkTicket { ticket_id, at } => {
                if self.current_ticket == Some(ticket_id) {
                    return Ok(vec![]);
                }
                Ok(vec![ConversationEvent::ConversationTicketLinked {
                    ticket_id,
                    linked_at: at,
                }])
            }
            ConversationCommand::RecordMailThread { thread, at } => {
                if self.mail_thread.is_some() {
                    return Ok(vec![]);
                }
                Ok(vec![ConversationEvent::MailThreadRecorded {
                    thread,
                    recorded_at: at,
                }])
            }
        }
    }

    pub fn apply_event(&mut self, event: ConversationEvent) {
        match event {
            ConversationEvent::ConversationTicketLinked { ticket_id, .. } => {
                self.current_ticket = Some(ticket_id)
            }
            ConversationEvent::MailThreadRecorded { thread, .. } => self.mail_thread = Some(thread),
        }
    }
}

crate::impl_aggregate!(
    Conversation,
    "conversation",
    ConversationCommand,
    ConversationEvent,
    ConversationError
);

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    #[test]
    fn a_conversation_moves_to_a_new_ticket_once() {
        let t1 = Uuid::from_u128(1);
        let t2 = Uuid::from_u128(2);
        let linked = |ticket_id| ConversationEvent::ConversationTicketLinked {
            ticket_id,
            linked_at: DateTime::UNIX_EPOCH,
        };
        TestFramework::<Conversation>::with(())
            .given(vec![linked(t1)])
            .when(ConversationCommand::LinkTicket {
                ticket_id: t2,
                at: DateTime::UNIX_EPOCH,
            })
            .then_expect_events(vec![linked(t2)]);
        TestFramework::<Conversation>::with(())
            .given(vec![linked(t1)])
            .when(ConversationCommand::LinkTicket {
                ticket_id: t1,
                at: DateTime::UNIX_EPOCH,
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn the_first_mail_thread_of_a_conversation_stays() {
        let thread = |id: &str| EmailThread {
            thread_id: id.into(),
            message_id_header: None,
            subject: Some("Your support request ABC".into()),
        };
        let recorded = ConversationEvent::MailThreadRecorded {
            thread: thread("t1"),
            recorded_at: DateTime::UNIX_EPOCH,
        };
        TestFramework::<Conversation>::with(())
            .given_no_previous_events()
            .when(ConversationCommand::RecordMailThread {
                thread: thread("t1"),
                at: DateTime::UNIX_EPOCH,
            })
            .then_expect_events(vec![recorded.clone()]);
        TestFramework::<Conversation>::with(())
            .given(vec![recorded])
            .when(ConversationCommand::RecordMailThread {
                thread: thread("t2"),
                at: DateTime::UNIX_EPOCH,
            })
            .then_expect_events(vec![]);
    }
}
