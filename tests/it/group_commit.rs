//! Group commit in the event store (issue 10): plain appends arriving
//! while others are being written share one statement and one commit. A
//! unit whose stream moved is left out of its group as a conflict and
//! retried on the stream read afresh; the others are written. Every
//! command lands once, on the state of everything before it, and no chain
//! forks.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use casebook_commands::EventStore;
use sqlx::PgPool;

use crate::append_cache::{append, counting_pool};
use crate::common::{eventually, TestDb};

/// Each stream of the bench type: its (sequence, payload `n`, position)
/// rows in sequence order.
async fn streams(pool: &PgPool) -> std::collections::BTreeMap<String, Vec<(i64, i64, i64)>> {
    let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT aggregate_id, sequence, (payload->>'n')::bigint, position FROM events
          WHERE aggregate_type = 'bench_stream' ORDER BY aggregate_id, sequence",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut by_stream = std::collections::BTreeMap::<String, Vec<_>>::new();
    for (id, sequence, n, position) in rows {
        by_stream
            .entry(id)
            .or_default()
            .push((sequence, n, position));
    }
    by_stream
}

/// Sequences 1..=expected without a gap, each event decided on the state
/// of all before it (`n` is its sequence less one), and the stream's events
/// in the log in its order.
fn assert_whole(id: &str, rows: &[(i64, i64, i64)], expected: usize) {
    assert_eq!(rows.len(), expected, "{id}: {rows:?}");
    for (i, (sequence, n, _)) in rows.iter().enumerate() {
        assert_eq!(*sequence, i as i64 + 1, "{id}: {rows:?}");
        assert_eq!(*n, sequence - 1, "{id} decided on a stale state: {rows:?}");
    }
    assert!(
        rows.windows(2).all(|w| w[0].2 < w[1].2),
        "{id}: the log holds the stream out of order: {rows:?}"
    );
}

async fn assert_chains_intact(pool: &PgPool) {
    let report = casebook_replay::verify_chains(pool).await.unwrap();
    assert!(report.first_break.is_none(), "{:?}", report.first_break);
}

/// `writers` tasks, each committing 6 times on streams of its own (a new
/// one after three); returns the statements taken.
async fn workload(store: &EventStore, acquired: &AtomicUsize, writers: usize) -> usize {
    let before = acquired.load(Ordering::SeqCst);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for c in 0..6 {
                append(&store, &format!("w{w}-{}", c / 3), 5).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    acquired.load(Ordering::SeqCst) - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_share_statements_and_each_lands_once_on_the_state_before_it() {
    let writers = 24;
    let commits = writers * 6;

    // Alone (CASEBOOK_APPEND_GROUP=1): a statement per commit, and a read
    // for each new stream.
    let db = TestDb::create().await;
    let (pool, acquired) = counting_pool(&db, 4).await;
    let alone = EventStore::new(pool.clone()).with_append_group(1);
    let statements = workload(&alone, &acquired, writers).await;
    assert_eq!(statements, commits + writers * 2);

    // Grouped (the default), on a database of its own: the same reads,
    // fewer appends than commits, and the same streams.
    let grouped_db = TestDb::create().await;
    let (grouped_pool, grouped_acquired) = counting_pool(&grouped_db, 4).await;
    let grouped = EventStore::new(grouped_pool.clone());
    let statements = workload(&grouped, &grouped_acquired, writers).await;
    assert!(
        statements < commits,
        "{statements} statements for {commits} commits and {} reads: too few grouped",
        writers * 2
    );
    assert_eq!(grouped.appends_waiting(), 0);
    assert_eq!(grouped.appends_pending(), 0);

    for pool in [&pool, &grouped_pool] {
        let streams = streams(pool).await;
        assert_eq!(streams.len(), writers * 2);
        for (id, rows) in &streams {
            assert_whole(id, rows, 15);
        }
        assert_chains_intact(pool).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_leaves_out_the_units_whose_stream_moved_or_went_and_writes_the_others() {
    let db = TestDb::create().await;
    // One connection: while the test holds it, appends queue.
    let (pool, acquired) = counting_pool(&db, 1).await;
    let store = EventStore::new(pool.clone());
    // Another process, with its own cache and group.
    let other = EventStore::new(db.pool.clone());

    let ids: Vec<String> = (0..12).map(|i| format!("s{i}")).collect();
    for id in &ids {
        append(&store, id, 3).await; // cached at sequence 3
    }
    // s0–s3 move on in the other process: the cached copies are stale.
    for id in &ids[..4] {
        append(&other, id, 2).await;
    }
    // s4 and s5 lose their last event (as a superuser around the triggers,
    // as a purge of their tail would): the heads the copies extend are gone.
    for id in &ids[4..6] {
        let mut tx = db.pool.begin().await.unwrap();
        sqlx::query("SET LOCAL session_replication_role = replica")
            .execute(&mut *tx)
            .await
            .unwrap();
        sqlx::query(
            "DELETE FROM events WHERE aggregate_type = 'bench_stream' AND aggregate_id = $1 AND sequence = 3",
        )
        .bind(id)
        .execute(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
    }

    // Every command queued behind the held connection, then let go.
    let held = pool.acquire().await.unwrap();
    let before = acquired.load(Ordering::SeqCst);
    let tasks: Vec<_> = ids
        .iter()
        .map(|id| {
            let (store, id) = (store.clone(), id.clone());
            tokio::spawn(async move { append(&store, &id, 4).await })
        })
        .collect();
    // Every unit in a writer's hands or in the queue: none can be written
    // before the connection is free, so they go in as few statements as
    // the four slots allow.
    let (store_ref, all) = (&store, ids.len());
    eventually(
        "the appends submitted",
        Duration::from_secs(30),
        || async move { (store_ref.appends_pending() == all).then_some(()) },
    )
    .await;
    drop(held);
    for t in tasks {
        t.await.unwrap();
    }
    // Without groups: 12 appends, and for each of the 6 moved streams a
    // read and a second append.
    let statements = acquired.load(Ordering::SeqCst) - before;
    assert!(statements < 24, "{statements} statements");

    let streams = streams(&db.pool).await;
    for id in &ids[..4] {
        assert_whole(id, &streams[id], 3 + 2 + 4);
    }
    for id in &ids[4..6] {
        // Read afresh at sequence 2, then appended to.
        assert_whole(id, &streams[id], 2 + 4);
    }
    for id in &ids[6..] {
        assert_whole(id, &streams[id], 3 + 4);
    }
    // Cutting a tail leaves its chain whole, and the appends extend it.
    assert_chains_intact(&db.pool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_in_two_processes_on_the_same_streams_never_fork_a_chain() {
    // Groups of one process lose keys to the other's statements: such a
    // group fails whole, and its units are appended one by one.
    let db = TestDb::create().await;
    let a = EventStore::new(db.pool.clone());
    let b = EventStore::new(db.pool.clone());
    let mut tasks = Vec::new();
    for i in 0..16 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            for c in 0..6 {
                append(&store, &format!("hot{}", (i + c) % 3), 2).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let streams = streams(&db.pool).await;
    let total: usize = streams.values().map(Vec::len).sum();
    assert_eq!(total, 16 * 6 * 2);
    for (id, rows) in &streams {
        assert_whole(id, rows, rows.len());
    }
    assert_chains_intact(&db.pool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_append_reports_each_round_and_compares_the_medians() {
    // The bench makes a scratch database of its own next to the test's,
    // and drops it when done.
    let db = TestDb::create().await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_casebook"))
        .args([
            "bench",
            "append",
            "--json",
            "--events",
            "600",
            "--writers",
            "4",
            "--rounds",
            "3",
        ])
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the casebook binary runs");
    crate::audit::assert_succeeded(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    // 600 events over 4 writers of 5-event commits: 30 commits each.
    assert_eq!(report["events"], 600);
    let rounds = report["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 3);
    let median = |key: &str| {
        let mut v: Vec<f64> = rounds.iter().map(|r| r[key].as_f64().unwrap()).collect();
        v.sort_by(f64::total_cmp);
        v[1]
    };
    let (es, base) = (
        median("event_store_per_second"),
        median("baseline_per_second"),
    );
    assert!(es > 0.0 && base > 0.0, "{report}");
    assert_eq!(report["event_store_per_second"].as_f64().unwrap(), es);
    assert_eq!(report["baseline_per_second"].as_f64().unwrap(), base);
    assert!((report["ratio"].as_f64().unwrap() - es / base).abs() < 1e-9);
    for r in rounds {
        let ratio = r["event_store_per_second"].as_f64().unwrap()
            / r["baseline_per_second"].as_f64().unwrap();
        assert!((r["ratio"].as_f64().unwrap() - ratio).abs() < 1e-9, "{r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_queued_behind_writers_that_stopped_are_still_written() {
    // Every append slot taken by writers of a runtime that then shuts
    // down (as a test's or a worker's may): the units queued behind them,
    // from another runtime, must not wait forever.
    let db = TestDb::create().await;
    let (pool, _) = counting_pool(&db, 1).await;
    let store = EventStore::new(pool.clone());
    // Cached, so that their next appends need no read.
    for i in 0..4 {
        append(&store, &format!("doomed{i}"), 1).await;
    }
    for i in 0..2 {
        append(&store, &format!("survivor{i}"), 2).await;
    }
    let held = pool.acquire().await.unwrap();

    let (busy_tx, busy) = std::sync::mpsc::channel::<()>();
    let (end, end_rx) = std::sync::mpsc::channel::<()>();
    let doomed = std::thread::spawn({
        let store = store.clone();
        move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                // One at a time, so that each takes a writer of its own,
                // which waits for the connection the test holds.
                for i in 0..4 {
                    let submitter = store.clone();
                    tokio::spawn(async move { append(&submitter, &format!("doomed{i}"), 1).await });
                    // Submitted (this runtime has one thread: a task runs
                    // to its first wait, so a pending append is queued),
                    // then taken by the writer it started.
                    let taken = async {
                        while store.appends_pending() <= i || store.appends_waiting() > 0 {
                            tokio::task::yield_now().await;
                        }
                    };
                    tokio::time::timeout(Duration::from_secs(30), taken)
                        .await
                        .expect("each append taken by a writer of its own");
                }
                busy_tx.send(()).unwrap();
                let _ = tokio::task::spawn_blocking(move || end_rx.recv()).await;
            });
            // The runtime goes, and its writers with it.
        }
    });
    busy.recv().unwrap();
    // Queued while the four slots are busy.
    let survivors: Vec<_> = (0..2)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { append(&store, &format!("survivor{i}"), 2).await })
        })
        .collect();
    let store_ref = &store;
    eventually("both queued", Duration::from_secs(30), || async move {
        (store_ref.appends_waiting() == 2).then_some(())
    })
    .await;
    end.send(()).unwrap();
    doomed.join().unwrap();
    drop(held);
    for t in survivors {
        tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("a queued append waits for a writer that is gone")
            .unwrap();
    }
    let streams = streams(&db.pool).await;
    for i in 0..2 {
        let id = format!("survivor{i}");
        assert_whole(&id, &streams[&id], 4);
    }
    assert_eq!(store.appends_waiting(), 0);
}
