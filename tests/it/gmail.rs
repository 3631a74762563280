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

use crate::common::{eventually, TestApp, GMAIL_PUSH_TOKEN};

pub const MAILBOX: &str = "support@acme.test";
pub const ACCESS_TOKEN: &str = "gmail-access-token";

pub fn gmail_message(
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

pub async fn mount_message(server: &MockServer, message: Value) {
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

pub async fn app_with_gmail(server: &MockServer) -> TestApp {
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

pub async fn send_push(app: &TestApp, history_id: u64, token: &str) -> reqwest::Response {
    app.http
        .post(app.url(&format!("/webhooks/gmail?token={token}")))
        .json(&push(history_id))
        .send()
        .await
        .unwrap()
}

/// The ticket and customer a Gmail message became, once the mail sync
/// worker has taken it in.
pub async fn ticket_of(app: &TestApp, gmail_id: &str) -> (Uuid, Uuid) {
    eventually(
        &format!("Gmail message {gmail_id} taken in"),
        Duration::from_secs(60),
        || async {
            sqlx::query_as(
                "SELECT aggregate_id::uuid, (payload->>'customer_id')::uuid FROM events
                  WHERE event_type = 'CustomerMessageReceived' AND payload->>'channel_message_id' = $1",
            )
            .bind(gmail_id)
            .fetch_optional(app.pool())
            .await
            .unwrap()
        },
    )
    .await
}

/// Waits until the mail sync has listed everything notified and settled
/// every message it could.
pub async fn synced(app: &TestApp) {
    eventually("the mailbox synced", Duration::from_secs(120), || async {
        let behind: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM gmail_sync
                      WHERE history_id IS NULL OR notified_history_id > history_id OR lease_until IS NOT NULL)
                  + (SELECT count(*) FROM gmail_messages WHERE state = 'pending')",
        )
        .fetch_one(app.pool())
        .await
        .unwrap();
        (behind == 0).then_some(())
    })
    .await
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

    // A redelivered push changes nothing.
    assert_eq!(send_push(&app, 1010, GMAIL_PUSH_TOKEN).await.status(), 204);
    synced(&app).await;
    assert_eq!(
        app.count("SELECT count(*) FROM events WHERE event_type = 'CustomerMessageReceived'")
            .await,
        3
    );
    let skipped: String =
        sqlx::query_scalar("SELECT state FROM gmail_messages WHERE message_id = 'm4'")
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert_eq!(
        skipped, "skipped",
        "our own sent reply is not a customer writing"
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
async fn when_gmail_fails_the_push_is_kept_and_the_sync_catches_up_later() {
    let gmail = MockServer::start().await;
    let app = app_with_gmail(&gmail).await;
    let failing = Mock::given(method("GET"))
        .and(path(format!("/gmail/v1/users/{MAILBOX}/messages")))
        .respond_with(
            ResponseTemplate::new(503)
                .set_body_string("backend error for +15551234567 <ada@example.com>"),
        )
        .mount_as_scoped(&gmail)
        .await;
    // Recorded and answered at once, whatever Gmail is doing.
    let response = send_push(&app, 2000, GMAIL_PUSH_TOKEN).await;
    assert_eq!(response.status(), 204);
    let error: String = eventually(
        "the failed sync is recorded",
        Duration::from_secs(60),
        || async {
            sqlx::query_scalar("SELECT last_error FROM gmail_sync WHERE last_error IS NOT NULL")
                .fetch_optional(app.pool())
                .await
                .unwrap()
        },
    )
    .await;
    assert!(
        !error.contains("5551234567") && !error.contains("ada@"),
        "{error}"
    );
    assert!(
        gmail.received_requests().await.unwrap().len() > 1,
        "transient failures are retried"
    );
    drop(failing);

    // Gmail is back: the worker catches up with no new push.
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
