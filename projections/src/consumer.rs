//! Runs a projector as a Kafka consumer group member on `<prefix>.events`.
//!
//! A batch's rows, its per-stream sequences and the Kafka offsets it
//! consumed are committed in one Postgres transaction; the offsets are then
//! committed to the group as well. A member that starts (or takes over a
//! partition) resumes from the group's committed offsets, which are never
//! ahead of what Postgres has applied: at worst one batch comes again and
//! its events are recognised by their stream sequence and skipped. Because
//! the start position comes from the broker, a broker that lost its data
//! (and with it the group's offsets) is read again from its beginning
//! instead of from positions that no longer mean anything.
//!
//! The consumer runs on a thread of its own and drives the async database
//! work through the runtime handle.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use casebook_domain::retry::Backoff;
use casebook_domain::topics::Topics;
use casebook_domain::EventEnvelope;
use casebook_telemetry::TraceHeaders;
use rand::Rng;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::metrics::{BATCH_SECONDS, LAG_EVENTS, SKIPPED};
use crate::projector::{apply_batch, ConsumedOffset, Projector};

const APPLY_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(100), Duration::from_secs(5), u32::MAX);

#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub brokers: String,
    pub topics: Topics,
    /// Most events applied in one transaction.
    pub batch_max: usize,
    pub poll_timeout: Duration,
}

impl ConsumerSettings {
    pub fn new(brokers: impl Into<String>, topics: Topics) -> Self {
        Self {
            brokers: brokers.into(),
            topics,
            batch_max: 500,
            poll_timeout: Duration::from_millis(100),
        }
    }
}

pub struct ProjectorRunner {
    pool: PgPool,
    settings: ConsumerSettings,
    projector: Arc<dyn Projector>,
}

impl ProjectorRunner {
    pub fn new(pool: PgPool, settings: ConsumerSettings, projector: Arc<dyn Projector>) -> Self {
        Self {
            pool,
            settings,
            projector,
        }
    }

    /// Starts the consumer on a thread of its own; the handle finishes after
    /// `shutdown`, once the batch in hand is committed.
    pub fn spawn(self, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        let runtime = Handle::current();
        tokio::task::spawn_blocking(move || {
            let name = self.projector.name();
            if let Err(e) = self.run(runtime, shutdown) {
                tracing::error!(projector = name, error = %e, "projector stopped");
            }
        })
    }

    fn consumer(&self) -> KafkaResult<BaseConsumer> {
        ClientConfig::new()
            .set("bootstrap.servers", &self.settings.brokers)
            .set(
                "group.id",
                self.settings.topics.group(self.projector.name()),
            )
            .set("client.id", format!("casebook-{}", self.projector.name()))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            .set("fetch.wait.max.ms", "20")
            .set("socket.timeout.ms", "10000")
            .set("reconnect.backoff.max.ms", "2000")
            .set("log_level", "3")
            .set("topic.metadata.refresh.interval.ms", "10000")
            .create()
    }

    fn run(self, runtime: Handle, shutdown: CancellationToken) -> KafkaResult<()> {
        let name = self.projector.name();
        let topic = self.settings.topics.events();
        let consumer = self.consumer()?;
        consumer.subscribe(&[&topic])?;
        tracing::info!(projector = name, topic = %topic, "projector consuming");
        let mut last_lag = Instant::now() - Duration::from_secs(10);
        let mut pending_commit = TopicPartitionList::new();
        while !shutdown.is_cancelled() {
            let mut batch: Vec<EventEnvelope> = Vec::new();
            // With tracing on: each event's W3C context from its headers.
            let tracing_on = casebook_telemetry::enabled();
            let mut parents: Vec<Option<TraceHeaders>> = Vec::new();
            let mut offsets: BTreeMap<(String, i32), i64> = BTreeMap::new();
            let mut timeout = self.settings.poll_timeout;
            while batch.len() < self.settings.batch_max {
                match consumer.poll(timeout) {
                    None => break,
                    Some(Err(e)) => {
                        tracing::warn!(projector = name, error = %e, "consumer error");
                        break;
                    }
                    Some(Ok(message)) => {
                        offsets.insert(
                            (message.topic().to_string(), message.partition()),
                            message.offset() + 1,
                        );
                        match message
                            .payload()
                            .map(serde_json::from_slice::<EventEnvelope>)
                        {
                            Some(Ok(envelope)) => {
                                if tracing_on {
                                    parents.push(trace_headers(&message));
                                }
                                batch.push(envelope)
                            }
                            other => {
                                SKIPPED.with_label_values(&[name, "unreadable"]).inc();
                                tracing::error!(projector = name, partition = message.partition(),
                                    offset = message.offset(), error = ?other.map(|r| r.err()),
                                    "message is not an event envelope; skipped");
                            }
                        }
                    }
                }
                timeout = Duration::ZERO;
            }
            if last_lag.elapsed() > Duration::from_secs(2) {
                runtime.block_on(observe_lag(&self.pool, name));
                last_lag = Instant::now();
            }
            if offsets.is_empty() {
                continue;
            }
            let consumed: Vec<ConsumedOffset> = offsets
                .iter()
                .map(|((topic, partition), next)| ConsumedOffset {
                    topic: topic.clone(),
                    partition: *partition,
                    next_offset: *next,
                })
                .collect();
            let spans = handling_spans(name, &batch, &parents);
            let mut attempt = 0;
            let applied = loop {
                attempt += 1;
                let started = Instant::now();
                match runtime.block_on(apply_batch(
                    &self.pool,
                    self.projector.as_ref(),
                    &batch,
                    &consumed,
                )) {
                    Ok(n) => {
                        BATCH_SECONDS
                            .with_label_values(&[name])
                            .observe(started.elapsed().as_secs_f64());
                        break Some(n);
                    }
                    Err(e) => {
                        tracing::warn!(projector = name, attempt, error = %e, "batch failed; retrying");
                        std::thread::sleep(
                            APPLY_BACKOFF.delay(attempt.min(10), rand::rng().random::<f64>()),
                        );
                        if shutdown.is_cancelled() {
                            // Not committed: the batch is consumed again next time.
                            break None;
                        }
                    }
                }
            };
            if applied.is_none() {
                for span in &spans {
                    span.record("otel.status_code", "ERROR");
                }
            }
            drop(spans);
            if applied.is_some() {
                for c in &consumed {
                    let _ = pending_commit.add_partition_offset(
                        &c.topic,
                        c.partition,
                        Offset::Offset(c.next_offset),
                    );
                }
                match consumer.commit(&pending_commit, CommitMode::Async) {
                    Ok(()) => pending_commit = TopicPartitionList::new(),
                    // Kept and sent with the next batch's offsets.
                    Err(e) => {
                        tracing::warn!(projector = name, error = %e, "offsets not committed to Kafka yet")
                    }
                }
            }
        }
        if pending_commit.count() > 0 {
            let _ = consumer.commit(&pending_commit, CommitMode::Sync);
        }
        consumer.unsubscribe();
        tracing::info!(projector = name, "projector stopped");
        Ok(())
    }
}

/// The W3C trace context a message carries in its headers, if any.
fn trace_headers(message: &BorrowedMessage<'_>) -> Option<TraceHeaders> {
    let headers = message.headers()?;
    let mut found = TraceHeaders::default();
    for header in headers.iter() {
        // Hostile input: anything longer than W3C allows is not even copied.
        let value = header
            .value
            .filter(|v| v.len() <= 512)
            .and_then(|v| std::str::from_utf8(v).ok());
        match header.key {
            casebook_telemetry::TRACEPARENT => found.traceparent = value.map(str::to_string),
            casebook_telemetry::TRACESTATE => found.tracestate = value.map(str::to_string),
            _ => {}
        }
    }
    found.traceparent.is_some().then_some(found)
}

/// One span per event of the batch, each a child of the relay's publish of
/// that event; they end once the batch is committed. None with tracing off.
fn handling_spans(
    projector: &'static str,
    batch: &[EventEnvelope],
    parents: &[Option<TraceHeaders>],
) -> Vec<tracing::Span> {
    batch
        .iter()
        .zip(parents)
        .map(|(event, parent)| {
            let span = tracing::info_span!(
                target: casebook_telemetry::TARGET,
                "projector.handle",
                otel.kind = "consumer",
                otel.status_code = tracing::field::Empty,
                messaging.system = "kafka",
                messaging.operation.type = "process",
                projector,
                event_type = %event.event_type,
                correlation_id = %event.correlation_id,
            );
            if let Some(parent) = parent {
                casebook_telemetry::continue_from(&span, |key| parent.value(key));
            }
            span
        })
        .collect()
}

async fn observe_lag(pool: &PgPool, projector: &'static str) {
    let lag: Result<i64, sqlx::Error> = sqlx::query_scalar(
        "SELECT (SELECT coalesce(max(position), 0) FROM events)
              - coalesce((SELECT last_position FROM projector_progress WHERE projector = $1), 0)",
    )
    .bind(projector)
    .fetch_one(pool)
    .await;
    match lag {
        Ok(lag) => LAG_EVENTS.with_label_values(&[projector]).set(lag.max(0)),
        Err(e) => tracing::debug!(projector, error = %e, "could not measure lag"),
    }
}
