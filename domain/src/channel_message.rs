//! One message as a channel identifies it (`whatsapp:SM…`, `email:<gmail
//! message id>`, `webform:<request key>`, and for replies we sent
//! `whatsapp-out:SM…`). The aggregate exists once per channel message, so the
//! event store's uniqueness turns a redelivered webhook into a recognised
//! duplicate instead of a second message.

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{Channel, Direction};

/// The aggregate id of a channel message.
pub fn channel_message_key(
    channel: Channel,
    direction: Direction,
    channel_message_id: &str,
) -> String {
    match direction {
        Direction::Inbound => format!("{}:{}", channel.as_str(), channel_message_id),
        Direction::Outbound => format!("{}-out:{}", channel.as_str(), channel_message_id),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ChannelMessageCommand {
    Accept {
        ticket_id: Uuid,
        message_id: Uuid,
        channel: Channel,
        direction: Direction,
        channel_message_id: String,
        at: DateTime<Utc>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ChannelMessageEvent {
    ChannelMessageAccepted {
        ticket_id: Uuid,
        message_id: Uuid,
        channel: Channel,
        direction: Direction,
        channel_message_id: String,
        accepted_at: DateTime<Utc>,
    },
}

impl DomainEvent for ChannelMessageEvent {
    fn event_type(&self) -> String {
        "ChannelMessageAccepted".to_string()
    }

    fn event_version(&self) -> String {
        "1".to_string()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelMessageError {
    #[error("channel message already accepted for ticket {ticket_id}")]
    Duplicate { ticket_id: Uuid, message_id: Uuid },
    #[error("channel message id must not be empty")]
    EmptyId,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChannelMessage {
    pub ticket_id: Option<Uuid>,
    pub message_id: Option<Uuid>,
}

impl ChannelMessage {
    pub fn decide(
        &self,
        command: ChannelMessageCommand,
    ) -> Result<Vec<ChannelMessageEvent>, ChannelMessageError> {
        match command {
            ChannelMessageCommand::Accept {
                ticket_id,
                message_id,
                channel,
                direction,
                channel_message_id,
                at,
            } => {
                if let (Some(ticket_id), Some(message_id)) = (self.ticket_id, self.message_id) {
                    return Err(ChannelMessageError::Duplicate {
                        ticket_id,
                        message_id,
                    });
                }
                if channel_message_id.trim().is_empty() {
                    return Err(ChannelMessageError::EmptyId);
                }
                Ok(vec![ChannelMessageEvent::ChannelMessageAccepted {
                    ticket_id,
                    message_id,
                    channel,
                    direction,
                    channel_message_id,
                    accepted_at: at,
                }])
            }
        }
    }

    pub fn apply_event(&mut self, event: ChannelMessageEvent) {
        match event {
            ChannelMessageEvent::ChannelMessageAccepted {
                ticket_id,
                message_id,
                ..
            } => {
                self.ticket_id = Some(ticket_id);
                self.message_id = Some(message_id);
            }
        }
    }
}

crate::impl_aggregate!(
    ChannelMessage,
    "channel_message",
    ChannelMessageCommand,
    ChannelMessageEvent,
    ChannelMessageError
);

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    fn accept() -> ChannelMessageCommand {
        ChannelMessageCommand::Accept {
            ticket_id: Uuid::from_u128(7),
            message_id: Uuid::from_u128(8),
            channel: Channel::Whatsapp,
            direction: Direction::Inbound,
            channel_message_id: "SM123".into(),
            at: DateTime::UNIX_EPOCH,
        }
    }

    fn accepted() -> ChannelMessageEvent {
        ChannelMessageEvent::ChannelMessageAccepted {
            ticket_id: Uuid::from_u128(7),
            message_id: Uuid::from_u128(8),
            channel: Channel::Whatsapp,
            direction: Direction::Inbound,
            channel_message_id: "SM123".into(),
            accepted_at: DateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn a_new_message_is_accepted() {
        TestFramework::<ChannelMessage>::with(())
            .given_no_previous_events()
            .when(accept())
            .then_expect_events(vec![accepted()]);
    }

    #[test]
    fn the_same_channel_message_twice_is_a_duplicate() {
        TestFramework::<ChannelMessage>::with(())
            .given(vec![accepted()])
            .when(accept())
            .then_expect_error(ChannelMessageError::Duplicate {
                ticket_id: Uuid::from_u128(7),
                message_id: Uuid::from_u128(8),
            });
    }

    #[test]
    fn keys_name_channel_and_direction() {
        assert_eq!(
            channel_message_key(Channel::Whatsapp, Direction::Inbound, "SM1"),
            "whatsapp:SM1"
        );
        assert_eq!(
            channel_message_key(Channel::Whatsapp, Direction::Outbound, "SM1"),
            "whatsapp-out:SM1"
        );
    }
}
