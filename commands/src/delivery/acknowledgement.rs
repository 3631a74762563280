//! The web form's acknowledgement email, and the limits on automatic email.
//!
//! A web-form submission opens an email claim; the relay puts its
//! `EmailClaimOpened` on the web form's outbound topic, keyed by the ticket,
//! so the acknowledgement goes out before any reply to that ticket. It
//! carries the status link and the one-time confirmation link (both tokens
//! derived here from the secret, never stored), under a fixed subject with
//! the ticket reference: nothing the submitter typed reaches a header. The
//! Gmail thread it opens is recorded, so that every later reply to the
//! ticket joins it and the customer's emailed answer continues the ticket.
//!
//! Every automatic email (acknowledgements, AI replies) counts against its
//! recipient: at most [`Settings::recipient_limit`] an hour, across
//! replicas (`crate::limits`).

use casebook_domain::conversation::{gmail_thread_conversation_id, webform_mail_conversation_id};
use casebook_domain::formatting::ticket_reference;
use casebook_domain::identity::{IdentityKind, CLAIM_VALID_HOURS};
use casebook_domain::ticket::EmailThread;
use casebook_domain::{
    Actor, ActorKind, Channel, Conversation, ConversationCommand, Customer, EmailClaim,
    EmailClaimCommand, EventEnvelope, EventMetadata, Ticket,
};
use chrono::Utc;

use super::{message_id, provider_error, rfc2822, transport_error, Delivery, GmailSent};
use crate::claims::LinkKeys;
use crate::limits::{self, Decision, Limit};
use crate::store::{CommandError, StoreError};
use crate::worker::{HandlerError, Incoming};

/// What acknowledgements and automatic email need beyond sending.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The keys of the links, and `CASEBOOK_PUBLIC_URL`; without them no
    /// acknowledgement can carry a link, so none is sent.
    pub links: Option<(LinkKeys, String)>,
    /// Automatic emails per recipient (0: no limit).
    pub recipient_limit: Limit,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            links: None,
            recipient_limit: Limit::per_hour(5),
        }
    }
}

/// The subject of every email about a web-form ticket.
pub fn webform_subject(ticket_id: uuid::Uuid) -> String {
    format!("Your support request {}", ticket_reference(ticket_id))
}

fn acknowledgement_body(
    public_url: &str,
    ticket_id: uuid::Uuid,
    status: &str,
    confirm: &str,
) -> String {
    let reference = ticket_reference(ticket_id);
    format!(
        "Hello,\n\n\
         We received your support request (reference {reference}) and will answer by email.\n\n\
         Where it stands: {public_url}/ticket/{ticket_id}?token={status}\n\n\
         To link this request with your earlier conversations with us, confirm this email address:\n\
         {public_url}/confirm/{confirm}\n\n\
         The link works once, for {CLAIM_VALID_HOURS} hours. If you did not write to us, ignore this \
         email: nothing will be linked.\n"
    )
}

impl Delivery {
    /// Sets what acknowledgements and the recipient limit need.
    pub fn with_acknowledgements(mut self, settings: Settings) -> Self {
        self.acknowledgements = settings;
        self
    }

    /// Whether an automatic email to `to` is within its recipient's limit
    /// (and counts it if so).
    pub(super) async fn automatic_email_allowed(&self, to: &str) -> Result<bool, HandlerError> {
        match limits::take(
            self.store.pool(),
            limits::AUTOMATIC_EMAIL,
            to,
            self.acknowledgements.recipient_limit,
        )
        .await
        {
            Ok(Decision::Allowed) => Ok(true),
            Ok(Decision::Limited { .. }) => Ok(false),
            Err(e) => Err(HandlerError::Retry(e.to_string())),
        }
    }

    /// A reply on `channel` to this customer is automatic (the AI's, or
    /// the system's) rather than a person's, and goes out by email.
    pub(super) async fn recipient_limit_refusal(
        &self,
        envelope: &EventEnvelope,
        customer: &Customer,
        channel: Channel,
    ) -> Result<Option<String>, HandlerError> {
        let automatic = matches!(envelope.actor.kind, ActorKind::Ai | ActorKind::System);
        if !automatic || !matches!(channel, Channel::Email | Channel::Webform) {
            return Ok(None);
        }
        let Some(to) = customer.address(IdentityKind::Email) else {
            return Ok(None);
        };
        if self.automatic_email_allowed(to).await? {
            Ok(None)
        } else {
            Ok(Some(
                "the recipient's limit of automatic emails per hour is reached".into(),
            ))
        }
    }

    /// The thread a web-form ticket's replies join: the customer's, once
    /// they wrote by email, else the acknowledgement's.
    pub(super) async fn webform_thread(&self, ticket: &Ticket) -> Option<EmailThread> {
        let id = ticket.id?;
        match self
            .store
            .load::<Conversation>(&webform_mail_conversation_id(id))
            .await
        {
            Ok(loaded) => loaded.aggregate.mail_thread,
            Err(e) => {
                tracing::warn!(error = %e, ticket_id = %id, "web form thread unreadable; replying outside it");
                None
            }
        }
    }

    /// Sends the acknowledgement of one web-form claim, once.
    pub(super) async fn acknowledge(
        &self,
        _message: &Incoming,
        envelope: &EventEnvelope,
    ) -> Result<(), HandlerError> {
        let retryable = |e: StoreError| HandlerError::Retry(e.to_string());
        let claim = self
            .store
            .load::<EmailClaim>(&envelope.aggregate_id)
            .await
            .map_err(retryable)?
            .aggregate;
        let (Some(claim_id), Some(ticket_id), Some(identity)) =
            (claim.claim_id, claim.ticket_id, claim.identity.clone())
        else {
            return Err(HandlerError::Poison(
                "an email claim that was never opened".into(),
            ));
        };
        if claim.acknowledged.is_some() {
            return Ok(());
        }
        let Some((keys, public_url)) = &self.acknowledgements.links else {
            tracing::warn!(%ticket_id, "no link secret: web form acknowledgement not sent");
            return Ok(());
        };
        let Some(g) = self.gmail.as_ref() else {
            tracing::warn!(%ticket_id, "Gmail sending is not configured: web form acknowledgement not sent");
            return Ok(());
        };
        if !self.automatic_email_allowed(&identity.value).await? {
            tracing::info!(%ticket_id, "recipient over its automatic email limit: acknowledgement not sent");
            return Ok(());
        }
        let subject = webform_subject(ticket_id);
        let body = acknowledgement_body(
            public_url.trim_end_matches('/'),
            ticket_id,
            &keys.status_token(ticket_id),
            &keys.confirm_token(claim_id),
        );
        // Deterministic, like a reply's: the same claim always sends the
        // same Message-ID, so an attempt whose fate is unknown (a crash or
        // a failed recording after Gmail took it) is found, not resent.
        let mid = message_id(claim_id, 0, &g.from);
        let tried_before = !self.parts_of(claim_id).await?.is_empty();
        let found = if tried_before {
            self.find_gmail(g, &mid)
                .await
                .map_err(HandlerError::Retry)?
        } else {
            None
        };
        let sent = match found {
            Some(sent) => {
                crate::metrics::DELIVERY_RECONCILED
                    .with_label_values(&["gmail", "found"])
                    .inc();
                sent
            }
            None => {
                self.mark_started(claim_id, 0, ticket_id, "gmail").await?;
                let raw = rfc2822(&g.from, &identity.value, &subject, &mid, None, &body);
                let encoded = serde_json::json!({
                    "raw": base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, raw.as_bytes())
                });
                let url = format!("{}/gmail/v1/users/me/messages/send", g.api_base);
                let mut request = self.http.post(&url).json(&encoded);
                if let Some(token) = &g.access_token {
                    request = request.bearer_auth(token);
                }
                let sent: GmailSent = match request.send().await {
                    Err(e) => return Err(HandlerError::Retry(transport_error(e))),
                    Ok(response) => {
                        let status = response.status();
                        if status.is_success() {
                            response
                                .json()
                                .await
                                .map_err(|e| HandlerError::Retry(transport_error(e)))?
                        } else {
                            let error =
                                provider_error(status, &response.text().await.unwrap_or_default());
                            return Err(match status.as_u16() {
                                429 | 500..=599 => HandlerError::Retry(error),
                                _ => HandlerError::Poison(format!(
                                    "acknowledgement refused by Gmail: {error}"
                                )),
                            });
                        }
                    }
                };
                self.mark_accepted(claim_id, 0, &sent.id).await?;
                sent
            }
        };
        let meta = EventMetadata::new(envelope.correlation_id.clone(), Actor::system("delivery"))
            .caused_by(envelope.event_id.to_string())
            .on_channel(Channel::Webform);
        let at = Utc::now();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut uow = self.store.unit_of_work(meta.clone());
            let recorded = async {
                uow.execute::<EmailClaim>(
                    &envelope.aggregate_id,
                    EmailClaimCommand::RecordAcknowledgement {
                        provider_message_id: sent.id.clone(),
                        thread_id: sent.thread_id.clone(),
                        at,
                    },
                )
                .await
                .map_err(|e| match e {
                    CommandError::Store(e) => e,
                    CommandError::Rejected(e) => StoreError::Corrupt(e.to_string()),
                })?;
                if let Some(thread_id) = &sent.thread_id {
                    let never = |e: CommandError<casebook_domain::ConversationError>| match e {
                        CommandError::Store(e) => e,
                        CommandError::Rejected(e) => match e {},
                    };
                    uow.execute::<Conversation>(
                        &webform_mail_conversation_id(ticket_id),
                        ConversationCommand::RecordMailThread {
                            thread: EmailThread {
                                thread_id: thread_id.clone(),
                                message_id_header: None,
                                subject: Some(subject.clone()),
                            },
                            at,
                        },
                    )
                    .await
                    .map_err(never)?;
                    uow.execute::<Conversation>(
                        &gmail_thread_conversation_id(thread_id),
                        ConversationCommand::LinkTicket { ticket_id, at },
                    )
                    .await
                    .map_err(never)?;
                }
                Ok::<_, StoreError>(())
            }
            .await;
            recorded.map_err(retryable)?;
            match uow.commit().await {
                Ok(_) => break,
                Err(StoreError::Conflict)
                    if crate::store::CONFLICT_BACKOFF.should_retry(attempt) =>
                {
                    crate::retry::sleep_backoff(&crate::store::CONFLICT_BACKOFF, attempt).await
                }
                Err(e) => return Err(retryable(e)),
            }
        }
        tracing::info!(%ticket_id, "web form acknowledgement delivered to the provider");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_acknowledgement_carries_both_links_and_nothing_the_submitter_typed() {
        let ticket = uuid::Uuid::from_u128(0xabc);
        let body = acknowledgement_body("https://desk.test", ticket, "ST", "CT");
        assert!(body.contains(&format!("https://desk.test/ticket/{ticket}?token=ST")));
        assert!(body.contains("https://desk.test/confirm/CT"));
        assert_eq!(
            webform_subject(ticket),
            format!("Your support request {}", ticket_reference(ticket))
        );
    }
}
