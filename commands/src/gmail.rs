//! Gmail intake: a Pub/Sub push says only "mailbox X changed up to history
//! id H"; the push is recorded and answered at once, and the mail sync
//! worker reads the new messages through the Gmail API
//! (`users.history.list`, then `users.messages.get`) and takes them in,
//! threaded by Gmail's `threadId`, keeping progress per message.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use casebook_domain::conversation::gmail_thread_conversation_id;
use casebook_domain::email::{automated_reason, html_to_text, strip_quoted_reply, HTML_MAX_BYTES};
use casebook_domain::identity::{normalize_email, parse_mailbox, IdentityKey};
use casebook_domain::masking::{mask_email, mask_pii};
use casebook_domain::retry::Backoff;
use casebook_domain::sanitize::{multi_line, single_line};
use casebook_domain::ticket::EmailThread;
use casebook_domain::{Category, Channel, Priority};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Deserialize;
use sqlx::{PgPool, Row};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::intake::{InboundMessage, Intake, IntakeError, Sender};
use crate::metrics::{EXTERNAL_CALLS, GMAIL_MESSAGES, GMAIL_SYNC_ERRORS};
use crate::retry::{jitter, retry};

/// Longest email body kept, in characters; the rest is cut.
pub const EMAIL_BODY_MAX: usize = 10_000;
/// Longest text/plain part read, in bytes, before quotes are stripped.
const PLAIN_MAX_BYTES: usize = 256 * 1024;
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
    next_page_token: Option<String>,
}

struct HistoryPage {
    ids: Vec<String>,
    next_page_token: Option<String>,
    history_id: Option<u64>,
}

/// Gmail's message and thread ids are short hexadecimal strings; anything
/// but a short run of letters, digits, `-` and `_` is not used to build a
/// request path or a conversation key.
fn valid_gmail_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
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
                        .map_err(|e| GmailError::Transport(mask_pii(&e.to_string())))?;
                    let status = response.status().as_u16();
                    match status {
                        200..=299 => response
                            .json::<T>()
                            .await
                            .map_err(|e| GmailError::Decode(mask_pii(&e.to_string()))),
                        404 => Err(GmailError::NotFound),
                        401 | 403 => Err(GmailError::Unauthorized(status)),
                        _ => {
                            // Gmail's error bodies can name the mailbox's
                            // correspondents: masked where they are made.
                            let text: String = response
                                .text()
                                .await
                                .unwrap_or_default()
                                .chars()
                                .take(200)
                                .collect();
                            Err(GmailError::Http(status, mask_pii(&text)))
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

    /// One page of `users.history.list`: ids of messages added since
    /// `start_history_id` (oldest first), the next page's token, and the
    /// mailbox's current history id.
    async fn history_page(
        &self,
        user: &str,
        start_history_id: u64,
        page_token: Option<&str>,
    ) -> Result<HistoryPage, GmailError> {
        let mut query = vec![
            ("startHistoryId", start_history_id.to_string()),
            ("historyTypes", "messageAdded".to_string()),
            ("maxResults", "500".to_string()),
        ];
        if let Some(token) = page_token {
            query.push(("pageToken", token.to_string()));
        }
        let page: HistoryList = self
            .get(
                "history.list",
                &format!("/gmail/v1/users/{user}/history"),
                &query,
            )
            .await?;
        let mut ids: Vec<String> = Vec::new();
        for record in page.history {
            for added in record.messages_added {
                if valid_gmail_id(&added.message.id) && !ids.contains(&added.message.id) {
                    ids.push(added.message.id);
                }
            }
        }
        Ok(HistoryPage {
            ids,
            next_page_token: page.next_page_token.filter(|t| t.len() <= 512),
            history_id: page.history_id.as_deref().and_then(|h| h.parse().ok()),
        })
    }

    /// The inbox's recent messages, oldest first, at most
    /// [`RECENT_MESSAGES_MAX`]: the fallback when there is no usable history
    /// cursor (first push, or a cursor Gmail no longer keeps).
    async fn recent_messages(&self, user: &str) -> Result<Vec<String>, GmailError> {
        let mut ids: Vec<String> = Vec::new();
        let mut page_token: Option<String> = None;
        loop {
            let mut query = vec![
                ("labelIds", "INBOX".to_string()),
                ("q", "newer_than:1d".to_string()),
                ("maxResults", "100".to_string()),
            ];
            if let Some(token) = &page_token {
                query.push(("pageToken", token.clone()));
            }
            let list: MessageList = self
                .get(
                    "messages.list",
                    &format!("/gmail/v1/users/{user}/messages"),
                    &query,
                )
                .await?;
            ids.extend(
                list.messages
                    .into_iter()
                    .map(|m| m.id)
                    .filter(|id| valid_gmail_id(id)),
            );
            match list.next_page_token {
                Some(token) if ids.len() < RECENT_MESSAGES_MAX && token.len() <= 512 => {
                    page_token = Some(token)
                }
                _ => break,
            }
        }
        ids.truncate(RECENT_MESSAGES_MAX);
        // The API lists newest first; take them in oldest-first order.
        ids.reverse();
        Ok(ids)
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
            .and_then(|p| decode_body(p, PLAIN_MAX_BYTES))
            .filter(|t| !t.trim().is_empty())
            .or_else(|| {
                find_part(payload, "text/html")
                    .and_then(|p| decode_body(p, HTML_MAX_BYTES))
                    .map(|h| html_to_text(&h))
            })
            .unwrap_or_default();
        let text = multi_line(&strip_quoted_reply(&raw));
        truncate_chars(&text, EMAIL_BODY_MAX)
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

/// A part's decoded text, at most `max_bytes` of it (cut at a character
/// boundary): a huge part is never decoded whole.
fn decode_body(part: &MessagePart, max_bytes: usize) -> Option<String> {
    let data = part.body.as_ref()?.data.as_ref()?;
    let data = data.trim();
    // Four base64 characters carry three bytes.
    let keep = (max_bytes / 3 + 1) * 4;
    let data = if data.len() > keep {
        &data[..keep]
    } else {
        data
    };
    let mut bytes = URL_SAFE_LENIENT.decode(data).ok()?;
    bytes.truncate(max_bytes);
    let text = String::from_utf8_lossy(&bytes);
    // A multi-byte character cut in half becomes one replacement character.
    Some(text.trim_end_matches('\u{FFFD}').to_string())
}

/// Messages taken from the mailbox's recent list when there is no usable
/// history cursor.
pub const RECENT_MESSAGES_MAX: usize = 500;
/// Messages fetched from Gmail at once while catching up.
const FETCH_CONCURRENCY: usize = 8;
/// Pending messages claimed per round.
const CHUNK: i64 = 64;
/// Attempts to read one message before it is recorded as refused.
const MESSAGE_ATTEMPTS_MAX: i32 = 10;
/// How long a worker holds a mailbox without renewing its lease.
const LEASE_SECS: i64 = 60;
/// How often the worker looks for work nobody told it about (a push another
/// replica received, a message whose retry is due).
const POLL_EVERY: Duration = Duration::from_secs(1);
const MAILBOX_BACKOFF: Backoff =
    Backoff::new(Duration::from_secs(1), Duration::from_secs(300), u32::MAX);
const MESSAGE_BACKOFF: Backoff =
    Backoff::new(Duration::from_secs(2), Duration::from_secs(600), u32::MAX);

/// A mailbox's sync state, as its lease was taken.
struct Leased {
    /// How far history has been listed (`None`: never).
    listed: Option<u64>,
    /// How far the pushes said the mailbox changed.
    notified: Option<u64>,
    /// The last push's correlation id.
    correlation_id: Option<String>,
}

/// What became of one Gmail message.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Settled {
    Accepted(Uuid),
    Duplicate(Uuid),
    Skipped(&'static str),
    Refused(String),
    Gone,
}

impl Settled {
    fn state(&self) -> &'static str {
        match self {
            Settled::Accepted(_) => "accepted",
            Settled::Duplicate(_) => "duplicate",
            Settled::Skipped(_) => "skipped",
            Settled::Refused(_) => "refused",
            Settled::Gone => "gone",
        }
    }
}

/// What a Gmail message stands for.
#[derive(Debug, Clone, PartialEq)]
pub enum Classified {
    /// A customer writing in.
    Customer(Box<InboundMessage>),
    /// Not a customer writing in: our own sent mail, a draft, spam.
    NotCustomer(&'static str),
    /// Mail that cannot become a ticket message, and why.
    Refused(String),
}

/// What one sync pass over a mailbox did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    pub discovered: usize,
    pub accepted: usize,
    pub duplicates: usize,
    pub skipped: usize,
    pub refused: usize,
    pub postponed: usize,
}

impl SyncReport {
    fn count(&mut self, settled: &Settled) {
        match settled {
            Settled::Accepted(_) => self.accepted += 1,
            Settled::Duplicate(_) => self.duplicates += 1,
            Settled::Skipped(_) | Settled::Gone => self.skipped += 1,
            Settled::Refused(_) => self.refused += 1,
        }
    }
}

/// Gmail intake. A push only records how far the mailbox has changed
/// ([`GmailSync::notify`]) and is answered at once; the sync worker
/// ([`GmailSync::run`]) lists the history into `gmail_messages`, then takes
/// each message in and records what became of it. One worker holds a
/// mailbox at a time (a lease in `gmail_sync`), so concurrent pushes and
/// replicas never fetch the same messages twice; a message that fails is
/// retried with backoff and, after [`MESSAGE_ATTEMPTS_MAX`] attempts or at
/// once when intake refuses it, recorded as refused with its reason. It
/// never holds back the messages after it.
#[derive(Clone)]
pub struct GmailSync {
    client: GmailClient,
    intake: Intake,
    pool: PgPool,
    support_address: Option<String>,
    worker_id: Uuid,
    wake: Arc<Notify>,
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
            worker_id: Uuid::now_v7(),
            wake: Arc::new(Notify::new()),
        }
    }

    /// Records that `mailbox` changed up to `history_id` and wakes the sync
    /// worker. Returns as soon as the notification is stored.
    pub async fn notify(
        &self,
        mailbox: &str,
        history_id: u64,
        correlation_id: &str,
    ) -> Result<(), GmailError> {
        let mailbox = normalize_email(mailbox).map_err(|_| GmailError::BadMailbox)?;
        sqlx::query(
            "INSERT INTO gmail_sync (email_address, history_id, notified_history_id, correlation_id)
             VALUES ($1, NULL, $2::text::numeric, $3)
             ON CONFLICT (email_address) DO UPDATE
                SET notified_history_id = GREATEST(gmail_sync.notified_history_id, EXCLUDED.notified_history_id),
                    correlation_id = EXCLUDED.correlation_id,
                    retry_at = LEAST(gmail_sync.retry_at, now()),
                    updated_at = now()",
        )
        .bind(&mailbox)
        .bind(history_id.to_string())
        .bind(correlation_id.chars().take(128).collect::<String>())
        .execute(&self.pool)
        .await?;
        self.wake.notify_one();
        Ok(())
    }

    /// The sync worker: runs until `shutdown`, syncing every mailbox with
    /// work to do, one at a time per mailbox across all replicas.
    pub async fn run(self, shutdown: CancellationToken) {
        tracing::info!("mail sync worker running");
        while !shutdown.is_cancelled() {
            match self.due_mailboxes().await {
                Ok(mailboxes) => {
                    for mailbox in mailboxes {
                        if shutdown.is_cancelled() {
                            break;
                        }
                        let span =
                            tracing::info_span!("mail_sync", mailbox = %mask_email(&mailbox));
                        match self
                            .sync_mailbox(&mailbox, &shutdown)
                            .instrument(span)
                            .await
                        {
                            Ok(Some(report)) => {
                                tracing::debug!(mailbox = %mask_email(&mailbox), ?report, "mailbox synced")
                            }
                            Ok(None) => {}
                            Err(e) => self.mailbox_failed(&mailbox, &e).await,
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "mail sync cannot read its state"),
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(POLL_EVERY) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        tracing::info!("mail sync worker stopped");
    }

    async fn due_mailboxes(&self) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT s.email_address FROM gmail_sync s
              WHERE s.retry_at <= now()
                AND (s.lease_until IS NULL OR s.lease_until < now() OR s.lease_owner = $1)
                AND (s.history_id IS NULL
                     OR s.notified_history_id > s.history_id
                     OR EXISTS (SELECT 1 FROM gmail_messages m
                                 WHERE m.email_address = s.email_address
                                   AND m.state = 'pending' AND m.next_attempt_at <= now()))
              ORDER BY s.updated_at
              LIMIT 100",
        )
        .bind(self.worker_id)
        .fetch_all(&self.pool)
        .await
    }

    /// Takes (or renews) the mailbox's lease; `None` while another worker
    /// holds it.
    async fn lease(&self, mailbox: &str) -> Result<Option<Leased>, GmailError> {
        let row: Option<(Option<String>, Option<String>, Option<String>)> = sqlx::query_as(
            "UPDATE gmail_sync
                SET lease_owner = $2, lease_until = now() + make_interval(secs => $3)
              WHERE email_address = $1
                AND (lease_until IS NULL OR lease_until < now() OR lease_owner = $2)
          RETURNING history_id::text, notified_history_id::text, correlation_id",
        )
        .bind(mailbox)
        .bind(self.worker_id)
        .bind(LEASE_SECS as f64)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(listed, notified, correlation_id)| Leased {
            listed: listed.and_then(|h| h.parse().ok()),
            notified: notified.and_then(|h| h.parse().ok()),
            correlation_id,
        }))
    }

    async fn release(&self, mailbox: &str) -> Result<(), GmailError> {
        sqlx::query(
            "UPDATE gmail_sync SET lease_owner = NULL, lease_until = NULL, failures = 0,
                    last_error = NULL, updated_at = now()
              WHERE email_address = $1 AND lease_owner = $2",
        )
        .bind(mailbox)
        .bind(self.worker_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn mailbox_failed(&self, mailbox: &str, error: &GmailError) {
        GMAIL_SYNC_ERRORS.inc();
        let error_text = mask_pii(&error.to_string());
        tracing::warn!(mailbox = %mask_email(mailbox), error = %error_text, "mail sync failed; retrying later");
        let result = sqlx::query(
            "UPDATE gmail_sync
                SET failures = failures + 1, last_error = $3,
                    lease_owner = NULL, lease_until = NULL, updated_at = now()
              WHERE email_address = $1 AND (lease_owner = $2 OR lease_owner IS NULL)
          RETURNING failures",
        )
        .bind(mailbox)
        .bind(self.worker_id)
        .bind(&error_text)
        .fetch_optional(&self.pool)
        .await;
        // The delay grows with the failures recorded so far.
        if let Ok(Some(row)) = result {
            let failures: i32 = row.get(0);
            let delay = MAILBOX_BACKOFF.delay(failures.max(1) as u32, jitter());
            let _ = sqlx::query(
                "UPDATE gmail_sync SET retry_at = now() + make_interval(secs => $2) WHERE email_address = $1",
            )
            .bind(mailbox)
            .bind(delay.as_secs_f64())
            .execute(&self.pool)
            .await;
        }
    }

    /// One pass over a mailbox: list what is new, then take in every
    /// pending message that is due. `None` when another worker holds it.
    pub async fn sync_mailbox(
        &self,
        mailbox: &str,
        shutdown: &CancellationToken,
    ) -> Result<Option<SyncReport>, GmailError> {
        let Some(leased) = self.lease(mailbox).await? else {
            return Ok(None);
        };
        let mut report = SyncReport::default();
        // The push that asked for this sync, so its request's id follows
        // the mail it brought in.
        let correlation = leased
            .correlation_id
            .unwrap_or_else(|| Uuid::now_v7().to_string());
        report.discovered = self
            .discover(mailbox, leased.listed, leased.notified, &correlation)
            .await?;
        while !shutdown.is_cancelled() {
            let taken = self.take_in_pending(mailbox, &mut report).await?;
            if taken == 0 {
                break;
            }
            // Still ours while we work through a backlog.
            if self.lease(mailbox).await?.is_none() {
                return Ok(Some(report));
            }
        }
        self.release(mailbox).await?;
        Ok(Some(report))
    }

    /// Lists message ids past the cursor into `gmail_messages` and moves the
    /// cursor, page by page. Returns how many ids were new.
    async fn discover(
        &self,
        mailbox: &str,
        listed: Option<u64>,
        notified: Option<u64>,
        correlation: &str,
    ) -> Result<usize, GmailError> {
        let target = notified.unwrap_or(0);
        let mut found = 0;
        match listed {
            Some(start) if start >= target => {}
            Some(start) => {
                let mut page_token: Option<String> = None;
                let mut latest = target;
                loop {
                    let page = match self
                        .client
                        .history_page(mailbox, start, page_token.as_deref())
                        .await
                    {
                        Ok(page) => page,
                        // Gmail keeps history for about a week; past that,
                        // take the recent inbox instead.
                        Err(GmailError::NotFound) => {
                            let ids = self.client.recent_messages(mailbox).await?;
                            found += self.record_ids(mailbox, &ids, correlation).await?;
                            break;
                        }
                        Err(e) => return Err(e),
                    };
                    found += self.record_ids(mailbox, &page.ids, correlation).await?;
                    if let Some(h) = page.history_id {
                        latest = latest.max(h);
                    }
                    match page.next_page_token {
                        Some(token) => {
                            page_token = Some(token);
                            // Another worker took the mailbox over: it
                            // lists from the cursor itself.
                            if self.lease(mailbox).await?.is_none() {
                                return Ok(found);
                            }
                        }
                        None => {
                            self.advance_cursor(mailbox, latest).await?;
                            return Ok(found);
                        }
                    }
                }
                self.advance_cursor(mailbox, latest).await?;
            }
            None => {
                let ids = self.client.recent_messages(mailbox).await?;
                found += self.record_ids(mailbox, &ids, correlation).await?;
                self.advance_cursor(mailbox, target).await?;
            }
        }
        Ok(found)
    }

    async fn record_ids(
        &self,
        mailbox: &str,
        ids: &[String],
        correlation: &str,
    ) -> Result<usize, GmailError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let inserted = sqlx::query(
            "INSERT INTO gmail_messages (email_address, message_id, correlation_id)
             SELECT $1, id, $3 FROM unnest($2::text[]) WITH ORDINALITY AS u(id, n) ORDER BY n
             ON CONFLICT (email_address, message_id) DO NOTHING",
        )
        .bind(mailbox)
        .bind(ids)
        .bind(correlation)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(inserted as usize)
    }

    async fn advance_cursor(&self, mailbox: &str, history_id: u64) -> Result<(), GmailError> {
        sqlx::query(
            "UPDATE gmail_sync
                SET history_id = GREATEST(coalesce(history_id, 0), $2::text::numeric), updated_at = now()
              WHERE email_address = $1",
        )
        .bind(mailbox)
        .bind(history_id.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Takes in up to [`CHUNK`] due pending messages, oldest first, fetching
    /// several at once. Returns how many it looked at.
    async fn take_in_pending(
        &self,
        mailbox: &str,
        report: &mut SyncReport,
    ) -> Result<usize, GmailError> {
        let pending: Vec<(String, i32, Option<String>)> = sqlx::query_as(
            "SELECT message_id, attempts, correlation_id FROM gmail_messages
              WHERE email_address = $1 AND state = 'pending' AND next_attempt_at <= now()
              ORDER BY seq LIMIT $2",
        )
        .bind(mailbox)
        .bind(CHUNK)
        .fetch_all(&self.pool)
        .await?;
        let count = pending.len();
        let fetched: Vec<_> = futures::stream::iter(pending.into_iter().map(
            |(id, attempts, correlation)| async move {
                let result = self.client.message(mailbox, &id).await;
                (id, attempts, correlation, result)
            },
        ))
        .buffered(FETCH_CONCURRENCY)
        .collect()
        .await;
        for (id, attempts, correlation, result) in fetched {
            let correlation = correlation.unwrap_or_else(|| format!("gmail:{id}"));
            let span = tracing::info_span!("gmail_message", correlation_id = %correlation, gmail_message_id = %id);
            let settled = async {
                match result {
                    Ok(message) => self.take_in(message, &correlation).await.map(Some),
                    Err(GmailError::NotFound) => Ok(Some(Settled::Gone)),
                    Err(e @ GmailError::Unauthorized(_)) => Err(e),
                    Err(e) if attempts + 1 >= MESSAGE_ATTEMPTS_MAX => Ok(Some(Settled::Refused(
                        format!("could not be read from Gmail after {} attempts: {}", attempts + 1, mask_pii(&e.to_string())),
                    ))),
                    Err(e) => {
                        tracing::warn!(attempt = attempts + 1, error = %mask_pii(&e.to_string()), "message not read yet; retrying later");
                        Ok(None)
                    }
                }
            }
            .instrument(span)
            .await;
            match settled {
                Ok(Some(settled)) => {
                    report.count(&settled);
                    self.settle(mailbox, &id, &settled).await?;
                }
                Ok(None) => {
                    report.postponed += 1;
                    self.postpone(mailbox, &id, attempts + 1, None).await?;
                }
                Err(GmailError::Intake(IntakeError::Store(e))) => {
                    // The event store is away: nothing after this can be
                    // taken in either; the mailbox retries later.
                    self.postpone(mailbox, &id, attempts + 1, Some("event store unavailable"))
                        .await
                        .ok();
                    return Err(GmailError::Intake(IntakeError::Store(e)));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(count)
    }

    /// Classifies a fetched message (off the async workers: HTML parsing is
    /// CPU work) and takes it in.
    async fn take_in(
        &self,
        message: GmailMessage,
        correlation: &str,
    ) -> Result<Settled, GmailError> {
        let support = self.support_address.clone();
        let classified =
            tokio::task::spawn_blocking(move || classify(&message, support.as_deref()))
                .await
                .map_err(|e| GmailError::Decode(format!("message parsing failed: {e}")))?;
        let inbound = match classified {
            Classified::Customer(inbound) => inbound,
            Classified::NotCustomer(why) => return Ok(Settled::Skipped(why)),
            Classified::Refused(why) => return Ok(Settled::Refused(why)),
        };
        match self.intake.receive(&inbound, correlation).await {
            Ok(outcome) if outcome.duplicate => Ok(Settled::Duplicate(outcome.ticket_id)),
            Ok(outcome) => Ok(Settled::Accepted(outcome.ticket_id)),
            Err(IntakeError::Rejected(why)) => Ok(Settled::Refused(why)),
            Err(e) => Err(GmailError::Intake(e)),
        }
    }

    async fn settle(&self, mailbox: &str, id: &str, settled: &Settled) -> Result<(), GmailError> {
        let (reason, ticket) = match settled {
            Settled::Accepted(t) | Settled::Duplicate(t) => (None, Some(*t)),
            Settled::Skipped(why) => (Some(why.to_string()), None),
            Settled::Refused(why) => (Some(why.chars().take(500).collect()), None),
            Settled::Gone => (None, None),
        };
        if let Settled::Refused(why) = settled {
            tracing::warn!(gmail_message_id = %id, reason = %why, "mail refused: it cannot become a ticket message");
        }
        GMAIL_MESSAGES.with_label_values(&[settled.state()]).inc();
        sqlx::query(
            "UPDATE gmail_messages
                SET state = $3, reason = $4, ticket_id = $5, attempts = attempts + 1, settled_at = now()
              WHERE email_address = $1 AND message_id = $2",
        )
        .bind(mailbox)
        .bind(id)
        .bind(settled.state())
        .bind(reason)
        .bind(ticket)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn postpone(
        &self,
        mailbox: &str,
        id: &str,
        attempts: i32,
        reason: Option<&str>,
    ) -> Result<(), GmailError> {
        let delay = MESSAGE_BACKOFF.delay(attempts.max(1) as u32, jitter());
        sqlx::query(
            "UPDATE gmail_messages
                SET attempts = $3, reason = $4, next_attempt_at = now() + make_interval(secs => $5)
              WHERE email_address = $1 AND message_id = $2",
        )
        .bind(mailbox)
        .bind(id)
        .bind(attempts)
        .bind(reason)
        .bind(delay.as_secs_f64())
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// Mail the sync could not turn into a ticket message, for staff to follow
/// up in the mailbox.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RefusedMail {
    pub mailbox: String,
    pub gmail_message_id: String,
    pub reason: String,
    pub attempts: i32,
    pub discovered_at: DateTime<Utc>,
}

/// The most recent refused mail, newest first.
pub async fn refused_mail(pool: &PgPool, limit: i64) -> Result<Vec<RefusedMail>, GmailError> {
    type Row = (String, String, Option<String>, i32, DateTime<Utc>);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT email_address, message_id, reason, attempts, discovered_at FROM gmail_messages
          WHERE state = 'refused' ORDER BY discovered_at DESC, seq DESC LIMIT $1",
    )
    .bind(limit.clamp(1, 10_000))
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(mailbox, id, reason, attempts, at)| RefusedMail {
            mailbox,
            gmail_message_id: id,
            reason: reason.unwrap_or_default(),
            attempts,
            discovered_at: at,
        })
        .collect())
}

/// Longest header value kept from a message (RFC 5322 caps a line at 998).
const HEADER_MAX: usize = 998;
const SUBJECT_MAX: usize = 200;
const NAME_MAX: usize = 100;

/// What a Gmail message stands for: our own mail, drafts and spam are not a
/// customer writing in; mail without a usable sender or any content cannot
/// become a ticket message.
pub fn classify(m: &GmailMessage, support_address: Option<&str>) -> Classified {
    if let Some(label) = m
        .label_ids
        .iter()
        .find(|l| matches!(l.as_str(), "SENT" | "DRAFT" | "SPAM" | "TRASH"))
    {
        return Classified::NotCustomer(match label.as_str() {
            "SENT" => "sent by us",
            "DRAFT" => "a draft",
            "SPAM" => "spam",
            _ => "in the trash",
        });
    }
    if !valid_gmail_id(&m.id) || !valid_gmail_id(&m.thread_id) {
        return Classified::Refused("the message or thread id is not a Gmail id".into());
    }
    let from = m.header("From").filter(|f| f.len() <= HEADER_MAX);
    let (name, address) = match from.map(parse_mailbox) {
        Some(Ok(parsed)) => parsed,
        _ => return Classified::Refused("no usable From address".into()),
    };
    if support_address == Some(address.as_str()) {
        return Classified::NotCustomer("sent from our own address");
    }
    let Ok(identity) = IdentityKey::email(&address) else {
        return Classified::Refused("no usable From address".into());
    };
    let name = name
        .map(|n| single_line(&n))
        .filter(|n| !n.is_empty() && n.chars().count() <= NAME_MAX);
    let subject = m
        .header("Subject")
        .map(|s| truncate_chars(&single_line(s), SUBJECT_MAX))
        .filter(|s| !s.is_empty());
    let automated = automated_reason(|name| m.header(name), &address);
    let message_id_header = m
        .header("Message-ID")
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.len() <= HEADER_MAX && !v.chars().any(char::is_control))
        .map(str::to_string);
    let body = m.text();
    let attachments = m.attachments();
    if body.trim().is_empty() && attachments == 0 {
        return Classified::Refused("the message has no text and no attachment".into());
    }
    Classified::Customer(Box::new(InboundMessage {
        channel: Channel::Email,
        channel_message_id: m.id.clone(),
        sender: Sender {
            identities: vec![identity],
            name,
        },
        conversation_id: Some(gmail_thread_conversation_id(&m.thread_id)),
        thread: Some(EmailThread {
            thread_id: m.thread_id.clone(),
            message_id_header,
            subject: subject.clone(),
        }),
        subject,
        body,
        attachments,
        category: Category::General,
        priority: Priority::Medium,
        received_at: m.received_at(),
        automated: automated.map(str::to_string),
    }))
}

fn truncate_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((cut, _)) => s[..cut].to_string(),
        None => s.to_string(),
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
