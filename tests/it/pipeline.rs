//! End to end through the real broker: intake → event store → relay →
//! Kafka → projectors → CRM read models.

use std::time::Duration;

use serde_json::Value;
use uuid::Uuid;

use crate::common::{eventually, form, read_topic, TestApp};

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_form_reaches_kafka_and_every_crm_view() {
    let app = TestApp::spawn().await;
    let response = app
        .http
        .post(app.url("/support/tickets"))
        .header("x-correlation-id", "corr-e2e-1")
        .json(&form("ada@example.com", "My export fails."))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let ticket_id: Uuid = response.json::<Value>().await.unwrap()["ticket_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    let pool = app.pool().clone();
    let (status, messages_count): (String, i32) =
        eventually("the ticket in crm_tickets", WAIT, || {
            let pool = pool.clone();
            async move {
                sqlx::query_as(
                    "SELECT status, messages_count FROM crm_tickets WHERE ticket_id = $1",
                )
                .bind(ticket_id)
                .fetch_optional(&pool)
                .await
                .unwrap()
            }
        })
        .await;
    assert_eq!((status.as_str(), messages_count), ("received", 1));
    let customer_id: Uuid =
        sqlx::query_scalar("SELECT customer_id FROM crm_tickets WHERE ticket_id = $1")
            .bind(ticket_id)
            .fetch_one(app.pool())
            .await
            .unwrap();
    eventually("the customer views", WAIT, || {
        let pool = pool.clone();
        async move {
            let name: Option<Option<String>> = sqlx::query_scalar("SELECT name FROM crm_customers WHERE customer_id = $1")
                .bind(customer_id)
                .fetch_optional(&pool)
                .await
                .unwrap();
            let identifier: Option<Uuid> =
                sqlx::query_scalar("SELECT customer_id FROM crm_customer_identifiers WHERE kind = 'email' AND value = 'ada@example.com'")
                    .fetch_optional(&pool)
                    .await
                    .unwrap();
            // A web-form address is a claim, not an identifier, until it is
            // confirmed.
            (name == Some(Some("Ada Lovelace".into())) && identifier.is_none()).then_some(())
        }
    })
    .await;
    let (channels, inbound): (Vec<String>, i32) = eventually("the conversation", WAIT, || {
        let pool = pool.clone();
        async move {
            sqlx::query_as(
                "SELECT channels, inbound_count FROM crm_conversations WHERE ticket_id = $1",
            )
            .bind(ticket_id)
            .fetch_optional(&pool)
            .await
            .unwrap()
        }
    })
    .await;
    assert_eq!((channels, inbound), (vec!["webform".to_string()], 1));
    let body: String = eventually("the message", WAIT, || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar(
                "SELECT body FROM crm_messages WHERE ticket_id = $1 AND direction = 'inbound'",
            )
            .bind(ticket_id)
            .fetch_optional(&pool)
            .await
            .unwrap()
        }
    })
    .await;
    assert_eq!(body, "My export fails.");

    // On Kafka: every stored event, exactly as stored, keyed by aggregate.
    let stored = app.count("SELECT count(*) FROM events").await as usize;
    let kafka = app.kafka();
    let events = read_topic(&kafka.brokers, &kafka.topics.events(), stored, WAIT).await;
    let opened = events
        .iter()
        .find(|m| m.envelope.event_type == "TicketOpened")
        .expect("TicketOpened on the events topic");
    assert_eq!(opened.key, ticket_id.to_string());
    assert_eq!(opened.envelope.correlation_id, "corr-e2e-1");
    assert_eq!(opened.envelope.actor.kind.as_str(), "customer");
    assert_eq!(opened.envelope.channel.map(|c| c.as_str()), Some("webform"));
    assert_eq!(
        opened.headers.get("event_type").map(String::as_str),
        Some("TicketOpened")
    );
    assert_eq!(
        opened.headers.get("correlation_id").map(String::as_str),
        Some("corr-e2e-1")
    );
    let (hash, position): (String, i64) =
        sqlx::query_as("SELECT hash, position FROM events WHERE event_id = $1")
            .bind(opened.envelope.event_id)
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert_eq!(opened.envelope.hash, hash);
    assert_eq!(opened.envelope.position, position);

    let incoming = read_topic(&kafka.brokers, &kafka.topics.tickets_incoming(), 1, WAIT).await;
    assert_eq!(incoming.len(), 1);
    assert_eq!(incoming[0].envelope.event_type, "CustomerMessageReceived");
    assert_eq!(incoming[0].key, ticket_id.to_string());
    let inbound = read_topic(
        &kafka.brokers,
        &kafka.topics.inbound(casebook_domain::Channel::Webform),
        1,
        WAIT,
    )
    .await;
    assert_eq!(inbound[0].envelope.event_id, incoming[0].envelope.event_id);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whatsapp_messages_reach_the_crm_views_once() {
    let app = TestApp::spawn().await;
    let params = [
        ("MessageSid", "SMe2e1"),
        ("From", "whatsapp:+447700900123"),
        ("To", "whatsapp:+14155238886"),
        ("Body", "Hi, is there a mobile app?"),
        ("ProfileName", "Grace"),
        ("NumMedia", "0"),
    ];
    for _ in 0..2 {
        assert_eq!(
            app.post_twilio("/webhooks/whatsapp", &params, None)
                .await
                .status(),
            200
        );
    }
    let follow_up = [
        ("MessageSid", "SMe2e2"),
        ("From", "whatsapp:+447700900123"),
        ("Body", "Android, please."),
    ];
    assert_eq!(
        app.post_twilio("/webhooks/whatsapp", &follow_up, None)
            .await
            .status(),
        200
    );

    let pool = app.pool().clone();
    let kinds: Vec<String> = eventually("both identifiers", WAIT, || {
        let pool = pool.clone();
        async move {
            let kinds: Vec<String> =
                sqlx::query_scalar("SELECT kind FROM crm_customer_identifiers WHERE value = '+447700900123' ORDER BY kind")
                    .fetch_all(&pool)
                    .await
                    .unwrap();
            (kinds.len() == 2).then_some(kinds)
        }
    })
    .await;
    assert_eq!(kinds, vec!["phone", "whatsapp"]);
    let (tickets, messages): (i64, i64) = eventually("two messages on one ticket", WAIT, || {
        let pool = pool.clone();
        async move {
            let counts: (i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM crm_tickets WHERE channel = 'whatsapp'),
                        (SELECT count(*) FROM crm_messages WHERE channel = 'whatsapp')",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            (counts.0 >= 1 && counts.1 >= 2).then_some(counts)
        }
    })
    .await;
    assert_eq!((tickets, messages), (1, 2));
    let sids: Vec<String> =
        sqlx::query_scalar("SELECT channel_message_id FROM crm_messages ORDER BY at")
            .fetch_all(app.pool())
            .await
            .unwrap();
    assert_eq!(sids, vec!["SMe2e1", "SMe2e2"]);
    app.stop().await;
}
