//! The customer's answer to "was this helpful?": `FeedbackReceived` on the
//! ticket, its actor the ticket's customer.
//!
//! One answer per ticket: the ticket refuses a second (`AlreadyGiven`), so
//! a reloaded form or a replayed request never counts twice and the event
//! stream stays bounded; there must be a reply to rate (`NothingToRate`).
//! The comment is sanitised like any customer text and bounded.

use casebook_domain::sanitize::multi_line;
use casebook_domain::{Actor, ActorKind, EventMetadata, Ticket, TicketCommand, TicketError};
use chrono::Utc;
use uuid::Uuid;

use crate::store::{CommandError, EventStore, StoreError};

/// The longest comment, in characters.
pub const MAX_COMMENT_CHARS: usize = 2000;

#[derive(Debug, thiserror::Error)]
pub enum FeedbackError {
    #[error("no such ticket")]
    NotFound,
    #[error("the comment is longer than {MAX_COMMENT_CHARS} characters")]
    CommentTooLong,
    #[error("there is no answer to rate yet")]
    NothingToRate,
    #[error("feedback was already given on this ticket")]
    AlreadyGiven,
    #[error("feedback refused: {0}")]
    Refused(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The comment as it is stored: sanitised, trimmed, `None` when empty;
/// refused over [`MAX_COMMENT_CHARS`].
pub fn clean_comment(raw: Option<&str>) -> Result<Option<String>, FeedbackError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    // Four bytes a character at most: anything longer is too long already,
    // and is not worth sanitising.
    if raw.len() > MAX_COMMENT_CHARS * 4 {
        return Err(FeedbackError::CommentTooLong);
    }
    let clean = multi_line(raw).trim().to_string();
    if clean.chars().count() > MAX_COMMENT_CHARS {
        return Err(FeedbackError::CommentTooLong);
    }
    Ok((!clean.is_empty()).then_some(clean))
}

/// Records a customer's feedback on a ticket. `customer` is the customer a
/// bearer token names, if that is how they came: then the ticket must be
/// theirs (another's reads as absent). With the ticket's status token, the
/// holder speaks for the ticket's customer.
pub async fn record(
    store: &EventStore,
    ticket_id: Uuid,
    customer: Option<Uuid>,
    helpful: bool,
    comment: Option<&str>,
    correlation_id: &str,
) -> Result<(), FeedbackError> {
    let comment = clean_comment(comment)?;
    let key = ticket_id.to_string();
    let ticket = store.load::<Ticket>(&key).await?.aggregate;
    let Some(owner) = ticket.customer_id else {
        return Err(FeedbackError::NotFound);
    };
    if customer.is_some_and(|c| c != owner) {
        return Err(FeedbackError::NotFound);
    }
    let mut meta = EventMetadata::new(
        correlation_id,
        Actor::new(ActorKind::Customer, owner.to_string()),
    );
    if let Some(channel) = ticket.channel {
        meta = meta.on_channel(channel);
    }
    let command = TicketCommand::RecordFeedback {
        helpful,
        comment,
        at: Utc::now(),
    };
    match store.execute::<Ticket>(&key, command, &meta).await {
        Ok(_) => Ok(()),
        Err(CommandError::Rejected(TicketError::NotFound)) => Err(FeedbackError::NotFound),
        Err(CommandError::Rejected(TicketError::NoResponseYet)) => {
            Err(FeedbackError::NothingToRate)
        }
        Err(CommandError::Rejected(TicketError::FeedbackAlreadyRecorded)) => {
            Err(FeedbackError::AlreadyGiven)
        }
        Err(CommandError::Rejected(e)) => Err(FeedbackError::Refused(e.to_string())),
        Err(CommandError::Store(e)) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_are_sanitised_and_bounded() {
        assert_eq!(clean_comment(None).unwrap(), None);
        assert_eq!(clean_comment(Some("  \n ")).unwrap(), None);
        assert_eq!(
            clean_comment(Some("Great\u{202E}, <b>thanks</b>\r\n")).unwrap(),
            Some("Great, <b>thanks</b>".to_string())
        );
        let longest = "é".repeat(MAX_COMMENT_CHARS);
        assert_eq!(
            clean_comment(Some(&longest))
                .unwrap()
                .unwrap()
                .chars()
                .count(),
            MAX_COMMENT_CHARS
        );
        assert!(matches!(
            clean_comment(Some(&format!("{longest}x"))),
            Err(FeedbackError::CommentTooLong)
        ));
        assert!(matches!(
            clean_comment(Some(&"x".repeat(MAX_COMMENT_CHARS * 5))),
            Err(FeedbackError::CommentTooLong)
        ));
    }
}
