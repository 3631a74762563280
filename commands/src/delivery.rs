//! Delivery: replies on `<prefix>.channels.*.outbound` go out through
//! Twilio's Messages API (WhatsApp) and Gmail's `users.messages.send` (email,
//! and web form replies, which are answered by email).
//!
//! Never twice: every part of a reply is written to `delivery_parts` as
//! "started" before its provider call and as "accepted", with the
//! provider's id, as soon as the provider took it, before the next part or
//! anything else. A retry or a redelivered message resumes at the first
//! part not accepted, and records the delivery events of accepted parts it
//! has not recorded yet. When a call's fate is unknown (a timeout after the
//! request went out, a 5xx from a gateway, an unreadable acceptance, or a
//! part found "started" after a crash), the provider is asked before
//! anything is resent: Gmail by the deterministic `Message-ID` each message
//! carries (`rfc822msgid:` search), Twilio by listing the messages to that
//! number from ours and matching the body. If it still cannot be told, the
//! part is not resent: the ticket is escalated with `delivery_failed`.
//!
//! A WhatsApp reply recorded with a `template` (outside WhatsApp's 24-hour
//! window) goes out as one message of that approved template: Twilio's
//! `ContentSid` and `ContentVariables` (`{"1": <status link>, "2": <ticket
//! reference>}`, the link `CASEBOOK_PUBLIC_URL/ticket/<id>?token=<status
//! token>`, made here from the secret and never stored) instead of `Body`;
//! the customer reads the reply itself on the status page. Such a message
//! cannot be found again by its body, so one whose fate is unknown is
//! never resent: the ticket is escalated instead.
//!
//! A reply that cannot be delivered is recorded as failed, the ticket is
//! escalated, and the message goes to the dead-letter topic (the worker
//! writes it). Provider error bodies carry the customer's address or number:
//! every error is masked where it is created.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use casebook_domain::formatting::ticket_reference;
use casebook_domain::identity::IdentityKind;
use casebook_domain::masking::mask_pii;
use casebook_domain::retry::Backoff;
use casebook_domain::sanitize::single_line;
use casebook_domain::status_link;
use casebook_domain::ticket::{DeliveryStatus, EmailThread, EscalationReason};
use casebook_domain::{
    Actor, Channel, Customer, EventEnvelope, EventMetadata, Ticket, TicketCommand, TicketError,
    TicketEvent,
};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use sqlx::PgPool;
use uuid::Uuid;

mod acknowledgement;
pub use acknowledgement::{webform_subject, Settings as AcknowledgementSettings};

use crate::intake::Intake;
use crate::metrics::{DELIVERY_RECONCILED, EXTERNAL_CALLS};
use crate::retry::sleep_backoff;
use crate::store::{CommandError, EventStore};
use crate::worker::{Handler, HandlerError, Incoming};

/// Calls of one part within one handling of a message; what still fails
/// is handed back to the worker, which retries the message later.
pub const DELIVERY_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(200), Duration::from_secs(5), 3);
/// Calls of one part across every handling of its message, after which the
/// reply counts as undeliverable.
pub const PART_ATTEMPT_LIMIT: i32 = 10;
/// Looks at the provider for a part whose fate is unknown.
const LOOKUP_BACKOFF: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(5), 3);
/// Twilio: pages of the message list read when looking for a part.
const TWILIO_LOOKUP_PAGES: usize = 3;

/// The outcome of one provider call. Every text is masked.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    /// The provider took it; its id.
    Accepted(String),
    /// Certainly not taken, worth another try (no connection, 429, 503).
    NotSent(String),
    /// Certainly not taken, and never will be (a 4xx).
    Refused(String),
    /// Maybe taken (a timeout after sending, a 500/502/504, an acceptance
    /// we could not read): look before resending.
    Unknown(String),
}

/// What a lookup at the provider found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Lookup {
    Found(String),
    Absent,
    Unknown(String),
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

/// Twilio's message list (`GET …/Messages.json`).
#[derive(Deserialize)]
struct TwilioPage {
    #[serde(default)]
    messages: Vec<TwilioListed>,
    #[serde(default)]
    next_page_uri: Option<String>,
}

#[derive(Deserialize)]
struct TwilioListed {
    sid: String,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    to: Option<String>,
    #[serde(default)]
    from: Option<String>,
    /// RFC 2822, e.g. `Wed, 25 Nov 2026 13:00:00 +0000`.
    #[serde(default)]
    date_created: Option<String>,
}

#[derive(Deserialize)]
struct GmailSent {
    id: String,
    #[serde(default, rename = "threadId")]
    thread_id: Option<String>,
}

/// Gmail's `users.messages.list`.
#[derive(Deserialize)]
struct GmailList {
    #[serde(default)]
    messages: Vec<GmailSent>,
}

/// A provider's error, masked and bounded.
fn provider_error(status: reqwest::StatusCode, body: &str) -> String {
    let body: String = body.chars().take(300).collect();
    mask_pii(&format!("HTTP {status}: {}", single_line(&body)))
}

/// A transport error, without the URL (it may carry a number) and masked.
fn transport_error(e: reqwest::Error) -> String {
    mask_pii(&e.without_url().to_string())
}

fn observe(service: &str, operation: &str, started: Instant, outcome: &str) {
    EXTERNAL_CALLS
        .with_label_values(&[service, operation, outcome])
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

/// The `Message-ID` of a reply's part: deterministic, so that the sent
/// message can be found again by it.
pub fn message_id(response_id: Uuid, part: usize, from: &str) -> String {
    let domain = from
        .rsplit_once('@')
        .map(|(_, d)| d)
        .filter(|d| {
            !d.is_empty()
                && d.chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-".contains(c))
        })
        .unwrap_or("casebook.invalid");
    format!("<casebook.{}.{part}@{domain}>", response_id.simple())
}

/// An RFC 2822 message: plain text, UTF-8, with our `Message-ID`, joined to
/// the customer's thread when there is one.
pub fn rfc2822(
    from: &str,
    to: &str,
    subject: &str,
    message_id: &str,
    in_reply_to: Option<&str>,
    body: &str,
) -> String {
    let mut m = String::new();
    m.push_str(&format!("From: {}\r\n", single_line(from)));
    m.push_str(&format!("To: {}\r\n", single_line(to)));
    m.push_str(&format!("Subject: {}\r\n", encode_header(subject)));
    m.push_str(&format!("Message-ID: {}\r\n", single_line(message_id)));
    if let Some(id) = in_reply_to {
        let id = single_line(id);
        m.push_str(&format!("In-Reply-To: {id}\r\nReferences: {id}\r\n"));
    }
    m.push_str("MIME-Version: 1.0\r\nContent-Type: text/plain; charset=UTF-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n");
    m.push_str(&body.replace("\r\n", "\n").replace('\n', "\r\n"));
    m
}

/// Where a reply goes.
enum Target<'a> {
    Twilio {
        settings: &'a TwilioSettings,
        /// `whatsapp:+…`
        to: String,
        /// An approved template instead of the body: its content SID and
        /// variables (JSON).
        template: Option<(String, String)>,
    },
    Gmail {
        settings: &'a GmailSendSettings,
        to: String,
        subject: String,
        in_reply_to: Option<String>,
        thread_id: Option<String>,
    },
}

impl Target<'_> {
    fn service(&self) -> &'static str {
        match self {
            Target::Twilio { .. } => "twilio",
            Target::Gmail { .. } => "gmail",
        }
    }
}

/// A row of `delivery_parts`.
#[derive(Debug, Clone, sqlx::FromRow)]
struct PartRow {
    part_index: i32,
    state: String,
    provider_message_id: Option<String>,
    attempts: i32,
    recorded: bool,
    first_started_at: DateTime<Utc>,
}

/// How one part ended in this handling.
enum PartEnd {
    Accepted(String),
    /// Give up on the reply: `failed` when it certainly did not go out,
    /// not when it may have (then it is escalated but not marked failed).
    GiveUp {
        error: String,
        failed: bool,
    },
}

pub struct Delivery {
    acknowledgements: AcknowledgementSettings,
    store: EventStore,
    pool: PgPool,
    intake: Intake,
    http: reqwest::Client,
    twilio: Option<TwilioSettings>,
    gmail: Option<GmailSendSettings>,
}

impl Delivery {
    pub fn new(
        store: EventStore,
        twilio: Option<TwilioSettings>,
        gmail: Option<GmailSendSettings>,
    ) -> Self {
        Self {
            acknowledgements: AcknowledgementSettings::default(),
            intake: Intake::new(store.clone()),
            pool: store.pool().clone(),
            store,
            http: http_client(Duration::from_secs(15)),
            twilio,
            gmail,
        }
    }

    /// The time one provider request may take.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.http = http_client(timeout);
        self
    }

    async fn parts_of(&self, response_id: Uuid) -> Result<Vec<PartRow>, HandlerError> {
        sqlx::query_as::<_, PartRow>(
            "SELECT part_index, state, provider_message_id, attempts, recorded, first_started_at
               FROM delivery_parts WHERE response_id = $1 ORDER BY part_index",
        )
        .bind(response_id)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)
    }

    /// The attempt-started marker, written before the provider call.
    async fn mark_started(
        &self,
        response_id: Uuid,
        index: usize,
        ticket_id: Uuid,
        service: &str,
    ) -> Result<PartRow, HandlerError> {
        sqlx::query_as::<_, PartRow>(
            "INSERT INTO delivery_parts (response_id, part_index, ticket_id, service, state)
             VALUES ($1, $2, $3, $4, 'started')
             ON CONFLICT (response_id, part_index) DO UPDATE
                SET state = 'started', attempts = delivery_parts.attempts + 1, last_started_at = now()
              WHERE delivery_parts.state <> 'accepted'
             RETURNING part_index, state, provider_message_id, attempts, recorded, first_started_at",
        )
        .bind(response_id)
        .bind(index as i32)
        .bind(ticket_id)
        .bind(service)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?
        .ok_or_else(|| HandlerError::Retry("the part was accepted meanwhile".into()))
    }

    async fn mark(&self, response_id: Uuid, index: usize, state: &str) -> Result<(), HandlerError> {
        sqlx::query(
            "UPDATE delivery_parts SET state = $3 WHERE response_id = $1 AND part_index = $2 AND state <> 'accepted'",
        )
        .bind(response_id)
        .bind(index as i32)
        .bind(state)
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(())
    }

    /// The provider took the part: durable before anything else happens.
    async fn mark_accepted(
        &self,
        response_id: Uuid,
        index: usize,
        provider_id: &str,
    ) -> Result<(), HandlerError> {
        sqlx::query(
            "UPDATE delivery_parts SET state = 'accepted', provider_message_id = $3, accepted_at = now()
              WHERE response_id = $1 AND part_index = $2",
        )
        .bind(response_id)
        .bind(index as i32)
        .bind(provider_id)
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(())
    }

    async fn mark_recorded(&self, response_id: Uuid, index: usize) -> Result<(), HandlerError> {
        sqlx::query(
            "UPDATE delivery_parts SET recorded = true WHERE response_id = $1 AND part_index = $2",
        )
        .bind(response_id)
        .bind(index as i32)
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(())
    }

    /// Whether another part already claimed this provider id.
    async fn claimed(&self, service: &str, provider_id: &str) -> Result<bool, String> {
        sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM delivery_parts WHERE service = $1 AND provider_message_id = $2)",
        )
        .bind(service)
        .bind(provider_id)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| e.to_string())
    }

    /// One provider call; `read` takes the id from the acceptance.
    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        service: &'static str,
        request: reqwest::RequestBuilder,
        id: impl FnOnce(T) -> String,
    ) -> Call {
        let started = Instant::now();
        let call = match request.send().await {
            // Refused before anything was sent.
            Err(e) if e.is_connect() || e.is_builder() => Call::NotSent(transport_error(e)),
            Err(e) => Call::Unknown(transport_error(e)),
            Ok(response) => {
                let status = response.status();
                if status.is_success() {
                    match response.json::<T>().await {
                        Ok(v) => Call::Accepted(id(v)),
                        Err(e) => Call::Unknown(format!(
                            "unreadable {service} acceptance: {}",
                            transport_error(e)
                        )),
                    }
                } else {
                    let error = provider_error(status, &response.text().await.unwrap_or_default());
                    match status.as_u16() {
                        429 | 503 => Call::NotSent(error),
                        500..=599 => Call::Unknown(error),
                        _ => Call::Refused(error),
                    }
                }
            }
        };
        let outcome = match &call {
            Call::Accepted(_) => "ok",
            Call::Unknown(_) => "unknown",
            _ => "error",
        };
        observe(service, "send", started, outcome);
        call
    }

    async fn send_part(
        &self,
        target: &Target<'_>,
        response_id: Uuid,
        index: usize,
        part: &str,
    ) -> Call {
        match target {
            Target::Twilio {
                settings: t,
                to,
                template,
            } => {
                let mut form = vec![("To", to.clone()), ("From", t.from.clone())];
                match template {
                    Some((sid, variables)) => {
                        form.push(("ContentSid", sid.clone()));
                        form.push(("ContentVariables", variables.clone()));
                    }
                    None => form.push(("Body", part.to_string())),
                }
                if let Some(cb) = &t.status_callback {
                    form.push(("StatusCallback", cb.clone()));
                }
                let url = format!(
                    "{}/2010-04-01/Accounts/{}/Messages.json",
                    t.api_base, t.account_sid
                );
                let request = self
                    .http
                    .post(&url)
                    .basic_auth(&t.account_sid, Some(&t.auth_token))
                    .form(&form);
                self.call("twilio", request, |m: TwilioMessage| m.sid).await
            }
            Target::Gmail {
                settings: g,
                to,
                subject,
                in_reply_to,
                thread_id,
            } => {
                let raw = rfc2822(
                    &g.from,
                    to,
                    subject,
                    &message_id(response_id, index, &g.from),
                    in_reply_to.as_deref(),
                    part,
                );
                let mut body = serde_json::json!({"raw": URL_SAFE_NO_PAD.encode(raw.as_bytes())});
                if let Some(thread) = thread_id {
                    body["threadId"] = serde_json::Value::String(thread.clone());
                }
                let url = format!("{}/gmail/v1/users/me/messages/send", g.api_base);
                let mut request = self.http.post(&url).json(&body);
                if let Some(token) = &g.access_token {
                    request = request.bearer_auth(token);
                }
                self.call("gmail", request, |m: GmailSent| m.id).await
            }
        }
    }

    /// Asks the provider whether a part whose fate is unknown went out.
    async fn look_up(
        &self,
        target: &Target<'_>,
        response_id: Uuid,
        index: usize,
        part: &str,
        since: DateTime<Utc>,
    ) -> Lookup {
        let started = Instant::now();
        let found = match target {
            Target::Twilio {
                template: Some(_), ..
            } => {
                Lookup::Unknown("a template message cannot be matched by its body at Twilio".into())
            }
            Target::Twilio { settings, to, .. } => {
                self.look_up_twilio(settings, to, part, since).await
            }
            Target::Gmail { settings, .. } => {
                self.look_up_gmail(settings, &message_id(response_id, index, &settings.from))
                    .await
            }
        };
        let outcome = match &found {
            Lookup::Found(_) => "found",
            Lookup::Absent => "absent",
            Lookup::Unknown(_) => "unknown",
        };
        observe(target.service(), "lookup", started, outcome);
        DELIVERY_RECONCILED
            .with_label_values(&[target.service(), outcome])
            .inc();
        found
    }

    /// `users.messages.list?q=rfc822msgid:<id>`: our Message-ID is unique.
    async fn look_up_gmail(&self, g: &GmailSendSettings, message_id: &str) -> Lookup {
        match self.find_gmail(g, message_id).await {
            Ok(Some(m)) => Lookup::Found(m.id),
            Ok(None) => Lookup::Absent,
            Err(e) => Lookup::Unknown(e),
        }
    }

    /// The message we sent with this `Message-ID`, if Gmail has it.
    async fn find_gmail(
        &self,
        g: &GmailSendSettings,
        message_id: &str,
    ) -> Result<Option<GmailSent>, String> {
        let url = format!("{}/gmail/v1/users/me/messages", g.api_base);
        let id = message_id.trim_start_matches('<').trim_end_matches('>');
        let mut request = self.http.get(&url).query(&[
            ("q", format!("rfc822msgid:{id}")),
            ("includeSpamTrash", "true".into()),
        ]);
        if let Some(token) = &g.access_token {
            request = request.bearer_auth(token);
        }
        match request.send().await {
            Err(e) => Err(transport_error(e)),
            Ok(r) if !r.status().is_success() => {
                let status = r.status();
                Err(provider_error(status, &r.text().await.unwrap_or_default()))
            }
            Ok(r) => match r.json::<GmailList>().await {
                Ok(list) => Ok(list.messages.into_iter().next()),
                Err(e) => Err(transport_error(e)),
            },
        }
    }

    /// Twilio's message list, filtered by `To` and `From`: the newest
    /// messages from us to that number, matched by body, created since the
    /// first attempt (a minute's clock skew allowed), and not claimed by
    /// another part. (Not filtered by `DateSent`: a message still queued
    /// has none.)
    async fn look_up_twilio(
        &self,
        t: &TwilioSettings,
        to: &str,
        part: &str,
        since: DateTime<Utc>,
    ) -> Lookup {
        let since = since - chrono::TimeDelta::minutes(1);
        let mut url = format!(
            "{}/2010-04-01/Accounts/{}/Messages.json",
            t.api_base, t.account_sid
        );
        let mut query: Option<Vec<(&str, String)>> = Some(vec![
            ("To", to.to_string()),
            ("From", t.from.clone()),
            ("PageSize", "50".into()),
        ]);
        for _ in 0..TWILIO_LOOKUP_PAGES {
            let mut request = self
                .http
                .get(&url)
                .basic_auth(&t.account_sid, Some(&t.auth_token));
            if let Some(q) = query.take() {
                request = request.query(&q);
            }
            let page = match request.send().await {
                Err(e) => return Lookup::Unknown(transport_error(e)),
                Ok(r) if !r.status().is_success() => {
                    let status = r.status();
                    return Lookup::Unknown(provider_error(
                        status,
                        &r.text().await.unwrap_or_default(),
                    ));
                }
                Ok(r) => match r.json::<TwilioPage>().await {
                    Ok(page) => page,
                    Err(e) => return Lookup::Unknown(transport_error(e)),
                },
            };
            let mut candidates: Vec<(DateTime<Utc>, String)> = page
                .messages
                .into_iter()
                .filter(|m| m.body.as_deref() == Some(part))
                .filter(|m| m.to.as_deref().is_none_or(|v| v == to))
                .filter(|m| m.from.as_deref().is_none_or(|v| v == t.from))
                .filter_map(|m| {
                    let created = DateTime::parse_from_rfc2822(m.date_created.as_deref()?).ok()?;
                    let created = created.with_timezone(&Utc);
                    (created >= since).then_some((created, m.sid))
                })
                .collect();
            candidates.sort();
            for (_, sid) in candidates {
                match self.claimed("twilio", &sid).await {
                    Ok(false) => return Lookup::Found(sid),
                    Ok(true) => {}
                    Err(e) => return Lookup::Unknown(e),
                }
            }
            match page.next_page_uri {
                // Relative to the API's host.
                Some(next) if next.starts_with('/') => url = format!("{}{next}", t.api_base),
                _ => return Lookup::Absent,
            }
        }
        Lookup::Unknown(format!(
            "the part was not among the newest {TWILIO_LOOKUP_PAGES} pages of messages"
        ))
    }

    /// Looks up a part, retrying a lookup that fails.
    async fn look_up_with_retries(
        &self,
        target: &Target<'_>,
        response_id: Uuid,
        index: usize,
        part: &str,
        since: DateTime<Utc>,
    ) -> Lookup {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.look_up(target, response_id, index, part, since).await {
                Lookup::Unknown(e) if LOOKUP_BACKOFF.should_retry(attempt) => {
                    tracing::warn!(attempt, error = %e, "looking up a part at the provider failed; retrying");
                    sleep_backoff(&LOOKUP_BACKOFF, attempt).await;
                }
                other => return other,
            }
        }
    }

    /// Delivers one part, unless the provider has it already.
    async fn deliver_part(
        &self,
        target: &Target<'_>,
        ticket_id: Uuid,
        response_id: Uuid,
        index: usize,
        part: &str,
        row: Option<&PartRow>,
    ) -> Result<PartEnd, HandlerError> {
        let service = target.service();
        let number = index + 1;
        if let Some(row) = row {
            if let Some(id) = &row.provider_message_id {
                return Ok(PartEnd::Accepted(id.clone()));
            }
            if row.state == "started" {
                // A call that never reported back (a crash, a timeout).
                match self
                    .look_up_with_retries(target, response_id, index, part, row.first_started_at)
                    .await
                {
                    Lookup::Found(id) => {
                        tracing::info!(part = number, "the provider has the part already: not resent");
                        self.mark_accepted(response_id, index, &id).await?;
                        return Ok(PartEnd::Accepted(id));
                    }
                    Lookup::Absent => {}
                    Lookup::Unknown(e) => {
                        return Ok(PartEnd::GiveUp {
                            error: format!("part {number} may or may not have reached {service}, and {service} could not tell: {e}; not resent"),
                            failed: false,
                        })
                    }
                }
            }
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let marker = self
                .mark_started(response_id, index, ticket_id, service)
                .await?;
            let error = match self.send_part(target, response_id, index, part).await {
                Call::Accepted(id) => {
                    self.mark_accepted(response_id, index, &id).await?;
                    return Ok(PartEnd::Accepted(id));
                }
                Call::Refused(e) => {
                    self.mark(response_id, index, "refused").await?;
                    return Ok(PartEnd::GiveUp {
                        error: format!("{service} refused part {number}: {e}"),
                        failed: true,
                    });
                }
                Call::NotSent(e) => {
                    self.mark(response_id, index, "refused").await?;
                    e
                }
                Call::Unknown(e) => {
                    tracing::warn!(part = number, error = %e, "the provider call ended without an answer; looking before resending");
                    sleep_backoff(&DELIVERY_BACKOFF, attempt.max(3)).await;
                    match self
                        .look_up_with_retries(target, response_id, index, part, marker.first_started_at)
                        .await
                    {
                        Lookup::Found(id) => {
                            self.mark_accepted(response_id, index, &id).await?;
                            return Ok(PartEnd::Accepted(id));
                        }
                        Lookup::Absent => {
                            self.mark(response_id, index, "refused").await?;
                            e
                        }
                        Lookup::Unknown(e2) => {
                            return Ok(PartEnd::GiveUp {
                                error: format!("part {number} may or may not have reached {service} ({e}), and {service} could not tell: {e2}; not resent"),
                                failed: false,
                            })
                        }
                    }
                }
            };
            if marker.attempts >= PART_ATTEMPT_LIMIT {
                return Ok(PartEnd::GiveUp {
                    error: format!(
                        "part {number} not delivered after {} attempts: {error}",
                        marker.attempts
                    ),
                    failed: true,
                });
            }
            if !DELIVERY_BACKOFF.should_retry(attempt) {
                // The worker tries the message again later; accepted parts
                // are not resent.
                return Err(HandlerError::Retry(format!(
                    "{service} did not take part {number}: {error}"
                )));
            }
            tracing::warn!(part = number, attempt, error = %error, "{service} did not take the part; retrying");
            sleep_backoff(&DELIVERY_BACKOFF, attempt).await;
        }
    }

    /// Where the reply goes; `Err` with a (masked) reason when it cannot.
    fn target<'a>(
        &'a self,
        ticket: &Ticket,
        customer: &Customer,
        channel: Channel,
        webform_thread: Option<EmailThread>,
    ) -> Result<Target<'a>, String> {
        let identity = |kind: IdentityKind| customer.address(kind).map(str::to_string);
        match channel {
            Channel::Whatsapp => {
                let settings = self
                    .twilio
                    .as_ref()
                    .ok_or("Twilio is not configured (TWILIO_ACCOUNT_SID…)")?;
                let number = identity(IdentityKind::Whatsapp)
                    .or_else(|| identity(IdentityKind::Phone))
                    .ok_or("the customer has no WhatsApp number")?;
                Ok(Target::Twilio {
                    settings,
                    to: format!("whatsapp:{number}"),
                    template: None,
                })
            }
            Channel::Email | Channel::Webform => {
                let settings = self
                    .gmail
                    .as_ref()
                    .ok_or("Gmail sending is not configured (GMAIL_SUPPORT_ADDRESS)")?;
                let to =
                    identity(IdentityKind::Email).ok_or("the customer has no email address")?;
                // A web-form ticket's replies join the acknowledgement's
                // thread, under its fixed subject: never the form's subject.
                let thread: Option<&EmailThread> =
                    ticket.email_thread.as_ref().or(webform_thread.as_ref());
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
                Ok(Target::Gmail {
                    settings,
                    to,
                    subject,
                    in_reply_to: thread.and_then(|t| t.message_id_header.clone()),
                    thread_id: thread.map(|t| t.thread_id.clone()),
                })
            }
        }
    }

    async fn deliver(&self, envelope: &EventEnvelope) -> Result<(), HandlerError> {
        let Ok(TicketEvent::ResponseSent {
            response_id,
            channel,
            body,
            parts,
            template,
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
        let delivery = ticket.responses.get(&response_id).and_then(|r| r.delivery);
        if delivery == Some(DeliveryStatus::Failed) {
            // Given up on before: a redelivered message.
            return Ok(());
        }
        let rows = self.parts_of(response_id).await?;
        if rows.is_empty() && delivery.is_some() {
            // Delivered before parts were tracked.
            return Ok(());
        }
        // A template goes as one message, whatever the body's parts.
        let parts = if parts.is_empty() || template.is_some() {
            vec![body]
        } else {
            parts
        };
        // The first reply's status link was recorded without its token:
        // it is added now, so the store never holds one.
        let parts: Vec<String> = match &self.acknowledgements.links {
            Some((keys, public_url)) => {
                let link = status_link::status_link(public_url, ticket_id);
                let token = keys.status_token(ticket_id);
                parts
                    .iter()
                    .map(|p| status_link::with_token(p, &link, &token))
                    .collect()
            }
            None => parts,
        };
        let meta = EventMetadata::new(envelope.correlation_id.clone(), Actor::system("delivery"))
            .caused_by(envelope.event_id.to_string())
            .on_channel(channel);
        let customer_id = ticket.customer_id.expect("an opened ticket has a customer");
        let customer = self
            .store
            .load::<Customer>(&customer_id.to_string())
            .await
            .map_err(retryable)?
            .aggregate;
        if let Some(refusal) = self
            .recipient_limit_refusal(envelope, &customer, channel)
            .await?
        {
            return self
                .give_up(ticket_id, response_id, &refusal, true, &meta)
                .await;
        }
        let webform_thread = match (channel, &ticket.email_thread) {
            (Channel::Webform, None) => self.webform_thread(&ticket).await,
            _ => None,
        };
        let mut target = match self.target(&ticket, &customer, channel, webform_thread) {
            Ok(t) => t,
            Err(e) => return self.give_up(ticket_id, response_id, &e, true, &meta).await,
        };
        if let Some(sid) = template {
            let variables = match (&mut target, &self.acknowledgements.links) {
                (Target::Twilio { template, .. }, Some((keys, public_url))) => {
                    let variables = followup_variables(
                        public_url,
                        ticket_id,
                        &keys.status_token(ticket_id),
                    );
                    *template = Some((sid, variables));
                    Ok(())
                }
                (Target::Twilio { .. }, None) => Err(
                    "a template reply needs the status link: CASEBOOK_JWT_SECRET and CASEBOOK_PUBLIC_URL",
                ),
                _ => Err("only WhatsApp replies go as a template"),
            };
            if let Err(e) = variables {
                return self.give_up(ticket_id, response_id, e, true, &meta).await;
            }
        }
        let status = match channel {
            Channel::Whatsapp => DeliveryStatus::Queued,
            _ => DeliveryStatus::Sent,
        };
        for (index, part) in parts.iter().enumerate() {
            let row = rows.iter().find(|r| r.part_index == index as i32);
            let id = match self
                .deliver_part(&target, ticket_id, response_id, index, part, row)
                .await?
            {
                PartEnd::Accepted(id) => id,
                PartEnd::GiveUp { error, failed } => {
                    return self
                        .give_up(ticket_id, response_id, &error, failed, &meta)
                        .await
                }
            };
            if !row.is_some_and(|r| r.recorded) {
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
                self.mark_recorded(response_id, index).await?;
            }
        }
        tracing::info!(%ticket_id, channel = channel.as_str(), parts = parts.len(), "reply delivered to the provider");
        Ok(())
    }

    /// The reply cannot be delivered (or it cannot be told whether it
    /// was): escalate the ticket, record the failure when it is certain,
    /// and hand the message to the dead-letter topic (`Poison`).
    async fn give_up(
        &self,
        ticket_id: Uuid,
        response_id: Uuid,
        error: &str,
        failed: bool,
        meta: &EventMetadata,
    ) -> Result<(), HandlerError> {
        // Masked already where it was made; masked again in case.
        let error: String = mask_pii(error).chars().take(500).collect();
        let at = Utc::now();
        let key = ticket_id.to_string();
        let note = if failed {
            format!("reply {response_id} could not be delivered: {error}")
        } else {
            format!("reply {response_id} may or may not have been delivered; check with the customer before resending: {error}")
        };
        let mut commands = vec![TicketCommand::Escalate {
            // One escalation per reply, however often this runs.
            escalation_id: Uuid::new_v5(&response_id, b"delivery_failed"),
            in_reply_to: None,
            reason: EscalationReason::DeliveryFailed,
            note: Some(note),
            at,
        }];
        if failed {
            commands.push(TicketCommand::RecordDeliveryStatus {
                response_id,
                status: DeliveryStatus::Failed,
                provider_message_id: None,
                error: Some(error.clone()),
                at,
            });
        }
        for command in commands {
            match self.store.execute::<Ticket>(&key, command, meta).await {
                Ok(_)
                | Err(CommandError::Rejected(
                    TicketError::Closed | TicketError::DuplicateEscalation(_),
                )) => {}
                Err(CommandError::Rejected(e)) => {
                    tracing::warn!(error = %e, "could not record the failed delivery")
                }
                Err(CommandError::Store(e)) => return Err(HandlerError::Retry(e.to_string())),
            }
        }
        tracing::warn!(%ticket_id, %response_id, error = %error, "reply not delivered; ticket escalated");
        Err(HandlerError::Poison(error))
    }
}

/// The `ContentVariables` of the follow-up template: `{{1}}` the status
/// link, `{{2}}` the ticket reference.
pub fn followup_variables(public_url: &str, ticket_id: Uuid, status_token: &str) -> String {
    serde_json::json!({
        "1": format!(
            "{}/ticket/{ticket_id}?token={status_token}",
            public_url.trim_end_matches('/')
        ),
        "2": ticket_reference(ticket_id),
    })
    .to_string()
}

fn http_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(5).min(timeout))
        .build()
        .expect("HTTP client builds")
}

fn db_error(e: sqlx::Error) -> HandlerError {
    HandlerError::Retry(format!("delivery parts: {e}"))
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
        self.0.deliver(&envelope).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_raw_message_joins_the_thread_and_cannot_be_header_injected() {
        let id = message_id(Uuid::nil(), 0, "support@acme.test");
        assert_eq!(
            id,
            "<casebook.00000000000000000000000000000000.0@acme.test>"
        );
        let raw = rfc2822(
            "support@acme.test",
            "ada@example.com",
            "Re: Invoices\r\nBcc: evil@example.com",
            &id,
            Some("<m1@mail.example.com>"),
            "Hi Ada,\n\nFound them.",
        );
        assert!(raw.contains("Subject: Re: Invoices Bcc: evil@example.com\r\n"));
        assert!(!raw.contains("\r\nBcc:"));
        assert!(raw.contains(&format!("Message-ID: {id}\r\n")));
        assert!(raw.contains("In-Reply-To: <m1@mail.example.com>\r\n"));
        assert!(raw.ends_with("Hi Ada,\r\n\r\nFound them."));
        assert!(rfc2822("a@b.co", "c@d.co", "Café", &id, None, "x").contains("Subject: =?UTF-8?B?"));
        assert!(message_id(Uuid::nil(), 1, "weird\r\n@x y").ends_with("@casebook.invalid>"));
    }

    #[test]
    fn provider_errors_are_masked_where_they_are_made() {
        let e = provider_error(
            reqwest::StatusCode::BAD_REQUEST,
            r#"{"code":21211,"message":"The 'To' number whatsapp:+447700900041 is not valid","more_info":"https://www.twilio.com/docs/errors/21211","status":400}"#,
        );
        assert!(!e.contains("447700900041"), "{e}");
        assert!(e.contains("21211") && e.starts_with("HTTP 400"), "{e}");
        let e = provider_error(
            reqwest::StatusCode::BAD_REQUEST,
            "Invalid To header: ada@example.com",
        );
        assert!(e.contains("a***@example.com") && !e.contains("ada@"), "{e}");
    }
}
