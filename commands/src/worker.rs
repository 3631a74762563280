//! A Kafka consumer group member that handles messages concurrently while
//! keeping each key's messages in order, and commits offsets only up to the
//! first message not yet finished: a crash repeats work, it never skips it
//! (handlers are idempotent). Messages a handler cannot ever process go to
//! the dead-letter topic with the error and their origin in headers.

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use casebook_domain::retry::Backoff;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::kafka::KafkaSettings;
use crate::retry::sleep_backoff;

const RETRY_BACKOFF: Backoff = Backoff::new(
    Duration::from_millis(200),
    Duration::from_secs(10),
    u32::MAX,
);

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
    /// backoff until it succeeds or the worker stops.
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

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub group: String,
    pub topics: Vec<String>,
    /// Messages handled at once (different keys).
    pub lanes: usize,
}

/// Offsets dispatched and not yet finished, per partition.
#[derive(Default)]
struct Tracker {
    pending: HashMap<(String, i32), BTreeSet<i64>>,
    next: HashMap<(String, i32), i64>,
    dirty: bool,
}

impl Tracker {
    fn start(&mut self, topic: &str, partition: i32, offset: i64) {
        self.pending
            .entry((topic.to_string(), partition))
            .or_default()
            .insert(offset);
    }

    fn finish(&mut self, topic: &str, partition: i32, offset: i64) {
        let key = (topic.to_string(), partition);
        let pending = self.pending.entry(key.clone()).or_default();
        pending.remove(&offset);
        let committable = pending.first().copied().unwrap_or(offset + 1);
        let next = self.next.entry(key).or_insert(committable);
        if committable > *next {
            *next = committable;
            self.dirty = true;
        }
    }

    fn committable(&mut self) -> Option<TopicPartitionList> {
        if !self.dirty {
            return None;
        }
        self.dirty = false;
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), next) in &self.next {
            let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next));
        }
        Some(tpl)
    }
}

fn lane_of(key: &str, lanes: usize) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() % lanes as u64) as usize
}

/// Starts the worker; it runs until `shutdown`, finishing messages in hand.
pub fn spawn<H: Handler>(
    kafka: &KafkaSettings,
    settings: WorkerSettings,
    handler: Arc<H>,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, rdkafka::error::KafkaError> {
    let consumer: StreamConsumer = kafka
        .client_config()
        .set("group.id", &settings.group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("fetch.wait.max.ms", "50")
        .set("topic.metadata.refresh.interval.ms", "10000")
        .create()?;
    let producer = kafka.producer()?;
    let dlq = kafka.topics.dlq();
    let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    let consumer = Arc::new(consumer);
    let tracker = Arc::new(Mutex::new(Tracker::default()));
    let lanes = settings.lanes.max(1);
    let group = settings.group.clone();

    Ok(tokio::spawn(async move {
        let lane_shutdown = CancellationToken::new();
        let mut senders = Vec::with_capacity(lanes);
        let mut lane_tasks = Vec::with_capacity(lanes);
        for _ in 0..lanes {
            let (tx, mut rx) = mpsc::channel::<Incoming>(64);
            senders.push(tx);
            let handler = handler.clone();
            let tracker = tracker.clone();
            let producer = producer.clone();
            let dlq = dlq.clone();
            let stop = lane_shutdown.clone();
            lane_tasks.push(tokio::spawn(async move {
                while let Some(message) = rx.recv().await {
                    // A message left unsettled at shutdown keeps its offset
                    // pending, so nothing at or past it is committed.
                    if process(handler.as_ref(), &message, &producer, &dlq, &stop).await {
                        tracker.lock().expect("not poisoned").finish(
                            &message.topic,
                            message.partition,
                            message.offset,
                        );
                    }
                }
            }));
        }
        tracing::info!(group = %group, "worker consuming");
        let mut commit_tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = commit_tick.tick() => commit(&consumer, &tracker),
                received = consumer.recv() => match received {
                    Err(e) => {
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
                        tracker.lock().expect("not poisoned").start(&message.topic, message.partition, message.offset);
                        let lane = lane_of(&message.key, lanes);
                        if senders[lane].send(message).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }
        // Finish what is in hand, then commit it.
        drop(senders);
        let grace = tokio::time::sleep(Duration::from_secs(20));
        tokio::pin!(grace);
        for task in lane_tasks {
            tokio::select! {
                _ = task => {}
                _ = &mut grace => { lane_shutdown.cancel(); }
            }
        }
        commit(&consumer, &tracker);
        tracing::info!(group = %group, "worker stopped");
    }))
}

fn commit(consumer: &StreamConsumer, tracker: &Mutex<Tracker>) {
    let tpl = tracker.lock().expect("not poisoned").committable();
    if let Some(tpl) = tpl {
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(error = %e, "offsets not committed yet");
            tracker.lock().expect("not poisoned").dirty = true;
        }
    }
}

/// Handles one message until it succeeds or is dead-lettered (settled:
/// `true`), or, once `stop` is cancelled, gives up after a failed attempt
/// (`false`: handled again after a restart).
async fn process<H: Handler + ?Sized>(
    handler: &H,
    message: &Incoming,
    producer: &FutureProducer,
    dlq: &str,
    stop: &CancellationToken,
) -> bool {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match handler.handle(message).await {
            Ok(()) => return true,
            Err(HandlerError::Poison(reason)) => {
                dead_letter(producer, dlq, message, &reason).await;
                return true;
            }
            Err(HandlerError::Retry(reason)) => {
                tracing::warn!(topic = %message.topic, offset = message.offset, attempt, error = %reason, "handling failed; retrying");
                if stop.is_cancelled() {
                    // Not settled: handled again after a restart.
                    return false;
                }
                sleep_backoff(&RETRY_BACKOFF, attempt.min(12)).await;
            }
        }
    }
}

/// Sends a message to the dead-letter topic with its error and origin.
pub async fn dead_letter(producer: &FutureProducer, dlq: &str, message: &Incoming, reason: &str) {
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
    match producer.send(record, Duration::from_secs(10)).await {
        Ok(_) => {
            tracing::error!(topic = %message.topic, offset = message.offset, error = %reason, "message sent to the dead-letter topic")
        }
        Err((e, _)) => tracing::error!(topic = %message.topic, offset = message.offset, error = %e,
            "message could not be dead-lettered; it is logged here and skipped"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_committed_only_past_finished_work() {
        let mut t = Tracker::default();
        for o in 10..13 {
            t.start("x", 0, o);
        }
        t.finish("x", 0, 11);
        // 10 is still running: nothing past it may be committed.
        assert_eq!(t.next[&("x".to_string(), 0)], 10);
        assert!(t.committable().is_none());
        t.finish("x", 0, 10);
        assert_eq!(t.next[&("x".to_string(), 0)], 12);
        assert_eq!(t.committable().map(|l| l.count()), Some(1));
        t.finish("x", 0, 12);
        assert_eq!(t.next[&("x".to_string(), 0)], 13);
    }

    struct AlwaysDown;

    #[async_trait]
    impl Handler for AlwaysDown {
        async fn handle(&self, _: &Incoming) -> Result<(), HandlerError> {
            Err(HandlerError::Retry("database unavailable".into()))
        }
    }

    #[tokio::test]
    async fn a_message_failing_at_shutdown_is_left_unsettled() {
        let producer: FutureProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:9")
            .create()
            .unwrap();
        let stop = CancellationToken::new();
        stop.cancel();
        let message = Incoming {
            topic: "t".into(),
            partition: 0,
            offset: 7,
            key: "k".into(),
            payload: vec![],
            headers: vec![],
        };
        assert!(!process(&AlwaysDown, &message, &producer, "dlq", &stop).await);
    }

    #[test]
    fn a_key_always_goes_to_the_same_lane() {
        assert_eq!(lane_of("ticket-1", 8), lane_of("ticket-1", 8));
        assert!(lane_of("ticket-2", 8) < 8);
    }
}
