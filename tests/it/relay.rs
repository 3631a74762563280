//! The relay through the real broker: nothing skipped, per-key order kept,
//! resumption from the checkpoint.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use casebook::app::Role;
use casebook_commands::EventStore;
use casebook_domain::{Actor, Category, Channel, EventMetadata, Priority, Ticket, TicketCommand};
use rand::Rng;
use uuid::Uuid;

use crate::common::{read_topic, TestApp};

const WAIT: Duration = Duration::from_secs(90);

fn meta() -> EventMetadata {
    EventMetadata::new("relay-test", Actor::system("test"))
}

async fn open_ticket(store: &EventStore, id: Uuid) {
    store
        .execute::<Ticket>(
            &id.to_string(),
            TicketCommand::Open {
                ticket_id: id,
                customer_id: Uuid::new_v4(),
                channel: Channel::Webform,
                subject: None,
                category: Category::General,
                priority: Priority::Low,
                at: chrono::Utc::now(),
                previous_ticket_id: None,
            },
            &meta(),
        )
        .await
        .unwrap();
}

async fn message(store: &EventStore, ticket: Uuid, n: usize) {
    store
        .execute::<Ticket>(
            &ticket.to_string(),
            TicketCommand::ReceiveCustomerMessage {
                message_id: Uuid::new_v4(),
                customer_id: Uuid::new_v4(),
                channel: Channel::Webform,
                channel_message_id: format!("msg-{ticket}-{n}-{}", Uuid::new_v4()),
                body: format!("message {n}"),
                attachments: 0,
                thread: None,
                automated: None,
                at: chrono::Utc::now(),
            },
            &meta(),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_events_from_32_writers_are_all_published_in_per_key_order() {
    let app = TestApp::spawn_with(&[Role::Relay, Role::Api], &[]).await;
    let store = Arc::new(EventStore::new(app.pool().clone()));
    let tickets: Vec<Uuid> = (0..16).map(|_| Uuid::new_v4()).collect();
    for t in &tickets {
        open_ticket(&store, *t).await;
    }
    // 32 writers share the 16 streams, so they also collide and retry.
    let writers: Vec<_> = (0..32)
        .map(|w| {
            let store = store.clone();
            let tickets = tickets.clone();
            tokio::spawn(async move {
                for n in 0..31 {
                    let t = tickets[rand::rng().random_range(0..tickets.len())];
                    message(&store, t, w * 100 + n).await;
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let stored = app.count("SELECT count(*) FROM events").await as usize;
    assert_eq!(stored, 16 + 32 * 31);

    let kafka = app.kafka();
    let received = read_topic(&kafka.brokers, &kafka.topics.events(), stored, WAIT).await;
    let mut first_seen: HashMap<String, Vec<i64>> = HashMap::new();
    let mut partition_of: HashMap<String, i32> = HashMap::new();
    let mut ids = std::collections::HashSet::new();
    for m in &received {
        let partition = *partition_of.entry(m.key.clone()).or_insert(m.partition);
        assert_eq!(partition, m.partition, "a key stays on one partition");
        if ids.insert(m.envelope.event_id) {
            first_seen
                .entry(m.key.clone())
                .or_default()
                .push(m.envelope.sequence);
        }
    }
    assert_eq!(ids.len(), stored, "every stored event was published");
    for (key, sequences) in first_seen {
        let expected: Vec<i64> = (1..=sequences.len() as i64).collect();
        assert_eq!(sequences, expected, "stream {key} arrived out of order");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_whose_transaction_commits_late_is_not_skipped() {
    let app = TestApp::spawn_with(&[Role::Relay, Role::Api], &[]).await;
    let store = EventStore::new(app.pool().clone());

    // A writer inserts first and commits last.
    let mut slow = app.pool().begin().await.unwrap();
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ('probe', 'late', 1, 'Probe', '1', '{}', '{}')",
    )
    .execute(&mut *slow)
    .await
    .unwrap();
    let quick: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    for t in &quick {
        open_ticket(&store, *t).await;
    }
    // While the slow transaction is open, the later events wait behind it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let published: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(published_total), 0)::bigint FROM relay_checkpoints",
    )
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(
        published, 0,
        "nothing passes a transaction still in progress"
    );
    slow.commit().await.unwrap();

    let kafka = app.kafka();
    let received = read_topic(&kafka.brokers, &kafka.topics.events(), 6, WAIT).await;
    let keys: std::collections::HashSet<String> = received.iter().map(|m| m.key.clone()).collect();
    assert!(keys.contains("late"), "the late event was published");
    for t in quick {
        assert!(keys.contains(&t.to_string()));
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_relay_resumes_from_its_checkpoint() {
    let roles = [Role::Relay, Role::Api];
    let mut app = TestApp::spawn_with(&roles, &[]).await;
    let store = EventStore::new(app.pool().clone());
    for _ in 0..10 {
        open_ticket(&store, Uuid::new_v4()).await;
    }
    let kafka = app.kafka();
    assert_eq!(
        read_topic(&kafka.brokers, &kafka.topics.events(), 10, WAIT)
            .await
            .len(),
        10
    );

    app.halt().await;
    // Written while no relay runs.
    for _ in 0..7 {
        open_ticket(&store, Uuid::new_v4()).await;
    }
    app.resume(&roles).await;
    let received = read_topic(&kafka.brokers, &kafka.topics.events(), 17, WAIT).await;
    // Give a repeat the chance to show up before counting.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let received_again = read_topic(
        &kafka.brokers,
        &kafka.topics.events(),
        18,
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(received.len(), 17);
    assert_eq!(
        received_again.len(),
        17,
        "every event once: nothing skipped, nothing repeated"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_broker_can_never_take_is_set_aside_and_the_rest_flows() {
    let app = TestApp::spawn_with(&[Role::Relay, Role::Api], &[]).await;
    let store = EventStore::new(app.pool().clone());
    let before: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    for t in &before {
        open_ticket(&store, *t).await;
    }
    // An event larger than any Kafka message may be (2 MB of payload).
    let huge = serde_json::json!({"blob": "x".repeat(2 * 1024 * 1024)});
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ('probe', 'huge', 1, 'Probe', '1', $1, '{}')",
    )
    .bind(&huge)
    .execute(app.pool())
    .await
    .unwrap();
    let after: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    for t in &after {
        open_ticket(&store, *t).await;
    }

    let kafka = app.kafka();
    let received = read_topic(&kafka.brokers, &kafka.topics.events(), 6, WAIT).await;
    let keys: std::collections::HashSet<String> = received.iter().map(|m| m.key.clone()).collect();
    for t in before.iter().chain(after.iter()) {
        assert!(
            keys.contains(&t.to_string()),
            "events behind the oversized one are published"
        );
    }
    assert!(!keys.contains("huge"));
    let (position, topic, error): (i64, String, String) = crate::common::eventually(
        "the oversized event is recorded as set aside",
        Duration::from_secs(30),
        || async {
            sqlx::query_as("SELECT position, topic, error FROM relay_set_aside")
                .fetch_optional(app.pool())
                .await
                .unwrap()
        },
    )
    .await;
    let stored: i64 = sqlx::query_scalar("SELECT position FROM events WHERE aggregate_id = 'huge'")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(position, stored);
    assert_eq!(topic, kafka.topics.events());
    assert!(error.contains("byte limit"), "{error}");
    let metrics = app
        .http
        .get(app.ops_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("casebook_relay_set_aside_total") && !l.ends_with(" 0")),
        "the set-aside counter moved"
    );
    app.stop().await;
}

/// The relay asks whether anything is pending on every idle poll. Once
/// Postgres switches its prepared statement to a generic plan (after five
/// runs), an `EXISTS` form of that question was planned as a sequential scan
/// of all of `events` (a third of the table guessed to match, the first row
/// expected at once), which on an idle relay reads the whole log each time.
/// The statement must stay an index scan with any parameters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relays_pending_check_reads_its_index_even_as_a_generic_plan() {
    let db = crate::common::TestDb::create().await;
    let pool = &db.pool;
    // A log big enough for the planner to care; the writer's hash is given,
    // so the rows skip the chain trigger.
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                             payload, metadata, hash)
         SELECT 'probe', (g / 10)::text, g % 10 + 1, 'Probed', '1',
                jsonb_build_object('n', g, 'text', repeat('x', 200)), '{}', 'h'
           FROM generate_series(0, 49999) AS g",
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE events").execute(pool).await.unwrap();
    let (last_tx, last_position): (String, i64) = sqlx::query_as(
        "SELECT transaction_id::text, position FROM events ORDER BY position DESC LIMIT 1",
    )
    .fetch_one(pool)
    .await
    .unwrap();

    let mut conn = pool.acquire().await.unwrap();
    sqlx::query("SET plan_cache_mode = force_generic_plan")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query(&format!(
        "PREPARE pending(text, bigint) AS {}",
        casebook_commands::relay::PENDING_QUERY
    ))
    .execute(&mut *conn)
    .await
    .unwrap();
    let plan: serde_json::Value = sqlx::query_scalar(&format!(
        "EXPLAIN (FORMAT JSON) EXECUTE pending('{last_tx}', {last_position})"
    ))
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    let text = plan.to_string();
    assert!(
        !text.contains("Seq Scan"),
        "the pending check scans the log: {text}"
    );
    assert!(text.contains("events_relay_idx"), "{text}");
    // And it answers: nothing past the last event, something past the one
    // before it.
    let nothing: Option<i64> =
        sqlx::query_scalar(&format!("EXECUTE pending('{last_tx}', {last_position})"))
            .fetch_optional(&mut *conn)
            .await
            .unwrap();
    assert_eq!(nothing, None);
    let next: Option<i64> = sqlx::query_scalar(&format!(
        "EXECUTE pending('{last_tx}', {})",
        last_position - 1
    ))
    .fetch_optional(&mut *conn)
    .await
    .unwrap();
    assert_eq!(next, Some(last_position));
    sqlx::query("DEALLOCATE pending")
        .execute(&mut *conn)
        .await
        .unwrap();
}
