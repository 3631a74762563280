//! The mail sync worker: a push is recorded and answered at once; mail that
//! cannot become a ticket message is refused with its reason and never
//! blocks the mail after it; a backlog catches up, each message read once.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};
use wiremock::matchers::{method, path, path_regex, query_param};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

use crate::common::{eventually, GMAIL_PUSH_TOKEN};
use crate::gmail::{
    app_with_gmail, gmail_message, mount_message, send_push, synced, ticket_of, MAILBOX,
};

fn history(ids: &[&str], history_id: u64) -> Value {
    json!({
        "history": ids.iter().enumerate().map(|(n, id)| json!({
            "id": (history_id - ids.len() as u64 + n as u64).to_string(),
            "messagesAdded": [{"message": {"id": id, "threadId": format!("th{id}"), "labelIds": ["INBOX"]}}]
        })).collect::<Vec<_>>(),
        "historyId": history_id.to_string()
    })
}

/// A message with only the given MIME parts.
fn raw_message(id: &str, from: &str, subject: &str, parts: Value) -> Value {
    json!({
        "id": id, "threadId": format!("th{id}"), "labelIds": ["INBOX"], "internalDate": "1795000000000",
        "payload": {"mimeType": "multipart/alternative", "filename": "", "headers": [
            {"name": "From", "value": from}, {"name": "Subject", "value": subject}],
          "parts": parts}
    })
}

async fn first_push_lists(gmail: &MockServer, ids: &[&str]) {
    Mock::given(method("GET"))
        .and(path(format!("/gmail/v1/users/{MAILBOX}/messages")))
        .and(query_param("labelIds", "INBOX"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "messages": ids.iter().rev().map(|id| json!({"id": id, "threadId": format!("th{id}")})).collect::<Vec<_>>()
        })))
        .mount(gmail)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_intake_refuses_is_recorded_and_never_blocks_the_mailbox() {
    let gmail = MockServer::start().await;
    let app = app_with_gmail(&gmail).await;
    first_push_lists(&gmail, &["a1"]).await;
    mount_message(
        &gmail,
        gmail_message(
            "a1",
            "tha1",
            "ada@example.com",
            "Hi",
            "Where are my invoices?",
            &["INBOX"],
        ),
    )
    .await;
    assert_eq!(send_push(&app, 100, GMAIL_PUSH_TOKEN).await.status(), 204);
    ticket_of(&app, "a1").await;

    // Next: a subject with no body, an HTML mail that is only an image, a
    // message with no usable sender, then a good one.
    Mock::given(method("GET"))
        .and(path(format!("/gmail/v1/users/{MAILBOX}/history")))
        .and(query_param("startHistoryId", "100"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(history(&["b1", "b2", "b3", "b4"], 110)),
        )
        .mount(&gmail)
        .await;
    mount_message(
        &gmail,
        raw_message(
            "b1",
            "bob@example.org",
            "Subject only",
            json!([
            {"mimeType": "text/plain", "filename": "", "body": {"size": 0, "data": ""}}]),
        ),
    )
    .await;
    let image_only = URL_SAFE_NO_PAD.encode("<html><body><img src=\"cid:logo\"></body></html>");
    mount_message(
        &gmail,
        raw_message(
            "b2",
            "carol@example.org",
            "Look",
            json!([
            {"mimeType": "text/html", "filename": "", "body": {"size": 40, "data": image_only}}]),
        ),
    )
    .await;
    mount_message(
        &gmail,
        raw_message("b3", "not an address", "Hello", json!([
            {"mimeType": "text/plain", "filename": "", "body": {"size": 5, "data": URL_SAFE_NO_PAD.encode("Hello")}}])),
    )
    .await;
    mount_message(
        &gmail,
        gmail_message(
            "b4",
            "thb4",
            "dave@example.org",
            "Export",
            "How do I export to CSV?",
            &["INBOX"],
        ),
    )
    .await;
    assert_eq!(send_push(&app, 110, GMAIL_PUSH_TOKEN).await.status(), 204);
    ticket_of(&app, "b4").await;
    synced(&app).await;
    let refused: Vec<(String, String)> = sqlx::query_as(
        "SELECT message_id, reason FROM gmail_messages WHERE state = 'refused' ORDER BY message_id",
    )
    .fetch_all(app.pool())
    .await
    .unwrap();
    let ids: Vec<&str> = refused.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["b1", "b2", "b3"]);
    assert!(refused.iter().all(|(_, reason)| !reason.is_empty()));
    assert!(refused[2].1.contains("From"), "{}", refused[2].1);
    // Staff see them, with why.
    let listed = crate::audit::casebook(&app, &["mail", "refused", "--json"]);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    let listed_ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["gmail_message_id"].as_str().unwrap())
        .collect();
    assert_eq!(listed_ids.len(), 3);
    for id in ["b1", "b2", "b3"] {
        assert!(listed_ids.contains(&id), "{id} listed");
    }

    // The cursor moved past them: the next push brings only what is new.
    Mock::given(method("GET"))
        .and(path(format!("/gmail/v1/users/{MAILBOX}/history")))
        .and(query_param("startHistoryId", "110"))
        .respond_with(ResponseTemplate::new(200).set_body_json(history(&["c1"], 120)))
        .expect(1)
        .mount(&gmail)
        .await;
    mount_message(
        &gmail,
        gmail_message(
            "c1",
            "thc1",
            "erin@example.org",
            "Login",
            "I cannot log in",
            &["INBOX"],
        ),
    )
    .await;
    assert_eq!(send_push(&app, 120, GMAIL_PUSH_TOKEN).await.status(), 204);
    ticket_of(&app, "c1").await;
    synced(&app).await;
    let gets_of_refused = gmail
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.url.path().ends_with("/messages/b1"))
        .count();
    assert_eq!(gets_of_refused, 1, "a refused message is not fetched again");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_a_thousand_messages_catches_up_each_read_once() {
    const BACKLOG: usize = 1000;
    let gmail = MockServer::start().await;
    let app = app_with_gmail(&gmail).await;
    first_push_lists(&gmail, &[]).await;
    assert_eq!(send_push(&app, 10, GMAIL_PUSH_TOKEN).await.status(), 204);
    synced(&app).await;

    // A thousand messages arrived while we were away: two history pages.
    let ids: Vec<String> = (0..BACKLOG).map(|n| format!("k{n:04}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let mut first = history(&refs[..500], 510);
    first["nextPageToken"] = json!("page-2");
    Mock::given(method("GET"))
        .and(path(format!("/gmail/v1/users/{MAILBOX}/history")))
        .and(query_param("startHistoryId", "10"))
        .and(wiremock::matchers::query_param_is_missing("pageToken"))
        .respond_with(ResponseTemplate::new(200).set_body_json(first))
        .mount(&gmail)
        .await;
    Mock::given(method("GET"))
        .and(path(format!("/gmail/v1/users/{MAILBOX}/history")))
        .and(query_param("pageToken", "page-2"))
        .respond_with(ResponseTemplate::new(200).set_body_json(history(&refs[500..], 1010)))
        .mount(&gmail)
        .await;
    Mock::given(method("GET"))
        .and(path_regex(format!(
            r"^/gmail/v1/users/{MAILBOX}/messages/k\d+$"
        )))
        .respond_with(|request: &Request| {
            let id = request.url.path().rsplit('/').next().unwrap().to_string();
            ResponseTemplate::new(200).set_body_json(gmail_message(
                &id,
                &format!("th{id}"),
                &format!("customer-{id}@example.org"),
                "Question",
                "How do I reset my password?",
                &["INBOX"],
            ))
        })
        .mount(&gmail)
        .await;

    // Several pushes at once (Pub/Sub redelivers and fans out).
    let pushes =
        futures::future::join_all((0..5).map(|n| send_push(&app, 1000 + n, GMAIL_PUSH_TOKEN)))
            .await;
    assert!(pushes.iter().all(|r| r.status() == 204));
    eventually(
        "the backlog is taken in",
        Duration::from_secs(300),
        || async {
            let taken: i64 =
                sqlx::query_scalar("SELECT count(*) FROM gmail_messages WHERE state = 'accepted'")
                    .fetch_one(app.pool())
                    .await
                    .unwrap();
            (taken == BACKLOG as i64).then_some(())
        },
    )
    .await;
    synced(&app).await;
    let received = app
        .count("SELECT count(*) FROM events WHERE event_type = 'CustomerMessageReceived'")
        .await;
    assert_eq!(received, BACKLOG as i64);
    let gets = gmail
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.url.path().contains("/messages/k"))
        .count();
    assert_eq!(gets, BACKLOG, "every message is fetched exactly once");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_replies_bounces_and_list_mail_are_taken_in_marked_as_automated() {
    let gmail = MockServer::start().await;
    let app = app_with_gmail(&gmail).await;
    first_push_lists(&gmail, &["r1", "r2", "r3", "r4"]).await;
    let with_header = |id: &str, from: &str, header: Option<(&str, &str)>| {
        let mut m = gmail_message(
            id,
            &format!("th{id}"),
            from,
            "Re: Hello",
            "I am out of office until Monday.",
            &["INBOX"],
        );
        if let Some((name, value)) = header {
            m["payload"]["headers"]
                .as_array_mut()
                .unwrap()
                .push(json!({"name": name, "value": value}));
        }
        m
    };
    mount_message(
        &gmail,
        with_header(
            "r1",
            "ada@example.com",
            Some(("Auto-Submitted", "auto-replied")),
        ),
    )
    .await;
    mount_message(
        &gmail,
        with_header("r2", "MAILER-DAEMON@mx.example.org", None),
    )
    .await;
    mount_message(
        &gmail,
        with_header(
            "r3",
            "news@example.org",
            Some(("List-Id", "<news.example.org>")),
        ),
    )
    .await;
    mount_message(&gmail, with_header("r4", "bob@example.org", None)).await;
    assert_eq!(send_push(&app, 100, GMAIL_PUSH_TOKEN).await.status(), 204);
    for id in ["r1", "r2", "r3", "r4"] {
        ticket_of(&app, id).await;
    }
    let marks: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT payload->>'channel_message_id', payload->>'automated' FROM events
          WHERE event_type = 'CustomerMessageReceived' ORDER BY payload->>'channel_message_id'",
    )
    .fetch_all(app.pool())
    .await
    .unwrap();
    assert_eq!(
        marks,
        vec![
            ("r1".to_string(), Some("auto_submitted".to_string())),
            ("r2".to_string(), Some("bounce".to_string())),
            ("r3".to_string(), Some("mailing_list".to_string())),
            ("r4".to_string(), None),
        ]
    );
    app.stop().await;
}
