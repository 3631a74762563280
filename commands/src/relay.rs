//! The outbox relay: publishes every stored event to Kafka, in store order,
//! exactly as stored.
//!
//! It reads `events` past its checkpoint in (transaction_id, position)
//! order, but only rows of transactions older than the oldest one still
//! running (`pg_snapshot_xmin`): those can no longer change, so an event
//! whose transaction inserted early and committed late is never skipped.
//! A batch is published with an idempotent `acks=all` producer and the
//! checkpoint moves only after every message of it was acknowledged; after a
//! crash or a broker outage the batch is published again, and consumers
//! recognise the copies by `event_id` (and per-stream sequence).
//!
//! An event the broker can never take (larger than a message may be, or
//! refused as invalid) is set aside instead of stalling everything behind
//! it: recorded in `relay_set_aside` with the error, counted in
//! `casebook_relay_set_aside_total` (an alert), and skipped. Projectors
//! read a missing stream event from the store, so read models stay whole.
//!
//! One relay per topic prefix is active at a time (a Postgres advisory
//! lock); others wait on standby.

use std::time::{Duration, Instant};

use casebook_domain::retry::Backoff;
use casebook_domain::topics::Topics;
use casebook_domain::{Channel, EventEnvelope, StoredEvent};
use casebook_telemetry::TraceHeaders;
use chrono::{DateTime, Utc};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use sqlx::postgres::PgRow;
use sqlx::{Connection, PgConnection, PgPool, Row};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::kafka::KafkaSettings;
use crate::metrics::{
    RELAY_ERRORS, RELAY_LAG_EVENTS, RELAY_LAG_SECONDS, RELAY_PUBLISHED, RELAY_SET_ASIDE,
};
use crate::retry::sleep_backoff;
use crate::store::StoreError;

const FAILURE_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(100), Duration::from_secs(5), u32::MAX);

#[derive(Debug, Clone)]
pub struct RelaySettings {
    pub batch_size: i64,
    /// How long to wait before polling again when nothing was new; each
    /// further empty poll doubles the wait up to `idle_poll_max`, and any
    /// activity resets it. (The relay polls rather than LISTENs: a
    /// transaction that NOTIFYs serialises commits cluster-wide, which would
    /// cap every writer's throughput.)
    pub idle_poll: Duration,
    pub idle_poll_max: Duration,
    /// How soon to look again when committed events are not yet visible
    /// behind an older running transaction.
    pub pending_poll: Duration,
    /// Largest message the relay sends; a bigger event is set aside without
    /// being tried (librdkafka's and the broker's default limit is 1 MB).
    pub max_message_bytes: usize,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            batch_size: 1000,
            idle_poll: Duration::from_millis(20),
            idle_poll_max: Duration::from_millis(50),
            pending_poll: Duration::from_millis(3),
            max_message_bytes: 1_000_000,
        }
    }
}

/// One event the relay could not publish to one topic, ever.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetAside {
    pub position: i64,
    pub event_id: Uuid,
    pub correlation_id: String,
    pub topic: String,
    pub error: String,
    pub size_bytes: usize,
}

/// Produce errors that no retry can fix: the message itself is refused.
fn is_permanent(e: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        e.rdkafka_error_code(),
        Some(
            MessageSizeTooLarge
                | InvalidMessageSize
                | InvalidMessage
                | InvalidRecord
                | MessageBatchTooLarge
                | PolicyViolation
                | InvalidArgument
        )
    )
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
}

impl From<sqlx::Error> for RelayError {
    fn from(e: sqlx::Error) -> Self {
        RelayError::Store(e.into())
    }
}

/// Where the relay has published up to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Checkpoint {
    pub transaction_id: u64,
    pub position: i64,
}

pub struct Relay {
    pool: PgPool,
    database_url: String,
    kafka: KafkaSettings,
    settings: RelaySettings,
}

/// Kafka destinations of one stored event: always `events` (keyed by
/// aggregate id); customer messages also to `tickets.incoming` and the
/// channel's inbound topic, replies to the channel's outbound topic,
/// escalations and approval requests to `escalations` (keyed by ticket id).
pub fn routes(topics: &Topics, e: &EventEnvelope) -> Vec<(String, String)> {
    let mut routes = vec![(topics.events(), e.aggregate_id.clone())];
    // A web-form claim's acknowledgement (with its confirmation link) is
    // delivered like a reply, in order with the ticket's replies.
    if e.aggregate_type == "email_claim" && e.event_type == "EmailClaimOpened" {
        if let Some(ticket) = e.payload.get("ticket_id").and_then(|t| t.as_str()) {
            routes.push((topics.outbound(Channel::Webform), ticket.to_string()));
        }
    }
    if e.aggregate_type != "ticket" {
        return routes;
    }
    let channel = e
        .payload
        .get("channel")
        .and_then(|c| c.as_str())
        .and_then(|c| c.parse::<Channel>().ok());
    let key = e.aggregate_id.clone();
    match (e.event_type.as_str(), channel) {
        ("CustomerMessageReceived", Some(channel)) => {
            routes.push((topics.tickets_incoming(), key.clone()));
            routes.push((topics.inbound(channel), key));
        }
        ("ResponseSent", Some(channel)) => routes.push((topics.outbound(channel), key)),
        ("TicketEscalated" | "ApprovalRequested", _) => routes.push((topics.escalations(), key)),
        _ => {}
    }
    routes
}

/// The first stored event past a checkpoint (`$1` its transaction id as
/// text, `$2` its position), committed or not yet released by the xmin
/// barrier; see [`Relay::has_pending`] for why it is not an `EXISTS`.
pub const PENDING_QUERY: &str = "SELECT position FROM events
  WHERE (transaction_id, position) > ($1::text::xid8, $2)
  ORDER BY transaction_id, position LIMIT 1";

impl Relay {
    pub fn new(
        pool: PgPool,
        database_url: String,
        kafka: KafkaSettings,
        settings: RelaySettings,
    ) -> Self {
        Self {
            pool,
            database_url,
            kafka,
            settings,
        }
    }

    fn name(&self) -> String {
        format!("relay:{}", self.kafka.topics.prefix())
    }

    /// Runs until `shutdown`: waits to become the active relay, then
    /// publishes. Failures are logged and retried; a batch in flight at
    /// shutdown is finished first.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut failures = 0;
        while !shutdown.is_cancelled() {
            match self.lead(&shutdown).await {
                Ok(()) => return,
                Err(e) => {
                    failures += 1;
                    RELAY_ERRORS.inc();
                    tracing::error!(error = %e, failures, "relay failed; retrying");
                    tokio::select! {
                        _ = sleep_backoff(&FAILURE_BACKOFF, failures.min(10)) => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        }
    }

    async fn lead(&self, shutdown: &CancellationToken) -> Result<(), RelayError> {
        // The lock lives on its own connection, outside the pool, so that it
        // goes away with the connection if this process dies.
        let mut lock_conn = PgConnection::connect(&self.database_url).await?;
        let lock_key = format!("casebook:{}", self.name());
        loop {
            let got: bool =
                sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
                    .bind(&lock_key)
                    .fetch_one(&mut lock_conn)
                    .await?;
            if got {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
        tracing::info!(relay = %self.name(), "relay active");
        let result = self.publish_loop(&mut lock_conn, shutdown).await;
        let _ = lock_conn.close().await;
        result
    }

    async fn publish_loop(
        &self,
        lock_conn: &mut PgConnection,
        shutdown: &CancellationToken,
    ) -> Result<(), RelayError> {
        let producer = self.kafka.producer()?;
        let mut checkpoint = self.load_checkpoint().await?;
        let mut failures = 0u32;
        let mut last_health = Instant::now();
        let mut last_lag = Instant::now() - Duration::from_secs(10);
        let mut idle_wait = self.settings.idle_poll;
        while !shutdown.is_cancelled() {
            if last_health.elapsed() > Duration::from_secs(5) {
                // Still holding the lock? A dead lock connection means
                // another relay may take over: step down and re-elect.
                sqlx::query("SELECT 1").execute(&mut *lock_conn).await?;
                last_health = Instant::now();
            }
            let batch = self.fetch(checkpoint).await?;
            if last_lag.elapsed() > Duration::from_secs(1) {
                self.observe_lag(checkpoint).await;
                last_lag = Instant::now();
            }
            if batch.is_empty() {
                let wait = if self.has_pending(checkpoint).await? {
                    idle_wait = self.settings.idle_poll;
                    self.settings.pending_poll
                } else {
                    let wait = idle_wait;
                    idle_wait = (idle_wait * 2).min(self.settings.idle_poll_max);
                    wait
                };
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => break,
                }
                continue;
            }
            idle_wait = self.settings.idle_poll;
            match self.publish(&producer, &batch).await {
                Ok(set_aside) => {
                    let (tx, last) = batch
                        .last()
                        .map(|(tx, e, _)| (*tx, e.position))
                        .expect("non-empty batch");
                    checkpoint = Checkpoint {
                        transaction_id: tx,
                        position: last,
                    };
                    self.save_checkpoint(checkpoint, batch.len() as i64, &set_aside)
                        .await?;
                    tracing::debug!(events = batch.len(), position = last, "batch published");
                    RELAY_PUBLISHED.inc_by(batch.len() as u64);
                    failures = 0;
                }
                Err(e) => {
                    failures += 1;
                    RELAY_ERRORS.inc();
                    tracing::warn!(error = %e, failures, events = batch.len(), "publishing failed; the batch will be published again");
                    if failures >= 2 {
                        // A broker that came back empty has lost its topics.
                        if let Err(e) = self.kafka.ensure_topics().await {
                            tracing::warn!(error = %e, "could not create missing topics");
                        }
                    }
                    if failures >= 3 || producer.client().fatal_error().is_some() {
                        // Start over with a fresh producer (and idempotence
                        // state): the broker may not know the old one.
                        return Err(RelayError::Kafka(e));
                    }
                    tokio::select! {
                        _ = sleep_backoff(&FAILURE_BACKOFF, failures) => {}
                        _ = shutdown.cancelled() => break,
                    }
                }
            }
        }
        // Let anything still queued in librdkafka reach the broker.
        let flusher = producer.clone();
        let _ = tokio::task::spawn_blocking(move || flusher.flush(Duration::from_secs(5))).await;
        Ok(())
    }

    async fn load_checkpoint(&self) -> Result<Checkpoint, RelayError> {
        sqlx::query(
            "INSERT INTO relay_checkpoints (relay, last_transaction_id, last_position)
             VALUES ($1, '0'::xid8, 0) ON CONFLICT (relay) DO NOTHING",
        )
        .bind(self.name())
        .execute(&self.pool)
        .await?;
        let row = sqlx::query("SELECT last_transaction_id::text AS tx, last_position FROM relay_checkpoints WHERE relay = $1")
            .bind(self.name())
            .fetch_one(&self.pool)
            .await?;
        Ok(Checkpoint {
            transaction_id: parse_xid(row.try_get("tx")?)?,
            position: row.try_get("last_position")?,
        })
    }

    /// Moves the checkpoint and records what was set aside, in one
    /// transaction: an event is either published, set aside, or ahead.
    async fn save_checkpoint(
        &self,
        c: Checkpoint,
        published: i64,
        set_aside: &[SetAside],
    ) -> Result<(), RelayError> {
        let mut tx = self.pool.begin().await?;
        for s in set_aside {
            tracing::error!(
                position = s.position,
                event_id = %s.event_id,
                correlation_id = %s.correlation_id,
                topic = %s.topic,
                size_bytes = s.size_bytes,
                error = %s.error,
                "event can never be published; set aside (relay_set_aside)"
            );
            sqlx::query(
                "INSERT INTO relay_set_aside (relay, position, event_id, topic, error, size_bytes)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            )
            .bind(self.name())
            .bind(s.position)
            .bind(s.event_id)
            .bind(&s.topic)
            .bind(&s.error)
            .bind(s.size_bytes as i64)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "UPDATE relay_checkpoints
                SET last_transaction_id = $2::text::xid8, last_position = $3,
                    published_total = published_total + $4, updated_at = now()
              WHERE relay = $1",
        )
        .bind(self.name())
        .bind(c.transaction_id.to_string())
        .bind(c.position)
        .bind(published)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        RELAY_SET_ASIDE.inc_by(set_aside.len() as u64);
        Ok(())
    }

    async fn fetch(&self, c: Checkpoint) -> Result<Vec<Fetched>, RelayError> {
        let rows = sqlx::query(
            "SELECT transaction_id::text AS tx, position, event_id, aggregate_type, aggregate_id, sequence,
                    event_type, event_version, occurred_at, payload, metadata, hash
               FROM events
              WHERE (transaction_id, position) > ($1::text::xid8, $2)
                AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())
              ORDER BY transaction_id, position
              LIMIT $3",
        )
        .bind(c.transaction_id.to_string())
        .bind(c.position)
        .bind(self.settings.batch_size)
        .fetch_all(&self.pool)
        .await?;
        let tracing = casebook_telemetry::enabled();
        rows.iter()
            .map(|row| {
                let stored = stored_event(row)?;
                let trace = if tracing {
                    stored_trace(&stored.metadata)
                } else {
                    None
                };
                Ok((parse_xid(row.try_get("tx")?)?, stored.into(), trace))
            })
            .collect()
    }

    /// Committed events past the checkpoint that the xmin barrier still
    /// holds back (an older transaction is running).
    ///
    /// Written as the first row in relay order, not as `EXISTS`: the
    /// planner drops an `ORDER BY … LIMIT 1` inside `EXISTS`, and once the
    /// prepared statement goes generic it costs the row comparison at a
    /// third of the table and scans all of `events` sequentially, on every
    /// idle poll, exactly when nothing is pending (228 ms at 1,000,000
    /// events). The ordered form stays an index-only scan of
    /// `events_relay_idx` with any parameters.
    async fn has_pending(&self, c: Checkpoint) -> Result<bool, RelayError> {
        let next: Option<i64> = sqlx::query_scalar(PENDING_QUERY)
            .bind(c.transaction_id.to_string())
            .bind(c.position)
            .fetch_optional(&self.pool)
            .await?;
        Ok(next.is_some())
    }

    async fn observe_lag(&self, c: Checkpoint) {
        let result: Result<(i64, Option<DateTime<Utc>>), sqlx::Error> = sqlx::query_as(
            "SELECT count(*), min(occurred_at) FROM (
                 SELECT occurred_at FROM events
                  WHERE (transaction_id, position) > ($1::text::xid8, $2)
                  ORDER BY transaction_id, position LIMIT 100000) pending",
        )
        .bind(c.transaction_id.to_string())
        .bind(c.position)
        .fetch_one(&self.pool)
        .await;
        match result {
            Ok((count, oldest)) => {
                RELAY_LAG_EVENTS.set(count);
                let age =
                    oldest.map(|t| (Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0);
                RELAY_LAG_SECONDS.set(age.unwrap_or(0.0));
            }
            Err(e) => tracing::warn!(error = %e, "could not measure relay lag"),
        }
    }

    /// Publishes every route of every event, in order, and waits until all
    /// of them are acknowledged by the broker. Returns what could never be
    /// published (too large, or refused as invalid): the caller records it
    /// and moves on. Any other error fails the batch, which is tried again.
    async fn publish(
        &self,
        producer: &FutureProducer,
        batch: &[Fetched],
    ) -> Result<Vec<SetAside>, KafkaError> {
        let mut set_aside = Vec::new();
        let mut deliveries = Vec::with_capacity(batch.len() * 2);
        // One span per event, a child of the append that stored it, ended
        // once the batch is acknowledged; its context goes with each copy of
        // the event as the `traceparent` (and `tracestate`) header.
        let mut spans = Vec::new();
        for (_, envelope, stored_trace) in batch {
            let span = publish_span(envelope, stored_trace.as_ref());
            let trace = casebook_telemetry::headers_of(&span);
            if !span.is_disabled() {
                spans.push((span, envelope.position));
            }
            let body = serde_json::to_vec(envelope).expect("an envelope serialises");
            for (topic, key) in routes(&self.kafka.topics, envelope) {
                let aside = |error: String| SetAside {
                    position: envelope.position,
                    event_id: envelope.event_id,
                    correlation_id: envelope.correlation_id.clone(),
                    topic: topic.clone(),
                    error,
                    size_bytes: body.len(),
                };
                if body.len() + key.len() > self.settings.max_message_bytes {
                    set_aside.push(aside(format!(
                        "message of {} bytes exceeds the {} byte limit",
                        body.len() + key.len(),
                        self.settings.max_message_bytes
                    )));
                    continue;
                }
                let mut headers = OwnedHeaders::new()
                    .insert(Header {
                        key: "correlation_id",
                        value: Some(envelope.correlation_id.as_bytes()),
                    })
                    .insert(Header {
                        key: "event_type",
                        value: Some(envelope.event_type.as_bytes()),
                    });
                for (key, value) in trace.iter().flat_map(|t| t.pairs()) {
                    headers = headers.insert(Header {
                        key,
                        value: Some(value.as_bytes()),
                    });
                }
                let mut record = FutureRecord::to(&topic)
                    .key(key.as_bytes())
                    .payload(&body)
                    .headers(headers);
                loop {
                    match producer.send_result(record) {
                        Ok(delivery) => {
                            deliveries.push((delivery, envelope, topic.clone(), body.len()));
                            break;
                        }
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                            record = back;
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        Err((e, _)) if is_permanent(&e) => {
                            set_aside.push(aside(e.to_string()));
                            break;
                        }
                        Err((e, _)) => return Err(e),
                    }
                }
            }
        }
        for (delivery, envelope, topic, size_bytes) in deliveries {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) if is_permanent(&e) => set_aside.push(SetAside {
                    position: envelope.position,
                    event_id: envelope.event_id,
                    correlation_id: envelope.correlation_id.clone(),
                    topic,
                    error: e.to_string(),
                    size_bytes,
                }),
                Ok(Err((e, _))) => return Err(e),
                Err(_) => return Err(KafkaError::Canceled),
            }
        }
        for (span, position) in &spans {
            if set_aside.iter().any(|s| s.position == *position) {
                span.record("otel.status_code", "ERROR");
            }
        }
        Ok(set_aside)
    }
}

/// An event read for publishing: its transaction id, its envelope, and the
/// trace context of the append that stored it (read only with tracing on).
type Fetched = (u64, EventEnvelope, Option<TraceHeaders>);

/// The W3C context the store kept in an event's metadata.
fn stored_trace(metadata: &serde_json::Value) -> Option<TraceHeaders> {
    let text = |key: &str| {
        metadata
            .get(key)
            .and_then(serde_json::Value::as_str)
            .map(str::to_string)
    };
    Some(TraceHeaders {
        traceparent: Some(text(casebook_telemetry::TRACEPARENT)?),
        tracestate: text(casebook_telemetry::TRACESTATE),
    })
}

/// The span of one event's publication, continuing the stored trace.
fn publish_span(envelope: &EventEnvelope, stored: Option<&TraceHeaders>) -> tracing::Span {
    let span = tracing::info_span!(
        target: casebook_telemetry::TARGET,
        "relay.publish",
        otel.kind = "producer",
        otel.status_code = tracing::field::Empty,
        messaging.system = "kafka",
        messaging.operation.type = "send",
        event_type = %envelope.event_type,
        correlation_id = %envelope.correlation_id,
    );
    if let Some(stored) = stored {
        casebook_telemetry::continue_from(&span, |key| stored.value(key));
    }
    span
}

fn parse_xid(text: String) -> Result<u64, RelayError> {
    text.parse()
        .map_err(|_| RelayError::Store(StoreError::Corrupt(format!("bad transaction id {text:?}"))))
}

/// Reads one `events` row.
pub fn stored_event(row: &PgRow) -> Result<StoredEvent, sqlx::Error> {
    Ok(StoredEvent {
        event_id: row.try_get::<Uuid, _>("event_id")?,
        position: row.try_get("position")?,
        aggregate_type: row.try_get("aggregate_type")?,
        aggregate_id: row.try_get("aggregate_id")?,
        sequence: row.try_get("sequence")?,
        event_type: row.try_get("event_type")?,
        event_version: row.try_get("event_version")?,
        occurred_at: row.try_get("occurred_at")?,
        payload: row.try_get("payload")?,
        metadata: row.try_get("metadata")?,
        hash: row.try_get("hash")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use casebook_domain::Actor;

    fn envelope(
        aggregate_type: &str,
        event_type: &str,
        payload: serde_json::Value,
    ) -> EventEnvelope {
        EventEnvelope {
            event_id: Uuid::nil(),
            position: 1,
            aggregate_type: aggregate_type.into(),
            aggregate_id: "t-1".into(),
            sequence: 1,
            event_type: event_type.into(),
            event_version: "1".into(),
            occurred_at: Utc::now(),
            correlation_id: "c".into(),
            causation_id: "c".into(),
            actor: Actor::system("test"),
            channel: None,
            payload,
            hash: String::new(),
        }
    }

    #[test]
    fn customer_messages_go_to_incoming_and_their_channel() {
        let topics = Topics::new("fte");
        let e = envelope(
            "ticket",
            "CustomerMessageReceived",
            serde_json::json!({"type": "CustomerMessageReceived", "channel": "whatsapp"}),
        );
        let topics_of: Vec<String> = routes(&topics, &e).into_iter().map(|(t, _)| t).collect();
        assert_eq!(
            topics_of,
            vec![
                "fte.events",
                "fte.tickets.incoming",
                "fte.channels.whatsapp.inbound"
            ]
        );
    }

    #[test]
    fn replies_and_escalations_have_their_topics() {
        let topics = Topics::new("x");
        let sent = envelope(
            "ticket",
            "ResponseSent",
            serde_json::json!({"channel": "email"}),
        );
        assert_eq!(routes(&topics, &sent)[1].0, "x.channels.email.outbound");
        let esc = envelope(
            "ticket",
            "TicketEscalated",
            serde_json::json!({"reason": "legal"}),
        );
        assert_eq!(routes(&topics, &esc)[1].0, "x.escalations");
        let customer = envelope("customer", "CustomerRegistered", serde_json::json!({}));
        assert_eq!(routes(&topics, &customer).len(), 1);
    }
}
