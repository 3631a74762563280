//! Gmail push notifications, read through a fake Gmail API that speaks its
//! JSON (users.messages.list, users.history.list, users.messages.get).

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use casebook::app::Role;
use serde_json::{json, Value};
use uuid::Uuid;
use wiremock::matchers::{header, method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

use std::time::Duration;

use crate::common::{eventually, form, TestApp, GMAIL_PUSH_TOKEN};

const MAILBOX: &str = "support@acme.test";
const ACCESS_TOKEN: &str = "gmail-access-token";

fn gmail_message(
    id: &str,
    thread: &str,
    from: &str,
    subject: &str,
    body: &str,
    labels: &[&str],
) -> Value {
    json!({
        "id": id,
        "threadId": thread,
        "labelIds": labels,
        "snippet": body.chars().take(40).collect::<String>(),
        "historyId": "1005",
        "internalDate": "1795000000000",
        "sizeEstimate": 2048,
        "payload": {
            "partId": "",
            "mimeType": "multipart/alternative",
            "filename": "",
            "headers": [
                {"name": "From", "value": from},
                {"name": "To", "value": MAILBOX},
                {"name": "Subject", "value": subject},
                {"name": "Message-ID", "value": format!("<{id}@mail.example.com>")}
            ],
            "body": {"size": 0},
            "parts": [
                {"partId": "0", "mimeType": "text/plain", "filename": "", "headers": [],
                 "body": {"size": body.len(), "data": URL_SAFE_NO_PAD.encode(body)}},
                {"partId": "1", "mimeType": "text/html", "filename": "", "headers": [],
                 "body": {"size": body.len(), "data": URL_SAFE_NO_PAD.encode(format!("<div>{body}</div>"))}}
            ]
        }
    })
}

fn push(history_id: u64) -> Value {
    let data = json!({"emailAddress": MAILBOX, "historyId": history_id}).to_string();
    json!({
        "message": {"data": STANDARD.encode(data), "messageId": "2070443601311540", "publishTime": "2026-11-24T10:00:00.000Z"},
        "subscription": "projects/acme/subscriptions/gmail-push"
    })
}

async fn mount_message(server: &MockServer, message: Value) {
    let id = message["id"].as_str().unwrap().to_string();
    Mock::given(method("GET"))
        .and(path(format!("/gmail/v1/users/{MAILBOX}/messages/{id}")))
        .and(query_param("format", "full"))
        .and(header(
            "authorization",
            format!("Bearer {ACCESS_TOKEN}").as_str(),
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(message))
        .mount(server)
        .await;
}

async fn app_with_gmail(server: &MockServer) -> TestApp {
    app_with_gmail_roles(server, &[Role::Api]).await
}

async fn app_with_gmail_roles(server: &MockServer, roles: &[Role]) -> TestApp {
    TestApp::spawn_with(
        roles,
        &[
            ("GMAIL_API_BASE", server.uri()),
            ("GMAIL_ACCESS_TOKEN", ACCESS_TOKEN.to_string()),
        ],
    )
    .await
}

async fn send_push(app: &TestApp, history_id: u64, token: &str) -> reqwest::Response {
    app.http
        .post(app.url(&format!("/webhooks/gmail?token={token}")))
        .json(&push(history_id))
        .send()
        .await
        .unwrap()
}

async fn ticket_of(app: &TestApp, gmail_id: &str) -> (Uuid, Uuid) {
    sqlx::query_as(
        "SELECT aggregate_id::uuid, (payload->>'customer_id')::uuid FROM events
          WHERE event_type = 'CustomerMessageReceived' AND payload->>'channel_message_id' = $1",
    )
    .bind(gmail_id)
    .fetch_one(app.pool())
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_is_read_through_the_gmail_api_and_threaded() {
    let gmail = MockServer::start().await;
    // The backbone: the threading is checked in the read models too.
    let app = app_with_gmail_roles(&gmail, crate::common::BACKBONE).await;

    // First push: no cursor yet, so the inbox's recent messages are listed.
    Mock::given(method("GET"))
        .and(path(format!("/gmail/v1/users/{MAILBOX}/messages")))
        .and(query_param("labelIds", "INBOX"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "messages": [{"id": "m1", "threadId": "t1"}], "resultSizeEstimate": 1
        })))
        .expect(1)
        .mount(&gmail)
        .await;
    mount_message(
        &gmail,
        gmail_message(
            "m1",
            "t1",
            "Ada Lovelace <Ada@Example.com>",
            "Invoices",
            "Where can I download my invoices?",
            &["INBOX", "UNREAD"],
        ),
    )
    .await;
    assert_eq!(send_push(&app, 1000, GMAIL_PUSH_TOKEN).await.status(), 204);
    let (t1, ada) = ticket_of(&app, "m1").await;

    // Second push: the history since the cursor brings a reply in the same
    // thread, a new thread, and our own sent reply (which is skipped).
    Mock::given(method("GET"))
        .and(path(format!("/gmail/v1/users/{MAILBOX}/history")))
        .and(query_param("startHistoryId", "1000"))
        .and(query_param("historyTypes", "messageAdded"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "history": [
                {"id": "1003", "messagesAdded": [{"message": {"id": "m2", "threadId": "t1", "labelIds": ["INBOX"]}}]},
                {"id": "1004", "messagesAdded": [{"message": {"id": "m4", "threadId": "t1", "labelIds": ["SENT"]}}]},
                {"id": "1005", "messagesAdded": [{"message": {"id": "m3", "threadId": "t2", "labelIds": ["INBOX"]}}]}
            ],
            "historyId": "1010"
        })))
        .expect(1)
        .mount(&gmail)
        .await;
    mount_message(
        &gmail,
        gmail_message("m2", "t1", "ada@example.com", "Re: Invoices",
            "Found them, thanks!\n\nOn Tue, Support <support@acme.test> wrote:\n> Billing > Invoices", &["INBOX"]),
    )
    .await;
    mount_message(
        &gmail,
        gmail_message(
            "m3",
            "t2",
            "Ada <ada@example.com>",
            "API limits",
            "What are the API rate limits?",
            &["INBOX"],
        ),
    )
    .await;
    mount_message(
        &gmail,
        gmail_message(
            "m4",
            "t1",
            "Support <support@acme.test>",
            "Re: Invoices",
            "Billing > Invoices",
            &["SENT"],
        ),
    )
    .await;
    assert_eq!(send_push(&app, 1010, GMAIL_PUSH_TOKEN).await.status(), 204);

    let (t1_again, ada_again) = ticket_of(&app, "m2").await;
    assert_eq!(t1_again, t1, "a reply in the thread continues its ticket");
    assert_eq!(ada_again, ada);
    let (t2, ada_third) = ticket_of(&app, "m3").await;
    assert_ne!(t2, t1, "a new thread is a new ticket");
    assert_eq!(ada_third, ada);
    assert_eq!(
        app.count("SELECT count(*) FROM events WHERE event_type = 'CustomerMessageReceived'")
            .await,
        3
    );
    let body: String = sqlx::query_scalar(
        "SELECT payload->>'body' FROM events WHERE payload->>'channel_message_id' = 'm2' AND event_type = 'CustomerMessageReceived'",
    )
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(body, "Found them, thanks!", "quoted history is dropped");

    // A web form naming the same address is only a claim: a customer of its
    // own until the address is confirmed.
    let submitted: Value = app
        .submit_form(form("ada@example.com", "And one more thing"))
        .await
        .json()
        .await
        .unwrap();
    let webform_customer: Uuid = sqlx::query_scalar(
        "SELECT (payload->>'customer_id')::uuid FROM events WHERE aggregate_id = $1 AND event_type = 'TicketOpened'",
    )
    .bind(submitted["ticket_id"].as_str().unwrap())
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_ne!(webform_customer, ada);
    assert_eq!(
        app.count("SELECT count(*) FROM events WHERE event_type = 'CustomerRegistered'")
            .await,
        2
    );

    // A redelivered push changes nothing.
    assert_eq!(send_push(&app, 1010, GMAIL_PUSH_TOKEN).await.status(), 204);
    assert_eq!(
        app.count("SELECT count(*) FROM events WHERE event_type = 'CustomerMessageReceived'")
            .await,
        4
    );

    // The read models follow: the thread is one conversation of two messages.
    let pool = app.pool().clone();
    let (channels, inbound): (Vec<String>, i32) = eventually("the threaded conversation", Duration::from_secs(60), || {
        let pool = pool.clone();
        async move {
            sqlx::query_as("SELECT channels, inbound_count FROM crm_conversations WHERE ticket_id = $1 AND inbound_count = 2")
                .bind(t1)
                .fetch_optional(&pool)
                .await
                .unwrap()
        }
    })
    .await;
    assert_eq!((channels, inbound), (vec!["email".to_string()], 2));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_with_a_wrong_token_is_refused() {
    let gmail = MockServer::start().await;
    let app = app_with_gmail(&gmail).await;
    let response = send_push(&app, 1000, "wrong").await;
    assert_eq!(response.status(), 403);
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"],
        "forbidden"
    );
    assert!(gmail.received_requests().await.unwrap().is_empty());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_gmail_fails_the_push_is_not_acknowledged_and_nothing_is_lost() {
    let gmail = MockServer::start().await;
    let app = app_with_gmail(&gmail).await;
    let failing = Mock::given(method("GET"))
        .and(path(format!("/gmail/v1/users/{MAILBOX}/messages")))
        .respond_with(ResponseTemplate::new(503))
        .mount_as_scoped(&gmail)
        .await;
    let response = send_push(&app, 2000, GMAIL_PUSH_TOKEN).await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    assert!(
        gmail.received_requests().await.unwrap().len() > 1,
        "transient failures are retried"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM gmail_sync").await,
        0,
        "the cursor did not move"
    );
    drop(failing);

    // Pub/Sub redelivers; now Gmail answers.
    Mock::given(method("GET"))
        .and(path(format!("/gmail/v1/users/{MAILBOX}/messages")))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"messages": [{"id": "m9", "threadId": "t9"}]})),
        )
        .mount(&gmail)
        .await;
    mount_message(
        &gmail,
        gmail_message(
            "m9",
            "t9",
            "bob@example.org",
            "Hello",
            "Is there a mobile app?",
            &["INBOX"],
        ),
    )
    .await;
    assert_eq!(send_push(&app, 2000, GMAIL_PUSH_TOKEN).await.status(), 204);
    ticket_of(&app, "m9").await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_push_is_a_bad_request() {
    let gmail = MockServer::start().await;
    let app = app_with_gmail(&gmail).await;
    let response = app
        .http
        .post(app.url(&format!("/webhooks/gmail?token={GMAIL_PUSH_TOKEN}")))
        .json(&json!({"message": {"data": "%%%"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    // A notification for something that is not a mailbox.
    let data =
        STANDARD.encode(json!({"emailAddress": "not-a-mailbox", "historyId": 5}).to_string());
    let response = app
        .http
        .post(app.url(&format!("/webhooks/gmail?token={GMAIL_PUSH_TOKEN}")))
        .json(&json!({"message": {"data": data, "messageId": "2"}, "subscription": "s"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(response.json::<Value>().await.unwrap()["message"]
        .as_str()
        .unwrap()
        .contains("emailAddress"));
    assert!(gmail.received_requests().await.unwrap().is_empty());
    assert_eq!(app.count("SELECT count(*) FROM events").await, 0);
    app.stop().await;
}
