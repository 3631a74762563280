//! The Kafka worker through the real broker, with handlers of the test's
//! own: a message that always fails is dead-lettered after the bound while
//! every other key carries on; a dead-letter write that fails commits
//! nothing past it; a member that loses a partition never commits it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use casebook_commands::kafka::{delete_topics, ensure_topics, KafkaSettings};
use casebook_commands::worker::{
    self, Handler, HandlerError, Incoming, RetryPolicy, WorkerSettings,
};
use casebook_domain::topics::Topics;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::common::{eventually, init_logs, kafka_brokers, unique_prefix};

const WAIT: Duration = Duration::from_secs(60);

fn kafka(prefix: &str, partitions: i32) -> KafkaSettings {
    KafkaSettings {
        brokers: kafka_brokers(),
        topics: Topics::new(prefix),
        partitions,
        replication: 1,
    }
}

/// One handled message: (key, payload, partition, offset, when).
type Handled = (String, String, i32, i64, Instant);

/// What a handler saw.
#[derive(Default)]
struct Seen {
    handled: Mutex<Vec<Handled>>,
    attempts: Mutex<HashMap<String, u32>>,
}

impl Seen {
    fn handled(&self) -> Vec<Handled> {
        self.handled.lock().unwrap().clone()
    }
}

/// Handles everything, except: `retry…` always asks to be retried (a
/// stream it cannot read), `poison…` is refused, and `hold…` waits until
/// `release` turns true.
struct TestHandler {
    seen: Arc<Seen>,
    release: watch::Receiver<bool>,
}

#[async_trait]
impl Handler for TestHandler {
    async fn handle(&self, m: &Incoming) -> Result<(), HandlerError> {
        let payload = String::from_utf8_lossy(&m.payload).into_owned();
        *self
            .seen
            .attempts
            .lock()
            .unwrap()
            .entry(payload.chars().take(40).collect())
            .or_default() += 1;
        if payload.starts_with("retry") {
            return Err(HandlerError::Retry("stream unreadable".into()));
        }
        if payload.starts_with("poison") {
            return Err(HandlerError::Poison("cannot ever be handled".into()));
        }
        if payload.starts_with("hold") {
            let mut release = self.release.clone();
            let _ = release.wait_for(|r| *r).await;
        }
        self.seen.handled.lock().unwrap().push((
            m.key.clone(),
            payload.chars().take(40).collect(),
            m.partition,
            m.offset,
            Instant::now(),
        ));
        Ok(())
    }
}

fn handler() -> (Arc<TestHandler>, Arc<Seen>, watch::Sender<bool>) {
    let seen = Arc::new(Seen::default());
    let (tx, rx) = watch::channel(false);
    (
        Arc::new(TestHandler {
            seen: seen.clone(),
            release: rx,
        }),
        seen,
        tx,
    )
}

fn producer(max_bytes: usize) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("message.max.bytes", max_bytes.to_string())
        .set("log_level", "3")
        .create()
        .expect("producer")
}

async fn produce(
    p: &FutureProducer,
    topic: &str,
    partition: Option<i32>,
    key: &str,
    payload: &[u8],
) {
    let mut record = FutureRecord::to(topic).key(key).payload(payload);
    if let Some(partition) = partition {
        record = record.partition(partition);
    }
    p.send(record, Duration::from_secs(10))
        .await
        .expect("the test's message is produced");
}

/// The group's committed offset of each partition (`None`: nothing yet).
fn committed(group: &str, topic: &str, partitions: i32) -> Vec<Option<i64>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", group)
        .set("log_level", "3")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let offsets = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    (0..partitions)
        .map(
            |p| match offsets.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => Some(o),
                _ => None,
            },
        )
        .collect()
}

async fn committed_async(group: &str, topic: &str, partitions: i32) -> Vec<Option<i64>> {
    let (group, topic) = (group.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || committed(&group, &topic, partitions))
        .await
        .unwrap()
}

/// The dead-letter topic's messages: (key, headers, payload length).
fn dead_letters(
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> Vec<(String, HashMap<String, String>)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", format!("test-dlq-{}", Uuid::new_v4()))
        .set("log_level", "3")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < expected && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_string(),
                                String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push((
                String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                headers,
            ));
        }
    }
    out
}

async fn dead_letters_async(
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> Vec<(String, HashMap<String, String>)> {
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || dead_letters(&topic, expected, timeout))
        .await
        .unwrap()
}

fn settings(k: &KafkaSettings, group: &str, topic: &str, retry: RetryPolicy) -> WorkerSettings {
    WorkerSettings {
        lanes: 4,
        // Smaller than the test's backlog: fetching pauses and resumes.
        max_in_flight: 32,
        retry,
        ..WorkerSettings::new(k, group.to_string(), vec![topic.to_string()])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_that_always_fails_is_dead_lettered_after_the_bound_while_every_other_key_is_handled()
{
    init_logs();
    let prefix = unique_prefix();
    let k = kafka(&prefix, 1);
    let topic = format!("{prefix}.work");
    let dlq = k.topics.dlq();
    ensure_topics(&k, &[topic.clone(), dlq.clone()])
        .await
        .unwrap();
    let p = producer(1_000_000);
    produce(&p, &topic, None, "stuck", b"retry: a stream it cannot read").await;
    for i in 0..200 {
        produce(
            &p,
            &topic,
            None,
            &format!("key-{}", i % 50),
            format!("ok {i}").as_bytes(),
        )
        .await;
    }
    produce(&p, &topic, None, "stuck", b"after the stuck one").await;

    let (handler, seen, _release) = handler();
    let group = format!("{prefix}.group");
    let retry = RetryPolicy {
        max_attempts: 4,
        max_retry: Duration::from_secs(120),
        base: Duration::from_secs(1),
        cap: Duration::from_secs(4),
    };
    let shutdown = CancellationToken::new();
    let task = worker::spawn(
        &k,
        settings(&k, &group, &topic, retry),
        handler,
        shutdown.clone(),
    )
    .unwrap();

    // Every other key is handled, in order per key.
    let handled = eventually("the 200 other messages", WAIT, || {
        let seen = seen.clone();
        async move {
            let h = seen.handled();
            (h.iter().filter(|m| m.1.starts_with("ok")).count() == 200).then_some(h)
        }
    })
    .await;
    let mut last: HashMap<&str, i64> = HashMap::new();
    for (key, _, _, offset, _) in &handled {
        if let Some(previous) = last.insert(key, *offset) {
            assert!(previous < *offset, "{key}: {previous} then {offset}");
        }
    }
    // The stuck one: tried exactly the bound, then dead-lettered with why.
    let letters = dead_letters_async(&dlq, 1, WAIT).await;
    assert_eq!(
        letters.len(),
        1,
        "the stuck message reaches the dead-letter topic"
    );
    let (key, headers) = &letters[0];
    assert_eq!(key, "stuck");
    assert!(
        headers["error"].contains("gave up after 4 attempts"),
        "{headers:?}"
    );
    assert!(
        headers["error"].contains("stream unreadable"),
        "{headers:?}"
    );
    assert_eq!(headers["source_topic"], topic);
    assert_eq!(headers["source_offset"], "0");
    assert_eq!(
        seen.attempts.lock().unwrap()["retry: a stream it cannot read"],
        4
    );
    // Its key's next message waited for it, then was handled.
    let after = eventually("the stuck key's next message", WAIT, || {
        let seen = seen.clone();
        async move { seen.handled().into_iter().find(|m| m.0 == "stuck") }
    })
    .await;
    assert_eq!(after.3, 201);
    // The other keys did not wait for the stuck one.
    let last_other = handled
        .iter()
        .filter(|m| m.1.starts_with("ok"))
        .map(|m| m.4)
        .max()
        .unwrap();
    assert!(last_other < after.4);
    // Everything settled: all of it committed.
    eventually("offsets committed past everything", WAIT, || async {
        (committed_async(&group, &topic, 1).await[0] == Some(202)).then_some(())
    })
    .await;
    shutdown.cancel();
    task.await.unwrap();
    let _ = delete_topics(&k, &[topic, dlq]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_letter_write_that_fails_commits_nothing_past_the_message() {
    init_logs();
    let prefix = unique_prefix();
    let k = kafka(&prefix, 1);
    let topic = format!("{prefix}.work");
    let dlq = k.topics.dlq();
    ensure_topics(&k, &[topic.clone(), dlq.clone()])
        .await
        .unwrap();
    // A message the dead-letter topic can never take: with the worker's
    // headers it is over the producer's 1,000,000-byte limit.
    let p = producer(1_048_576);
    produce(&p, &topic, None, "a", b"ok first").await;
    let mut big = b"poison ".to_vec();
    big.resize(999_950, b'x');
    produce(&p, &topic, None, "big", &big).await;
    produce(&p, &topic, None, "b", b"ok second").await;
    produce(&p, &topic, None, "c", b"ok third").await;

    let (handler, seen, _release) = handler();
    let group = format!("{prefix}.group");
    let shutdown = CancellationToken::new();
    let task = worker::spawn(
        &k,
        settings(&k, &group, &topic, RetryPolicy::default()),
        handler,
        shutdown.clone(),
    )
    .unwrap();
    eventually("the messages around the poison one", WAIT, || {
        let seen = seen.clone();
        async move { (seen.handled().len() == 3).then_some(()) }
    })
    .await;
    // Time for several dead-letter attempts and commits.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        committed_async(&group, &topic, 1).await[0],
        Some(1),
        "only the message before the one that could not be dead-lettered is committed"
    );
    assert!(dead_letters_async(&dlq, 1, Duration::from_secs(2))
        .await
        .is_empty());
    shutdown.cancel();
    task.await.unwrap();
    assert_eq!(
        committed_async(&group, &topic, 1).await[0],
        Some(1),
        "nor at shutdown"
    );
    let _ = delete_topics(&k, &[topic, dlq]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_that_lost_a_partition_never_commits_it() {
    init_logs();
    let prefix = unique_prefix();
    let k = kafka(&prefix, 2);
    let topic = format!("{prefix}.work");
    let dlq = k.topics.dlq();
    ensure_topics(&k, &[topic.clone(), dlq.clone()])
        .await
        .unwrap();
    let p = producer(1_000_000);
    let group = format!("{prefix}.group");
    let retry = RetryPolicy::default();

    // Member A owns both partitions and is stuck in one message on each.
    let (handler_a, seen_a, release_a) = handler();
    let stop_a = CancellationToken::new();
    let a = worker::spawn(
        &k,
        settings(&k, &group, &topic, retry),
        handler_a,
        stop_a.clone(),
    )
    .unwrap();
    for partition in 0..2 {
        produce(
            &p,
            &topic,
            Some(partition),
            &format!("warm-{partition}"),
            b"ok warm",
        )
        .await;
    }
    eventually("A handles both partitions", WAIT, || {
        let seen = seen_a.clone();
        async move { (seen.handled().len() == 2).then_some(()) }
    })
    .await;
    for partition in 0..2 {
        produce(
            &p,
            &topic,
            Some(partition),
            &format!("held-{partition}"),
            b"hold",
        )
        .await;
    }
    eventually("A's warm-up committed", WAIT, || async {
        (committed_async(&group, &topic, 2).await == vec![Some(1), Some(1)]).then_some(())
    })
    .await;

    // Member B joins: one partition moves to it, and B handles the held
    // message there and more after it.
    let (handler_b, seen_b, release_b) = handler();
    release_b.send(true).unwrap();
    let stop_b = CancellationToken::new();
    let b = worker::spawn(
        &k,
        settings(&k, &group, &topic, retry),
        handler_b,
        stop_b.clone(),
    )
    .unwrap();
    let moved = eventually("B takes over a partition", Duration::from_secs(90), || {
        let seen = seen_b.clone();
        async move { seen.handled().first().map(|m| m.2) }
    })
    .await;
    for i in 0..5 {
        produce(&p, &topic, Some(moved), &format!("more-{i}"), b"ok more").await;
    }
    eventually("B commits its progress", WAIT, || async {
        let c = committed_async(&group, &topic, 2).await;
        (c[moved as usize] == Some(7)).then_some(())
    })
    .await;

    // A's stuck message on the moved partition finishes now: A must not
    // commit that partition (it would move B's progress back to 2).
    release_a.send(true).unwrap();
    eventually("A finishes what it held", WAIT, || {
        let seen = seen_a.clone();
        async move {
            seen.handled()
                .iter()
                .any(|m| m.1 == "hold" && m.2 == moved)
                .then_some(())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        committed_async(&group, &topic, 2).await[moved as usize],
        Some(7),
        "the partition's new owner's progress stands"
    );
    stop_a.cancel();
    stop_b.cancel();
    a.await.unwrap();
    b.await.unwrap();
    let _ = delete_topics(&k, &[topic, dlq]).await;
}
