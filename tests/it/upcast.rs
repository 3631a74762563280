//! Event versions: a `TicketUnassigned` stored as version 1 (`agent_id`)
//! still replays after version 2 renamed the field (`previous_assignee`):
//! through the event store's load path, the live projector, a rebuild of
//! the read model and the audit trail.

use std::time::Duration;

use casebook::app::Role;
use casebook_api::auth::Role as TokenRole;
use casebook_commands::EventStore;
use casebook_domain::{Ticket, TicketCommand};
use chrono::{SecondsFormat, Utc};
use serde_json::{json, Value};

use crate::audit::{assert_succeeded, casebook};
use crate::common::{eventually, form, TestApp};
use crate::trail::{gql, ticket_command, token, TRAIL};

/// The read model's assignee of the ticket once the tickets projector has
/// applied the stream up to `sequence`.
async fn projected_assignee(app: &TestApp, ticket: &str, sequence: i64) -> Option<String> {
    let pool = app.pool().clone();
    let ticket = ticket.to_string();
    eventually(
        "the tickets projector at the sequence",
        Duration::from_secs(60),
        || {
            let pool = pool.clone();
            let ticket = ticket.clone();
            async move {
                let row: Option<(Option<String>,)> = sqlx::query_as(
                    "SELECT t.assigned_to FROM crm_tickets t
                       JOIN projector_streams p ON p.projector = 'crm-tickets' AND p.aggregate_type = 'ticket'
                        AND p.aggregate_id = t.ticket_id::text
                      WHERE t.ticket_id = $1::uuid AND p.last_sequence >= $2",
                )
                .bind(&ticket)
                .bind(sequence)
                .fetch_optional(&pool)
                .await
                .unwrap();
                row
            }
        },
    )
    .await
    .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_version_1_event_replays_after_its_payload_changed_shape() {
    let app = TestApp::spawn_with(&[Role::Api, Role::Relay, Role::Projector], &[]).await;
    let body: Value = app
        .submit_form(form("cy@example.com", "unassign me"))
        .await
        .json()
        .await
        .unwrap();
    let ticket = body["ticket_id"].as_str().unwrap().to_string();
    ticket_command(
        &app,
        &ticket,
        TicketCommand::Assign {
            agent_id: "grace".into(),
            assigned_by: "grace".into(),
            at: Utc::now(),
        },
    )
    .await;
    assert_eq!(
        projected_assignee(&app, &ticket, 3).await.as_deref(),
        Some("grace")
    );

    // What an older build stored: version 1, the holder in `agent_id`.
    let (sequence, metadata): (i64, Value) = sqlx::query_as(
        "SELECT sequence + 1, metadata FROM events WHERE aggregate_type = 'ticket' AND aggregate_id = $1
          ORDER BY sequence DESC LIMIT 1",
    )
    .bind(&ticket)
    .fetch_one(app.pool())
    .await
    .unwrap();
    let v1 = json!({
        "type": "TicketUnassigned",
        "agent_id": "grace",
        "unassigned_by": "sam",
        "unassigned_at": Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true),
    });
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, hash)
         VALUES ('ticket', $1, $2, 'TicketUnassigned', '1', $3, $4, NULL)",
    )
    .bind(&ticket)
    .bind(sequence)
    .bind(&v1)
    .bind(&metadata)
    .execute(app.pool())
    .await
    .unwrap();

    // The live projector (through the relay and Kafka) reads it.
    assert_eq!(projected_assignee(&app, &ticket, sequence).await, None);

    // A rebuild of the read model reads it.
    let out = casebook(&app, &["replay", "projections", "--only", "crm-tickets"]);
    assert_succeeded(&out);
    let (assignee, state_assignee): (Option<String>, Option<String>) = sqlx::query_as(
        "SELECT assigned_to, state->>'assigned_to' FROM crm_tickets WHERE ticket_id = $1::uuid",
    )
    .bind(&ticket)
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!((assignee, state_assignee), (None, None));

    // The audit trail reads it, and shows it as stored.
    let supervisor = token(&app, TokenRole::Supervisor, "sam").await;
    let trail = gql(&app, &supervisor, TRAIL, json!({"id": ticket})).await;
    assert!(trail.get("errors").is_none(), "{trail}");
    let trail = &trail["data"]["auditTrail"];
    assert_eq!(trail["state"]["assignee"], Value::Null);
    assert_eq!(trail["state"]["handler"], "human");
    assert_eq!(trail["chainValid"], true);
    let last = trail["events"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["eventType"], "TicketUnassigned");
    assert_eq!(last["eventVersion"], "1");
    assert_eq!(last["payload"]["agent_id"], "grace");

    // The store's load path reads it: the ticket is nobody's, and a command
    // on it is decided against that state and written as the new version.
    let store = EventStore::new(app.pool().clone());
    let loaded = store.load::<Ticket>(&ticket).await.unwrap();
    assert_eq!(loaded.aggregate.assigned_to, None);
    assert_eq!(loaded.version as i64, sequence);
    let refused = store
        .execute::<Ticket>(
            &ticket,
            TicketCommand::Unassign {
                unassigned_by: "sam".into(),
                at: Utc::now(),
            },
            &casebook_domain::EventMetadata::new("t", casebook_domain::Actor::system("test")),
        )
        .await;
    assert!(refused.is_err(), "nobody holds it any more");
    ticket_command(
        &app,
        &ticket,
        TicketCommand::Assign {
            agent_id: "ann".into(),
            assigned_by: "ann".into(),
            at: Utc::now(),
        },
    )
    .await;
    ticket_command(
        &app,
        &ticket,
        TicketCommand::Unassign {
            unassigned_by: "ann".into(),
            at: Utc::now(),
        },
    )
    .await;
    let (version, payload): (String, Value) = sqlx::query_as(
        "SELECT event_version, payload FROM events WHERE aggregate_id = $1 AND event_type = 'TicketUnassigned'
          ORDER BY sequence DESC LIMIT 1",
    )
    .bind(&ticket)
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(version, "2");
    assert_eq!(payload["previous_assignee"], "ann");
    assert_eq!(projected_assignee(&app, &ticket, sequence + 2).await, None);

    // A version no build wrote is refused, not guessed at.
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, hash)
         VALUES ('ticket', $1, $2, 'TicketUnassigned', '9', $3, $4, NULL)",
    )
    .bind(&ticket)
    .bind(sequence + 3)
    .bind(&v1)
    .bind(&metadata)
    .execute(app.pool())
    .await
    .unwrap();
    assert!(store.load::<Ticket>(&ticket).await.is_err());
    app.stop().await;
}
