//! Email and WhatsApp customers learn where their ticket stands: the first
//! reply on a ticket (the AI's, or an approved draft) carries the status
//! link with its token, end to end through the agent, the broker, delivery
//! and the fake Twilio and Gmail; the link works; later replies do not
//! repeat it; the store never holds the token.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use casebook::app::Role;
use casebook_commands::approvals::Approvals;
use casebook_commands::EventStore;
use casebook_domain::status_link::STATUS_TOKEN_LEN;
use serde_json::{json, Value};
use uuid::Uuid;
use wiremock::matchers::{method, path, path_regex};
use wiremock::{Mock, Request, Respond, ResponseTemplate};

use crate::agent::{count, event_of, start_with, whatsapp, Fakes, ScriptedOpenAi, WAIT};
use crate::common::{eventually, TestApp, GMAIL_PUSH_TOKEN, PUBLIC_URL};

/// The status token of the ticket's link in `text`, if the link is there.
fn link_token(text: &str, ticket: Uuid) -> Option<String> {
    let link = format!("{PUBLIC_URL}/ticket/{ticket}?token=");
    let at = text.find(&link)? + link.len();
    Some(text[at..].chars().take(STATUS_TOKEN_LEN).collect())
}

/// The link works: the token reads the conversation.
async fn follow(app: &TestApp, ticket: Uuid, token: &str, customer_text: &str) {
    assert_eq!(token.len(), STATUS_TOKEN_LEN);
    let response = app
        .http
        .get(app.url(&format!("/ticket/{ticket}?token={token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let messages = body["messages"]
        .as_array()
        .expect("the token shows messages");
    assert!(
        messages.iter().any(|m| m["body"] == customer_text),
        "{body}"
    );
}

/// Nothing the service stored carries the token: not the events (so not
/// the topics), not the read models.
async fn token_is_nowhere_stored(app: &TestApp, token: &str) {
    let pattern = format!("%{token}%");
    let in_events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE payload::text LIKE $1")
            .bind(&pattern)
            .fetch_one(app.pool())
            .await
            .unwrap();
    let in_messages: i64 =
        sqlx::query_scalar("SELECT count(*) FROM crm_messages WHERE body LIKE $1")
            .bind(&pattern)
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert_eq!((in_events, in_messages), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_whatsapp_customers_first_reply_links_to_the_status_page_and_the_second_does_not() {
    let fakes = Fakes::start(true).await;
    let app = start_with(&fakes, None, None, &[Role::All], &[]).await;
    let question = "How do I export my project data?";
    let ticket = whatsapp(&app, "whatsapp:+447700900301", "SMlink1", question).await;
    let first = eventually("the first reply at Twilio", WAIT, || async {
        let sent = fakes.whatsapp_sent().await;
        let parts = event_of(&app, ticket, "ResponseSent").await["parts"]
            .as_array()
            .map_or(0, Vec::len);
        (parts > 0 && sent.len() >= parts).then_some(sent)
    })
    .await;
    let with_link: Vec<&String> = first.iter().filter(|m| m.contains("/ticket/")).collect();
    assert_eq!(with_link.len(), 1, "{first:?}");
    for message in &first {
        assert!(message.chars().count() < casebook_domain::formatting::WHATSAPP_MAX_CHARS);
    }
    let token = link_token(with_link[0], ticket).expect("the link carries its token");
    follow(&app, ticket, &token, question).await;

    let again = whatsapp(
        &app,
        "whatsapp:+447700900301",
        "SMlink2",
        "And how do I reset my password?",
    )
    .await;
    assert_eq!(again, ticket, "the same conversation, the same ticket");
    eventually("the second reply", WAIT, || async {
        (count(&app, ticket, "ResponseSent").await >= 2).then_some(())
    })
    .await;
    // Every part of it: the link would be on the last.
    let parts = event_of(&app, ticket, "ResponseSent").await["parts"]
        .as_array()
        .map_or(0, Vec::len);
    assert!(parts > 0);
    let all = eventually("the second reply at Twilio", WAIT, || async {
        let sent = fakes.whatsapp_sent().await;
        (sent.len() >= first.len() + parts).then_some(sent)
    })
    .await;
    assert_eq!(all.len(), first.len() + parts, "{all:?}");
    for later in &all[first.len()..] {
        assert!(
            !later.contains("/ticket/"),
            "only the first reply links: {later}"
        );
    }
    token_is_nowhere_stored(&app, &token).await;
    app.stop().await;
}

/// Gmail's `messages/send`, with a fresh id each time.
struct GmailAccepts;

impl Respond for GmailAccepts {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let id = format!("sent-{}", Uuid::new_v4().simple());
        ResponseTemplate::new(200)
            .set_body_json(json!({"id": id, "threadId": "thread-88", "labelIds": ["SENT"]}))
    }
}

fn mail(id: &str, message_id: &str, text: &str) -> Value {
    json!({
        "id": id, "threadId": "thread-88", "labelIds": ["INBOX"], "internalDate": "1795000000000",
        "payload": {"mimeType": "text/plain", "headers": [
            {"name": "From", "value": "Ada Lovelace <ada@example.com>"},
            {"name": "Subject", "value": "Exporting data"},
            {"name": "Message-ID", "value": message_id}],
          "body": {"data": URL_SAFE_NO_PAD.encode(text)}}
    })
}

/// The plain-text bodies of the replies Gmail was asked to send, in order.
async fn emails_sent(fakes: &Fakes) -> Vec<String> {
    fakes
        .gmail
        .received_requests()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.url.path() == "/gmail/v1/users/me/messages/send")
        .map(|r| {
            let body: Value = serde_json::from_slice(&r.body).unwrap();
            let raw = URL_SAFE_NO_PAD
                .decode(body["raw"].as_str().unwrap())
                .unwrap();
            String::from_utf8(raw).unwrap().replace("\r\n", "\n")
        })
        .collect()
}

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
    assert_eq!(response.status(), 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_email_customers_first_reply_links_to_the_status_page_and_the_second_does_not() {
    let fakes = Fakes::start(true).await;
    let question = "How do I export my project data?";
    for (matcher, body) in [
        (
            "^/gmail/v1/users/[^/]+/messages$",
            json!({"messages": [{"id": "gm1", "threadId": "thread-88"}]}),
        ),
        (
            "^/gmail/v1/users/[^/]+/messages/gm1$",
            mail("gm1", "<m1@mail.example.com>", question),
        ),
        (
            "^/gmail/v1/users/[^/]+/history$",
            json!({"history": [{"messagesAdded": [{"message": {"id": "gm2", "threadId": "thread-88"}}]}], "historyId": "20"}),
        ),
        (
            "^/gmail/v1/users/[^/]+/messages/gm2$",
            mail(
                "gm2",
                "<m2@mail.example.com>",
                "And how do I reset my password?",
            ),
        ),
    ] {
        Mock::given(method("GET"))
            .and(path_regex(matcher))
            .respond_with(ResponseTemplate::new(200).set_body_json(body))
            .mount(&fakes.gmail)
            .await;
    }
    Mock::given(method("POST"))
        .and(path("/gmail/v1/users/me/messages/send"))
        .respond_with(GmailAccepts)
        .with_priority(1)
        .mount(&fakes.gmail)
        .await;
    let app = start_with(&fakes, None, None, &[Role::All], &[]).await;
    push(&app, 9).await;
    let first = eventually("the first reply at Gmail", WAIT, || async {
        emails_sent(&fakes).await.into_iter().next()
    })
    .await;
    let ticket: Uuid = sqlx::query_scalar(
        "SELECT aggregate_id::uuid FROM events WHERE event_type = 'CustomerMessageReceived' LIMIT 1",
    )
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert!(first.contains("Hi Ada,"), "{first}");
    assert!(
        first.contains("You can see where your request stands at any time: "),
        "{first}"
    );
    let token = link_token(&first, ticket).expect("the link carries its token");
    follow(&app, ticket, &token, question).await;

    push(&app, 20).await;
    let second = eventually("the second reply at Gmail", WAIT, || async {
        emails_sent(&fakes).await.into_iter().nth(1)
    })
    .await;
    assert_eq!(count(&app, ticket, "ResponseSent").await, 2, "one ticket");
    assert!(
        !second.contains("/ticket/"),
        "only the first reply links: {second}"
    );
    assert!(second.contains("Ticket reference: "), "{second}");
    token_is_nowhere_stored(&app, &token).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_approved_draft_that_is_the_first_reply_carries_the_link() {
    let fakes = Fakes::start(true).await;
    let llm = wiremock::MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(ScriptedOpenAi {
            query: "export project data",
            body: "Open the project menu and choose Export.".to_string(),
            confidence: 0.3,
        })
        .mount(&llm)
        .await;
    let app = start_with(&fakes, Some(&llm), None, &[Role::All], &[]).await;
    let ticket = whatsapp(
        &app,
        "whatsapp:+447700900302",
        "SMlink3",
        "How do I export my project data?",
    )
    .await;
    let requested = event_of(&app, ticket, "ApprovalRequested").await;
    let approval: Uuid = requested["approval_id"].as_str().unwrap().parse().unwrap();
    let approvals = Approvals::new(EventStore::new(app.pool().clone()), "The Support Team")
        .with_public_url(PUBLIC_URL);
    approvals
        .approve(ticket, approval, "grace", None, "approve-test")
        .await
        .unwrap();
    let sent = eventually("the approved reply at Twilio", WAIT, || async {
        let sent = fakes.whatsapp_sent().await;
        (!sent.is_empty()).then_some(sent)
    })
    .await;
    let token = sent
        .iter()
        .find_map(|m| link_token(m, ticket))
        .unwrap_or_else(|| panic!("the approved first reply links: {sent:?}"));
    follow(&app, ticket, &token, "How do I export my project data?").await;
    app.stop().await;
}
