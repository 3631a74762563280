//! The aggregate cache of the event store (issue 10): a command on a stream
//! this store just wrote needs no read, and a cached copy that no longer
//! matches the stored stream (another writer, a purge) never gets an event
//! appended: the append fails as a conflict and the command is retried
//! against the stream read afresh.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use casebook::bench::{AppendBench, BenchStream};
use casebook_commands::{CommandError, EventStore, StoreError};
use casebook_domain::{Actor, Category, Channel, EventMetadata, Priority, Ticket, TicketCommand};
use chrono::Utc;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use uuid::Uuid;

use crate::audit::assert_succeeded;
use crate::common::{eventually, TestDb};

const KEY: &str = "3333333333333333333333333333333333333333333333333333333333333333";

fn meta() -> EventMetadata {
    EventMetadata::new("append-cache-test", Actor::system("test"))
}

/// A pool of `size` connections on the test database that counts every
/// connection handed out (a new one, or an idle one again): the event store
/// takes one per statement, so the count is the number of statements a
/// command needed.
pub(crate) async fn counting_pool(db: &TestDb, size: u32) -> (PgPool, Arc<AtomicUsize>) {
    let acquired = Arc::new(AtomicUsize::new(0));
    let (reused, opened) = (acquired.clone(), acquired.clone());
    let pool = PgPoolOptions::new()
        .max_connections(size)
        .before_acquire(move |_, _| {
            let counter = reused.clone();
            Box::pin(async move {
                counter.fetch_add(1, Ordering::SeqCst);
                Ok(true)
            })
        })
        .after_connect(move |_, _| {
            let counter = opened.clone();
            Box::pin(async move {
                counter.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
        })
        .connect(&db.url)
        .await
        .expect("connect the counting pool");
    (pool, acquired)
}

pub(crate) async fn append(store: &EventStore, id: &str, count: usize) {
    store
        .execute::<BenchStream>(id, AppendBench { count }, &meta())
        .await
        .expect("append");
}

/// Statements one command on `id` takes through `store`.
async fn statements_for(store: &EventStore, acquired: &AtomicUsize, id: &str) -> usize {
    let before = acquired.load(Ordering::SeqCst);
    append(store, id, 5).await;
    acquired.load(Ordering::SeqCst) - before
}

/// The stream's (sequence, payload `n`) pairs, in order.
async fn stream(pool: &PgPool, id: &str) -> Vec<(i64, i64)> {
    sqlx::query_as(
        "SELECT sequence, (payload->>'n')::bigint FROM events
          WHERE aggregate_type = 'bench_stream' AND aggregate_id = $1 ORDER BY sequence",
    )
    .bind(id)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Every event of the stream was decided on the state of all the events
/// before it: sequences 1..=n without a gap, and each event's `n` (the
/// count of events its command saw, plus its place in the commit) is its
/// sequence less one.
fn assert_no_lost_update(rows: &[(i64, i64)], expected: usize) {
    assert_eq!(rows.len(), expected, "{rows:?}");
    for (i, (sequence, n)) in rows.iter().enumerate() {
        assert_eq!(*sequence, i as i64 + 1, "{rows:?}");
        assert_eq!(*n, sequence - 1, "decided on a stale state: {rows:?}");
    }
}

async fn assert_chains_intact(pool: &PgPool) {
    let report = casebook_replay::verify_chains(pool).await.unwrap();
    assert!(report.first_break.is_none(), "{:?}", report.first_break);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_serves_the_next_command_on_a_stream_without_reading_it() {
    let db = TestDb::create().await;
    let (pool, acquired) = counting_pool(&db, 2).await;

    // Without a cache every command reads its stream, then appends.
    let uncached = EventStore::with_aggregate_cache(pool.clone(), 0);
    assert_eq!(statements_for(&uncached, &acquired, "plain").await, 2);
    assert_eq!(statements_for(&uncached, &acquired, "plain").await, 2);

    // With one, the first command reads; the next ones only append.
    let hits_before = casebook_commands::metrics::AGGREGATE_CACHE
        .with_label_values(&["hit"])
        .get();
    let store = EventStore::new(pool.clone());
    assert_eq!(statements_for(&store, &acquired, "cached").await, 2);
    for _ in 0..3 {
        assert_eq!(statements_for(&store, &acquired, "cached").await, 1);
    }
    // A clone shares the cache (the service clones its store per task).
    assert_eq!(statements_for(&store.clone(), &acquired, "cached").await, 1);
    assert_eq!(store.aggregate_cache().hits_and_misses(), (4, 1));
    // Operators see the hits too (the counter is the process's: other tests
    // add to it, never take from it).
    let hits_after = casebook_commands::metrics::AGGREGATE_CACHE
        .with_label_values(&["hit"])
        .get();
    assert!(
        hits_after >= hits_before + 4,
        "{hits_before} → {hits_after}"
    );

    // What was decided from memory is what a read would have given.
    assert_no_lost_update(&stream(&pool, "cached").await, 25);
    assert_no_lost_update(&stream(&pool, "plain").await, 10);
    assert_chains_intact(&pool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_another_store_turns_a_cached_copy_into_a_conflict_retried_on_fresh_state()
{
    let db = TestDb::create().await;
    let (pool, acquired) = counting_pool(&db, 2).await;
    // Two stores: two processes, each with its own cache.
    let a = EventStore::new(pool.clone());
    let b = EventStore::new(db.pool.clone());

    append(&a, "s", 5).await;
    append(&a, "s", 5).await; // a holds the stream at sequence 10
    append(&b, "s", 5).await; // b reads it and appends 11..15

    // a's copy is stale: its append conflicts (one statement), the entry
    // goes, the command reads the stream and appends (two more).
    assert_eq!(statements_for(&a, &acquired, "s").await, 3);
    assert_no_lost_update(&stream(&pool, "s").await, 20);
    // Its fresh state is cached again.
    assert_eq!(statements_for(&a, &acquired, "s").await, 1);
    assert_no_lost_update(&stream(&pool, "s").await, 25);

    // A unit of work used directly reads what it loads (it may decide on a
    // stream it does not append to). Two streams, one moved by the other
    // store after the read: the whole commit fails, neither stream gets
    // anything, and both entries go.
    append(&a, "m1", 2).await;
    append(&a, "m2", 2).await;
    let mut uow = a.unit_of_work(meta());
    uow.execute::<BenchStream>("m1", AppendBench { count: 1 })
        .await
        .unwrap();
    uow.execute::<BenchStream>("m2", AppendBench { count: 1 })
        .await
        .unwrap();
    append(&b, "m2", 2).await;
    assert!(
        matches!(uow.commit().await, Err(StoreError::Conflict)),
        "a moved head fails the whole unit"
    );
    assert_no_lost_update(&stream(&pool, "m1").await, 2);
    assert_no_lost_update(&stream(&pool, "m2").await, 4);
    assert_eq!(statements_for(&a, &acquired, "m1").await, 2);
    // Both unmoved: two reads, one statement appends to both, and what it
    // committed serves the next command.
    let before = acquired.load(Ordering::SeqCst);
    let mut uow = a.unit_of_work(meta());
    uow.execute::<BenchStream>("m1", AppendBench { count: 1 })
        .await
        .unwrap();
    uow.execute::<BenchStream>("m2", AppendBench { count: 1 })
        .await
        .unwrap();
    assert_eq!(uow.commit().await.unwrap(), 2);
    assert_eq!(acquired.load(Ordering::SeqCst) - before, 3);
    assert_eq!(statements_for(&a, &acquired, "m2").await, 1);
    assert_no_lost_update(&stream(&pool, "m1").await, 8);
    assert_no_lost_update(&stream(&pool, "m2").await, 10);

    // Many writers on one stream through both stores at once: every
    // command lands exactly once, each on the state before it, and the
    // chain never forks.
    let mut tasks = Vec::new();
    for i in 0..6 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            for _ in 0..5 {
                append(&store, "busy", 3).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_no_lost_update(&stream(&pool, "busy").await, 6 * 5 * 3);
    assert_chains_intact(&pool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_stream_held_in_the_cache_is_not_resurrected() {
    let db = TestDb::create().await;
    let store = EventStore::new(db.pool.clone());
    let ticket = Uuid::new_v4();
    let id = ticket.to_string();
    let as_of = Utc::now() + chrono::Duration::days(1);
    let long_ago = as_of - chrono::Duration::days(366);
    store
        .execute::<Ticket>(
            &id,
            TicketCommand::Open {
                ticket_id: ticket,
                customer_id: Uuid::new_v4(),
                channel: Channel::Webform,
                subject: Some("export".into()),
                category: Category::Technical,
                priority: Priority::Medium,
                previous_ticket_id: None,
                at: long_ago - chrono::Duration::hours(1),
            },
            &meta(),
        )
        .await
        .unwrap();
    store
        .execute::<Ticket>(
            &id,
            TicketCommand::Resolve {
                resolved_by: "agent:grace".into(),
                resolution: Some("answered".into()),
                at: long_ago,
            },
            &meta(),
        )
        .await
        .unwrap();
    // The store now holds the resolved ticket in memory.
    let (hits, _) = store.aggregate_cache().hits_and_misses();
    assert_eq!(hits, 1);
    let stored = events_of(&db.pool, &id).await;
    assert_eq!(stored, 2);

    // Retention archives and purges it (and records its tombstone).
    let dir = std::env::temp_dir().join(format!("casebook-cache-{}", Uuid::new_v4()));
    let key = ed25519_dalek::SigningKey::from_bytes(&[0x33; 32]);
    let (pool, dir_ref, id_ref) = (&db.pool, &dir, &id);
    eventually("the ticket purged", Duration::from_secs(60), || {
        let key = key.clone();
        async move {
            casebook::audit::archive_pass(pool, dir_ref, as_of, &key)
                .await
                .unwrap();
            (events_of(pool, id_ref).await == 0).then_some(())
        }
    })
    .await;

    // A command on the cached copy (resolved, so it may be reopened) must
    // not append at sequence 3 to a stream whose events are gone: the
    // append conflicts, the stream is read afresh (empty), and the ticket
    // that no longer exists refuses the command.
    let reopened = store
        .execute::<Ticket>(
            &id,
            TicketCommand::Reopen {
                reopened_by: "agent:grace".into(),
                reason: None,
                at: Utc::now(),
            },
            &meta(),
        )
        .await;
    assert!(
        matches!(reopened, Err(CommandError::Rejected(_))),
        "{reopened:?}"
    );
    assert_eq!(events_of(&db.pool, &id).await, 0);

    // The whole log still verifies: chains, purged leaves, archive.
    let verified = Command::new(env!("CARGO_BIN_EXE_casebook"))
        .args(["audit", "verify"])
        .env("DATABASE_URL", &db.url)
        .env("CASEBOOK_AUDIT_SIGNING_KEY", KEY)
        .env("CASEBOOK_ARCHIVE_DIR", &dir)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the casebook binary runs");
    assert_succeeded(&verified);
    let out = String::from_utf8_lossy(&verified.stdout);
    assert!(out.contains(&format!("{stored} purged")), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

async fn events_of(pool: &PgPool, id: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_type = 'ticket' AND aggregate_id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_refused_on_a_cached_state_is_decided_again_on_the_stored_one() {
    // No append follows a refusal, so nothing would prove the cached state
    // current: the command is taken again on the stream read afresh.
    let db = TestDb::create().await;
    let a = EventStore::new(db.pool.clone());
    let b = EventStore::new(db.pool.clone());
    let ticket = Uuid::new_v4();
    let id = ticket.to_string();
    a.execute::<Ticket>(
        &id,
        TicketCommand::Open {
            ticket_id: ticket,
            customer_id: Uuid::new_v4(),
            channel: Channel::Webform,
            subject: None,
            category: Category::General,
            priority: Priority::Low,
            previous_ticket_id: None,
            at: Utc::now(),
        },
        &meta(),
    )
    .await
    .unwrap();
    // a holds the open ticket; b resolves it.
    b.execute::<Ticket>(
        &id,
        TicketCommand::Resolve {
            resolved_by: "agent:grace".into(),
            resolution: None,
            at: Utc::now(),
        },
        &meta(),
    )
    .await
    .unwrap();
    // On a's copy (open) a reopen is refused; on the store's (resolved) it
    // is what happens.
    a.execute::<Ticket>(
        &id,
        TicketCommand::Reopen {
            reopened_by: "agent:grace".into(),
            reason: None,
            at: Utc::now(),
        },
        &meta(),
    )
    .await
    .expect("decided on the stored ticket, not the cached one");
    // The refusal was on a's cached copy: one hit (the copy), then a read.
    assert_eq!(a.aggregate_cache().hits_and_misses().0, 1);
    assert_eq!(events_of(&db.pool, &id).await, 3);
    assert_chains_intact(&db.pool).await;
}
