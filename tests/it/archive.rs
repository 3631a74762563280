//! Retention: a year after resolution a ticket goes to the archive and
//! leaves the hot tables; the log stays verifiable; a hold keeps a ticket;
//! an investigation brings one back, checked against the manifest.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use casebook::app::Role;
use casebook_commands::EventStore;
use casebook_domain::{Actor, EventMetadata, Ticket, TicketCommand};
use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::audit::assert_succeeded;
use crate::common::{eventually, form, TestApp};

const KEY: &str = "3333333333333333333333333333333333333333333333333333333333333333";

fn casebook(app: &TestApp, dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_casebook"))
        .args(args)
        .env("DATABASE_URL", &app.config.database_url)
        .env("KAFKA_BROKERS", &app.config.kafka_brokers)
        .env("KAFKA_TOPIC_PREFIX", &app.config.topic_prefix)
        .env("CASEBOOK_AUDIT_SIGNING_KEY", KEY)
        .env("CASEBOOK_ARCHIVE_DIR", dir)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the casebook binary runs")
}

fn ok(out: &std::process::Output) -> String {
    assert_succeeded(out);
    String::from_utf8_lossy(&out.stdout).to_string()
}

async fn ticket(app: &TestApp, email: &str) -> String {
    let body: Value = app
        .submit_form(form(email, "please keep this"))
        .await
        .json()
        .await
        .unwrap();
    body["ticket_id"].as_str().unwrap().to_string()
}

async fn resolve(app: &TestApp, id: &str, at: DateTime<Utc>) {
    EventStore::new(app.pool().clone())
        .execute::<Ticket>(
            id,
            TicketCommand::Resolve {
                resolved_by: "agent:grace".into(),
                resolution: Some("answered".into()),
                at,
            },
            &EventMetadata::new("archive-test", Actor::system("test")),
        )
        .await
        .unwrap();
}

async fn events_of(app: &TestApp, id: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_type = 'ticket' AND aggregate_id = $1",
    )
    .bind(id)
    .fetch_one(app.pool())
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_resolved_a_year_ago_is_archived_purged_verified_and_restored_while_held_and_open_ones_stay(
) {
    let app = TestApp::spawn_with(&[Role::Api], &[]).await;
    let dir = std::env::temp_dir().join(format!("casebook-archive-{}", uuid::Uuid::new_v4()));
    let as_of = Utc::now() + chrono::Duration::days(1);
    let long_ago = as_of - chrono::Duration::days(366);

    let old = ticket(&app, "old@example.com").await;
    let held = ticket(&app, "held@example.com").await;
    let open = ticket(&app, "open@example.com").await;
    let recent = ticket(&app, "recent@example.com").await;
    resolve(&app, &old, long_ago).await;
    resolve(&app, &held, long_ago).await;
    resolve(&app, &recent, as_of - chrono::Duration::days(364)).await;
    let old_events = events_of(&app, &old).await;
    assert!(old_events >= 2);
    ok(&casebook(&app, &dir, &["archive", "hold", &held]));

    // The pass archives only what its checkpoint covers; another test's
    // open transaction can hold that back for a moment.
    let as_of_text = as_of.to_rfc3339();
    let (app_ref, dir_ref, old_ref) = (&app, &dir, &old);
    let stdout = eventually("the old ticket archived", Duration::from_secs(60), || {
        let as_of_text = as_of_text.clone();
        async move {
            let out = ok(&casebook(
                app_ref,
                dir_ref,
                &["archive", "run", "--as-of", &as_of_text],
            ));
            (events_of(app_ref, old_ref).await == 0).then_some(out)
        }
    })
    .await;
    assert!(stdout.contains("archived 1 tickets"), "{stdout}");
    assert!(stdout.contains("1 on legal hold"), "{stdout}");

    // Held, open and recent tickets stay whole.
    for id in [&held, &open, &recent] {
        assert!(events_of(&app, id).await >= 1, "{id}");
    }
    // The purge kept every leaf, named its file, and recorded a tombstone.
    let (file, sha, purged): (String, String, i64) = sqlx::query_as(
        "SELECT archive_file, archive_sha256, count(*) FROM events_purged WHERE aggregate_id = $1 GROUP BY 1, 2",
    )
    .bind(&old)
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(purged, old_events);
    let bytes = std::fs::read(dir.join(&file)).unwrap();
    assert_eq!(
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes)),
        sha
    );
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["files"][&file]["sha256"], sha);
    assert!(manifest["files"][&file]["checkpoint"]["signature"].is_string());
    let tombstone: Value = sqlx::query_scalar(
        "SELECT payload FROM events WHERE aggregate_type = 'archive_file' AND aggregate_id = $1",
    )
    .bind(&file)
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(tombstone["type"], "TicketsPurged");
    assert_eq!(tombstone["sha256"], sha);
    assert_eq!(tombstone["tickets"][0], old.as_str());

    // The customer's link says gone.
    let response = reqwest::get(app.url(&format!("/ticket/{old}")))
        .await
        .unwrap();
    assert_eq!(response.status(), 410);
    assert_eq!(
        response.json::<Value>().await.unwrap()["status"],
        "archived"
    );
    let response = reqwest::get(app.url(&format!("/ticket/{open}")))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // Nothing else can delete: the sanctioned path only.
    let refused = sqlx::query("DELETE FROM events WHERE aggregate_id = $1")
        .bind(&open)
        .execute(app.pool())
        .await;
    assert!(refused.unwrap_err().to_string().contains("immutable"));

    // The log still verifies, purged range proven against the archive.
    let verified = ok(&casebook(&app, &dir, &["audit", "verify"]));
    assert!(
        verified.contains(&format!("{old_events} purged")),
        "{verified}"
    );

    // A changed archive is caught, by verify and by restore.
    let mut bad = bytes.clone();
    let last = bad.len() - 9;
    bad[last] ^= 0x01;
    std::fs::write(dir.join(&file), &bad).unwrap();
    let failed = casebook(&app, &dir, &["audit", "verify"]);
    assert_eq!(failed.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&failed.stderr).contains("SHA-256"));
    let refused = casebook(&app, &dir, &["archive", "restore", &old]);
    assert_eq!(refused.status.code(), Some(1));
    assert_eq!(events_of(&app, &old).await, 0);
    std::fs::write(dir.join(&file), &bytes).unwrap();

    // Restored for an investigation: the same events, the log still whole.
    let restored = ok(&casebook(&app, &dir, &["archive", "restore", &old]));
    assert!(
        restored.contains(&format!("{old_events} events restored")),
        "{restored}"
    );
    assert_eq!(events_of(&app, &old).await, old_events);
    ok(&casebook(&app, &dir, &["audit", "verify"]));
    let response = reqwest::get(app.url(&format!("/ticket/{old}")))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // A released hold lets the next pass take the held ticket.
    ok(&casebook(
        &app,
        &dir,
        &["archive", "hold", &held, "--release"],
    ));
    let (app_ref, dir_ref, held_ref) = (&app, &dir, &held);
    eventually(
        "the released ticket archived",
        Duration::from_secs(60),
        || {
            let as_of_text = as_of_text.clone();
            async move {
                ok(&casebook(
                    app_ref,
                    dir_ref,
                    &["archive", "run", "--as-of", &as_of_text],
                ));
                (events_of(app_ref, held_ref).await == 0).then_some(())
            }
        },
    )
    .await;
    ok(&casebook(&app, &dir, &["audit", "verify"]));
    std::fs::remove_dir_all(&dir).unwrap();
    app.stop().await;
}
