//! Delivery: replies on `<prefix>.channels.*.outbound` go out through
//! Twilio's Messages API (WhatsApp) and Gmail's `users.messages.send` (email,
//! and web form replies, which are answered by email), with retries and
//! backoff. What the provider says becomes delivery-status events; a reply
//! that cannot be delivered goes to the dead-letter topic and the ticket is
//! escalated with `delivery_failed`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use casebook_domain::formatting::ticket_reference;
use casebook_domain::identity::IdentityKind;
use casebook_domain::retry::Backoff;
use casebook_domain::sanitize::single_line;
use casebook_domain::ticket::{DeliveryStatus, EmailThread};
use casebook_domain::{
    Actor, Channel, Customer, EventEnvelope, EventMetadata, Ticket, TicketCommand, TicketError,
    TicketEvent,
};
use chrono::Utc;
use rdkafka::producer::FutureProducer;
use serde::Deserialize;
use uuid::Uuid;

mod acknowledgement;
pub use acknowledgement::{webform_subject, Settings as AcknowledgementSettings};

use crate::intake::Intake;
use crate::metrics::EXTERNAL_CALLS;
use crate::retry::retry;
use crate::store::{CommandError, EventStore};
use crate::worker::{dead_letter, Handler, HandlerError, Incoming};

/// Attempts per message part before the reply counts as undeliverable.
pub const DELIVERY_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(200), Duration::from_secs(5), 5);

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("{0}")]
    Transient(String),
    #[error("{0}")]
    Permanent(String),
}

impl SendError {
    fn is_transient(&self) -> bool {
        matches!(self, SendError::Transient(_))
    }
}

#[derive(Debug, Clone)]
pub struct TwilioSettings {
    pub api_base: String,
    pub account_sid: String,
    pub auth_token: String,
    /// `whatsapp:+…`
    pub from: String,
    /// Where Twilio reports delivery status.
    pub status_callback: Option<String>,
}

#[derive(Debug, Clone)]
pub struct GmailSendSettings {
    pub api_base: String,
    pub access_token: Option<String>,
    pub from: String,
}

#[derive(Deserialize)]
struct TwilioMessage {
    sid: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GmailSent {
    id: String,
}

fn classify(status: reqwest::StatusCode, body: String) -> SendError {
    let detail = format!(
        "HTTP {status}: {}",
        body.chars().take(200).collect::<String>()
    );
    if status.as_u16() == 429 || status.is_server_error() {
        SendError::Transient(detail)
    } else {
        SendError::Permanent(detail)
    }
}

fn observe<T>(service: &str, started: Instant, result: &Result<T, SendError>) {
    let outcome = if result.is_ok() { "ok" } else { "error" };
    EXTERNAL_CALLS
        .with_label_values(&[service, "send", outcome])
        .observe(started.elapsed().as_secs_f64());
}

/// RFC 2047 for a header value that is not plain ASCII.
fn encode_header(value: &str) -> String {
    let clean = single_line(value);
    if clean.is_ascii() {
        clean
    } else {
        format!("=?UTF-8?B?{}?=", STANDARD.encode(clean.as_bytes()))
    }
}

/// An RFC 2822 message: plain text, UTF-8, joined to the customer's thread
/// when there is one.
pub fn rfc2822(
    from: &str,
    to: &str,
    subject: &str,
    in_reply_to: Option<&str>,
    body: &str,
) -> String {
    let mut m = String::new();
    m.push_str(&format!("From: {}\r\n", single_line(from)));
    m.push_str(&format!("To: {}\r\n", single_line(to)));
    m.push_str(&format!("Subject: {}\r\n", encode_header(subject)));
    if let Some(id) = in_reply_to {
        let id = single_line(id);
        m.push_str(&format!("In-Reply-To: {id}\r\nReferences: {id}\r\n"));
    }
    m.push_str("MIME-Version: 1.0\r\nContent-Type: text/plain; charset=UTF-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n");
    m.push_str(&body.replace("\r\n", "\n").replace('\n', "\r\n"));
    m
}

pub struct Delivery {
    store: EventStore,
    intake: Intake,
    http: reqwest::Client,
    twilio: Option<TwilioSettings>,
    gmail: Option<GmailSendSettings>,
    producer: FutureProducer,
    dlq: String,
    acknowledgements: AcknowledgementSettings,
}

impl Delivery {
    pub fn new(
        store: EventStore,
        twilio: Option<TwilioSettings>,
        gmail: Option<GmailSendSettings>,
        producer: FutureProducer,
        dlq: String,
    ) -> Self {
        Self {
            intake: Intake::new(store.clone()),
            store,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(15))
                .connect_timeout(Duration::from_secs(5))
                .build()
                .expect("HTTP client builds"),
            twilio,
            gmail,
            producer,
            dlq,
            acknowledgements: AcknowledgementSettings::default(),
        }
    }

    /// One provider call, retried with backoff on transient failures and
    /// timed per attempt; `build` makes the request afresh for each attempt.
    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        service: &'static str,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<T, SendError> {
        retry(
            &DELIVERY_BACKOFF,
            service,
            SendError::is_transient,
            || async {
                let started = Instant::now();
                let result = async {
                    let response = build()
                        .send()
                        .await
                        .map_err(|e| SendError::Transient(e.to_string()))?;
                    let status = response.status();
                    if !status.is_success() {
                        return Err(classify(status, response.text().await.unwrap_or_default()));
                    }
                    response.json::<T>().await.map_err(|e| {
                        SendError::Permanent(format!("unreadable {service} response: {e}"))
                    })
                }
                .await;
                observe(service, started, &result);
                result
            },
        )
        .await
    }

    async fn twilio_send(
        &self,
        t: &TwilioSettings,
        to: &str,
        body: &str,
    ) -> Result<String, SendError> {
        let mut form = vec![
            ("To", to.to_string()),
            ("From", t.from.clone()),
            ("Body", body.to_string()),
        ];
        if let Some(cb) = &t.status_callback {
            form.push(("StatusCallback", cb.clone()));
        }
        let url = format!(
            "{}/2010-04-01/Accounts/{}/Messages.json",
            t.api_base, t.account_sid
        );
        let sent: TwilioMessage = self
            .call("twilio", || {
                self.http
                    .post(&url)
                    .basic_auth(&t.account_sid, Some(&t.auth_token))
                    .form(&form)
            })
            .await?;
        Ok(sent.sid)
    }

    async fn gmail_send(
        &self,
        g: &GmailSendSettings,
        raw: &str,
        thread_id: Option<&str>,
    ) -> Result<String, SendError> {
        let mut body = serde_json::json!({"raw": URL_SAFE_NO_PAD.encode(raw.as_bytes())});
        if let Some(thread) = thread_id {
            body["threadId"] = serde_json::Value::String(thread.to_string());
        }
        let url = format!("{}/gmail/v1/users/me/messages/send", g.api_base);
        let sent: GmailSent = self
            .call("gmail", || {
                let request = self.http.post(&url).json(&body);
                match &g.access_token {
                    Some(token) => request.bearer_auth(token),
                    None => request,
                }
            })
            .await?;
        Ok(sent.id)
    }

    /// Sends one reply; returns the provider ids of what went out.
    async fn send(
        &self,
        ticket: &Ticket,
        customer: &Customer,
        channel: Channel,
        body: &str,
        parts: &[String],
    ) -> Result<Vec<String>, SendError> {
        let identity = |kind: IdentityKind| customer.address(kind).map(str::to_string);
        match channel {
            Channel::Whatsapp => {
                let t = self.twilio.as_ref().ok_or_else(|| {
                    SendError::Permanent("Twilio is not configured (TWILIO_ACCOUNT_SID…)".into())
                })?;
                let number = identity(IdentityKind::Whatsapp)
                    .or_else(|| identity(IdentityKind::Phone))
                    .ok_or_else(|| {
                        SendError::Permanent("the customer has no WhatsApp number".into())
                    })?;
                let mut ids = Vec::with_capacity(parts.len());
                for part in parts {
                    ids.push(
                        self.twilio_send(t, &format!("whatsapp:{number}"), part)
                            .await?,
                    );
                }
                Ok(ids)
            }
            Channel::Email | Channel::Webform => {
                let g = self.gmail.as_ref().ok_or_else(|| {
                    SendError::Permanent(
                        "Gmail sending is not configured (GMAIL_SUPPORT_ADDRESS)".into(),
                    )
                })?;
                let to = identity(IdentityKind::Email).ok_or_else(|| {
                    SendError::Permanent("the customer has no email address".into())
                })?;
                // A web-form ticket's replies join the acknowledgement's
                // thread, under its fixed subject: never the form's subject.
                let recorded = match (channel, &ticket.email_thread) {
                    (Channel::Webform, None) => self.webform_thread(ticket).await,
                    _ => None,
                };
                let thread: Option<&EmailThread> =
                    ticket.email_thread.as_ref().or(recorded.as_ref());
                let reference = ticket.id.map(ticket_reference).unwrap_or_default();
                let typed_subject = match channel {
                    Channel::Webform => None,
                    _ => ticket.subject.clone(),
                };
                let subject = match thread.and_then(|t| t.subject.clone()).or(typed_subject) {
                    Some(s) if s.to_lowercase().starts_with("re:") => s,
                    Some(s) => format!("Re: {s}"),
                    None => format!("Your support request {reference}"),
                };
                let raw = rfc2822(
                    &g.from,
                    &to,
                    &subject,
                    thread.and_then(|t| t.message_id_header.as_deref()),
                    body,
                );
                Ok(vec![
                    self.gmail_send(g, &raw, thread.map(|t| t.thread_id.as_str()))
                        .await?,
                ])
            }
        }
    }

    async fn deliver(
        &self,
        message: &Incoming,
        envelope: &EventEnvelope,
    ) -> Result<(), HandlerError> {
        let Ok(TicketEvent::ResponseSent {
            response_id,
            channel,
            body,
            parts,
            ..
        }) = envelope.decode::<TicketEvent>()
        else {
            return Err(HandlerError::Poison(format!(
                "{} is not a reply",
                envelope.event_type
            )));
        };
        let retryable = |e: crate::store::StoreError| HandlerError::Retry(e.to_string());
        let ticket = self
            .store
            .load::<Ticket>(&envelope.aggregate_id)
            .await
            .map_err(retryable)?
            .aggregate;
        let Some(ticket_id) = ticket.id else {
            return Err(HandlerError::Poison(
                "reply to a ticket that does not exist".into(),
            ));
        };
        if ticket
            .responses
            .get(&response_id)
            .is_some_and(|r| r.delivery.is_some())
        {
            // Delivered (or given up on) before: a redelivered message.
            return Ok(());
        }
        let customer_id = ticket.customer_id.expect("an opened ticket has a customer");
        let customer = self
            .store
            .load::<Customer>(&customer_id.to_string())
            .await
            .map_err(retryable)?
            .aggregate;
        let parts = if parts.is_empty() {
            vec![body.clone()]
        } else {
            parts
        };
        let meta = EventMetadata::new(envelope.correlation_id.clone(), Actor::system("delivery"))
            .caused_by(envelope.event_id.to_string())
            .on_channel(channel);
        if let Some(refusal) = self
            .recipient_limit_refusal(envelope, &customer, channel)
            .await?
        {
            self.give_up(message, ticket_id, response_id, &refusal, &meta)
                .await?;
            return Ok(());
        }
        match self.send(&ticket, &customer, channel, &body, &parts).await {
            Ok(ids) => {
                let status = match channel {
                    Channel::Whatsapp => DeliveryStatus::Queued,
                    _ => DeliveryStatus::Sent,
                };
                for id in ids {
                    self.intake
                        .record_outbound(
                            ticket_id,
                            response_id,
                            provider_channel(channel),
                            &id,
                            status,
                            meta.clone(),
                        )
                        .await
                        .map_err(|e| HandlerError::Retry(e.to_string()))?;
                }
                tracing::info!(%ticket_id, channel = channel.as_str(), parts = parts.len(), "reply delivered to the provider");
                Ok(())
            }
            Err(e) => {
                self.give_up(message, ticket_id, response_id, &e.to_string(), &meta)
                    .await?;
                Ok(())
            }
        }
    }

    /// The reply could not be delivered: record it, escalate the ticket,
    /// and keep the message in the dead-letter topic.
    async fn give_up(
        &self,
        message: &Incoming,
        ticket_id: Uuid,
        response_id: Uuid,
        error: &str,
        meta: &EventMetadata,
    ) -> Result<(), HandlerError> {
        let at = Utc::now();
        let key = ticket_id.to_string();
        let commands = [
            TicketCommand::RecordDeliveryStatus {
                response_id,
                status: DeliveryStatus::Failed,
                provider_message_id: None,
                error: Some(error.chars().take(500).collect()),
                at,
            },
            TicketCommand::Escalate {
                escalation_id: Uuid::now_v7(),
                in_reply_to: None,
                reason: casebook_domain::ticket::EscalationReason::DeliveryFailed,
                note: Some(format!(
                    "reply {response_id} could not be delivered: {error}"
                )),
                at,
            },
        ];
        for command in commands {
            match self.store.execute::<Ticket>(&key, command, meta).await {
                Ok(_) | Err(CommandError::Rejected(TicketError::Closed)) => {}
                Err(CommandError::Rejected(e)) => {
                    tracing::warn!(error = %e, "could not record the failed delivery")
                }
                Err(CommandError::Store(e)) => return Err(HandlerError::Retry(e.to_string())),
            }
        }
        dead_letter(&self.producer, &self.dlq, message, error).await;
        Ok(())
    }
}

/// Web form replies go out by email and are tracked as email.
fn provider_channel(channel: Channel) -> Channel {
    match channel {
        Channel::Webform => Channel::Email,
        other => other,
    }
}

/// The delivery worker's handler for the outbound topics.
pub struct DeliveryHandler(pub Arc<Delivery>);

#[async_trait]
impl Handler for DeliveryHandler {
    async fn handle(&self, message: &Incoming) -> Result<(), HandlerError> {
        let envelope: EventEnvelope = serde_json::from_slice(&message.payload)
            .map_err(|e| HandlerError::Poison(format!("not an event envelope: {e}")))?;
        if envelope.event_type == "EmailClaimOpened" {
            return self.0.acknowledge(message, &envelope).await;
        }
        if envelope.event_type != "ResponseSent" {
            return Ok(());
        }
        self.0.deliver(message, &envelope).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_raw_message_joins_the_thread_and_cannot_be_header_injected() {
        let raw = rfc2822(
            "support@acme.test",
            "ada@example.com",
            "Re: Invoices\r\nBcc: evil@example.com",
            Some("<m1@mail.example.com>"),
            "Hi Ada,\n\nFound them.",
        );
        assert!(raw.contains("Subject: Re: Invoices Bcc: evil@example.com\r\n"));
        assert!(!raw.contains("\r\nBcc:"));
        assert!(raw.contains("In-Reply-To: <m1@mail.example.com>\r\n"));
        assert!(raw.ends_with("Hi Ada,\r\n\r\nFound them."));
        assert!(rfc2822("a@b.co", "c@d.co", "Café", None, "x").contains("Subject: =?UTF-8?B?"));
    }
}
