//! Broker outages: intake keeps accepting, nothing acknowledged is lost,
//! and nothing is applied twice when the broker is back.

use std::collections::HashSet;
use std::time::Duration;

use casebook::app::Role;
use serde_json::Value;
use uuid::Uuid;

use crate::common::{eventually, form, read_topic, Broker, TestApp};

const WAIT: Duration = Duration::from_secs(150);

async fn count_reaches(app: &TestApp, sql: &'static str, n: i64) {
    let pool = app.pool().clone();
    eventually(&format!("{sql} to reach {n}"), WAIT, || {
        let pool = pool.clone();
        async move {
            let count: i64 = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap();
            (count >= n).then_some(())
        }
    })
    .await;
}

async fn submit_during(app: &TestApp, n: usize, tag: &str) -> Vec<Uuid> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let response = app
            .submit_form(form(
                &format!("{tag}{i}@example.com"),
                "while the broker is down",
            ))
            .await;
        assert_eq!(response.status(), 202, "intake never depends on the broker");
        let body: Value = response.json().await.unwrap();
        ids.push(body["ticket_id"].as_str().unwrap().parse().unwrap());
    }
    ids
}

/// The broker stops answering (frozen, connections hanging) and comes back
/// with its data: every role runs, and the read models end up with every
/// submission exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forms_arriving_while_the_broker_is_unresponsive_reach_the_read_models_once() {
    let broker = Broker::start().await;
    let app = TestApp::spawn_with(
        crate::common::BACKBONE,
        &[("KAFKA_BROKERS", broker.address())],
    )
    .await;
    submit_during(&app, 5, "before").await;
    count_reaches(&app, "SELECT count(*) FROM crm_messages", 5).await;

    broker.pause();
    submit_during(&app, 100, "during").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.resume();

    count_reaches(&app, "SELECT count(*) FROM crm_tickets", 105).await;
    count_reaches(&app, "SELECT count(*) FROM crm_messages", 105).await;
    // Web-form addresses are claims, not identifiers: one customer each.
    count_reaches(&app, "SELECT count(*) FROM crm_customers", 105).await;
    // Let any copy the relay or a consumer might repeat arrive, then count.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(app.count("SELECT count(*) FROM crm_tickets").await, 105);
    assert_eq!(app.count("SELECT count(*) FROM crm_messages").await, 105);
    assert_eq!(app.count("SELECT count(*) FROM crm_customers").await, 105);
    assert_eq!(
        app.count("SELECT count(*) FROM crm_tickets WHERE messages_count <> 1")
            .await,
        0
    );
    assert_eq!(
        app.count("SELECT count(*) FROM crm_conversations WHERE inbound_count <> 1")
            .await,
        0
    );
    app.stop().await;
}

/// The broker process dies and a new, empty one takes its place: the relay
/// recreates the topics and publishes everything it had not published.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forms_arriving_while_the_broker_is_dead_are_all_published_after_it_restarts() {
    let mut broker = Broker::start().await;
    // No consumers in this process: librdkafka's fetcher cannot cope with a
    // broker that forgot its topics (it crashes on tansu's answer), which a
    // real Kafka restart never does.
    let app = TestApp::spawn_with(
        &[Role::Api, Role::Relay],
        &[("KAFKA_BROKERS", broker.address())],
    )
    .await;
    let kafka = app.kafka();
    let before = submit_during(&app, 5, "before").await;
    let published = read_topic(&broker.address(), &kafka.topics.events(), 25, WAIT).await;
    assert!(published.iter().any(|m| m.key == before[4].to_string()));

    broker.kill();
    let during = submit_during(&app, 100, "during").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.restart().await;

    // 100 submissions of new customers: 5 events each.
    let received = read_topic(&broker.address(), &kafka.topics.events(), 500, WAIT).await;
    let opened: HashSet<String> = received
        .iter()
        .filter(|m| m.envelope.event_type == "TicketOpened")
        .map(|m| m.key.clone())
        .collect();
    for id in &during {
        assert!(
            opened.contains(&id.to_string()),
            "ticket {id} missing from the events topic"
        );
    }
    let ids: HashSet<Uuid> = received.iter().map(|m| m.envelope.event_id).collect();
    assert_eq!(ids.len(), 500);
    app.stop().await;
}
