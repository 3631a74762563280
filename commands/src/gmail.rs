//! Gmail intake: a Pub/Sub push says only "mailbox X changed up to history
//! id H"; the new messages are read through the Gmail API
//! (`users.history.list`, then `users.messages.get`) and taken in, threaded
//! by Gmail's `threadId`.

use std::time::{Duration, Instant};

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use casebook_domain::conversation::gmail_thread_conversation_id;
use casebook_domain::email::{html_to_text, strip_quoted_reply};
use casebook_domain::identity::{normalize_email, parse_mailbox, IdentityKey};
use casebook_domain::retry::Backoff;
use casebook_domain::sanitize::{multi_line, single_line};
use casebook_domain::ticket::EmailThread;
use casebook_domain::{Category, Channel, Priority};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use sqlx::PgPool;

use crate::intake::{InboundMessage, Intake, IntakeError, Sender};
use crate::metrics::EXTERNAL_CALLS;
use crate::retry::retry;

/// Longest email body kept, in characters; the rest is cut.
pub const EMAIL_BODY_MAX: usize = 10_000;
const GMAIL_BACKOFF: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(3), 4);

const URL_SAFE_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

#[derive(Debug, thiserror::Error)]
pub enum GmailError {
    #[error("gmail: not found")]
    NotFound,
    #[error("gmail: access refused ({0})")]
    Unauthorized(u16),
    #[error("gmail: HTTP {0}: {1}")]
    Http(u16, String),
    #[error("gmail: {0}")]
    Transport(String),
    #[error("gmail: unreadable response: {0}")]
    Decode(String),
    #[error("the notification's emailAddress is not an email address")]
    BadMailbox,
    #[error(transparent)]
    Intake(#[from] IntakeError),
    #[error("gmail sync state: {0}")]
    Database(#[from] sqlx::Error),
}

impl GmailError {
    fn is_transient(&self) -> bool {
        match self {
            GmailError::Transport(_) => true,
            GmailError::Http(status, _) => *status == 429 || *status >= 500,
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct GmailClient {
    http: reqwest::Client,
    base: String,
    access_token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct HistoryList {
    #[serde(default)]
    history: Vec<HistoryRecord>,
    next_page_token: Option<String>,
    history_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct HistoryRecord {
    #[serde(default)]
    messages_added: Vec<MessageAdded>,
}

#[derive(Debug, Deserialize)]
struct MessageAdded {
    message: MessageRef,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MessageRef {
    id: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MessageList {
    #[serde(default)]
    messages: Vec<MessageRef>,
}

/// `users.messages.get` with `format=full`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GmailMessage {
    pub id: String,
    pub thread_id: String,
    #[serde(default)]
    pub label_ids: Vec<String>,
    pub history_id: Option<String>,
    pub internal_date: Option<String>,
    pub payload: Option<MessagePart>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessagePart {
    #[serde(default)]
    pub mime_type: String,
    #[serde(default)]
    pub filename: String,
    #[serde(default)]
    pub headers: Vec<Header>,
    pub body: Option<PartBody>,
    #[serde(default)]
    pub parts: Vec<MessagePart>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Header {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PartBody {
    pub data: Option<String>,
    pub attachment_id: Option<String>,
}

impl GmailClient {
    pub fn new(base: &str, access_token: Option<String>) -> Result<Self, GmailError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(3))
            .build()
            .map_err(|e| GmailError::Transport(e.to_string()))?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_string(),
            access_token,
        })
    }

    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        operation: &'static str,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T, GmailError> {
        retry(
            &GMAIL_BACKOFF,
            operation,
            GmailError::is_transient,
            || async {
                let started = Instant::now();
                let mut request = self.http.get(format!("{}{}", self.base, path)).query(query);
                if let Some(token) = &self.access_token {
                    request = request.bearer_auth(token);
                }
                let result = async {
                    let response = request
                        .send()
                        .await
                        .map_err(|e| GmailError::Transport(e.to_string()))?;
                    let status = response.status().as_u16();
                    match status {
                        200..=299 => response
                            .json::<T>()
                            .await
                            .map_err(|e| GmailError::Decode(e.to_string())),
                        404 => Err(GmailError::NotFound),
                        401 | 403 => Err(GmailError::Unauthorized(status)),
                        _ => {
                            let text: String = response
                                .text()
                                .await
                                .unwrap_or_default()
                                .chars()
                                .take(200)
                                .collect();
                            Err(GmailError::Http(status, text))
                        }
                    }
                }
                .await;
                let outcome = if result.is_ok() { "ok" } else { "error" };
                EXTERNAL_CALLS
                    .with_label_values(&["gmail", operation, outcome])
                    .observe(started.elapsed().as_secs_f64());
                result
            },
        )
        .await
    }

    /// Ids of messages added since `start_history_id`, oldest first, across
    /// every page.
    async fn messages_since(
        &self,
        user: &str,
        start_history_id: u64,
    ) -> Result<(Vec<String>, Option<u64>), GmailError> {
        let mut ids = Vec::new();
        let mut page_token: Option<String> = None;
        let mut latest = None;
        loop {
            let mut query = vec![
                ("startHistoryId", start_history_id.to_string()),
                ("historyTypes", "messageAdded".to_string()),
            ];
            if let Some(token) = &page_token {
                query.push(("pageToken", token.clone()));
            }
            let page: HistoryList = self
                .get(
                    "history.list",
                    &format!("/gmail/v1/users/{user}/history"),
                    &query,
                )
                .await?;
            latest = page
                .history_id
                .as_deref()
                .and_then(|h| h.parse().ok())
                .or(latest);
            for record in page.history {
                for added in record.messages_added {
                    if !ids.contains(&added.message.id) {
                        ids.push(added.message.id);
                    }
                }
            }
            match page.next_page_token {
                Some(token) => page_token = Some(token),
                None => return Ok((ids, latest)),
            }
        }
    }

    /// The inbox's recent messages: the fallback when there is no usable
    /// history cursor (first push, or a cursor Gmail no longer keeps).
    async fn recent_messages(&self, user: &str) -> Result<Vec<String>, GmailError> {
        let list: MessageList = self
            .get(
                "messages.list",
                &format!("/gmail/v1/users/{user}/messages"),
                &[
                    ("labelIds", "INBOX".to_string()),
                    ("q", "newer_than:1d".to_string()),
                    ("maxResults", "50".to_string()),
                ],
            )
            .await?;
        // The API lists newest first; take them in oldest-first order.
        Ok(list.messages.into_iter().rev().map(|m| m.id).collect())
    }

    pub async fn message(&self, user: &str, id: &str) -> Result<GmailMessage, GmailError> {
        self.get(
            "messages.get",
            &format!("/gmail/v1/users/{user}/messages/{id}"),
            &[("format", "full".to_string())],
        )
        .await
    }
}

impl GmailMessage {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.payload
            .as_ref()?
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_str())
    }

    /// The message text: the first text/plain part, else text/html made
    /// plain; quoted history removed.
    pub fn text(&self) -> String {
        let Some(payload) = &self.payload else {
            return String::new();
        };
        let raw = find_part(payload, "text/plain")
            .and_then(decode_body)
            .or_else(|| {
                find_part(payload, "text/html")
                    .and_then(decode_body)
                    .map(|h| html_to_text(&h))
            })
            .unwrap_or_default();
        let text = multi_line(&strip_quoted_reply(&raw));
        if text.chars().count() > EMAIL_BODY_MAX {
            text.chars().take(EMAIL_BODY_MAX).collect()
        } else {
            text
        }
    }

    pub fn attachments(&self) -> u32 {
        fn count(part: &MessagePart) -> u32 {
            let own = u32::from(!part.filename.is_empty());
            own + part.parts.iter().map(count).sum::<u32>()
        }
        self.payload.as_ref().map(count).unwrap_or(0)
    }

    pub fn received_at(&self) -> DateTime<Utc> {
        self.internal_date
            .as_deref()
            .and_then(|ms| ms.parse::<i64>().ok())
            .and_then(DateTime::from_timestamp_millis)
            .unwrap_or_else(Utc::now)
    }
}

fn find_part<'a>(part: &'a MessagePart, mime: &str) -> Option<&'a MessagePart> {
    if part.mime_type.eq_ignore_ascii_case(mime) && part.filename.is_empty() {
        return Some(part);
    }
    part.parts.iter().find_map(|p| find_part(p, mime))
}

fn decode_body(part: &MessagePart) -> Option<String> {
    let data = part.body.as_ref()?.data.as_ref()?;
    let bytes = URL_SAFE_LENIENT.decode(data.trim()).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// What one push led to.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    pub fetched: usize,
    pub accepted: usize,
    pub duplicates: usize,
    pub skipped: usize,
}

#[derive(Clone)]
pub struct GmailSync {
    client: GmailClient,
    intake: Intake,
    pool: PgPool,
    support_address: Option<String>,
}

impl GmailSync {
    pub fn new(
        client: GmailClient,
        intake: Intake,
        pool: PgPool,
        support_address: Option<String>,
    ) -> Self {
        Self {
            client,
            intake,
            pool,
            support_address: support_address.and_then(|a| normalize_email(&a).ok()),
        }
    }

    /// Reads and takes in what arrived in `mailbox` up to `history_id`. On
    /// error nothing is acknowledged and the cursor stays, so Pub/Sub's
    /// redelivery tries again (messages already taken in are recognised).
    pub async fn on_push(
        &self,
        mailbox: &str,
        history_id: u64,
        correlation_id: &str,
    ) -> Result<SyncReport, GmailError> {
        let mailbox = normalize_email(mailbox).map_err(|_| GmailError::BadMailbox)?;
        let stored: Option<String> =
            sqlx::query_scalar("SELECT history_id::text FROM gmail_sync WHERE email_address = $1")
                .bind(&mailbox)
                .fetch_optional(&self.pool)
                .await?;
        let stored = stored.and_then(|s| s.parse::<u64>().ok());
        let (ids, latest) = match stored {
            Some(start) if start >= history_id => (Vec::new(), None),
            Some(start) => match self.client.messages_since(&mailbox, start).await {
                Ok(found) => found,
                // Gmail keeps history for about a week; past that, resync.
                Err(GmailError::NotFound) => (self.client.recent_messages(&mailbox).await?, None),
                Err(e) => return Err(e),
            },
            None => (self.client.recent_messages(&mailbox).await?, None),
        };
        let mut report = SyncReport::default();
        for id in ids {
            let message = match self.client.message(&mailbox, &id).await {
                Ok(m) => m,
                // Deleted between the notification and now: nothing to take in.
                Err(GmailError::NotFound) => {
                    report.skipped += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            report.fetched += 1;
            let Some(inbound) = self.inbound(&message) else {
                report.skipped += 1;
                continue;
            };
            let outcome = self.intake.receive(&inbound, correlation_id).await?;
            if outcome.duplicate {
                report.duplicates += 1;
            } else {
                report.accepted += 1;
            }
        }
        let new_cursor = latest.map_or(history_id, |l| l.max(history_id));
        sqlx::query(
            "INSERT INTO gmail_sync (email_address, history_id) VALUES ($1, $2::text::numeric)
             ON CONFLICT (email_address) DO UPDATE
                SET history_id = GREATEST(gmail_sync.history_id, EXCLUDED.history_id), updated_at = now()",
        )
        .bind(&mailbox)
        .bind(new_cursor.to_string())
        .execute(&self.pool)
        .await?;
        Ok(report)
    }

    /// The inbound message a Gmail message stands for, or `None` for what
    /// is not a customer writing in (our own sent mail, drafts, spam, an
    /// unreadable sender).
    pub fn inbound(&self, m: &GmailMessage) -> Option<InboundMessage> {
        if m.label_ids
            .iter()
            .any(|l| matches!(l.as_str(), "SENT" | "DRAFT" | "SPAM" | "TRASH"))
        {
            return None;
        }
        let (name, address) = match m.header("From").map(parse_mailbox) {
            Some(Ok(parsed)) => parsed,
            _ => {
                tracing::warn!(gmail_message_id = %m.id, "message without a usable From address; skipped");
                return None;
            }
        };
        if self.support_address.as_deref() == Some(address.as_str()) {
            return None;
        }
        let identity = IdentityKey::email(&address).ok()?;
        let name = name
            .map(|n| single_line(&n))
            .filter(|n| !n.is_empty() && n.chars().count() <= 100);
        let subject = m
            .header("Subject")
            .map(single_line)
            .filter(|s| !s.is_empty());
        Some(InboundMessage {
            channel: Channel::Email,
            channel_message_id: m.id.clone(),
            sender: Sender {
                identities: vec![identity],
                name,
            },
            conversation_id: Some(gmail_thread_conversation_id(&m.thread_id)),
            thread: Some(EmailThread {
                thread_id: m.thread_id.clone(),
                message_id_header: m.header("Message-ID").map(str::to_string),
                subject: subject.clone(),
            }),
            subject,
            body: m.text(),
            attachments: m.attachments(),
            category: Category::General,
            priority: Priority::Medium,
            received_at: m.received_at(),
            automated: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(json: serde_json::Value) -> GmailMessage {
        serde_json::from_value(json).unwrap()
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    }

    #[test]
    fn a_multipart_message_yields_its_plain_text_without_quotes() {
        let m = message(serde_json::json!({
            "id": "m1", "threadId": "t1", "labelIds": ["INBOX"], "internalDate": "1795000000000",
            "payload": {"mimeType": "multipart/alternative", "headers": [
                {"name": "From", "value": "Ada <ada@example.com>"}, {"name": "Subject", "value": "Re: Export"}],
              "parts": [
                {"mimeType": "text/plain", "body": {"data": b64("Still failing.\r\n\r\nOn Mon, Support wrote:\r\n> try again")}},
                {"mimeType": "text/html", "body": {"data": b64("<p>Still failing.</p>")}},
                {"mimeType": "application/pdf", "filename": "log.pdf", "body": {"attachmentId": "a1"}}]}
        }));
        assert_eq!(m.text(), "Still failing.");
        assert_eq!(m.attachments(), 1);
        assert_eq!(m.header("subject"), Some("Re: Export"));
        assert_eq!(m.received_at().timestamp_millis(), 1_795_000_000_000);
    }

    #[test]
    fn an_html_only_message_is_made_plain() {
        let m = message(serde_json::json!({
            "id": "m2", "threadId": "t2",
            "payload": {"mimeType": "text/html", "headers": [], "body": {"data": b64("<div>Hi &amp; bye</div>")}}
        }));
        assert_eq!(m.text(), "Hi & bye");
    }
}
