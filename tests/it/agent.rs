//! The AI agent end to end, through the real broker, with local fakes of the
//! model APIs (scripted tool calls), Twilio and Gmail.

use std::path::Path;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use casebook::app::{self, Role};
use casebook_agent::knowledge::KnowledgeBase;
use casebook_commands::approvals::Approvals;
use casebook_commands::EventStore;
use casebook_domain::formatting::WHATSAPP_MAX_CHARS;
use casebook_domain::{Actor, Category, Channel, EventMetadata, Priority, Ticket, TicketCommand};
use serde_json::{json, Value};
use uuid::Uuid;
use wiremock::matchers::{method, path, path_regex};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::common::{eventually, read_topic, TestApp};

pub(crate) const WAIT: Duration = Duration::from_secs(90);
pub(crate) const ACCOUNT: &str = "AC0123456789abcdef0123456789abcdef";

pub(crate) fn model_dir() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".casebook/models/all-MiniLM-L6-v2")
        .display()
        .to_string()
}

/// Twilio's Messages API: every message gets a fresh SID.
pub(crate) struct TwilioAccepts;

impl Respond for TwilioAccepts {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let sid = format!("SM{}", Uuid::new_v4().simple());
        ResponseTemplate::new(201)
            .set_body_json(json!({"sid": sid, "status": "queued", "account_sid": ACCOUNT}))
    }
}

/// An OpenAI-compatible model that searches first, then answers with
/// `body` at `confidence`.
pub(crate) struct ScriptedOpenAi {
    pub(crate) query: &'static str,
    pub(crate) body: String,
    pub(crate) confidence: f64,
}

impl Respond for ScriptedOpenAi {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&request.body).unwrap();
        let searched = body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["role"] == "tool");
        let call = if searched {
            json!({"id": "call_2", "type": "function", "function": {"name": "send_response",
                "arguments": json!({"body": self.body, "confidence": self.confidence}).to_string()}})
        } else {
            json!({"id": "call_1", "type": "function", "function": {"name": "search_knowledge_base",
                "arguments": json!({"query": self.query}).to_string()}})
        };
        ResponseTemplate::new(200).set_body_json(json!({
            "id": "chatcmpl-1", "object": "chat.completion", "model": "scripted",
            "choices": [{"index": 0, "finish_reason": "tool_calls",
                "message": {"role": "assistant", "content": null, "tool_calls": [call]}}]
        }))
    }
}

/// The Anthropic Messages API, scripted the same way.
struct ScriptedAnthropic {
    body: &'static str,
}

impl Respond for ScriptedAnthropic {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&request.body).unwrap();
        let searched = body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["content"][0]["type"] == "tool_result");
        let block = if searched {
            json!({"type": "tool_use", "id": "toolu_2", "name": "send_response", "input": {"body": self.body, "confidence": 0.95}})
        } else {
            json!({"type": "tool_use", "id": "toolu_1", "name": "search_knowledge_base", "input": {"query": "export project data"}})
        };
        ResponseTemplate::new(200).set_body_json(json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-test",
            "stop_reason": "tool_use", "content": [block]
        }))
    }
}

pub(crate) struct Fakes {
    pub(crate) twilio: MockServer,
    pub(crate) gmail: MockServer,
}

impl Fakes {
    pub(crate) async fn start(twilio_ok: bool) -> Self {
        let twilio = MockServer::start().await;
        let messages = Mock::given(method("POST")).and(path(format!(
            "/2010-04-01/Accounts/{ACCOUNT}/Messages.json"
        )));
        if twilio_ok {
            messages.respond_with(TwilioAccepts).mount(&twilio).await;
        } else {
            messages
                .respond_with(ResponseTemplate::new(503))
                .mount(&twilio)
                .await;
        }
        let gmail = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/gmail/v1/users/me/messages/send"))
            .respond_with(ResponseTemplate::new(200).set_body_json(
                json!({"id": "sent-1", "threadId": "t-email", "labelIds": ["SENT"]}),
            ))
            .mount(&gmail)
            .await;
        Self { twilio, gmail }
    }

    /// The WhatsApp bodies Twilio was asked to send.
    pub(crate) async fn whatsapp_sent(&self) -> Vec<String> {
        self.twilio
            .received_requests()
            .await
            .unwrap()
            .iter()
            .filter(|r| r.url.path().ends_with("/Messages.json"))
            .map(|r| {
                let form: Vec<(String, String)> = serde_urlencoded::from_bytes(&r.body).unwrap();
                form.into_iter()
                    .find(|(k, _)| k == "Body")
                    .map(|(_, v)| v)
                    .unwrap_or_default()
            })
            .collect()
    }
}

async fn start(fakes: &Fakes, llm: Option<&MockServer>, fallback: Option<&MockServer>) -> TestApp {
    start_with(fakes, llm, fallback, &[Role::All], &[]).await
}

/// `roles` of the service with the fakes and models, the demo articles on
/// export, passwords and the mobile apps ingested, and `extra` settings.
pub(crate) async fn start_with(
    fakes: &Fakes,
    llm: Option<&MockServer>,
    fallback: Option<&MockServer>,
    roles: &[Role],
    extra: &[(&str, String)],
) -> TestApp {
    let mut overrides = vec![
        ("CASEBOOK_EMBEDDINGS", format!("local:{}", model_dir())),
        ("TWILIO_ACCOUNT_SID", ACCOUNT.to_string()),
        ("TWILIO_WHATSAPP_FROM", "whatsapp:+14155238886".to_string()),
        ("TWILIO_API_BASE", fakes.twilio.uri()),
        ("GMAIL_API_BASE", fakes.gmail.uri()),
        ("GMAIL_ACCESS_TOKEN", "gmail-access".to_string()),
    ];
    if let Some(llm) = llm {
        overrides.push(("LLM_BASE_URL", format!("{}/v1", llm.uri())));
        overrides.push(("LLM_MODEL", "scripted-gpt".to_string()));
    }
    if let Some(fallback) = fallback {
        overrides.push(("LLM_FALLBACK_BASE_URL", fallback.uri()));
        overrides.push(("LLM_FALLBACK_API_KEY", "anthropic-key".to_string()));
        overrides.push(("LLM_FALLBACK_MODEL", "claude-test".to_string()));
    }
    overrides.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
    let app = TestApp::spawn_with(roles, &overrides).await;
    let kb = KnowledgeBase::new(app.pool().clone(), app::embedder(&app.config).unwrap());
    for article in [
        "15-export-project-data",
        "02-log-in-and-reset-password",
        "14-mobile-apps-and-offline-mode",
    ] {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("kb/demo/{article}.md"));
        kb.ingest_path(&file).await.unwrap();
    }
    app
}

pub(crate) async fn whatsapp(app: &TestApp, from: &str, sid: &str, body: &str) -> Uuid {
    let params = [
        ("MessageSid", sid),
        ("From", from),
        ("To", "whatsapp:+14155238886"),
        ("Body", body),
        ("ProfileName", "Ada"),
    ];
    assert_eq!(
        app.post_twilio("/webhooks/whatsapp", &params, None)
            .await
            .status(),
        200
    );
    sqlx::query_scalar(
        "SELECT aggregate_id::uuid FROM events WHERE event_type = 'CustomerMessageReceived' AND payload->>'channel_message_id' = $1",
    )
    .bind(sid)
    .fetch_one(app.pool())
    .await
    .unwrap()
}

pub(crate) async fn event_of(app: &TestApp, ticket: Uuid, event_type: &'static str) -> Value {
    let pool = app.pool().clone();
    eventually(&format!("{event_type} on {ticket}"), WAIT, || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar(
                "SELECT payload FROM events WHERE aggregate_id = $1 AND event_type = $2 ORDER BY sequence DESC LIMIT 1",
            )
            .bind(ticket.to_string())
            .bind(event_type)
            .fetch_optional(&pool)
            .await
            .unwrap()
        }
    })
    .await
}

pub(crate) async fn count(app: &TestApp, ticket: Uuid, event_type: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_id = $1 AND event_type = $2")
        .bind(ticket.to_string())
        .bind(event_type)
        .fetch_one(app.pool())
        .await
        .unwrap()
}

pub(crate) async fn sent_count_reaches(fakes: &Fakes, n: usize) -> Vec<String> {
    eventually(
        &format!("{n} WhatsApp messages at Twilio"),
        WAIT,
        || async {
            let sent = fakes.whatsapp_sent().await;
            (sent.len() >= n).then_some(sent)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_whatsapp_question_is_answered_from_the_knowledge_base_and_delivered() {
    let fakes = Fakes::start(true).await;
    // No model configured: the local responder answers.
    let app = start(&fakes, None, None).await;
    let ticket = whatsapp(
        &app,
        "whatsapp:+447700900001",
        "SMq1",
        "How do I export my project data?",
    )
    .await;
    let sent = event_of(&app, ticket, "ResponseSent").await;
    let drafted = event_of(&app, ticket, "ResponseDrafted").await;
    assert_eq!(drafted["generated_by"], "local");
    assert!(drafted["confidence"].as_f64().unwrap() >= 0.8, "{drafted}");
    let searched = event_of(&app, ticket, "KnowledgeSearched").await;
    assert!(
        searched["hits"][0]["document_id"]
            .as_str()
            .unwrap()
            .contains("export"),
        "{searched}"
    );
    event_of(&app, ticket, "CustomerHistoryReviewed").await;
    assert!(sent["body"].as_str().unwrap().contains("Export"), "{sent}");

    let delivered = sent_count_reaches(&fakes, 1).await;
    assert!(delivered.concat().contains("Export"));
    let request = &fakes.twilio.received_requests().await.unwrap()[0];
    let form: Vec<(String, String)> = serde_urlencoded::from_bytes(&request.body).unwrap();
    assert!(form.contains(&("To".into(), "whatsapp:+447700900001".into())));
    assert!(form
        .iter()
        .any(|(k, v)| k == "StatusCallback" && v.ends_with("/webhooks/whatsapp/status")));
    let status = event_of(&app, ticket, "DeliveryStatusChanged").await;
    assert_eq!(status["status"], "queued");
    // The agent's latency is on the ops listener's metrics.
    let metrics = app
        .http
        .get(app.ops_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("casebook_agent_seconds_count{outcome=\"ok\"}"),
        "agent latency is measured"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_answer_is_split_into_whatsapp_messages_at_sentences() {
    let fakes = Fakes::start(true).await;
    let llm = MockServer::start().await;
    let body = "You can export a single project or, if you're an Owner or Admin, the whole workspace. \
        Exports are available in CSV and JSON on all plans. Open the project and choose the project menu, then Export. \
        Choose a format: CSV gives one row per task, easy to open in a spreadsheet, and JSON gives the full structure. \
        Larger exports are processed in the background and we email you a download link, valid for 7 days. \
        Only one workspace export can run at a time; you can find recent exports and their export IDs in Settings.";
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(ScriptedOpenAi {
            query: "export project data",
            body: body.to_string(),
            confidence: 0.95,
        })
        .mount(&llm)
        .await;
    let app = start(&fakes, Some(&llm), None).await;
    let ticket = whatsapp(
        &app,
        "whatsapp:+447700900002",
        "SMq2",
        "How do I export everything?",
    )
    .await;
    let sent = event_of(&app, ticket, "ResponseSent").await;
    let parts = sent["parts"].as_array().unwrap();
    assert!(parts.len() >= 2, "{sent}");
    let delivered = sent_count_reaches(&fakes, parts.len()).await;
    assert_eq!(delivered.len(), parts.len());
    for part in &delivered {
        assert!(part.chars().count() < WHATSAPP_MAX_CHARS, "{part}");
        assert!(part.ends_with('.'), "split mid-sentence: {part}");
    }
    assert_eq!(
        event_of(&app, ticket, "ResponseDrafted").await["generated_by"],
        "scripted-gpt"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn guardrails_escalate_with_their_reason_and_only_a_holding_reply_goes_out() {
    let fakes = Fakes::start(true).await;
    let app = start(&fakes, None, None).await;
    let cases = [
        (
            "whatsapp:+447700900011",
            "SMg1",
            "I want a refund for last month.",
            "refund_request",
        ),
        (
            "whatsapp:+447700900012",
            "SMg2",
            "My lawyer will contact you about this.",
            "legal",
        ),
        (
            "whatsapp:+447700900013",
            "SMg3",
            "This is the worst, most useless app ever!! I hate it.",
            "negative_sentiment",
        ),
        ("whatsapp:+447700900014", "SMg4", "human", "human_requested"),
        (
            "whatsapp:+447700900015",
            "SMg5",
            "How much does the Business plan cost?",
            "pricing_inquiry",
        ),
    ];
    let mut tickets = Vec::new();
    for (from, sid, text, _) in cases {
        tickets.push(whatsapp(&app, from, sid, text).await);
    }
    for (ticket, (_, _, _, reason)) in tickets.iter().zip(cases) {
        let escalated = event_of(&app, *ticket, "TicketEscalated").await;
        assert_eq!(escalated["reason"], reason);
        event_of(&app, *ticket, "ResponseSent").await;
        assert_eq!(
            count(&app, *ticket, "ResponseSent").await,
            1,
            "only the holding reply"
        );
        assert_eq!(
            count(&app, *ticket, "ResponseDrafted").await,
            0,
            "nothing drafted"
        );
    }
    let delivered = sent_count_reaches(&fakes, cases.len()).await;
    assert_eq!(delivered.len(), cases.len());
    assert!(
        delivered.iter().all(|d| d.contains("team")),
        "{delivered:?}"
    );
    assert!(!delivered
        .iter()
        .any(|d| d.to_lowercase().contains("refund")));

    let kafka = app.kafka();
    let escalations = read_topic(
        &kafka.brokers,
        &kafka.topics.escalations(),
        cases.len(),
        WAIT,
    )
    .await;
    let reasons: std::collections::BTreeSet<String> = escalations
        .iter()
        .map(|m| m.envelope.payload["reason"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(reasons.len(), cases.len());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_low_confidence_draft_waits_for_approval() {
    let fakes = Fakes::start(true).await;
    let llm = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(ScriptedOpenAi {
            query: "reset password",
            body: "To reset your password, choose Forgot password on the sign-in page and follow the email.".into(),
            confidence: 0.5,
        })
        .mount(&llm)
        .await;
    let app = start(&fakes, Some(&llm), None).await;
    let approved = whatsapp(
        &app,
        "whatsapp:+447700900021",
        "SMa1",
        "I forgot my password, what now?",
    )
    .await;
    let rejected = whatsapp(
        &app,
        "whatsapp:+447700900022",
        "SMa2",
        "Password reset please?",
    )
    .await;
    let approvals = Approvals::new(EventStore::new(app.pool().clone()), "The Support Team");
    let mut ids = Vec::new();
    for ticket in [approved, rejected] {
        let requested = event_of(&app, ticket, "ApprovalRequested").await;
        assert!(
            requested["reasons"][0]
                .as_str()
                .unwrap()
                .contains("confidence 0.50"),
            "{requested}"
        );
        ids.push(
            requested["approval_id"]
                .as_str()
                .unwrap()
                .parse::<Uuid>()
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        fakes.whatsapp_sent().await.is_empty(),
        "nothing reaches the customer before approval"
    );

    approvals
        .approve(
            approved,
            ids[0],
            "grace",
            Some(
                "Choose Forgot password on the sign-in page, then follow the email we send.".into(),
            ),
            "corr",
        )
        .await
        .unwrap();
    approvals
        .reject(rejected, ids[1], "grace", "not our product's flow", "corr")
        .await
        .unwrap();
    let delivered = sent_count_reaches(&fakes, 1).await;
    assert!(
        delivered[0].contains("Forgot password on the sign-in page, then follow"),
        "{delivered:?}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        fakes.whatsapp_sent().await.len(),
        1,
        "the rejected draft is never delivered"
    );
    assert_eq!(count(&app, rejected, "ResponseSent").await, 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_the_model_is_down_the_fallback_and_then_the_local_responder_answer() {
    let fakes = Fakes::start(true).await;
    let down = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&down)
        .await;
    let fallback = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .respond_with(ScriptedAnthropic {
            body: "Exports are available in CSV and JSON on all plans. Open the project and choose the project menu, then Export.",
        })
        .mount(&fallback)
        .await;
    let app = start(&fakes, Some(&down), Some(&fallback)).await;
    let ticket = whatsapp(
        &app,
        "whatsapp:+447700900031",
        "SMf1",
        "How can I export a project?",
    )
    .await;
    assert_eq!(
        event_of(&app, ticket, "ResponseDrafted").await["generated_by"],
        "claude-test"
    );
    event_of(&app, ticket, "ResponseSent").await;
    app.stop().await;

    // Both providers down: the local responder still answers.
    let fakes = Fakes::start(true).await;
    let also_down = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&also_down)
        .await;
    let app = start(&fakes, Some(&down), Some(&also_down)).await;
    let ticket = whatsapp(
        &app,
        "whatsapp:+447700900032",
        "SMf2",
        "How do I export my project data?",
    )
    .await;
    assert_eq!(
        event_of(&app, ticket, "ResponseDrafted").await["generated_by"],
        "local"
    );
    sent_count_reaches(&fakes, 1).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_undeliverable_reply_ends_in_the_dead_letter_topic_and_an_escalation() {
    let fakes = Fakes::start(false).await;
    let app = start(&fakes, None, None).await;
    let ticket = whatsapp(
        &app,
        "whatsapp:+447700900041",
        "SMd1",
        "How do I export my project data?",
    )
    .await;
    let escalated = event_of(&app, ticket, "TicketEscalated").await;
    assert_eq!(escalated["reason"], "delivery_failed");
    let failed = event_of(&app, ticket, "DeliveryStatusChanged").await;
    assert_eq!(failed["status"], "failed");
    assert!(
        fakes.twilio.received_requests().await.unwrap().len() >= 5,
        "retried before giving up"
    );
    let kafka = app.kafka();
    let dlq = read_topic(&kafka.brokers, &kafka.topics.dlq(), 1, WAIT).await;
    assert_eq!(dlq[0].envelope.event_type, "ResponseSent");
    assert_eq!(dlq[0].key, ticket.to_string());
    assert_eq!(
        dlq[0].headers["source_topic"],
        kafka.topics.outbound(Channel::Whatsapp)
    );
    assert!(
        dlq[0].headers["error"].contains("503"),
        "{:?}",
        dlq[0].headers
    );
    assert!(dlq[0].headers.contains_key("source_offset"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_email_reply_joins_the_customers_gmail_thread() {
    let fakes = Fakes::start(true).await;
    // The Gmail fake also serves the inbound side.
    let message = json!({
        "id": "gm1", "threadId": "thread-77", "labelIds": ["INBOX"], "internalDate": "1795000000000",
        "payload": {"mimeType": "text/plain", "headers": [
            {"name": "From", "value": "Ada Lovelace <ada@example.com>"},
            {"name": "Subject", "value": "Exporting data"},
            {"name": "Message-ID", "value": "<CA+gm1@mail.example.com>"}],
          "body": {"data": URL_SAFE_NO_PAD.encode("How do I export my project data?")}}
    });
    Mock::given(method("GET"))
        .and(path_regex("^/gmail/v1/users/[^/]+/messages$"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"messages": [{"id": "gm1", "threadId": "thread-77"}]})),
        )
        .mount(&fakes.gmail)
        .await;
    Mock::given(method("GET"))
        .and(path_regex("^/gmail/v1/users/[^/]+/messages/gm1$"))
        .respond_with(ResponseTemplate::new(200).set_body_json(message))
        .mount(&fakes.gmail)
        .await;
    let app = start(&fakes, None, None).await;
    let data = base64::engine::general_purpose::STANDARD
        .encode(json!({"emailAddress": "support@acme.test", "historyId": 9}).to_string());
    let push = app
        .http
        .post(app.url(&format!(
            "/webhooks/gmail?token={}",
            crate::common::GMAIL_PUSH_TOKEN
        )))
        .json(&json!({"message": {"data": data, "messageId": "1"}, "subscription": "s"}))
        .send()
        .await
        .unwrap();
    assert_eq!(push.status(), 204);

    let sent = eventually("a reply sent through Gmail", WAIT, || async {
        fakes
            .gmail
            .received_requests()
            .await
            .unwrap()
            .into_iter()
            .find(|r| r.url.path() == "/gmail/v1/users/me/messages/send")
    })
    .await;
    let body: Value = serde_json::from_slice(&sent.body).unwrap();
    assert_eq!(body["threadId"], "thread-77");
    let raw = String::from_utf8(
        URL_SAFE_NO_PAD
            .decode(body["raw"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert!(raw.contains("To: ada@example.com\r\n"), "{raw}");
    assert!(raw.contains("From: support@acme.test\r\n"), "{raw}");
    assert!(raw.contains("Subject: Re: Exporting data\r\n"), "{raw}");
    assert!(
        raw.contains("In-Reply-To: <CA+gm1@mail.example.com>\r\n"),
        "{raw}"
    );
    assert!(raw.contains("Hi Ada,"), "{raw}");
    assert!(raw.contains("Ticket reference: "), "{raw}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sla_breach_is_recorded_once() {
    let app = TestApp::spawn_with(&[Role::Api, Role::Relay, Role::Projector], &[]).await;
    let store = EventStore::new(app.pool().clone());
    let ticket = Uuid::now_v7();
    store
        .execute::<Ticket>(
            &ticket.to_string(),
            TicketCommand::Open {
                ticket_id: ticket,
                customer_id: Uuid::new_v4(),
                channel: Channel::Whatsapp,
                subject: None,
                category: Category::General,
                priority: Priority::Medium,
                at: chrono::Utc::now() - chrono::TimeDelta::minutes(10),
                previous_ticket_id: None,
            },
            &EventMetadata::new("sla-test", Actor::system("test")),
        )
        .await
        .unwrap();
    let pool = app.pool().clone();
    eventually("the ticket projected", WAIT, || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, Uuid>("SELECT ticket_id FROM crm_tickets WHERE ticket_id = $1")
                .bind(ticket)
                .fetch_optional(&pool)
                .await
                .unwrap()
        }
    })
    .await;
    assert_eq!(
        casebook_commands::sla::check_once(&store, app.pool())
            .await
            .unwrap(),
        1
    );
    // Before or after the read model catches up, a second check adds nothing.
    assert_eq!(
        casebook_commands::sla::check_once(&store, app.pool())
            .await
            .unwrap(),
        0
    );
    assert_eq!(count(&app, ticket, "SlaBreached").await, 1);
    let breach = event_of(&app, ticket, "SlaBreached").await;
    assert_eq!(breach["kind"], "first_response");
    app.stop().await;
}
