//! The agent answers every customer message exactly once (issue 6, items 2,
//! 5 and 6), end to end through the real broker with fakes of the model
//! API, Twilio and Gmail: two quick messages on one ticket are both
//! answered and nothing is dead-lettered; a message delivered twice gets
//! one reply or escalation whatever became of it; a machine-written
//! message gets none; and a ticket gets at most its automatic replies an
//! hour.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use casebook::app::{self, Role};
use casebook_commands::{EventStore, InboundMessage, Intake, Sender};
use casebook_domain::identity::IdentityKey;
use casebook_domain::{Category, Channel, Priority};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{json, Value};
use uuid::Uuid;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::agent::{count, start_with, whatsapp, Fakes, WAIT};
use crate::common::{eventually, read_topic, TestApp};

/// An OpenAI-compatible model that searches the knowledge base twice (the
/// most a message may), then answers by what the customer asked: export
/// questions confidently, password questions unsure of itself (so a person
/// approves), anything else by escalating with `knowledge_gap`.
struct TwoSearchesThenAnswer;

impl Respond for TwoSearchesThenAnswer {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&request.body).unwrap();
        let messages = body["messages"].as_array().unwrap();
        let asked = messages
            .iter()
            .find(|m| m["role"] == "user")
            .and_then(|m| m["content"].as_str())
            .unwrap_or_default()
            .to_lowercase();
        let searches = messages.iter().filter(|m| m["role"] == "tool").count();
        let (name, arguments) = match searches {
            0 if asked.contains("password") => {
                ("search_knowledge_base", json!({"query": "reset password"}))
            }
            1 if asked.contains("password") => (
                "search_knowledge_base",
                json!({"query": "forgot password email"}),
            ),
            0 => (
                "search_knowledge_base",
                json!({"query": "export project data"}),
            ),
            1 => ("search_knowledge_base", json!({"query": "export CSV JSON"})),
            _ if asked.contains("password") => (
                "send_response",
                json!({"body": "To reset your password, choose Forgot password on the sign-in page and follow the email.",
                       "confidence": 0.5}),
            ),
            _ if asked.contains("export") => (
                "send_response",
                json!({"body": "Exports are available in CSV and JSON on all plans. Open the project and choose the project menu, then Export.",
                       "confidence": 0.95}),
            ),
            _ => (
                "escalate",
                json!({"reason": "knowledge_gap", "note": "nothing in the knowledge base"}),
            ),
        };
        let call = json!({"id": format!("call_{searches}"), "type": "function",
            "function": {"name": name, "arguments": arguments.to_string()}});
        ResponseTemplate::new(200).set_body_json(json!({
            "id": "chatcmpl-1", "object": "chat.completion", "model": "scripted",
            "choices": [{"index": 0, "finish_reason": "tool_calls",
                "message": {"role": "assistant", "content": null, "tool_calls": [call]}}]
        }))
    }
}

async fn two_searches_model() -> MockServer {
    let llm = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(TwoSearchesThenAnswer)
        .mount(&llm)
        .await;
    llm
}

/// The id of the customer message intake stored for `channel_message_id`.
async fn message_id(app: &TestApp, channel_message_id: &str) -> Uuid {
    sqlx::query_scalar(
        "SELECT (payload->>'message_id')::uuid FROM events
          WHERE event_type = 'CustomerMessageReceived' AND payload->>'channel_message_id' = $1",
    )
    .bind(channel_message_id)
    .fetch_one(app.pool())
    .await
    .unwrap()
}

/// How many events of `event_type` answer customer message `message`.
async fn count_for(app: &TestApp, message: Uuid, event_type: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type = $1 AND payload->>'in_reply_to' = $2",
    )
    .bind(event_type)
    .bind(message.to_string())
    .fetch_one(app.pool())
    .await
    .unwrap()
}

/// Publishes customer message `message` to `tickets.incoming` again, with
/// the key, payload and headers the relay gave it: a redelivery. `on_topic`
/// is how many messages the topic holds. Returns (partition, offset).
async fn redeliver(app: &TestApp, message: Uuid, on_topic: usize) -> (i32, i64) {
    let kafka = app.kafka();
    let topic = kafka.topics.tickets_incoming();
    let all = read_topic(&kafka.brokers, &topic, on_topic, WAIT).await;
    let original = all
        .iter()
        .find(|m| m.envelope.payload["message_id"] == message.to_string())
        .unwrap_or_else(|| panic!("message {message} is on {topic}"));
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("message.timeout.ms", "15000")
        .create()
        .unwrap();
    let mut headers = OwnedHeaders::new();
    for (key, value) in &original.headers {
        headers = headers.insert(Header {
            key,
            value: Some(value.as_bytes()),
        });
    }
    let payload = serde_json::to_vec(&original.envelope).unwrap();
    let delivery = producer
        .send(
            FutureRecord::to(&topic)
                .key(original.key.as_bytes())
                .partition(original.partition)
                .payload(&payload)
                .headers(headers),
            Duration::from_secs(15),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("redelivered");
    (delivery.partition, delivery.offset)
}

/// Waits until the agent's consumer group committed past every offset in
/// `delivered`: it has finished with those messages.
async fn agent_finished(app: &TestApp, delivered: &[(i32, i64)]) {
    let kafka = app.kafka();
    let topic = kafka.topics.tickets_incoming();
    let group = kafka.topics.group("agent");
    let brokers = kafka.brokers.clone();
    let mut wanted: HashMap<i32, i64> = HashMap::new();
    for (partition, offset) in delivered {
        let next = wanted.entry(*partition).or_default();
        *next = (*next).max(offset + 1);
    }
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("log_level", "3")
            .create()
            .unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            let mut tpl = TopicPartitionList::new();
            for partition in wanted.keys() {
                tpl.add_partition(&topic, *partition);
            }
            let done = consumer
                .committed_offsets(tpl, Duration::from_secs(5))
                .map(|committed| {
                    wanted.iter().all(|(partition, next)| {
                        matches!(
                            committed.find_partition(&topic, *partition).map(|p| p.offset()),
                            Some(Offset::Offset(at)) if at >= *next
                        )
                    })
                })
                .unwrap_or(false);
            if done {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the agent never finished the redelivered messages"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    })
    .await
    .unwrap();
}

/// A message a machine wrote, taken in as the Gmail intake marks one.
async fn automated_email(app: &TestApp, id: &str, why: &str) -> (Uuid, Uuid) {
    let outcome = Intake::new(EventStore::new(app.pool().clone()))
        .receive(
            &InboundMessage {
                channel: Channel::Email,
                channel_message_id: id.to_string(),
                sender: Sender {
                    identities: vec![IdentityKey::email("mailer-daemon@example.net").unwrap()],
                    name: None,
                },
                conversation_id: None,
                thread: None,
                subject: Some("Automatic reply: Re: your ticket".into()),
                body: "I am out of the office until Monday and will reply when I return.".into(),
                attachments: 0,
                category: Category::General,
                priority: Priority::Medium,
                received_at: chrono::Utc::now(),
                automated: Some(why.to_string()),
            },
            "automated-test",
        )
        .await
        .unwrap();
    (outcome.ticket_id, outcome.message_id)
}

async fn gmail_sends(fakes: &Fakes) -> usize {
    fakes
        .gmail
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.url.path().ends_with("/messages/send"))
        .count()
}

/// `n` WhatsApp messages reach Twilio, and no more arrive for a while.
async fn exactly_sent(fakes: &Fakes, n: usize) {
    eventually(
        &format!("{n} WhatsApp messages at Twilio"),
        WAIT,
        || async { (fakes.whatsapp_sent().await.len() >= n).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(fakes.whatsapp_sent().await.len(), n, "nothing more is sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_quick_messages_on_one_ticket_are_both_answered_and_none_is_dead_lettered() {
    let fakes = Fakes::start(true).await;
    let llm = two_searches_model().await;
    // Everything but the agent: both messages are on the ticket before the
    // agent sees the first.
    let app = start_with(
        &fakes,
        Some(&llm),
        None,
        &[Role::Api, Role::Relay, Role::Projector, Role::Delivery],
        &[],
    )
    .await;
    let from = "whatsapp:+447700900201";
    let ticket = whatsapp(&app, from, "SMquick1", "How do I export my project?").await;
    let second = whatsapp(&app, from, "SMquick2", "And can I export it as JSON?").await;
    assert_eq!(ticket, second, "one conversation, one ticket");
    let (first, second) = (
        message_id(&app, "SMquick1").await,
        message_id(&app, "SMquick2").await,
    );
    let kafka = app.kafka();
    read_topic(&kafka.brokers, &kafka.topics.tickets_incoming(), 2, WAIT).await;

    let agent = app::start(&app.config, &[Role::Agent], None).await.unwrap();
    for message in [first, second] {
        eventually(&format!("a reply to {message}"), WAIT, || async {
            (count_for(&app, message, "ResponseSent").await == 1).then_some(())
        })
        .await;
        // Each message had its own two searches.
        assert_eq!(count_for(&app, message, "KnowledgeSearched").await, 2);
        assert_eq!(count_for(&app, message, "ResponseDrafted").await, 1);
    }
    assert_eq!(count(&app, ticket, "ResponseSent").await, 2);
    exactly_sent(&fakes, 2).await;
    let dlq = read_topic(
        &kafka.brokers,
        &kafka.topics.dlq(),
        1,
        Duration::from_secs(3),
    )
    .await;
    assert!(
        dlq.is_empty(),
        "dead-lettered: {:?}",
        dlq.iter().map(|m| &m.headers).collect::<Vec<_>>()
    );
    agent.stop(Duration::from_secs(20)).await;
    app.stop().await;
}

/// What one customer message must have led to, exactly.
struct Expected {
    replies: i64,
    drafts: i64,
    approvals: i64,
    escalation: Option<&'static str>,
    withheld: i64,
}

const ANSWERED: Expected = Expected {
    replies: 1,
    drafts: 1,
    approvals: 0,
    escalation: None,
    withheld: 0,
};

const fn escalated(reason: &'static str) -> Expected {
    Expected {
        replies: 1,
        drafts: 0,
        approvals: 0,
        escalation: Some(reason),
        withheld: 0,
    }
}

async fn assert_exactly(app: &TestApp, what: &str, message: Uuid, expected: &Expected) {
    let got = (
        count_for(app, message, "ResponseSent").await,
        count_for(app, message, "ResponseDrafted").await,
        count_for(app, message, "TicketEscalated").await,
        count_for(app, message, "AutoReplyWithheld").await,
    );
    assert_eq!(
        got,
        (
            expected.replies,
            expected.drafts,
            i64::from(expected.escalation.is_some()),
            expected.withheld
        ),
        "{what}: (replies, drafts, escalations, withheld)"
    );
    if let Some(reason) = expected.escalation {
        let escalated: Value = sqlx::query_scalar(
            "SELECT payload FROM events WHERE event_type = 'TicketEscalated' AND payload->>'in_reply_to' = $1",
        )
        .bind(message.to_string())
        .fetch_one(app.pool())
        .await
        .unwrap();
        assert_eq!(escalated["reason"], reason, "{what}");
    }
    let ticket: String = sqlx::query_scalar(
        "SELECT aggregate_id FROM events WHERE event_type = 'CustomerMessageReceived' AND payload->>'message_id' = $1",
    )
    .bind(message.to_string())
    .fetch_one(app.pool())
    .await
    .unwrap();
    let approvals: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_id = $1 AND event_type = 'ApprovalRequested'",
    )
    .bind(&ticket)
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(approvals, expected.approvals, "{what}: approvals");
}

/// Waits until message `message` got its first answer of any kind.
async fn settled(app: &TestApp, message: Uuid) {
    eventually(&format!("an outcome for {message}"), WAIT, || async {
        let mut n = 0;
        for event_type in [
            "ResponseSent",
            "TicketEscalated",
            "AutoReplyWithheld",
            "CustomerMessageQueuedForHuman",
        ] {
            n += count_for(app, message, event_type).await;
        }
        let approval: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events a JOIN events d ON d.event_type = 'ResponseDrafted'
               AND a.event_type = 'ApprovalRequested' AND a.payload->>'draft_id' = d.payload->>'draft_id'
             WHERE d.payload->>'in_reply_to' = $1",
        )
        .bind(message.to_string())
        .fetch_one(app.pool())
        .await
        .unwrap();
        // An escalation's holding reply comes in the same commit.
        (n + approval > 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_delivered_twice_is_answered_or_escalated_once_whatever_the_outcome() {
    let fakes = Fakes::start(true).await;
    let llm = two_searches_model().await;
    let app = start_with(&fakes, Some(&llm), None, &[Role::All], &[]).await;
    let cases: [(&str, &str, &str, Expected); 8] = [
        (
            "answered",
            "+447700900301",
            "How do I export my project data?",
            ANSWERED,
        ),
        (
            "held for approval",
            "+447700900302",
            "I forgot my password, what now?",
            Expected {
                replies: 0,
                drafts: 1,
                approvals: 1,
                escalation: None,
                withheld: 0,
            },
        ),
        (
            "knowledge gap",
            "+447700900303",
            "Which moon of Jupiter is the largest?",
            escalated("knowledge_gap"),
        ),
        (
            "refund",
            "+447700900304",
            "I want a refund for last month.",
            escalated("refund_request"),
        ),
        (
            "legal",
            "+447700900305",
            "My lawyer will contact you about this.",
            escalated("legal"),
        ),
        (
            "anger",
            "+447700900306",
            "This is the worst, most useless app ever!! I hate it.",
            escalated("negative_sentiment"),
        ),
        (
            "a human",
            "+447700900307",
            "human",
            escalated("human_requested"),
        ),
        (
            "pricing",
            "+447700900308",
            "How much does the Business plan cost?",
            escalated("pricing_inquiry"),
        ),
    ];
    let mut messages = Vec::new();
    for (i, (_, number, text, _)) in cases.iter().enumerate() {
        let sid = format!("SMtwice{i}");
        whatsapp(&app, &format!("whatsapp:{number}"), &sid, text).await;
        messages.push(message_id(&app, &sid).await);
    }
    // A machine-written message is never answered, however often it comes.
    let (_, automated) = automated_email(&app, "gm-ooo-1", "auto_submitted").await;
    messages.push(automated);
    let automated_expected = Expected {
        replies: 0,
        drafts: 0,
        approvals: 0,
        escalation: Some("automated_message"),
        withheld: 1,
    };

    for message in &messages {
        settled(&app, *message).await;
    }
    let mut delivered = Vec::new();
    for message in &messages {
        delivered.push(redeliver(&app, *message, messages.len()).await);
    }
    agent_finished(&app, &delivered).await;

    for ((what, _, _, expected), message) in cases.iter().zip(&messages) {
        assert_exactly(&app, what, *message, expected).await;
    }
    assert_exactly(&app, "automated", automated, &automated_expected).await;
    // One answer and six holding replies reached Twilio; nothing by email.
    exactly_sent(&fakes, 7).await;
    assert_eq!(
        gmail_sends(&fakes).await,
        0,
        "nothing goes back to a machine"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_escalated_because_every_model_failed_is_escalated_once_when_delivered_twice() {
    let fakes = Fakes::start(true).await;
    let down = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&down)
        .await;
    let app = start_with(&fakes, Some(&down), None, &[Role::All], &[]).await;
    // The local responder fails too: its knowledge base is gone.
    sqlx::query("ALTER TABLE kb_chunks RENAME TO kb_chunks_unavailable")
        .execute(app.pool())
        .await
        .unwrap();
    whatsapp(
        &app,
        "whatsapp:+447700900401",
        "SMdown1",
        "How do I export my project data?",
    )
    .await;
    let message = message_id(&app, "SMdown1").await;
    settled(&app, message).await;
    let delivered = redeliver(&app, message, 1).await;
    agent_finished(&app, &[delivered]).await;
    assert_exactly(
        &app,
        "model unavailable",
        message,
        &escalated("model_unavailable"),
    )
    .await;
    exactly_sent(&fakes, 1).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ticket_gets_at_most_its_automatic_replies_an_hour_then_the_agent_stays_silent() {
    let fakes = Fakes::start(true).await;
    // No model: the local responder answers every one of these.
    let app = start_with(
        &fakes,
        None,
        None,
        &[Role::All],
        &[("CASEBOOK_AUTO_REPLY_CAP_PER_HOUR", "2".to_string())],
    )
    .await;
    // Another helpdesk's auto-responder, say, writing back after each reply.
    let from = "whatsapp:+447700900501";
    let mut messages = Vec::new();
    for i in 1..=4 {
        let sid = format!("SMloop{i}");
        let ticket = whatsapp(&app, from, &sid, "How do I export my project data?").await;
        let message = message_id(&app, &sid).await;
        settled(&app, message).await;
        messages.push((ticket, message));
    }
    let ticket = messages[0].0;
    assert!(messages.iter().all(|(t, _)| *t == ticket));
    for (_, message) in &messages[..2] {
        assert_exactly(&app, "within the limit", *message, &ANSWERED).await;
    }
    // The first past the limit escalates for a person, silently...
    assert_exactly(
        &app,
        "first past the limit",
        messages[2].1,
        &Expected {
            replies: 0,
            drafts: 0,
            approvals: 0,
            escalation: Some("auto_reply_limit"),
            withheld: 1,
        },
    )
    .await;
    // ...and the next waits for that person: staff hold the ticket now,
    // the AI stays silent, and no holding reply goes past the limit.
    assert_exactly(
        &app,
        "second past the limit",
        messages[3].1,
        &Expected {
            replies: 0,
            drafts: 0,
            approvals: 0,
            escalation: None,
            withheld: 0,
        },
    )
    .await;
    assert_eq!(
        count_for(&app, messages[3].1, "CustomerMessageQueuedForHuman").await,
        1
    );
    let sent: Vec<Value> = sqlx::query_scalar(
        "SELECT payload FROM events WHERE aggregate_id = $1 AND event_type = 'ResponseSent'",
    )
    .bind(ticket.to_string())
    .fetch_all(app.pool())
    .await
    .unwrap();
    assert_eq!(sent.len(), 2);
    assert!(
        sent.iter().all(|s| s["automatic"] == json!(true)),
        "{sent:?}"
    );
    // Delivered again, the withheld message stays withheld.
    let delivered = redeliver(&app, messages[2].1, 4).await;
    agent_finished(&app, &[delivered]).await;
    assert_eq!(count_for(&app, messages[2].1, "AutoReplyWithheld").await, 1);
    assert_eq!(count(&app, ticket, "TicketEscalated").await, 1);
    // The two replies' messages (the first may add one: the status link).
    let parts: usize = sent
        .iter()
        .map(|s| s["parts"].as_array().map_or(1, Vec::len))
        .sum();
    exactly_sent(&fakes, parts).await;
    app.stop().await;
}

/// A model that escalates at once, claiming a reason only the desk records
/// and leaving a huge note.
struct ClaimsTheDesksReason;

impl Respond for ClaimsTheDesksReason {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let arguments = json!({"reason": "auto_reply_limit", "note": "x".repeat(10_000)});
        ResponseTemplate::new(200).set_body_json(json!({
            "id": "chatcmpl-1", "object": "chat.completion", "model": "scripted",
            "choices": [{"index": 0, "finish_reason": "tool_calls",
                "message": {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "escalate", "arguments": arguments.to_string()}}]}}]
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_model_escalates_only_with_the_reasons_its_tool_offers_and_a_bounded_note() {
    let fakes = Fakes::start(true).await;
    let llm = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(ClaimsTheDesksReason)
        .mount(&llm)
        .await;
    let app = start_with(&fakes, Some(&llm), None, &[Role::All], &[]).await;
    whatsapp(
        &app,
        "whatsapp:+447700900701",
        "SMclaim1",
        "How do I export my project data?",
    )
    .await;
    let message = message_id(&app, "SMclaim1").await;
    settled(&app, message).await;
    let escalated: Value = sqlx::query_scalar(
        "SELECT payload FROM events WHERE event_type = 'TicketEscalated' AND payload->>'in_reply_to' = $1",
    )
    .bind(message.to_string())
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(escalated["reason"], "manual");
    assert_eq!(escalated["note"].as_str().unwrap().chars().count(), 500);
    // A person will look: the customer hears so.
    assert_eq!(count_for(&app, message, "ResponseSent").await, 1);
    app.stop().await;
}
