//! A claim is not an identity: a web-form email unlocks nothing until the
//! address is confirmed by the one-time link of the acknowledgement, and
//! nothing of another conversation reaches the status page, a reply or the
//! model. Through HTTP, the real broker, and fakes of Gmail and the model.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use casebook::app::Role;
use casebook_commands::claims::LinkKeys;
use serde_json::{json, Value};
use uuid::Uuid;
use wiremock::matchers::{method, path, path_regex};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::common::{eventually, form, TestApp, GMAIL_PUSH_TOKEN, JWT_SECRET, PUBLIC_URL};

const WAIT: Duration = Duration::from_secs(90);
const SECRET: &str = "ACCOUNT-SECRET-4242";

/// Gmail's `messages.send`: a reply in a thread stays in it, anything else
/// opens a new thread.
struct GmailSends(AtomicUsize);

impl Respond for GmailSends {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let n = self.0.fetch_add(1, Ordering::SeqCst);
        let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
        let thread = body["threadId"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("thread-out-{n}"));
        ResponseTemplate::new(200).set_body_json(
            json!({"id": format!("sent-{n}"), "threadId": thread, "labelIds": ["SENT"]}),
        )
    }
}

/// A model that asks for the customer's history, then answers briefly.
struct HistoryCurious;

impl Respond for HistoryCurious {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&request.body).unwrap();
        let asked = body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["role"] == "tool");
        let call = if asked {
            json!({"id": "call_2", "type": "function", "function": {"name": "send_response",
                "arguments": json!({"body": "Thank you, we are looking into it.", "confidence": 0.9}).to_string()}})
        } else {
            json!({"id": "call_1", "type": "function", "function": {"name": "get_customer_history",
                "arguments": "{}"}})
        };
        ResponseTemplate::new(200).set_body_json(json!({
            "id": "chatcmpl-1", "object": "chat.completion", "model": "scripted",
            "choices": [{"index": 0, "finish_reason": "tool_calls",
                "message": {"role": "assistant", "content": null, "tool_calls": [call]}}]
        }))
    }
}

async fn gmail_fake() -> MockServer {
    let gmail = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/gmail/v1/users/me/messages/send"))
        .respond_with(GmailSends(AtomicUsize::new(0)))
        .mount(&gmail)
        .await;
    gmail
}

fn gmail_message(id: &str, thread: &str, subject: &str, text: &str) -> Value {
    json!({
        "id": id, "threadId": thread, "labelIds": ["INBOX"], "internalDate": "1795000000000",
        "payload": {"mimeType": "text/plain", "headers": [
            {"name": "From", "value": "Ada Lovelace <ada@example.com>"},
            {"name": "Subject", "value": subject},
            {"name": "Message-ID", "value": format!("<{id}@mail.example.com>")}],
          "body": {"data": URL_SAFE_NO_PAD.encode(text)}}
    })
}

async fn mount_inbound(gmail: &MockServer, message: Value) {
    let id = message["id"].as_str().unwrap().to_string();
    Mock::given(method("GET"))
        .and(path_regex(format!("^/gmail/v1/users/[^/]+/messages/{id}$")))
        .respond_with(ResponseTemplate::new(200).set_body_json(message))
        .mount(gmail)
        .await;
}

/// The first push lists the inbox; later ones read history since the last.
async fn push(app: &TestApp, history_id: u64) {
    let data = STANDARD
        .encode(json!({"emailAddress": "support@acme.test", "historyId": history_id}).to_string());
    let response = app
        .http
        .post(app.url(&format!("/webhooks/gmail?token={GMAIL_PUSH_TOKEN}")))
        .json(&json!({"message": {"data": data, "messageId": history_id.to_string()}, "subscription": "s"}))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
}

async fn ticket_of_gmail(app: &TestApp, gmail_id: &str) -> Uuid {
    let pool = app.pool().clone();
    let gmail_id = gmail_id.to_string();
    eventually(&format!("gmail message {gmail_id} taken in"), WAIT, || {
        let pool = pool.clone();
        let gmail_id = gmail_id.clone();
        async move {
            sqlx::query_scalar(
                "SELECT aggregate_id::uuid FROM events WHERE event_type = 'CustomerMessageReceived'
                   AND payload->>'channel_message_id' = $1",
            )
            .bind(gmail_id)
            .fetch_optional(&pool)
            .await
            .unwrap()
        }
    })
    .await
}

async fn event_count(app: &TestApp, aggregate_id: &str, event_type: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_id = $1 AND event_type = $2")
        .bind(aggregate_id)
        .bind(event_type)
        .fetch_one(app.pool())
        .await
        .unwrap()
}

async fn history_reviews(app: &TestApp, ticket: Uuid, n: i64) -> Vec<Value> {
    let pool = app.pool().clone();
    eventually(&format!("{n} history reviews on {ticket}"), WAIT, || {
        let pool = pool.clone();
        async move {
            let rows: Vec<Value> = sqlx::query_scalar(
                "SELECT payload FROM events WHERE aggregate_id = $1 AND event_type = 'CustomerHistoryReviewed' ORDER BY sequence",
            )
            .bind(ticket.to_string())
            .fetch_all(&pool)
            .await
            .unwrap();
            (rows.len() as i64 >= n).then_some(rows)
        }
    })
    .await
}

/// The bodies of every request the model was sent about the customer
/// message containing `marker`.
async fn model_requests_about(llm: &MockServer, marker: &str) -> Vec<String> {
    llm.received_requests()
        .await
        .unwrap()
        .into_iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .filter(|body| {
            let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
            v["messages"].as_array().is_some_and(|messages| {
                messages
                    .iter()
                    .filter(|m| m["role"] == "user")
                    .take(1)
                    .any(|m| m["content"].as_str().is_some_and(|c| c.contains(marker)))
            })
        })
        .collect()
}

/// The raw RFC 2822 messages sent through Gmail.
async fn sent_mail(gmail: &MockServer) -> Vec<(Value, String)> {
    gmail
        .received_requests()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.url.path() == "/gmail/v1/users/me/messages/send")
        .map(|r| {
            let body: Value = serde_json::from_slice(&r.body).unwrap();
            let raw = String::from_utf8(
                URL_SAFE_NO_PAD
                    .decode(body["raw"].as_str().unwrap())
                    .unwrap(),
            )
            .unwrap();
            (body, raw)
        })
        .collect()
}

fn confirm_token(raw: &str) -> Option<String> {
    let start = raw.find(&format!("{PUBLIC_URL}/confirm/"))? + PUBLIC_URL.len() + 9;
    Some(
        raw[start..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_web_form_naming_anothers_email_sees_none_of_their_history_until_the_link_is_followed() {
    let gmail = gmail_fake().await;
    let llm = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(HistoryCurious)
        .mount(&llm)
        .await;
    // Ada writes by email (a proven identity), with something private.
    Mock::given(method("GET"))
        .and(path_regex("^/gmail/v1/users/[^/]+/messages$"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"messages": [{"id": "gm1", "threadId": "thread-ada"}]})),
        )
        .mount(&gmail)
        .await;
    mount_inbound(
        &gmail,
        gmail_message(
            "gm1",
            "thread-ada",
            "Invoice",
            &format!("My account number is {SECRET}, please check my invoice."),
        ),
    )
    .await;
    let app = TestApp::spawn_with(
        &[Role::All],
        &[
            ("GMAIL_API_BASE", gmail.uri()),
            ("GMAIL_ACCESS_TOKEN", "gmail-access".to_string()),
            ("LLM_BASE_URL", format!("{}/v1", llm.uri())),
            ("LLM_MODEL", "scripted-gpt".to_string()),
        ],
    )
    .await;
    push(&app, 10).await;
    let ada_ticket = ticket_of_gmail(&app, "gm1").await;
    // Ada's message is in the read model the agent reads history from.
    let pool = app.pool().clone();
    eventually("Ada's message projected", WAIT, || {
        let pool = pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM crm_messages WHERE ticket_id = $1 AND body LIKE '%' || $2 || '%'",
            )
            .bind(ada_ticket)
            .bind(SECRET)
            .fetch_one(&pool)
            .await
            .unwrap();
            (n > 0).then_some(())
        }
    })
    .await;
    history_reviews(&app, ada_ticket, 1).await;

    // Eve submits the web form under Ada's address.
    let mut eve = form("ada@example.com", "Remind me what I wrote before?");
    eve["name"] = json!("Eve");
    eve["subject"] = json!("URGENT: reset your password at evil.example");
    let response = app.submit_form(eve).await;
    assert_eq!(response.status(), 202);
    let accepted: Value = response.json().await.unwrap();
    let ticket: Uuid = accepted["ticket_id"].as_str().unwrap().parse().unwrap();
    let token = accepted["status_token"].as_str().unwrap().to_string();

    // The agent reviewed history for Eve's ticket and found none; the model
    // was never given Ada's words.
    let reviews = history_reviews(&app, ticket, 1).await;
    assert_eq!(reviews[0]["previous_tickets"], 0, "{reviews:?}");
    let about_eve = model_requests_about(&llm, "Remind me what I wrote before?").await;
    assert!(
        about_eve.len() >= 2,
        "the model was asked, and given the history tool's answer"
    );
    assert!(
        about_eve.iter().all(|body| !body.contains(SECRET)),
        "Ada's message reached the model for Eve's ticket"
    );
    // Ada's name was not overwritten, and Eve is not Ada's customer.
    assert_eq!(
        app.count("SELECT count(*) FROM events WHERE event_type = 'CustomerNameUpdated'")
            .await,
        0
    );
    let customers: Vec<Uuid> = sqlx::query_scalar(
        "SELECT DISTINCT (payload->>'customer_id')::uuid FROM events WHERE event_type = 'TicketOpened'",
    )
    .fetch_all(app.pool())
    .await
    .unwrap();
    assert_eq!(
        customers.len(),
        2,
        "the web form opened a customer of its own"
    );
    // Nothing of Ada's reaches Eve's status page.
    let status: Value = app
        .get_json(&format!("/ticket/{ticket}?token={token}"))
        .await;
    assert!(!status.to_string().contains(SECRET), "{status}");

    // The acknowledgement went to the address, under a fixed subject, with
    // the status link and the confirmation link.
    let (ack_request, ack) = eventually("the acknowledgement email", WAIT, || async {
        sent_mail(&gmail)
            .await
            .into_iter()
            .find(|(_, raw)| raw.contains("/confirm/"))
    })
    .await;
    assert!(ack.contains("To: ada@example.com\r\n"), "{ack}");
    assert!(
        !ack.contains("evil.example"),
        "the form's subject is not echoed: {ack}"
    );
    assert!(ack.contains("Subject: Your support request "), "{ack}");
    assert!(
        ack.contains(&format!("{PUBLIC_URL}/ticket/{ticket}?token={token}")),
        "{ack}"
    );
    assert!(
        ack_request.get("threadId").is_none(),
        "the acknowledgement opens a thread"
    );
    let confirm = confirm_token(&ack).expect("a confirmation link");

    // Following the link joins the claim to Ada's proven address...
    let response = app
        .http
        .get(app.url(&format!("/confirm/{confirm}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // ...and once only.
    let again = app
        .http
        .get(app.url(&format!("/confirm/{confirm}")))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);
    assert_eq!(again.json::<Value>().await.unwrap()["error"], "conflict");

    // The AI found nothing to answer Eve with and escalated; a person
    // hands the ticket back, so the AI answers the next message.
    casebook_commands::staff::Staff::new(
        casebook_commands::EventStore::new(app.pool().clone()),
        "The Support Team",
    )
    .hand_back_to_ai(ticket, "grace", "corr-hand-back")
    .await
    .unwrap();
    // Ada answers the acknowledgement by email: her reply continues the
    // web-form ticket, and now its history includes her earlier ticket.
    let thread = eventually("the acknowledgement's thread recorded", WAIT, || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT payload->>'thread_id' FROM events WHERE event_type = 'ClaimAcknowledgementSent'",
            )
            .fetch_optional(&pool)
            .await
            .unwrap()
        }
    })
    .await;
    Mock::given(method("GET"))
        .and(path_regex("^/gmail/v1/users/[^/]+/history$"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "history": [{"messagesAdded": [{"message": {"id": "gm2", "threadId": thread}}]}],
            "historyId": "20"
        })))
        .mount(&gmail)
        .await;
    mount_inbound(
        &gmail,
        gmail_message(
            "gm2",
            &thread,
            "Re: Your support request",
            "And what about my invoice?",
        ),
    )
    .await;
    push(&app, 20).await;
    assert_eq!(ticket_of_gmail(&app, "gm2").await, ticket);
    let reviews = history_reviews(&app, ticket, 2).await;
    assert!(
        reviews[1]["previous_tickets"].as_u64().unwrap() >= 1,
        "{reviews:?}"
    );
    let about_ada = model_requests_about(&llm, "And what about my invoice?").await;
    assert!(
        about_ada.iter().any(|body| body.contains(SECRET)),
        "after confirmation the history flows"
    );
    app.stop().await;
}

async fn claim_token(app: &TestApp, ticket: &str) -> String {
    let claim_id: Uuid = sqlx::query_scalar(
        "SELECT (payload->>'claim_id')::uuid FROM events WHERE event_type = 'EmailClaimOpened' AND payload->>'ticket_id' = $1",
    )
    .bind(ticket)
    .fetch_one(app.pool())
    .await
    .unwrap();
    LinkKeys::new(JWT_SECRET).confirm_token(claim_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmation_link_works_once_and_the_store_keeps_only_its_hash() {
    let app = TestApp::spawn_with(&[Role::Api], &[]).await;
    let accepted: Value = app
        .submit_form(form("grace@example.com", "Please confirm me"))
        .await
        .json()
        .await
        .unwrap();
    let ticket = accepted["ticket_id"].as_str().unwrap();
    let token = claim_token(&app, ticket).await;
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE payload::text LIKE '%' || $1 || '%' OR aggregate_id LIKE '%' || $1 || '%'",
    )
    .bind(&token)
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(stored, 0, "the token itself is never stored");

    for bad in ["nope", &"x".repeat(200), &token[..token.len() - 1]] {
        let response = app
            .http
            .get(app.url(&format!("/confirm/{bad}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{bad}");
    }
    let confirmed = app
        .http
        .get(app.url(&format!("/confirm/{token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(confirmed.status(), 200);
    assert_eq!(
        confirmed.json::<Value>().await.unwrap()["ticket_id"],
        ticket
    );
    // Nobody owned the address: the claimant now does.
    assert_eq!(
        event_count(&app, "email:grace@example.com", "IdentityClaimed").await,
        1
    );
    let again = app
        .http
        .get(app.url(&format!("/confirm/{token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);
    assert_eq!(
        app.count("SELECT count(*) FROM events WHERE event_type = 'EmailClaimConfirmed'")
            .await,
        1
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_web_form_with_someone_elses_email_cannot_touch_the_first() {
    let app = TestApp::spawn_with(&[Role::Api], &[]).await;
    let first: Value = app
        .submit_form(form("ada@example.com", "Private detail"))
        .await
        .json()
        .await
        .unwrap();
    let mut eve = form("ada@example.com", "Who am I?");
    eve["name"] = json!("Eve");
    let second: Value = app.submit_form(eve).await.json().await.unwrap();
    assert_ne!(first["ticket_id"], second["ticket_id"]);
    let customer_of = |ticket: Value| {
        let pool = app.pool().clone();
        async move {
            sqlx::query_scalar::<_, Uuid>(
                "SELECT (payload->>'customer_id')::uuid FROM events WHERE aggregate_id = $1 AND event_type = 'TicketOpened'",
            )
            .bind(ticket.as_str().unwrap())
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_ne!(
        customer_of(first["ticket_id"].clone()).await,
        customer_of(second["ticket_id"].clone()).await,
        "an unproven address joins nobody"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM events WHERE event_type IN ('CustomerNameUpdated', 'IdentityClaimed', 'IdentityLinked')")
            .await,
        0,
        "nothing is claimed or renamed on a web form's word"
    );
    let status: Value = app
        .http
        .get(app.url(&format!(
            "/ticket/{}?token={}",
            second["ticket_id"].as_str().unwrap(),
            second["status_token"].as_str().unwrap()
        )))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["messages"].as_array().unwrap().len(), 1);
    assert!(!status.to_string().contains("Private detail"), "{status}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_email_reply_on_the_web_forms_thread_joins_its_ticket() {
    let gmail = gmail_fake().await;
    let app = TestApp::spawn_with(
        &[Role::Api, Role::Relay, Role::Projector, Role::Delivery],
        &[
            ("GMAIL_API_BASE", gmail.uri()),
            ("GMAIL_ACCESS_TOKEN", "gmail-access".to_string()),
        ],
    )
    .await;
    let accepted: Value = app
        .submit_form(form("ada@example.com", "My export fails"))
        .await
        .json()
        .await
        .unwrap();
    let ticket: Uuid = accepted["ticket_id"].as_str().unwrap().parse().unwrap();
    let pool = app.pool().clone();
    let thread = eventually("the acknowledgement sent", WAIT, || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT payload->>'thread_id' FROM events WHERE event_type = 'ClaimAcknowledgementSent'",
            )
            .fetch_optional(&pool)
            .await
            .unwrap()
        }
    })
    .await;
    let mail = sent_mail(&gmail).await;
    assert_eq!(mail.len(), 1);
    assert!(
        !mail[0].1.contains("Export fails"),
        "no form subject in the mail: {}",
        mail[0].1
    );
    Mock::given(method("GET"))
        .and(path_regex("^/gmail/v1/users/[^/]+/messages$"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"messages": [{"id": "gr1", "threadId": thread}]})),
        )
        .mount(&gmail)
        .await;
    mount_inbound(
        &gmail,
        gmail_message(
            "gr1",
            &thread,
            "Re: Your support request",
            "It still fails today.",
        ),
    )
    .await;
    push(&app, 10).await;
    assert_eq!(ticket_of_gmail(&app, "gr1").await, ticket);
    assert_eq!(
        app.count("SELECT count(*) FROM events WHERE event_type = 'TicketOpened'")
            .await,
        1,
        "the reply opened no ticket of its own"
    );
    app.stop().await;
}
