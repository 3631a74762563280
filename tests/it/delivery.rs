//! Delivery end to end: a reply appended to the store travels through the
//! relay and the real broker to the delivery worker, which sends it to fakes
//! of Twilio's Messages API and Gmail's API speaking their wire formats
//! (message resources, lists with filters, `rfc822msgid:` search). The fakes
//! fail the way providers do: a part refused for a while, an acceptance that
//! answers too late, an error body naming the customer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use casebook::app::Role;
use casebook_commands::delivery::message_id;
use casebook_commands::EventStore;
use casebook_domain::{Actor, Channel, EventMetadata, Ticket, TicketCommand};
use serde_json::{json, Value};
use uuid::Uuid;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::common::{eventually, read_topic, TestApp};

const WAIT: Duration = Duration::from_secs(90);
const ACCOUNT: &str = "AC0123456789abcdef0123456789abcdef";
const OUR_NUMBER: &str = "whatsapp:+14155238886";
const SUPPORT: &str = "support@acme.test";

/// Twilio's Messages resource: `POST` creates a message (form-encoded),
/// `GET` lists them newest first, filtered by `To` and `From`.
#[derive(Default)]
struct Twilio {
    /// The messages Twilio has.
    stored: Vec<Value>,
    /// The `Body` of every create request, in order.
    posts: Vec<String>,
    /// Body → how many more create requests answer 503.
    unavailable: HashMap<String, usize>,
    /// Body → accept it, but answer this late (once).
    stall: HashMap<String, Duration>,
    /// Refuse every create request with this status and error body.
    refuse: Option<(u16, Value)>,
    lists: usize,
}

#[derive(Clone, Default)]
struct TwilioFake(Arc<Mutex<Twilio>>);

impl TwilioFake {
    fn with(&self, f: impl FnOnce(&mut Twilio)) -> &Self {
        f(&mut self.0.lock().unwrap());
        self
    }

    fn get<T>(&self, f: impl FnOnce(&Twilio) -> T) -> T {
        f(&self.0.lock().unwrap())
    }

    fn stored_bodies(&self) -> Vec<String> {
        self.get(|t| {
            t.stored
                .iter()
                .map(|m| m["body"].as_str().unwrap().to_string())
                .collect()
        })
    }

    async fn serve(&self) -> MockServer {
        let server = MockServer::start().await;
        Mock::given(path(format!(
            "/2010-04-01/Accounts/{ACCOUNT}/Messages.json"
        )))
        .respond_with(self.clone())
        .mount(&server)
        .await;
        server
    }
}

impl Respond for TwilioFake {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut t = self.0.lock().unwrap();
        let uri = format!("/2010-04-01/Accounts/{ACCOUNT}/Messages.json");
        if request.method.as_str() == "GET" {
            t.lists += 1;
            let q: HashMap<String, String> = request.url.query_pairs().into_owned().collect();
            let messages: Vec<Value> = t
                .stored
                .iter()
                .rev()
                .filter(|m| q.get("To").is_none_or(|v| m["to"] == *v))
                .filter(|m| q.get("From").is_none_or(|v| m["from"] == *v))
                .cloned()
                .collect();
            return ResponseTemplate::new(200).set_body_json(json!({
                "messages": messages, "uri": uri, "first_page_uri": uri,
                "next_page_uri": null, "previous_page_uri": null, "page": 0, "page_size": 50,
            }));
        }
        let form: HashMap<String, String> = serde_urlencoded::from_bytes(&request.body).unwrap();
        let body = form["Body"].clone();
        t.posts.push(body.clone());
        if let Some(n) = t.unavailable.get_mut(&body).filter(|n| **n > 0) {
            *n -= 1;
            return ResponseTemplate::new(503).set_body_json(json!({
                "code": 20503, "message": "Service unavailable",
                "more_info": "https://www.twilio.com/docs/errors/20503", "status": 503}));
        }
        if let Some((status, error)) = &t.refuse {
            return ResponseTemplate::new(*status).set_body_json(error.clone());
        }
        let sid = format!("SM{}", Uuid::new_v4().simple());
        let message = json!({
            "sid": sid, "account_sid": ACCOUNT, "to": form["To"], "from": form["From"],
            "body": body, "status": "queued", "direction": "outbound-api", "num_segments": "1",
            "date_created": chrono::Utc::now().to_rfc2822(), "date_updated": chrono::Utc::now().to_rfc2822(),
            "date_sent": null, "error_code": null, "error_message": null, "price": null,
            "uri": format!("/2010-04-01/Accounts/{ACCOUNT}/Messages/{sid}.json"),
        });
        t.stored.push(message.clone());
        let response = ResponseTemplate::new(201).set_body_json(message);
        match t.stall.remove(&body) {
            Some(delay) => response.set_delay(delay),
            None => response,
        }
    }
}

/// Gmail: `messages/send` takes a base64url RFC 2822 message, and
/// `messages?q=rfc822msgid:<id>` finds one by its `Message-ID`.
#[derive(Default)]
struct Gmail {
    /// (Gmail id, Message-ID header, raw message).
    stored: Vec<(String, String, String)>,
    /// The Message-ID of every message sent.
    sent: Vec<String>,
    searches: Vec<String>,
}

impl Gmail {
    /// Messages sent for one reply (its parts' Message-IDs name it); the
    /// web form's acknowledgement is not one of them.
    fn sends_of(&self, response_id: Uuid) -> usize {
        let marker = format!("casebook.{}.", response_id.simple());
        self.sent.iter().filter(|m| m.contains(&marker)).count()
    }
}

#[derive(Clone, Default)]
struct GmailFake(Arc<Mutex<Gmail>>);

impl GmailFake {
    fn get<T>(&self, f: impl FnOnce(&Gmail) -> T) -> T {
        f(&self.0.lock().unwrap())
    }

    async fn serve(&self) -> MockServer {
        let server = MockServer::start().await;
        Mock::given(path("/gmail/v1/users/me/messages/send"))
            .and(method("POST"))
            .respond_with(self.clone())
            .mount(&server)
            .await;
        Mock::given(path("/gmail/v1/users/me/messages"))
            .and(method("GET"))
            .respond_with(self.clone())
            .mount(&server)
            .await;
        server
    }

    fn store(&self, message_id: &str, raw: &str) -> String {
        let id = format!("{:x}", rand_id());
        self.0
            .lock()
            .unwrap()
            .stored
            .push((id.clone(), message_id.to_string(), raw.to_string()));
        id
    }
}

fn rand_id() -> u64 {
    Uuid::new_v4().as_u64_pair().0
}

impl Respond for GmailFake {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        if request.method.as_str() == "GET" {
            let q = request
                .url
                .query_pairs()
                .find(|(k, _)| k == "q")
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
            let mut g = self.0.lock().unwrap();
            g.searches.push(q.clone());
            let wanted = q.strip_prefix("rfc822msgid:").unwrap_or("\u{0}");
            let found: Vec<Value> = g
                .stored
                .iter()
                .filter(|(_, mid, _)| {
                    mid.trim_matches(['<', '>']) == wanted.trim_matches(['<', '>'])
                })
                .map(|(id, _, _)| json!({"id": id, "threadId": format!("t-{id}")}))
                .collect();
            return ResponseTemplate::new(200).set_body_json(if found.is_empty() {
                json!({"resultSizeEstimate": 0})
            } else {
                json!({"messages": found, "resultSizeEstimate": found.len()})
            });
        }
        let body: Value = serde_json::from_slice(&request.body).unwrap();
        let raw = String::from_utf8(
            URL_SAFE_NO_PAD
                .decode(body["raw"].as_str().unwrap())
                .unwrap(),
        )
        .unwrap();
        let mid = raw
            .lines()
            .find_map(|l| l.strip_prefix("Message-ID: "))
            .unwrap_or_default()
            .to_string();
        self.0.lock().unwrap().sent.push(mid.clone());
        let id = self.store(&mid, &raw);
        ResponseTemplate::new(200)
            .set_body_json(json!({"id": id, "threadId": format!("t-{id}"), "labelIds": ["SENT"]}))
    }
}

async fn start(twilio: &MockServer, gmail: &MockServer, extra: &[(&str, String)]) -> TestApp {
    let mut overrides = vec![
        ("TWILIO_ACCOUNT_SID", ACCOUNT.to_string()),
        ("TWILIO_WHATSAPP_FROM", OUR_NUMBER.to_string()),
        ("TWILIO_API_BASE", twilio.uri()),
        ("GMAIL_API_BASE", gmail.uri()),
        ("GMAIL_ACCESS_TOKEN", "gmail-access".to_string()),
        ("GMAIL_SUPPORT_ADDRESS", SUPPORT.to_string()),
    ];
    overrides.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
    TestApp::spawn_with(&[Role::Api, Role::Relay, Role::Delivery], &overrides).await
}

/// A WhatsApp customer writes in; returns the ticket.
async fn whatsapp_ticket(app: &TestApp, from: &str) -> Uuid {
    let sid = format!("SM{}", Uuid::new_v4().simple());
    let params = [
        ("MessageSid", sid.as_str()),
        ("From", from),
        ("To", OUR_NUMBER),
        ("Body", "Where is my export?"),
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
    .bind(&sid)
    .fetch_one(app.pool())
    .await
    .unwrap()
}

/// A web form customer writes in; returns the ticket.
async fn webform_ticket(app: &TestApp, email: &str) -> Uuid {
    let response = app
        .submit_form(crate::common::form(
            email,
            "The CSV export fails every time.",
        ))
        .await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    body["ticket_id"].as_str().unwrap().parse().unwrap()
}

/// The agent's part, done by hand: a reply appended to the ticket.
async fn reply(app: &TestApp, ticket: Uuid, response_id: Uuid, channel: Channel, parts: &[&str]) {
    EventStore::new(app.pool().clone())
        .execute::<Ticket>(
            &ticket.to_string(),
            TicketCommand::SendResponse {
                response_id,
                draft_id: None,
                channel,
                body: parts.join(" "),
                parts: if parts.len() > 1 {
                    parts.iter().map(|p| p.to_string()).collect()
                } else {
                    vec![]
                },
                in_reply_to: None,
                automatic: None,
                at: chrono::Utc::now(),
                holding: false,
                template: None,
            },
            &EventMetadata::new("delivery-test", Actor::system("test")),
        )
        .await
        .unwrap();
}

async fn payloads(app: &TestApp, ticket: Uuid, event_type: &str) -> Vec<Value> {
    sqlx::query_scalar(
        "SELECT payload FROM events WHERE aggregate_id = $1 AND event_type = $2 ORDER BY sequence",
    )
    .bind(ticket.to_string())
    .bind(event_type)
    .fetch_all(app.pool())
    .await
    .unwrap()
}

async fn first_event(app: &TestApp, ticket: Uuid, event_type: &'static str) -> Value {
    let pool = app.pool().clone();
    eventually(&format!("{event_type} on {ticket}"), WAIT, || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar(
                "SELECT payload FROM events WHERE aggregate_id = $1 AND event_type = $2 ORDER BY sequence LIMIT 1",
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

/// Provider ids recorded for a reply, part by part.
async fn recorded_parts(app: &TestApp, response_id: Uuid) -> Vec<(i32, String, Option<String>)> {
    sqlx::query_as(
        "SELECT part_index, state, provider_message_id FROM delivery_parts WHERE response_id = $1 ORDER BY part_index",
    )
    .bind(response_id)
    .fetch_all(app.pool())
    .await
    .unwrap()
}

async fn all_parts_recorded(app: &TestApp, response_id: Uuid, n: usize) -> Vec<String> {
    let pool = app.pool().clone();
    eventually("every part accepted and recorded", WAIT, || {
        let pool = pool.clone();
        async move {
            let rows: Vec<(String, bool)> = sqlx::query_as(
                "SELECT provider_message_id, recorded FROM delivery_parts
                  WHERE response_id = $1 AND state = 'accepted' ORDER BY part_index",
            )
            .bind(response_id)
            .fetch_all(&pool)
            .await
            .unwrap();
            (rows.len() == n && rows.iter().all(|r| r.1))
                .then(|| rows.into_iter().map(|r| r.0).collect())
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_whatsapp_reply_whose_second_part_fails_resumes_at_that_part() {
    let twilio = TwilioFake::default();
    let parts = [
        "You can export a project from its menu.",
        "Exports come as CSV or JSON.",
        "Large exports arrive by email.",
    ];
    // Part 2 is refused more often than one handling retries it.
    twilio.with(|t| {
        t.unavailable.insert(parts[1].to_string(), 5);
    });
    let (twilio_server, gmail_server) = (twilio.serve().await, GmailFake::default().serve().await);
    let app = start(&twilio_server, &gmail_server, &[]).await;
    let ticket = whatsapp_ticket(&app, "whatsapp:+447700900101").await;
    let response_id = Uuid::now_v7();
    reply(&app, ticket, response_id, Channel::Whatsapp, &parts).await;

    let ids = all_parts_recorded(&app, response_id, 3).await;
    // Each part reached the customer once, in order; part 1 was never sent
    // again while part 2 was retried.
    assert_eq!(twilio.stored_bodies(), parts);
    let posts = twilio.get(|t| t.posts.clone());
    assert_eq!(
        posts.iter().filter(|p| *p == parts[0]).count(),
        1,
        "{posts:?}"
    );
    assert_eq!(
        posts.iter().filter(|p| *p == parts[1]).count(),
        6,
        "{posts:?}"
    );
    assert_eq!(
        posts.iter().filter(|p| *p == parts[2]).count(),
        1,
        "{posts:?}"
    );
    let stored_sids: Vec<String> = twilio.get(|t| {
        t.stored
            .iter()
            .map(|m| m["sid"].as_str().unwrap().to_string())
            .collect()
    });
    assert_eq!(ids, stored_sids);
    assert!(payloads(&app, ticket, "TicketEscalated").await.is_empty());
    assert_eq!(
        first_event(&app, ticket, "DeliveryStatusChanged").await["status"],
        "queued"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_send_accepted_whose_recording_fails_is_not_sent_again() {
    let gmail = GmailFake::default();
    let (twilio_server, gmail_server) = (TwilioFake::default().serve().await, gmail.serve().await);
    let app = start(&twilio_server, &gmail_server, &[]).await;
    // Recording the delivery fails twice after Gmail accepted the message;
    // each failure makes the worker handle the message again.
    sqlx::raw_sql(
        "CREATE SEQUENCE test_record_failures;
         CREATE FUNCTION test_fail_recording() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.event_type = 'DeliveryStatusChanged' THEN
             IF nextval('test_record_failures') <= 2 THEN
               RAISE EXCEPTION 'disk full (test)';
             END IF;
           END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER test_fail_recording BEFORE INSERT ON events
           FOR EACH ROW EXECUTE FUNCTION test_fail_recording();",
    )
    .execute(app.pool())
    .await
    .unwrap();
    let ticket = webform_ticket(&app, "grace@example.com").await;
    let response_id = Uuid::now_v7();
    reply(
        &app,
        ticket,
        response_id,
        Channel::Webform,
        &["Hi Grace, try the JSON export."],
    )
    .await;

    let status = first_event(&app, ticket, "DeliveryStatusChanged").await;
    assert_eq!(status["status"], "sent");
    let failures: i64 = sqlx::query_scalar("SELECT last_value FROM test_record_failures")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert!(failures >= 3, "recording failed before it succeeded");
    assert_eq!(
        gmail.get(|g| g.sends_of(response_id)),
        1,
        "Gmail accepted it once: never sent again"
    );
    let reply_mid = message_id(response_id, 0, SUPPORT);
    let stored_id = gmail.get(|g| {
        g.stored
            .iter()
            .find(|(_, mid, _)| *mid == reply_mid)
            .map(|(id, _, _)| id.clone())
            .expect("the reply is at Gmail")
    });
    assert_eq!(status["provider_message_id"], stored_id);
    assert_eq!(
        recorded_parts(&app, response_id).await,
        vec![(0, "accepted".to_string(), Some(stored_id))]
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_timeout_after_twilio_accepted_is_checked_before_anything_is_resent() {
    let twilio = TwilioFake::default();
    let body = "Your export is ready in Settings.";
    // Twilio takes the message but answers after the client gave up.
    twilio.with(|t| {
        t.stall.insert(body.to_string(), Duration::from_secs(20));
    });
    let (twilio_server, gmail_server) = (twilio.serve().await, GmailFake::default().serve().await);
    let app = start(
        &twilio_server,
        &gmail_server,
        &[("CASEBOOK_PROVIDER_TIMEOUT_SECS", "2".to_string())],
    )
    .await;
    let ticket = whatsapp_ticket(&app, "whatsapp:+447700900102").await;
    let response_id = Uuid::now_v7();
    reply(&app, ticket, response_id, Channel::Whatsapp, &[body]).await;

    let ids = all_parts_recorded(&app, response_id, 1).await;
    assert_eq!(twilio.get(|t| t.posts.len()), 1, "not resent");
    assert!(twilio.get(|t| t.lists) >= 1, "Twilio was asked first");
    let sid = twilio.get(|t| t.stored[0]["sid"].as_str().unwrap().to_string());
    assert_eq!(ids, vec![sid.clone()]);
    let status = first_event(&app, ticket, "DeliveryStatusChanged").await;
    assert_eq!(status["provider_message_id"], sid);
    assert!(payloads(&app, ticket, "TicketEscalated").await.is_empty());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_email_left_started_by_a_crash_is_found_at_gmail_by_its_message_id() {
    let gmail = GmailFake::default();
    let (twilio_server, gmail_server) = (TwilioFake::default().serve().await, gmail.serve().await);
    let app = start(&twilio_server, &gmail_server, &[]).await;
    let ticket = webform_ticket(&app, "lin@example.com").await;
    let response_id = Uuid::now_v7();
    // A worker marked the attempt started, Gmail took the message, and the
    // worker died before it could write down Gmail's answer.
    sqlx::query(
        "INSERT INTO delivery_parts (response_id, part_index, ticket_id, service, state) VALUES ($1, 0, $2, 'gmail', 'started')",
    )
    .bind(response_id)
    .bind(ticket)
    .execute(app.pool())
    .await
    .unwrap();
    let gmail_id = gmail.store(
        &message_id(response_id, 0, SUPPORT),
        "From: support@acme.test\r\n\r\nHi",
    );
    reply(
        &app,
        ticket,
        response_id,
        Channel::Webform,
        &["Hi Lin, here is how."],
    )
    .await;

    assert_eq!(
        all_parts_recorded(&app, response_id, 1).await,
        vec![gmail_id.clone()]
    );
    assert_eq!(
        gmail.get(|g| g.sends_of(response_id)),
        0,
        "found at Gmail, not sent again"
    );
    let searched = gmail.get(|g| g.searches.clone());
    assert_eq!(
        searched,
        vec![format!(
            "rfc822msgid:casebook.{}.0@acme.test",
            response_id.simple()
        )]
    );
    assert_eq!(
        first_event(&app, ticket, "DeliveryStatusChanged").await["provider_message_id"],
        gmail_id
    );

    // A reply that was never taken is sent, with that Message-ID.
    let second = Uuid::now_v7();
    reply(
        &app,
        ticket,
        second,
        Channel::Webform,
        &["Hi Lin, one more thing."],
    )
    .await;
    all_parts_recorded(&app, second, 1).await;
    assert_eq!(gmail.get(|g| g.sends_of(second)), 1);
    assert_eq!(gmail.get(|g| g.sends_of(response_id)), 0);
    let second_mid = message_id(second, 0, SUPPORT);
    let (_, _, raw) = gmail.get(|g| {
        g.stored
            .iter()
            .find(|(_, mid, _)| *mid == second_mid)
            .cloned()
            .expect("the second reply was sent with its Message-ID")
    });
    assert!(raw.contains("To: lin@example.com\r\n"), "{raw}");
    app.stop().await;
}

/// Everything the service logs, captured (JSON lines).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// One thread: the capturing subscriber sees every task of the service.
#[tokio::test(flavor = "current_thread")]
async fn a_provider_error_naming_the_customer_is_masked_in_logs_notes_and_dead_letters() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_current_span(true)
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let number = "+447700900199";
    let twilio = TwilioFake::default();
    twilio.with(|t| {
        t.refuse = Some((
            400,
            json!({"code": 63016, "message": format!("Failed to send freeform message to whatsapp:{number} because you are outside the allowed window. Contact lovelace@example.org"),
                   "more_info": "https://www.twilio.com/docs/errors/63016", "status": 400}),
        ));
    });
    let (twilio_server, gmail_server) = (twilio.serve().await, GmailFake::default().serve().await);
    let app = start(&twilio_server, &gmail_server, &[]).await;
    let ticket = whatsapp_ticket(&app, &format!("whatsapp:{number}")).await;
    let response_id = Uuid::now_v7();
    reply(
        &app,
        ticket,
        response_id,
        Channel::Whatsapp,
        &["Here is your answer."],
    )
    .await;

    let escalated = first_event(&app, ticket, "TicketEscalated").await;
    assert_eq!(escalated["reason"], "delivery_failed");
    let note = escalated["note"].as_str().unwrap();
    assert!(note.contains("63016"), "{note}");
    let failed = first_event(&app, ticket, "DeliveryStatusChanged").await;
    assert_eq!(failed["status"], "failed");
    let kafka = app.kafka();
    let dlq = read_topic(&kafka.brokers, &kafka.topics.dlq(), 1, WAIT).await;
    let error = dlq[0].headers["error"].clone();
    assert!(error.contains("63016"), "{error}");
    // Refused for good: tried once.
    assert_eq!(twilio.get(|t| t.posts.len()), 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("63016"), "the error was logged");
    for (place, text) in [
        ("escalation note", note.to_string()),
        ("delivery status", failed["error"].to_string()),
        ("dead-letter header", error.clone()),
        ("logs", logs.clone()),
    ] {
        for leak in ["447700900199", "7700 900199", "lovelace@"] {
            assert!(
                !text.contains(leak),
                "{leak} unmasked in the {place}: {text}"
            );
        }
    }
    assert!(
        note.contains("+**********99") && note.contains("l***@example.org"),
        "{note}"
    );
    app.stop().await;
}
