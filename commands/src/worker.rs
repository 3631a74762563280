//! A Kafka consumer group member that handles messages concurrently while
//! keeping each key's messages in order, and commits offsets only up to the
//! first message not yet settled: a crash repeats work, it never skips it
//! (handlers are idempotent).
//!
//! - **No key blocks another.** Each key has its own queue; a key's next
//!   message starts when its previous one is settled. At most `lanes`
//!   handlers run at once (a semaphore, held only while a handler runs, not
//!   while a failed message waits for its next attempt). Messages taken from
//!   Kafka and not yet settled are bounded by `max_in_flight`: at the bound
//!   the consumer pauses fetching its partitions and resumes at half of it,
//!   while it keeps polling (heartbeats, rebalances).
//! - **Retries are bounded.** A handler's `Retry` is tried again with
//!   exponential backoff and jitter, until `max_attempts` or `max_retry`
//!   elapsed; then the message goes to the dead-letter topic with the error
//!   and its origin in headers. `Poison` goes there at once.
//! - **A message is settled only once it is handled or dead-lettered.** A
//!   dead-letter write that fails is retried with backoff; the message stays
//!   pending meanwhile, so no offset at or past it is committed.
//! - **Offsets belong to an assignment.** The tracker is reset by the
//!   rebalance callbacks: a revoked partition's finished work is committed
//!   before it goes, and messages still in hand for it are never committed
//!   later (nor started, if they were only queued).
//! - Every message is handled in a span carrying the envelope's
//!   `correlation_id` (header) and `causation_id` (payload).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use casebook_domain::masking::mask_pii;
use casebook_domain::retry::Backoff;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::kafka::KafkaSettings;
use crate::metrics::{DLQ_MESSAGES, WORKER_ERRORS};
use crate::retry::jitter;

/// One consumed message.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: String,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Worth trying again later (a database or API outage): retried with
    /// backoff, within the worker's bounds, then dead-lettered.
    #[error("{0}")]
    Retry(String),
    /// Never going to work: the message goes to the dead-letter topic.
    #[error("{0}")]
    Poison(String),
}

#[async_trait]
pub trait Handler: Send + Sync + 'static {
    async fn handle(&self, message: &Incoming) -> Result<(), HandlerError>;
}

/// How long a message that keeps failing is tried before it is
/// dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (`CASEBOOK_WORKER_MAX_ATTEMPTS`).
    pub max_attempts: u32,
    /// Time from the first attempt after which no new attempt starts
    /// (`CASEBOOK_WORKER_MAX_RETRY_SECS`).
    pub max_retry: Duration,
    /// The wait between attempts (exponential, with jitter).
    pub base: Duration,
    pub cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            max_retry: Duration::from_secs(300),
            base: Duration::from_millis(200),
            cap: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    fn backoff(&self) -> Backoff {
        Backoff::new(self.base, self.cap, self.max_attempts)
    }
}

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub group: String,
    pub topics: Vec<String>,
    /// Handlers running at once (different keys).
    pub lanes: usize,
    /// Messages taken from Kafka and not yet settled, across all keys; at
    /// this bound fetching pauses.
    pub max_in_flight: usize,
    pub retry: RetryPolicy,
    /// Where messages that cannot be handled go.
    pub dead_letter_topic: String,
}

impl WorkerSettings {
    /// Defaults: 8 lanes, 512 messages in flight, the default retry policy,
    /// the deployment's dead-letter topic.
    pub fn new(kafka: &KafkaSettings, group: String, topics: Vec<String>) -> Self {
        Self {
            group,
            topics,
            lanes: 8,
            max_in_flight: 512,
            retry: RetryPolicy::default(),
            dead_letter_topic: kafka.topics.dlq(),
        }
    }
}

/// Per partition: the offsets in hand and the next offset to commit, valid
/// for one assignment (`epoch`).
#[derive(Debug)]
struct PartitionState {
    epoch: u64,
    pending: BTreeSet<i64>,
    /// The highest offset taken: with nothing pending, everything up to it
    /// is settled (offsets are taken in order).
    high: Option<i64>,
    next: Option<i64>,
    dirty: bool,
}

/// Offsets taken and not yet settled, per partition this member owns.
#[derive(Default, Debug)]
struct Tracker {
    partitions: HashMap<(String, i32), PartitionState>,
    epochs: u64,
}

impl Tracker {
    fn fresh(&mut self) -> PartitionState {
        self.epochs += 1;
        PartitionState {
            epoch: self.epochs,
            pending: BTreeSet::new(),
            high: None,
            next: None,
            dirty: false,
        }
    }

    /// Records a message taken; returns the assignment it belongs to.
    fn start(&mut self, topic: &str, partition: i32, offset: i64) -> u64 {
        let key = (topic.to_string(), partition);
        if !self.partitions.contains_key(&key) {
            let state = self.fresh();
            self.partitions.insert(key.clone(), state);
        }
        let state = self.partitions.get_mut(&key).expect("inserted");
        state.pending.insert(offset);
        state.high = state.high.max(Some(offset));
        state.epoch
    }

    /// Whether a message taken in `epoch` still belongs to this member.
    fn is_current(&self, topic: &str, partition: i32, epoch: u64) -> bool {
        self.partitions
            .get(&(topic.to_string(), partition))
            .is_some_and(|s| s.epoch == epoch)
    }

    /// A message settled. Ignored when its partition was revoked (or
    /// reassigned) since it was taken.
    fn finish(&mut self, topic: &str, partition: i32, offset: i64, epoch: u64) {
        let Some(state) = self.partitions.get_mut(&(topic.to_string(), partition)) else {
            return;
        };
        if state.epoch != epoch || !state.pending.remove(&offset) {
            return;
        }
        // Out of order across keys: 6 may settle before 5, and then 5's
        // settling makes everything up to 6 committable.
        let committable = match state.pending.first() {
            Some(first) => *first,
            None => state.high.unwrap_or(offset).max(offset) + 1,
        };
        if state.next.is_none_or(|n| committable > n) {
            state.next = Some(committable);
            state.dirty = true;
        }
    }

    /// Offsets to commit since the last call.
    fn committable(&mut self) -> Option<TopicPartitionList> {
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), state) in &mut self.partitions {
            if let (true, Some(next)) = (state.dirty, state.next) {
                let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(next));
                state.dirty = false;
            }
        }
        (tpl.count() > 0).then_some(tpl)
    }

    /// A commit failed: offer these offsets again (if still owned).
    fn retry_commit(&mut self, tpl: &TopicPartitionList) {
        for e in tpl.elements() {
            if let Some(state) = self
                .partitions
                .get_mut(&(e.topic().to_string(), e.partition()))
            {
                state.dirty = true;
            }
        }
    }

    /// An asynchronous commit failed (a rebalance in progress, a broker
    /// away): offer the offsets again, unless the partition changed hands
    /// or moved on since.
    fn commit_failed(&mut self, tpl: &TopicPartitionList) {
        for e in tpl.elements() {
            if let Some(state) = self
                .partitions
                .get_mut(&(e.topic().to_string(), e.partition()))
            {
                if let (Offset::Offset(o), Some(next)) = (e.offset(), state.next) {
                    if o == next {
                        state.dirty = true;
                    }
                }
            }
        }
    }

    /// Partitions leave this member: returns their finished offsets (to
    /// commit while still owned) and forgets them.
    fn revoke(&mut self, revoked: &TopicPartitionList) -> TopicPartitionList {
        let mut last = TopicPartitionList::new();
        for e in revoked.elements() {
            if let Some(state) = self
                .partitions
                .remove(&(e.topic().to_string(), e.partition()))
            {
                if let (true, Some(next)) = (state.dirty, state.next) {
                    let _ =
                        last.add_partition_offset(e.topic(), e.partition(), Offset::Offset(next));
                }
            }
        }
        last
    }

    /// Partitions join this member: each starts a new assignment.
    fn assign(&mut self, assigned: &TopicPartitionList) {
        for e in assigned.elements() {
            let state = self.fresh();
            self.partitions
                .insert((e.topic().to_string(), e.partition()), state);
        }
    }

    fn forget_all(&mut self) {
        self.partitions.clear();
    }
}

/// The consumer's context: keeps the tracker in step with the assignment.
struct WorkerContext {
    group: String,
    tracker: Arc<Mutex<Tracker>>,
}

impl ClientContext for WorkerContext {}

impl ConsumerContext for WorkerContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(revoked) = rebalance {
            let last = lock(&self.tracker).revoke(revoked);
            if last.count() > 0 {
                // Still ours until this callback returns.
                if let Err(e) = consumer.commit(&last, CommitMode::Sync) {
                    tracing::warn!(group = %self.group, error = %e, "offsets of revoked partitions not committed; their new owner repeats that work");
                }
            }
            tracing::info!(group = %self.group, partitions = revoked.count(), "partitions revoked");
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        if let Err(e) = result {
            WORKER_ERRORS
                .with_label_values(&[self.group.as_str(), "commit"])
                .inc();
            tracing::warn!(group = %self.group, error = %e, "offsets not committed; retrying");
            lock(&self.tracker).commit_failed(offsets);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(assigned) => {
                lock(&self.tracker).assign(assigned);
                tracing::info!(group = %self.group, partitions = assigned.count(), "partitions assigned");
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => {
                // The assignment is unknown: commit nothing for it.
                tracing::warn!(group = %self.group, error = %e, "rebalance failed");
                if consumer.assignment_lost() {
                    lock(&self.tracker).forget_all();
                }
            }
        }
    }
}

fn lock(tracker: &Mutex<Tracker>) -> std::sync::MutexGuard<'_, Tracker> {
    tracker.lock().unwrap_or_else(|p| p.into_inner())
}

type WorkerConsumer = StreamConsumer<WorkerContext>;

/// A message taken from Kafka, with the assignment it was taken in.
struct Taken {
    message: Incoming,
    epoch: u64,
}

/// What a message's task reports when it ends.
struct Done {
    key: String,
    topic: String,
    partition: i32,
    offset: i64,
    epoch: u64,
    settled: bool,
}

/// What every message's task shares.
struct Shared<H> {
    handler: Arc<H>,
    producer: FutureProducer,
    dlq: String,
    group: String,
    retry: RetryPolicy,
    lanes: Semaphore,
    /// Cancelled when a failing message should stop being retried.
    stop: CancellationToken,
}

/// Starts the worker; it runs until `shutdown`, finishing messages in hand.
pub fn spawn<H: Handler>(
    kafka: &KafkaSettings,
    settings: WorkerSettings,
    handler: Arc<H>,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, KafkaError> {
    let tracker = Arc::new(Mutex::new(Tracker::default()));
    let consumer: WorkerConsumer = kafka
        .client_config()
        .set("group.id", &settings.group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("fetch.wait.max.ms", "50")
        .set("topic.metadata.refresh.interval.ms", "10000")
        .create_with_context(WorkerContext {
            group: settings.group.clone(),
            tracker: tracker.clone(),
        })?;
    let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    let shared = Arc::new(Shared {
        handler,
        producer: kafka.producer()?,
        dlq: settings.dead_letter_topic.clone(),
        group: settings.group.clone(),
        retry: settings.retry,
        lanes: Semaphore::new(settings.lanes.max(1)),
        stop: CancellationToken::new(),
    });
    let max_in_flight = settings.max_in_flight.max(1);
    Ok(tokio::spawn(run(
        consumer,
        tracker,
        shared,
        max_in_flight,
        shutdown,
    )))
}

async fn run<H: Handler>(
    consumer: WorkerConsumer,
    tracker: Arc<Mutex<Tracker>>,
    shared: Arc<Shared<H>>,
    max_in_flight: usize,
    shutdown: CancellationToken,
) {
    let group = shared.group.clone();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    // Keys with a message being handled, and what waits behind it.
    let mut queues: HashMap<String, VecDeque<Taken>> = HashMap::new();
    let mut in_flight = 0usize;
    let mut running = 0usize;
    let mut paused = false;
    let mut commit_tick = tokio::time::interval(Duration::from_millis(250));
    commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(group = %group, "worker consuming");

    let start_task = |taken: Taken, running: &mut usize| {
        *running += 1;
        let shared = shared.clone();
        let done_tx = done_tx.clone();
        tokio::spawn(async move {
            let m = &taken.message;
            let settled = process(&shared, m).await;
            let _ = done_tx.send(Done {
                key: m.key.clone(),
                topic: m.topic.clone(),
                partition: m.partition,
                offset: m.offset,
                epoch: taken.epoch,
                settled,
            });
        });
    };

    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = commit_tick.tick() => commit(&consumer, &tracker),
            Some(done) = done_rx.recv() => {
                running -= 1;
                in_flight -= 1;
                if done.settled {
                    lock(&tracker).finish(&done.topic, done.partition, done.offset, done.epoch);
                }
                // The key's next message, skipping those of partitions this
                // member no longer owns.
                let next = loop {
                    match queues.get_mut(&done.key).and_then(VecDeque::pop_front) {
                        Some(t) if !lock(&tracker).is_current(&t.message.topic, t.message.partition, t.epoch) => in_flight -= 1,
                        other => break other,
                    }
                };
                match next {
                    Some(taken) => start_task(taken, &mut running),
                    None => { queues.remove(&done.key); }
                }
                if paused && in_flight <= max_in_flight / 2 {
                    paused = !set_paused(&consumer, false, &group);
                }
            }
            received = consumer.recv() => match received {
                Err(e) => {
                    WORKER_ERRORS.with_label_values(&[group.as_str(), "consume"]).inc();
                    tracing::warn!(group = %group, error = %e, "consumer error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Ok(m) => {
                    let message = Incoming {
                        topic: m.topic().to_string(),
                        partition: m.partition(),
                        offset: m.offset(),
                        key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                        payload: m.payload().unwrap_or_default().to_vec(),
                        headers: m.headers().map(|h| h.iter()
                            .map(|h| (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
                            .collect()).unwrap_or_default(),
                    };
                    drop(m);
                    let epoch = lock(&tracker).start(&message.topic, message.partition, message.offset);
                    in_flight += 1;
                    let taken = Taken { message, epoch };
                    match queues.get_mut(&taken.message.key) {
                        Some(waiting) => waiting.push_back(taken),
                        None => {
                            queues.insert(taken.message.key.clone(), VecDeque::new());
                            start_task(taken, &mut running);
                        }
                    }
                    // At the bound (or past it, after a rebalance handed us
                    // partitions that were not paused): stop fetching.
                    if in_flight >= max_in_flight {
                        paused = set_paused(&consumer, true, &group) || paused;
                    }
                }
            }
        }
    }

    // Stop taking work; let the messages being handled finish (failing ones
    // keep retrying for a while), then stop retrying. Queued messages are
    // not started: they stay pending and are handled after a restart.
    drop(done_tx);
    let grace = tokio::time::sleep(Duration::from_secs(15));
    tokio::pin!(grace);
    while running > 0 {
        tokio::select! {
            done = done_rx.recv() => match done {
                Some(done) => {
                    running -= 1;
                    if done.settled {
                        lock(&tracker).finish(&done.topic, done.partition, done.offset, done.epoch);
                    }
                }
                None => break,
            },
            _ = &mut grace, if !shared.stop.is_cancelled() => shared.stop.cancel(),
        }
    }
    commit(&consumer, &tracker);
    tracing::info!(group = %group, "worker stopped");
}

/// Pauses or resumes fetching every assigned partition; `true` when done.
fn set_paused(consumer: &WorkerConsumer, pause: bool, group: &str) -> bool {
    let assignment = match consumer.assignment() {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(group, error = %e, "assignment unknown");
            return false;
        }
    };
    let result = if pause {
        consumer.pause(&assignment)
    } else {
        consumer.resume(&assignment)
    };
    match result {
        Ok(()) => {
            tracing::info!(
                group,
                paused = pause,
                "fetching {}",
                if pause {
                    "paused: too many messages in hand"
                } else {
                    "resumed"
                }
            );
            true
        }
        Err(e) => {
            tracing::warn!(group, error = %e, "could not pause or resume fetching");
            false
        }
    }
}

fn commit(consumer: &WorkerConsumer, tracker: &Mutex<Tracker>) {
    let tpl = lock(tracker).committable();
    if let Some(tpl) = tpl {
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(error = %e, "offsets not committed yet");
            lock(tracker).retry_commit(&tpl);
        }
    }
}

/// The ids a message's span carries: `correlation_id` from its headers,
/// `causation_id` from the envelope. Hostile input: bounded, one line.
fn trace_ids(message: &Incoming) -> (String, String) {
    #[derive(serde::Deserialize)]
    struct Ids {
        #[serde(default)]
        correlation_id: Option<String>,
        #[serde(default)]
        causation_id: Option<String>,
    }
    let clean = |s: &str| -> String {
        s.chars()
            .filter(|c| !c.is_control())
            .take(128)
            .collect::<String>()
    };
    let ids = serde_json::from_slice::<Ids>(&message.payload).ok();
    let correlation = message
        .headers
        .iter()
        .find(|(k, _)| k == "correlation_id")
        .map(|(_, v)| v.clone())
        .or_else(|| ids.as_ref().and_then(|i| i.correlation_id.clone()))
        .unwrap_or_default();
    let causation = ids.and_then(|i| i.causation_id).unwrap_or_default();
    (clean(&correlation), clean(&causation))
}

/// Handles one message until it succeeds or is dead-lettered (settled:
/// `true`), or, once `stop` is cancelled, gives up after a failed attempt
/// (`false`: it stays pending and is handled again after a restart).
async fn process<H: Handler>(shared: &Shared<H>, message: &Incoming) -> bool {
    let (correlation_id, causation_id) = trace_ids(message);
    // The trace's span of this handling: a child of the relay's publish,
    // whose context came in the `traceparent` header. The log span below
    // stays the innermost one, so log lines keep their ids.
    let handling = tracing::info_span!(
        target: casebook_telemetry::TARGET,
        "worker.handle",
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        messaging.system = "kafka",
        messaging.operation.type = "process",
        messaging.consumer.group.name = %shared.group,
        messaging.destination.name = %message.topic,
        messaging.destination.partition.id = message.partition,
        messaging.kafka.offset = message.offset,
        correlation_id = %correlation_id,
    );
    casebook_telemetry::continue_from(&handling, |key| {
        message
            .headers
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    });
    let span = handling.in_scope(|| {
        tracing::info_span!(
            "message",
            group = %shared.group,
            topic = %message.topic,
            partition = message.partition,
            offset = message.offset,
            correlation_id = %correlation_id,
            causation_id = %causation_id,
        )
    });
    let settled = handle_bounded(shared, message)
        .instrument(span)
        .instrument(handling.clone())
        .await;
    if !settled {
        handling.record("otel.status_code", "ERROR");
    }
    settled
}

async fn handle_bounded<H: Handler>(shared: &Shared<H>, message: &Incoming) -> bool {
    let group = shared.group.as_str();
    let policy = shared.retry;
    let backoff = policy.backoff();
    let first = Instant::now();
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let result = {
            let _lane = shared.lanes.acquire().await.expect("never closed");
            shared.handler.handle(message).await
        };
        let reason = match result {
            Ok(()) => return true,
            Err(HandlerError::Poison(reason)) => {
                WORKER_ERRORS.with_label_values(&[group, "poison"]).inc();
                reason
            }
            Err(HandlerError::Retry(reason)) => {
                WORKER_ERRORS.with_label_values(&[group, "retry"]).inc();
                let elapsed = first.elapsed();
                if attempt >= policy.max_attempts || elapsed >= policy.max_retry {
                    WORKER_ERRORS.with_label_values(&[group, "exhausted"]).inc();
                    format!(
                        "gave up after {attempt} attempts in {}s: {reason}",
                        elapsed.as_secs()
                    )
                } else {
                    tracing::warn!(attempt, error = %mask_pii(&reason), "handling failed; retrying");
                    if shared.stop.is_cancelled() {
                        return false;
                    }
                    let wait = backoff
                        .delay(attempt, jitter())
                        .min(policy.max_retry.saturating_sub(elapsed));
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shared.stop.cancelled() => return false,
                    }
                    continue;
                }
            }
        };
        return dead_letter_until_written(shared, message, &reason).await;
    }
}

/// Writes the message to the dead-letter topic, retrying a failed write
/// with backoff: the message is settled only once the write succeeded
/// (`true`), or stays pending when the worker stops first (`false`).
async fn dead_letter_until_written<H: Handler>(
    shared: &Shared<H>,
    message: &Incoming,
    reason: &str,
) -> bool {
    let group = shared.group.as_str();
    let backoff = Backoff::new(
        Duration::from_millis(500),
        Duration::from_secs(30),
        u32::MAX,
    );
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match dead_letter(&shared.producer, &shared.dlq, message, reason).await {
            Ok(()) => {
                DLQ_MESSAGES.with_label_values(&[group]).inc();
                return true;
            }
            Err(e) => {
                WORKER_ERRORS.with_label_values(&[group, "dlq_write"]).inc();
                tracing::error!(attempt, error = %e, "the dead-letter write failed; the message stays pending and the write is retried");
                tokio::select! {
                    _ = tokio::time::sleep(backoff.delay(attempt.min(16), jitter())) => {}
                    _ = shared.stop.cancelled() => return false,
                }
            }
        }
    }
}

/// Sends a message to the dead-letter topic with its error (emails and
/// phone numbers masked, at most 1,000 characters) and origin in headers.
pub async fn dead_letter(
    producer: &FutureProducer,
    dlq: &str,
    message: &Incoming,
    reason: &str,
) -> Result<(), KafkaError> {
    let reason: String = mask_pii(reason).chars().take(1000).collect();
    let partition = message.partition.to_string();
    let offset = message.offset.to_string();
    let mut headers = OwnedHeaders::new();
    for (k, v) in &message.headers {
        headers = headers.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    headers = headers
        .insert(Header {
            key: "error",
            value: Some(reason.as_bytes()),
        })
        .insert(Header {
            key: "source_topic",
            value: Some(message.topic.as_bytes()),
        })
        .insert(Header {
            key: "source_partition",
            value: Some(partition.as_bytes()),
        })
        .insert(Header {
            key: "source_offset",
            value: Some(offset.as_bytes()),
        });
    let record = FutureRecord::to(dlq)
        .key(&message.key)
        .payload(&message.payload)
        .headers(headers);
    producer
        .send(record, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)?;
    tracing::error!(topic = %message.topic, offset = message.offset, error = %reason, "message sent to the dead-letter topic");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the handler saw: the trace its own span joined, and the span
    /// log lines get.
    #[derive(Default)]
    struct Probe(Mutex<Option<(Option<String>, String)>>);

    #[async_trait]
    impl Handler for Probe {
        async fn handle(&self, _message: &Incoming) -> Result<(), HandlerError> {
            let own = tracing::info_span!(target: casebook_telemetry::TARGET, "probe");
            let trace = casebook_telemetry::headers_of(&own).and_then(|h| h.traceparent);
            let log_span = tracing::Span::current()
                .metadata()
                .map(|m| m.name().to_string())
                .unwrap_or_default();
            *self.0.lock().unwrap() = Some((trace, log_span));
            Ok(())
        }
    }

    async fn handled_with(headers: Vec<(String, String)>) -> (Option<String>, String) {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::Layer as _;

        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        use tracing_subscriber::filter::{LevelFilter, Targets};
        // As the service sets it up: logs see every span but the trace's,
        // the OpenTelemetry layer only the trace's.
        let subscriber = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::sink)
                    .with_filter(
                        Targets::new()
                            .with_default(LevelFilter::INFO)
                            .with_target(casebook_telemetry::TARGET, LevelFilter::OFF),
                    ),
            )
            .with(
                tracing_opentelemetry::layer()
                    .with_tracer(provider.tracer("test"))
                    .with_filter(
                        Targets::new().with_target(casebook_telemetry::TARGET, LevelFilter::INFO),
                    ),
            );
        let _guard = tracing::subscriber::set_default(subscriber);
        let probe = Arc::new(Probe::default());
        let shared = Shared {
            handler: probe.clone(),
            // Never used: the handler succeeds, nothing is dead-lettered.
            producer: rdkafka::ClientConfig::new()
                .set("bootstrap.servers", "127.0.0.1:9")
                .create()
                .unwrap(),
            dlq: "dlq".into(),
            group: "t.agent".into(),
            retry: RetryPolicy::default(),
            lanes: Semaphore::new(1),
            stop: CancellationToken::new(),
        };
        let message = Incoming {
            topic: "t.tickets.incoming".into(),
            partition: 0,
            offset: 7,
            key: "k".into(),
            payload: b"{}".to_vec(),
            headers,
        };
        assert!(process(&shared, &message).await);
        let seen = probe.0.lock().unwrap().take();
        seen.expect("handled")
    }

    // One thread: the handler runs under this test's subscriber.
    #[tokio::test(flavor = "current_thread")]
    async fn a_message_is_handled_in_the_trace_its_traceparent_names() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (trace, log_span) = handled_with(vec![
            ("correlation_id".into(), "c-1".into()),
            ("traceparent".into(), parent.into()),
        ])
        .await;
        let trace = trace.expect("the handling is traced");
        assert!(
            trace.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{trace}"
        );
        assert!(
            !trace.contains("00f067aa0ba902b7"),
            "a span of its own: {trace}"
        );
        // Log lines still get the message's span (with its ids).
        assert_eq!(log_span, "message");

        let (trace, _) = handled_with(vec![("traceparent".into(), "00-bogus".into())]).await;
        let trace = trace.expect("the handling is traced");
        assert!(!trace.contains("4bf92f3577b34da6a3ce929d0e0e4736"));
    }

    fn tpl(parts: &[(&str, i32)]) -> TopicPartitionList {
        let mut t = TopicPartitionList::new();
        for (topic, p) in parts {
            t.add_partition(topic, *p);
        }
        t
    }

    fn next(t: &Tracker, topic: &str, p: i32) -> Option<i64> {
        t.partitions[&(topic.to_string(), p)].next
    }

    #[test]
    fn offsets_are_committed_only_past_finished_work() {
        let mut t = Tracker::default();
        t.assign(&tpl(&[("x", 0)]));
        let e: Vec<u64> = (10..13).map(|o| t.start("x", 0, o)).collect();
        t.finish("x", 0, 11, e[1]);
        // 10 is still running: nothing past it may be committed.
        assert_eq!(next(&t, "x", 0), Some(10));
        assert_eq!(t.committable().map(|l| l.count()), Some(1));
        assert!(t.committable().is_none());
        t.finish("x", 0, 10, e[0]);
        assert_eq!(next(&t, "x", 0), Some(12));
        t.finish("x", 0, 12, e[2]);
        assert_eq!(next(&t, "x", 0), Some(13));
    }

    #[test]
    fn work_settled_out_of_order_is_committed_once_the_gap_closes() {
        let mut t = Tracker::default();
        t.assign(&tpl(&[("x", 0)]));
        let e5 = t.start("x", 0, 5);
        let e6 = t.start("x", 0, 6);
        t.finish("x", 0, 6, e6);
        assert_eq!(next(&t, "x", 0), Some(5));
        t.finish("x", 0, 5, e5);
        assert_eq!(next(&t, "x", 0), Some(7));
    }

    #[test]
    fn a_revoked_partition_is_never_committed_by_work_that_finishes_later() {
        let mut t = Tracker::default();
        t.assign(&tpl(&[("x", 0), ("x", 1)]));
        let a = t.start("x", 0, 5);
        let b = t.start("x", 0, 6);
        let c = t.start("x", 1, 3);
        t.finish("x", 0, 5, a);
        // Partition 0 leaves: its finished work is handed over for a last
        // commit, and it is forgotten.
        let last = t.revoke(&tpl(&[("x", 0)]));
        assert_eq!(
            last.find_partition("x", 0).unwrap().offset(),
            Offset::Offset(6)
        );
        assert!(!t.is_current("x", 0, b));
        t.finish("x", 0, 6, b);
        t.finish("x", 1, 3, c);
        let committable = t.committable().unwrap();
        assert!(committable.find_partition("x", 0).is_none());
        assert_eq!(
            committable.find_partition("x", 1).unwrap().offset(),
            Offset::Offset(4)
        );
        // Partition 0 comes back: a new assignment, and what was in hand
        // from the old one still counts for nothing.
        t.assign(&tpl(&[("x", 0)]));
        t.finish("x", 0, 6, b);
        assert!(t.committable().is_none());
        assert!(!t.is_current("x", 0, b));
    }

    #[test]
    fn trace_ids_come_from_the_header_and_the_envelope_bounded() {
        let message = Incoming {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            key: "k".into(),
            payload: br#"{"causation_id":"evt-1","correlation_id":"ignored"}"#.to_vec(),
            headers: vec![("correlation_id".into(), format!("c\n{}", "x".repeat(500)))],
        };
        let (correlation, causation) = trace_ids(&message);
        assert_eq!(causation, "evt-1");
        assert!(correlation.starts_with("cx"));
        assert_eq!(correlation.chars().count(), 128);
    }
}
