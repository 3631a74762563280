//! Twilio's WhatsApp webhooks through HTTP.

use casebook::app::Role;
use casebook_commands::{EventStore, Intake};
use casebook_domain::ticket::DeliveryStatus;
use casebook_domain::{Actor, Channel, EventMetadata, Ticket, TicketCommand};
use serde_json::Value;
use uuid::Uuid;

use crate::common::TestApp;

const FROM: &str = "whatsapp:+14155550123";

fn message<'a>(sid: &'a str, body: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("MessageSid", sid),
        ("AccountSid", "AC00000000000000000000000000000000"),
        ("From", FROM),
        ("To", "whatsapp:+14155238886"),
        ("Body", body),
        ("ProfileName", "Ada"),
        ("NumMedia", "0"),
    ]
}

async fn ticket_of(app: &TestApp, sid: &str) -> Uuid {
    sqlx::query_scalar(
        "SELECT aggregate_id::uuid FROM events
          WHERE event_type = 'CustomerMessageReceived' AND payload->>'channel_message_id' = $1",
    )
    .bind(sid)
    .fetch_one(app.pool())
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_message_creates_customer_and_ticket() {
    let app = TestApp::spawn_with(&[Role::Api], &[]).await;
    let response = app
        .post_twilio(
            "/webhooks/whatsapp",
            &message("SM0001", "How do I reset my password?"),
            None,
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/xml");
    assert_eq!(response.text().await.unwrap(), "<Response/>");

    let identities: Vec<String> = sqlx::query_scalar(
        "SELECT jsonb_array_elements(payload->'identities')->>'kind' FROM events WHERE event_type = 'CustomerRegistered'",
    )
    .fetch_all(app.pool())
    .await
    .unwrap();
    assert_eq!(identities, vec!["whatsapp", "phone"]);
    let ticket = ticket_of(&app, "SM0001").await;
    let status: Value = app.get_json(&format!("/ticket/{ticket}")).await;
    assert_eq!(status["channel"], "whatsapp");
    assert_eq!(status["status"], "received");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_missing_signature_is_refused_and_nothing_is_stored() {
    let app = TestApp::spawn_with(&[Role::Api], &[]).await;
    let params = message("SM0002", "hello");
    let response = app
        .post_twilio(
            "/webhooks/whatsapp",
            &params,
            Some("AAAAAAAAAAAAAAAAAAAAAAAAAAA=".into()),
        )
        .await;
    assert_eq!(response.status(), 403);
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"],
        "forbidden"
    );

    let owned: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let response = app
        .http
        .post(app.url("/webhooks/whatsapp"))
        .form(&owned)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);

    // Signed for another URL (the signature covers the URL Twilio called).
    let elsewhere = crate::common::twilio_signature(
        crate::common::TWILIO_TOKEN,
        "https://evil.test/webhooks/whatsapp",
        &owned,
    );
    let response = app
        .post_twilio("/webhooks/whatsapp", &params, Some(elsewhere))
        .await;
    assert_eq!(response.status(), 403);
    assert_eq!(app.count("SELECT count(*) FROM events").await, 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_message_sid_twice_is_one_message() {
    let app = TestApp::spawn_with(&[Role::Api], &[]).await;
    for _ in 0..2 {
        let response = app
            .post_twilio("/webhooks/whatsapp", &message("SM0003", "hello"), None)
            .await;
        assert_eq!(response.status(), 200);
    }
    assert_eq!(
        app.count("SELECT count(*) FROM events WHERE event_type = 'CustomerMessageReceived'")
            .await,
        1
    );
    assert_eq!(
        app.count("SELECT count(*) FROM events WHERE event_type = 'TicketOpened'")
            .await,
        1
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_from_a_number_continue_its_open_ticket() {
    let app = TestApp::spawn_with(&[Role::Api], &[]).await;
    app.post_twilio("/webhooks/whatsapp", &message("SM0010", "first"), None)
        .await;
    app.post_twilio("/webhooks/whatsapp", &message("SM0011", "second"), None)
        .await;
    let first = ticket_of(&app, "SM0010").await;
    assert_eq!(first, ticket_of(&app, "SM0011").await);

    // Once resolved, the next message reopens it; once closed, the next
    // message starts a new ticket for the same customer, linked to it.
    let store = EventStore::new(app.pool().clone());
    let meta = EventMetadata::new("test", Actor::system("test"));
    store
        .execute::<Ticket>(
            &first.to_string(),
            TicketCommand::Resolve {
                resolved_by: "agent:grace".into(),
                resolution: None,
                at: chrono::Utc::now(),
            },
            &meta,
        )
        .await
        .unwrap();
    app.post_twilio("/webhooks/whatsapp", &message("SM0013", "again"), None)
        .await;
    assert_eq!(first, ticket_of(&app, "SM0013").await);
    store
        .execute::<Ticket>(
            &first.to_string(),
            TicketCommand::Close {
                closed_by: "agent:grace".into(),
                at: chrono::Utc::now(),
            },
            &meta,
        )
        .await
        .unwrap();
    app.post_twilio("/webhooks/whatsapp", &message("SM0012", "third"), None)
        .await;
    let third = ticket_of(&app, "SM0012").await;
    assert_ne!(first, third);
    let previous: Option<String> = sqlx::query_scalar(
        "SELECT payload->>'previous_ticket_id' FROM events WHERE event_type = 'TicketOpened' AND aggregate_id = $1",
    )
    .bind(third.to_string())
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(previous, Some(first.to_string()));
    assert_eq!(
        app.count("SELECT count(*) FROM events WHERE event_type = 'CustomerRegistered'")
            .await,
        1
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_refused_by_field() {
    let app = TestApp::spawn_with(&[Role::Api], &[]).await;
    let params = vec![
        ("MessageSid", "SM0020"),
        ("From", "+14155550123"),
        ("Body", ""),
    ];
    let response = app.post_twilio("/webhooks/whatsapp", &params, None).await;
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert!(body["fields"]["From"].is_string(), "{body}");
    assert!(body["fields"]["Body"].is_string(), "{body}");
    assert_eq!(app.count("SELECT count(*) FROM events").await, 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_callbacks_become_delivery_events() {
    let app = TestApp::spawn_with(&[Role::Api], &[]).await;
    app.post_twilio("/webhooks/whatsapp", &message("SM0030", "hi"), None)
        .await;
    let ticket = ticket_of(&app, "SM0030").await;

    // A reply the delivery worker handed to Twilio as SMout30.
    let store = EventStore::new(app.pool().clone());
    let meta = EventMetadata::new("test", Actor::system("delivery"));
    let response_id = Uuid::new_v4();
    store
        .execute::<Ticket>(
            &ticket.to_string(),
            TicketCommand::SendResponse {
                response_id,
                draft_id: None,
                channel: Channel::Whatsapp,
                body: "Settings > Security > Reset.".into(),
                parts: vec!["Settings > Security > Reset.".into()],
                in_reply_to: None,
                automatic: None,
                holding: false,
                template: None,
                at: chrono::Utc::now(),
            },
            &meta,
        )
        .await
        .unwrap();
    Intake::new(store)
        .record_outbound(
            ticket,
            response_id,
            Channel::Whatsapp,
            "SMout30",
            DeliveryStatus::Queued,
            meta,
        )
        .await
        .unwrap();

    for status in ["sent", "delivered", "sent"] {
        let params = vec![("MessageSid", "SMout30"), ("MessageStatus", status)];
        assert_eq!(
            app.post_twilio("/webhooks/whatsapp/status", &params, None)
                .await
                .status(),
            200
        );
    }
    let statuses: Vec<String> = sqlx::query_scalar(
        "SELECT payload->>'status' FROM events WHERE event_type = 'DeliveryStatusChanged' ORDER BY sequence",
    )
    .fetch_all(app.pool())
    .await
    .unwrap();
    // The late "sent" after "delivered" changes nothing.
    assert_eq!(statuses, vec!["queued", "sent", "delivered"]);

    let unknown = vec![("MessageSid", "SMnever"), ("MessageStatus", "delivered")];
    assert_eq!(
        app.post_twilio("/webhooks/whatsapp/status", &unknown, None)
            .await
            .status(),
        200
    );
    let unsigned = app
        .post_twilio(
            "/webhooks/whatsapp/status",
            &unknown,
            Some("bm9wZQ==".into()),
        )
        .await;
    assert_eq!(unsigned.status(), 403);
    app.stop().await;
}
