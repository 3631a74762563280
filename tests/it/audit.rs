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
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
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
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
