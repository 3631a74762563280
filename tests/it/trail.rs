//! The audit trail over GraphQL: a ticket as it stood at a moment (a time
//! or a position), its chain, masking for auditors without `auditor_pii`,
//! the roles that may read it, every query recorded as an event, and the
//! same answer from `casebook replay ticket --as-of`.

use std::time::Duration;

use casebook::app::Role;
use casebook_api::auth::Role as TokenRole;
use casebook_api::users::{self, Permission};
use casebook_api::TokenKeys;
use casebook_commands::EventStore;
use casebook_domain::{Actor, EventMetadata, Ticket, TicketCommand};
use chrono::Utc;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::audit::{assert_succeeded, casebook};
use crate::common::{form, TestApp, JWT_SECRET};

pub async fn token(app: &TestApp, role: TokenRole, sub: &str) -> String {
    users::issue_token(
        app.pool(),
        &TokenKeys::new(JWT_SECRET),
        role,
        sub,
        None,
        3600,
    )
    .await
    .unwrap()
    .token
}

pub async fn gql(app: &TestApp, token: &str, query: &str, variables: Value) -> Value {
    let response = app
        .http
        .post(app.url("/graphql"))
        .bearer_auth(token)
        .json(&json!({"query": query, "variables": variables}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

pub const TRAIL: &str = "query($id: ID!, $asOf: DateTime, $pos: Int) {
    auditTrail(ticketId: $id, asOf: $asOf, asOfPosition: $pos) {
        events { position sequence eventType eventVersion occurredAt actor { kind id } payload hash }
        state chainValid masked
    }
}";

pub async fn ticket_command(app: &TestApp, ticket: &str, command: TicketCommand) {
    EventStore::new(app.pool().clone())
        .execute::<Ticket>(
            ticket,
            command,
            &EventMetadata::new("trail-test", Actor::system("test")),
        )
        .await
        .unwrap();
}

async fn views(app: &TestApp, ticket: &str) -> Vec<Value> {
    sqlx::query_scalar(
        "SELECT payload FROM events WHERE aggregate_type = 'audit_trail' AND aggregate_id = $1 ORDER BY sequence",
    )
    .bind(ticket)
    .fetch_all(app.pool())
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auditor_sees_a_ticket_as_it_stood_between_two_events_masked_and_recorded() {
    let app = TestApp::spawn_with(&[Role::Api], &[]).await;
    let body: Value = app
        .submit_form(form(
            "ada@example.com",
            "Please call me on +44 7700 900123 or write to ada@example.com",
        ))
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
    tokio::time::sleep(Duration::from_millis(30)).await;
    let between = Utc::now();
    let between_position: i64 = sqlx::query_scalar(
        "SELECT max(position) FROM events WHERE aggregate_type = 'ticket' AND aggregate_id = $1",
    )
    .bind(&ticket)
    .fetch_one(app.pool())
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    ticket_command(
        &app,
        &ticket,
        TicketCommand::Resolve {
            resolved_by: "grace".into(),
            resolution: Some("answered".into()),
            at: Utc::now(),
        },
    )
    .await;

    let auditor = token(&app, TokenRole::Auditor, "ida").await;
    let supervisor = token(&app, TokenRole::Supervisor, "sam").await;
    let vars =
        |as_of: Option<String>, pos: Option<i64>| json!({"id": ticket, "asOf": as_of, "pos": pos});

    // As of a moment between the assignment and the resolution: the
    // earlier state, the events up to then, an intact chain, masked.
    let then = gql(
        &app,
        &auditor,
        TRAIL,
        vars(Some(between.to_rfc3339()), None),
    )
    .await;
    assert!(then.get("errors").is_none(), "{then}");
    let trail = &then["data"]["auditTrail"];
    let events = trail["events"].as_array().unwrap();
    let types: Vec<&str> = events
        .iter()
        .map(|e| e["eventType"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        ["TicketOpened", "CustomerMessageReceived", "TicketAssigned"]
    );
    assert_eq!(trail["state"]["status"], "in_progress");
    assert_eq!(trail["state"]["assignee"], "grace");
    assert_eq!(trail["state"]["handler"], "human");
    assert_eq!(trail["chainValid"], true);
    assert_eq!(trail["masked"], true);
    assert_eq!(events[2]["actor"]["kind"], "SYSTEM");
    assert_eq!(events[0]["hash"].as_str().unwrap().len(), 64);
    let shown = trail.to_string();
    assert!(!shown.contains("ada@example.com"), "{shown}");
    assert!(!shown.contains("900123"), "{shown}");
    assert!(shown.contains("a***@example.com"), "{shown}");

    // The same moment as a position.
    let by_position = gql(&app, &auditor, TRAIL, vars(None, Some(between_position))).await;
    assert_eq!(by_position["data"]["auditTrail"]["events"], trail["events"]);
    assert_eq!(by_position["data"]["auditTrail"]["state"], trail["state"]);

    // Now: resolved.
    let now = gql(&app, &auditor, TRAIL, vars(None, None)).await;
    assert_eq!(now["data"]["auditTrail"]["state"]["status"], "resolved");
    assert_eq!(
        now["data"]["auditTrail"]["events"]
            .as_array()
            .unwrap()
            .len(),
        4
    );

    // A supervisor sees identifiers, and the CLI gives the same answer.
    let unmasked = gql(
        &app,
        &supervisor,
        TRAIL,
        vars(Some(between.to_rfc3339()), None),
    )
    .await;
    let unmasked = &unmasked["data"]["auditTrail"];
    assert_eq!(unmasked["masked"], false);
    assert!(unmasked["state"]["messages"][0]["body"]
        .as_str()
        .unwrap()
        .contains("ada@example.com"));
    let out = casebook(
        &app,
        &[
            "replay",
            "ticket",
            &ticket,
            "--as-of",
            &between.to_rfc3339(),
            "--json",
        ],
    );
    assert_succeeded(&out);
    let cli: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cli["state"], unmasked["state"]);
    assert_eq!(cli["chain_valid"], true);
    let cli_hashes: Vec<&Value> = cli["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["hash"])
        .collect();
    let gql_hashes: Vec<&Value> = unmasked["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["hash"])
        .collect();
    assert_eq!(cli_hashes, gql_hashes);
    let cli_position = casebook(
        &app,
        &[
            "replay",
            "ticket",
            &ticket,
            "--as-of-position",
            &between_position.to_string(),
            "--json",
        ],
    );
    let cli_position: Value = serde_json::from_slice(&cli_position.stdout).unwrap();
    assert_eq!(cli_position["state"], unmasked["state"]);

    // An auditor granted auditor_pii sees them too, from the next request.
    users::set_permission(app.pool(), "ida", Permission::AuditorPii, true)
        .await
        .unwrap();
    let granted = gql(
        &app,
        &auditor,
        TRAIL,
        vars(Some(between.to_rfc3339()), None),
    )
    .await;
    assert_eq!(granted["data"]["auditTrail"]["masked"], false);
    assert_eq!(granted["data"]["auditTrail"]["state"], unmasked["state"]);

    // Every query was recorded, with who looked and how.
    let recorded = views(&app, &ticket).await;
    assert_eq!(recorded.len(), 5, "{recorded:?}");
    assert_eq!(recorded[0]["viewer"], "ida");
    assert_eq!(recorded[0]["role"], "auditor");
    assert_eq!(recorded[0]["pii_unmasked"], false);
    assert_eq!(recorded[0]["events_shown"], 3);
    assert_eq!(recorded[1]["as_of_position"], between_position);
    assert_eq!(recorded[3]["viewer"], "sam");
    assert_eq!(recorded[4]["pii_unmasked"], true);
    let actor: String = sqlx::query_scalar(
        "SELECT metadata->>'actor_id' FROM events WHERE aggregate_type = 'audit_trail' AND aggregate_id = $1 AND sequence = 1",
    )
    .bind(&ticket)
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(actor, "ida");

    // An altered event shows as a broken chain.
    let mut tx = app.pool().begin().await.unwrap();
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("UPDATE events SET payload = jsonb_set(payload, '{agent_id}', '\"mallory\"') WHERE aggregate_id = $1 AND event_type = 'TicketAssigned'")
        .bind(&ticket)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let tampered = gql(&app, &supervisor, TRAIL, vars(None, None)).await;
    assert_eq!(tampered["data"]["auditTrail"]["chainValid"], false);
    assert_eq!(
        tampered["data"]["auditTrail"]["state"]["assignee"],
        "mallory"
    );
    let before_tamper = gql(
        &app,
        &supervisor,
        TRAIL,
        vars(None, Some(between_position - 1)),
    )
    .await;
    assert_eq!(before_tamper["data"]["auditTrail"]["chainValid"], true);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_auditors_and_supervisors_read_trails_and_a_missing_ticket_is_null() {
    let app = TestApp::spawn_with(&[Role::Api], &[]).await;
    let body: Value = app
        .submit_form(form("bob@example.com", "hello"))
        .await
        .json()
        .await
        .unwrap();
    let ticket = body["ticket_id"].as_str().unwrap().to_string();
    let customer: Uuid = sqlx::query_scalar(
        "SELECT (payload->>'customer_id')::uuid FROM events WHERE aggregate_id = $1 AND sequence = 1",
    )
    .bind(&ticket)
    .fetch_one(app.pool())
    .await
    .unwrap();
    let customer_token = users::issue_token(
        app.pool(),
        &TokenKeys::new(JWT_SECRET),
        TokenRole::Customer,
        "bob",
        Some(customer),
        3600,
    )
    .await
    .unwrap()
    .token;
    for t in [
        token(&app, TokenRole::Agent, "ann").await,
        token(&app, TokenRole::Analyst, "al").await,
        customer_token,
    ] {
        let refused = gql(&app, &t, TRAIL, json!({"id": ticket})).await;
        assert_eq!(
            refused["errors"][0]["extensions"]["code"], "FORBIDDEN",
            "{refused}"
        );
        assert_eq!(refused["data"]["auditTrail"], Value::Null);
    }
    assert!(
        views(&app, &ticket).await.is_empty(),
        "refused queries record nothing"
    );

    let auditor = token(&app, TokenRole::Auditor, "ida").await;
    let bad = gql(&app, &auditor, TRAIL, json!({"id": "not-a-uuid"})).await;
    assert_eq!(bad["errors"][0]["extensions"]["code"], "BAD_USER_INPUT");
    let negative = gql(&app, &auditor, TRAIL, json!({"id": ticket, "pos": -1})).await;
    assert_eq!(
        negative["errors"][0]["extensions"]["code"],
        "BAD_USER_INPUT"
    );

    let missing = Uuid::new_v4().to_string();
    let none = gql(&app, &auditor, TRAIL, json!({"id": missing})).await;
    assert!(none.get("errors").is_none(), "{none}");
    assert_eq!(none["data"]["auditTrail"], Value::Null);
    // Before the ticket's first event: nothing to show either.
    let before = gql(&app, &auditor, TRAIL, json!({"id": ticket, "pos": 0})).await;
    assert_eq!(before["data"]["auditTrail"], Value::Null);
    // Looking is recorded even when there was nothing to see.
    assert_eq!(views(&app, &missing).await.len(), 1);
    assert_eq!(views(&app, &ticket).await[0]["events_shown"], 0);
    app.stop().await;
}
