//! Tamper evidence, replay as of a moment, and rebuilding read models.

use std::process::Command;
use std::time::Duration;

use casebook::app::Role;
use casebook_commands::EventStore;
use casebook_domain::{Actor, EventMetadata, Ticket, TicketCommand};
use serde_json::Value;
use uuid::Uuid;

use crate::common::{eventually, form, TestApp};

pub fn casebook(app: &TestApp, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_casebook"))
        .args(args)
        .env("DATABASE_URL", &app.config.database_url)
        .env("KAFKA_BROKERS", &app.config.kafka_brokers)
        .env("KAFKA_TOPIC_PREFIX", &app.config.topic_prefix)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the casebook binary runs")
}

/// Fails the test, with the command's stderr, unless it exited 0.
pub fn assert_succeeded(out: &std::process::Output) {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_passes_on_an_intact_store_and_names_the_first_altered_event() {
    let app = TestApp::spawn_with(&[Role::Api], &[]).await;
    for i in 0..3 {
        app.submit_form(form(&format!("user{i}@example.com"), "hello"))
            .await;
    }
    let report = casebook_replay::verify_chains(app.pool()).await.unwrap();
    assert!(report.first_break.is_none());
    assert_eq!(
        report.events,
        app.count("SELECT count(*) FROM events").await as u64
    );
    let ok = casebook(&app, &["audit", "verify"]);
    assert_succeeded(&ok);
    assert!(String::from_utf8_lossy(&ok.stdout).starts_with("intact"));

    // Updates are refused outright...
    let refused = sqlx::query(
        "UPDATE events SET payload = '{}' WHERE event_type = 'CustomerMessageReceived'",
    )
    .execute(app.pool())
    .await;
    assert!(refused.unwrap_err().to_string().contains("immutable"));

    // ...so a tamperer must go around the trigger; the chain still tells.
    let (ticket, sequence): (String, i64) = sqlx::query_as(
        "SELECT aggregate_id, sequence FROM events WHERE event_type = 'CustomerMessageReceived' ORDER BY position LIMIT 1",
    )
    .fetch_one(app.pool())
    .await
    .unwrap();
    let mut tx = app.pool().begin().await.unwrap();
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("UPDATE events SET payload = jsonb_set(payload, '{body}', '\"nothing happened\"') WHERE aggregate_id = $1 AND sequence = $2")
        .bind(&ticket)
        .bind(sequence)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let report = casebook_replay::verify_chains(app.pool()).await.unwrap();
    let broken = report.first_break.expect("the altered event is found");
    assert_eq!(
        (broken.aggregate_type.as_str(), broken.aggregate_id.as_str()),
        ("ticket", ticket.as_str())
    );
    assert_eq!(broken.at.sequence, sequence);
    let failed = casebook(&app, &["audit", "verify"]);
    assert_eq!(failed.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(
        stderr.contains(&format!("ticket/{ticket}"))
            && stderr.contains(&format!("sequence {sequence}")),
        "{stderr}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_replays_as_it_stood_at_a_moment() {
    let app = TestApp::spawn_with(&[Role::Api], &[]).await;
    let body: Value = app
        .submit_form(form("ada@example.com", "first"))
        .await
        .json()
        .await
        .unwrap();
    let ticket_id = body["ticket_id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before_resolution = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    EventStore::new(app.pool().clone())
        .execute::<Ticket>(
            &ticket_id,
            TicketCommand::Resolve {
                resolved_by: "agent:grace".into(),
                resolution: Some("answered".into()),
                at: chrono::Utc::now(),
            },
            &EventMetadata::new("audit-test", Actor::system("test")),
        )
        .await
        .unwrap();

    let then = casebook_replay::ticket_as_of(app.pool(), &ticket_id, Some(before_resolution))
        .await
        .unwrap();
    assert_eq!(then.events.len(), 2);
    assert_eq!(then.state.status.as_str(), "received");
    let now = casebook_replay::ticket_as_of(app.pool(), &ticket_id, None)
        .await
        .unwrap();
    assert_eq!(now.events.last().unwrap().event_type, "TicketResolved");
    assert_eq!(now.state.status.as_str(), "resolved");

    let as_of = before_resolution.to_rfc3339();
    let out = casebook(
        &app,
        &["replay", "ticket", &ticket_id, "--as-of", &as_of, "--json"],
    );
    assert_succeeded(&out);
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["state"]["status"], "received");
    assert_eq!(json["events"].as_array().unwrap().len(), 2);

    let missing = casebook(&app, &["replay", "ticket", &Uuid::new_v4().to_string()]);
    assert_eq!(missing.status.code(), Some(1));
    let usage = casebook(&app, &["replay", "ticket", "not-a-uuid"]);
    assert_eq!(usage.status.code(), Some(2));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuilt_read_models_equal_the_live_ones() {
    let app = TestApp::spawn().await;
    for i in 0..4 {
        app.submit_form(form(&format!("r{i}@example.com"), "rebuild me"))
            .await;
    }
    let pool = app.pool().clone();
    eventually("four projected messages", Duration::from_secs(60), || {
        let pool = pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_messages")
                .fetch_one(&pool)
                .await
                .unwrap();
            let t: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_customers")
                .fetch_one(&pool)
                .await
                .unwrap();
            // Each read model has its own projector: wait for all of them.
            let k: i64 = sqlx::query_scalar(
                "SELECT (SELECT count(*) FROM crm_tickets) + (SELECT count(*) FROM crm_customers)
                        + (SELECT count(*) FROM crm_conversations)",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            (n == 4 && t == 4 && k == 12).then_some(())
        }
    })
    .await;
    let snapshot = "SELECT (SELECT jsonb_agg(t ORDER BY ticket_id) FROM (SELECT ticket_id, status, messages_count, sla_due_at FROM crm_tickets) t)::text
                 || (SELECT jsonb_agg(c ORDER BY customer_id) FROM crm_customers c)::text
                 || (SELECT jsonb_agg(m ORDER BY message_id) FROM crm_messages m)::text
                 || (SELECT jsonb_agg(v ORDER BY ticket_id) FROM crm_conversations v)::text";
    let before: String = sqlx::query_scalar(snapshot)
        .fetch_one(app.pool())
        .await
        .unwrap();
    let out = casebook(&app, &["replay", "projections"]);
    assert_succeeded(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("crm-tickets"));
    let after: String = sqlx::query_scalar(snapshot)
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(before, after);
    let bad = casebook(&app, &["replay", "projections", "--only", "nope"]);
    assert_eq!(bad.status.code(), Some(1));
    app.stop().await;
}

/// The signing key the anchored tests use (a fixed seed: tests only).
const TEST_SIGNING_KEY: &str = "1111111111111111111111111111111111111111111111111111111111111111";

fn test_public_key() -> String {
    let key = casebook_domain::checkpoint::signing_key_from_hex(TEST_SIGNING_KEY).unwrap();
    hex::encode(key.verifying_key().as_bytes())
}

fn casebook_keyed(app: &TestApp, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_casebook"))
        .args(args)
        .env("DATABASE_URL", &app.config.database_url)
        .env("KAFKA_BROKERS", &app.config.kafka_brokers)
        .env("KAFKA_TOPIC_PREFIX", &app.config.topic_prefix)
        .env("CASEBOOK_AUDIT_SIGNING_KEY", TEST_SIGNING_KEY)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the casebook binary runs")
}

/// Takes checkpoints until one covers every stored event (a checkpoint
/// covers transactions below the cluster's xmin, which other tests' open
/// transactions may hold back for a moment).
async fn checkpoint_everything(app: &TestApp) {
    let total = app.count("SELECT count(*) FROM events").await;
    let app_ref = app;
    eventually(
        "a checkpoint over every event",
        Duration::from_secs(60),
        || async move {
            let out = casebook_keyed(app_ref, &["audit", "checkpoint"]);
            assert_succeeded(&out);
            let size = app_ref
                .count("SELECT coalesce(max(size), 0) FROM audit_checkpoints")
                .await;
            (size == total).then_some(())
        },
    )
    .await;
}

/// Three customers write in: streams of every kind, then a checkpoint over
/// all of it, which verifies.
async fn anchored_app() -> TestApp {
    let app = TestApp::spawn_with(&[Role::Api], &[]).await;
    for i in 0..3 {
        app.submit_form(form(
            &format!("anchor{i}@example.com"),
            &format!("hello {i}"),
        ))
        .await;
    }
    checkpoint_everything(&app).await;
    let ok = casebook_keyed(&app, &["audit", "verify"]);
    assert_succeeded(&ok);
    let stdout = String::from_utf8_lossy(&ok.stdout);
    // Other tests' open transactions may hold a checkpoint back, so there
    // may be more than one; verify must count every one of them.
    let taken = app.count("SELECT count(*) FROM audit_checkpoints").await;
    assert!(taken >= 1);
    assert!(
        stdout.starts_with("intact") && stdout.contains(&format!("{taken} checkpoints")),
        "{stdout} ({taken} checkpoints stored)"
    );
    app
}

/// Runs `sql` as the superuser with the triggers off (what a tamperer with
/// database access does), then expects `audit verify` to fail naming one of
/// `expected`.
async fn tamper_and_expect(app: &TestApp, sql: &[&str], expected: &[&str]) {
    let mut tx = app.pool().begin().await.unwrap();
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .unwrap();
    for statement in sql {
        sqlx::query(statement).execute(&mut *tx).await.unwrap();
    }
    tx.commit().await.unwrap();
    let failed = casebook_keyed(app, &["audit", "verify"]);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "{stderr}");
    assert!(expected.iter().any(|e| stderr.contains(e)), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_payload_byte_is_caught() {
    let app = anchored_app().await;
    let (ticket, sequence): (String, i64) = sqlx::query_as(
        "SELECT aggregate_id, sequence FROM events WHERE event_type = 'CustomerMessageReceived' ORDER BY position DESC LIMIT 1",
    )
    .fetch_one(app.pool())
    .await
    .unwrap();
    // One character of the body: "hello 2" becomes "hello 3".
    tamper_and_expect(
        &app,
        &[&format!(
            "UPDATE events SET payload = jsonb_set(payload, '{{body}}', to_jsonb(replace(payload->>'body', 'hello 2', 'hello 3')))
              WHERE aggregate_type = 'ticket' AND aggregate_id = '{ticket}' AND sequence = {sequence}"
        )],
        &[&format!("stream ticket/{ticket} at sequence {sequence}")],
    )
    .await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_stream_tail_is_caught() {
    let app = anchored_app().await;
    tamper_and_expect(
        &app,
        &["DELETE FROM events e WHERE e.aggregate_type = 'ticket'
             AND e.aggregate_id = (SELECT aggregate_id FROM events WHERE aggregate_type = 'ticket' ORDER BY position LIMIT 1)
             AND e.sequence = (SELECT max(sequence) FROM events x WHERE x.aggregate_type = 'ticket' AND x.aggregate_id = e.aggregate_id)"],
        &["commits to", "do not give its Merkle root"],
    )
    .await;
    // Every remaining chain still holds: only the anchor sees it.
    let chains = casebook_replay::verify_chains(app.pool()).await.unwrap();
    assert!(chains.failure.is_none(), "{:?}", chains.failure);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_stream_is_caught() {
    let app = anchored_app().await;
    tamper_and_expect(
        &app,
        &["DELETE FROM events WHERE aggregate_type = 'ticket'
             AND aggregate_id = (SELECT aggregate_id FROM events WHERE aggregate_type = 'ticket' ORDER BY position LIMIT 1)"],
        &["commits to", "do not give its Merkle root"],
    )
    .await;
    // Every remaining chain still holds: only the anchor sees it.
    let chains = casebook_replay::verify_chains(app.pool()).await.unwrap();
    assert!(chains.failure.is_none(), "{:?}", chains.failure);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_swapped_positions_are_caught() {
    let app = anchored_app().await;
    // The first events of two different streams trade positions (an
    // identity column cannot be updated: out and back in, swapped).
    tamper_and_expect(
        &app,
        &[
            "CREATE TEMP TABLE swapped AS
               SELECT * FROM events WHERE position IN (
                 (SELECT min(position) FROM events WHERE aggregate_type = 'ticket'),
                 (SELECT min(position) FROM events WHERE aggregate_type = 'customer'))",
            "DELETE FROM events WHERE position IN (SELECT position FROM swapped)",
            "INSERT INTO events OVERRIDING SYSTEM VALUE
               SELECT (SELECT max(position) FROM swapped) + (SELECT min(position) FROM swapped) - s.position,
                      s.transaction_id, s.event_id, s.aggregate_type, s.aggregate_id, s.sequence, s.event_type,
                      s.event_version, s.payload, s.metadata, s.occurred_at, s.hash
                 FROM swapped s",
        ],
        // In log order the moved event either breaks its stream's order or
        // changes its leaf; either way it is named.
        &["do not give its Merkle root", "hash chain broken"],
    )
    .await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_are_signed_published_and_prove_inclusion_offline() {
    let app = anchored_app().await;
    // One more customer writes in after the first checkpoint: a second
    // one covers it, and both must be published.
    app.submit_form(form("anchor3@example.com", "hello 3"))
        .await;
    checkpoint_everything(&app).await;
    let taken = app.count("SELECT count(*) FROM audit_checkpoints").await;
    assert!(taken >= 2);

    // The checkpoints went out on the audit topic, keyed `checkpoint`.
    let topic = format!("{}.audit", app.config.topic_prefix);
    let brokers = app.config.kafka_brokers.clone();
    let published = tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::Message;
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", format!("audit-reader-{}", Uuid::new_v4()))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("log_level", "3")
            .create()
            .unwrap();
        consumer.subscribe(&[&topic]).unwrap();
        // Every checkpoint taken is published, in order; the last covers
        // every event.
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline && (seen.len() as i64) < taken {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(500)) {
                let key = m.key().map(|k| String::from_utf8_lossy(k).to_string());
                let payload: Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
                seen.push((key, payload));
            }
        }
        seen
    })
    .await
    .unwrap();
    assert_eq!(
        published.len() as i64,
        taken,
        "every checkpoint is published"
    );
    for (key, payload) in &published {
        assert_eq!(key.as_deref(), Some("checkpoint"));
        assert_eq!(payload["public_key"], test_public_key());
    }
    let total = app.count("SELECT count(*) FROM events").await;
    assert_eq!(published.last().unwrap().1["size"], total);

    // A proof of the second customer message, checked with no database.
    let event_id: Uuid = sqlx::query_scalar(
        "SELECT event_id FROM events WHERE event_type = 'CustomerMessageReceived' ORDER BY position OFFSET 1 LIMIT 1",
    )
    .fetch_one(app.pool())
    .await
    .unwrap();
    let out = casebook_keyed(&app, &["audit", "prove", &event_id.to_string()]);
    assert_succeeded(&out);
    let dir = std::env::temp_dir().join(format!("casebook-proof-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("proof.json");
    std::fs::write(&file, &out.stdout).unwrap();
    let offline = |file: &std::path::Path, key: &str| {
        Command::new(env!("CARGO_BIN_EXE_casebook"))
            .args(["audit", "verify-proof"])
            .arg(file)
            .args(["--public-key", key])
            // Nothing to connect to: the check must not need one.
            .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
            .env("KAFKA_BROKERS", "127.0.0.1:1")
            .env_remove("CASEBOOK_AUDIT_SIGNING_KEY")
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let ok = offline(&file, &test_public_key());
    assert_succeeded(&ok);
    assert!(String::from_utf8_lossy(&ok.stdout).starts_with("included"));

    // Another key, or an edited event, is refused.
    let other = casebook_domain::checkpoint::signing_key_from_hex(&"22".repeat(32)).unwrap();
    let refused = offline(&file, &hex::encode(other.verifying_key().as_bytes()));
    assert_eq!(refused.status.code(), Some(1));
    let mut proof: Value = serde_json::from_slice(&out.stdout).unwrap();
    let payload = proof["content"]["payload"]
        .as_str()
        .unwrap()
        .replace("hello", "hullo");
    proof["content"]["payload"] = payload.into();
    let edited = dir.join("edited.json");
    std::fs::write(&edited, serde_json::to_vec(&proof).unwrap()).unwrap();
    let refused = offline(&edited, &test_public_key());
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("content"));
    std::fs::remove_dir_all(&dir).unwrap();
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_prints_json_as_postgres_does() {
    let app = TestApp::spawn_with(&[Role::Api], &[]).await;
    let values = [
        serde_json::json!({"zz": [1, 2.5, null, true, false], "a": "x\"\\\n\u{1}é\u{7f}/", "bb": {"k": 1e16, "j": 1.5e-7, "i": -0.0, "h": 1.0}, "ab": -3}),
        serde_json::json!({"": "", "aa": {"b": [], "a": {}}, "a": 0.1, "ä": 1.7976931348623157e308, "u": u64::MAX, "i": i64::MIN}),
        serde_json::json!([123456789.123, -0.000001, 5e-324, "\t\r\u{c}\u{8}\u{1f}"]),
    ];
    for v in values {
        let printed: String = sqlx::query_scalar("SELECT $1::jsonb::text")
            .bind(&v)
            .fetch_one(app.pool())
            .await
            .unwrap();
        assert_eq!(casebook_domain::audit::jsonb_text(&v), printed);
    }
    // And the hashes the writer stored recompute from what Postgres prints.
    app.submit_form(form(
        "quote@example.com",
        "a \"quoted\" line\nand ünïcode ✓",
    ))
    .await;
    let report = casebook_replay::verify_chains(app.pool()).await.unwrap();
    assert!(report.failure.is_none(), "{:?}", report.failure);
    assert!(report.events > 0);
    app.stop().await;
}
