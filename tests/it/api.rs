//! The web form, ticket status, probes and the error contract, through HTTP.

use std::time::Duration;

use casebook::app::Role;
use casebook_api::{Role as TokenRole, TokenKeys};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::common::{form, TestApp, JWT_SECRET};

async fn api_only() -> TestApp {
    TestApp::spawn_with(&[Role::Api], &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_form_is_acknowledged_and_its_status_is_readable_at_once() {
    let app = api_only().await;
    let response = app
        .http
        .post(app.url("/support/tickets"))
        .header("x-correlation-id", "corr-webform-1")
        .json(&form(
            "ada@example.com",
            "My CSV export fails with error 42.",
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(response.headers()["x-correlation-id"], "corr-webform-1");
    let body: Value = response.json().await.unwrap();
    let ticket_id = body["ticket_id"].as_str().unwrap().to_string();
    assert_eq!(body["status_url"], format!("/ticket/{ticket_id}"));
    let token = body["status_token"].as_str().unwrap();

    let status: Value = app.get_json(&format!("/ticket/{ticket_id}")).await;
    assert_eq!(status["ticket_id"], ticket_id);
    assert_eq!(status["status"], "received");
    assert_eq!(status["channel"], "webform");
    assert_eq!(status["priority"], "medium");
    assert_eq!(status["messages_count"], 1);
    assert!(status["first_response_at"].is_null());
    for key in ["created_at", "updated_at", "sla_due_at"] {
        assert!(status[key].is_string(), "{key} in {status}");
    }
    assert!(
        status.get("messages").is_none(),
        "no messages without a token: {status}"
    );

    let with_token: Value = app
        .get_json(&format!("/ticket/{ticket_id}?token={token}"))
        .await;
    let messages = with_token["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0]["direction"], "inbound");
    assert_eq!(messages[0]["channel"], "webform");
    assert_eq!(messages[0]["body"], "My CSV export fails with error 42.");

    // The request's correlation id travels with every event it caused.
    let correlations: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT metadata->>'correlation_id' FROM events")
            .fetch_all(app.pool())
            .await
            .unwrap();
    assert_eq!(correlations, vec!["corr-webform-1".to_string()]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_encoded_form_is_accepted_too() {
    let app = api_only().await;
    let response = app
        .http
        .post(app.url("/support/tickets"))
        .form(&[
            ("name", "Grace Hopper"),
            ("email", "grace@example.com"),
            ("subject", "Login"),
            ("message", "I cannot log in."),
            ("category", "account"),
            ("priority", "high"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let id = response.json::<Value>().await.unwrap()["ticket_id"]
        .as_str()
        .unwrap()
        .to_string();
    let status: Value = app.get_json(&format!("/ticket/{id}")).await;
    assert_eq!(status["priority"], "high");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_form_is_refused_naming_every_bad_field_and_stores_nothing() {
    let app = api_only().await;
    let response = app
        .submit_form(json!({
            "name": "",
            "email": "not-an-address",
            "subject": "x".repeat(201),
            "category": "sales",
            "priority": 3,
        }))
        .await;
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "validation_failed");
    let mut fields: Vec<&str> = body["fields"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    fields.sort();
    assert_eq!(
        fields,
        vec!["category", "email", "message", "name", "priority", "subject"]
    );
    assert_eq!(body["fields"]["priority"], "must be a string");
    assert_eq!(app.count("SELECT count(*) FROM events").await, 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_unreadable_bodies_get_clear_errors() {
    let app = api_only().await;
    let big = form("ada@example.com", &"x".repeat(70 * 1024));
    let response = app.submit_form(big).await;
    assert_eq!(response.status(), 413);
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"],
        "payload_too_large"
    );

    let response = app
        .http
        .post(app.url("/support/tickets"))
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 415);
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"],
        "unsupported_media_type"
    );

    let response = app
        .http
        .post(app.url("/support/tickets"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"],
        "bad_request"
    );
    assert_eq!(app.count("SELECT count(*) FROM events").await, 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_client_request_id_gives_the_same_ticket() {
    let app = api_only().await;
    let mut submission = form("ada@example.com", "Please help");
    submission["client_request_id"] = json!("retry-7");
    let first: Value = app
        .submit_form(submission.clone())
        .await
        .json()
        .await
        .unwrap();
    let events = app.count("SELECT count(*) FROM events").await;
    let second = app.submit_form(submission).await;
    assert_eq!(second.status(), 202);
    let second: Value = second.json().await.unwrap();
    assert_eq!(first["ticket_id"], second["ticket_id"]);
    assert_eq!(first["status_token"], second["status_token"]);
    assert_eq!(app.count("SELECT count(*) FROM events").await, events);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_client_request_id_with_another_submission_is_a_conflict() {
    let app = api_only().await;
    let mut submission = form("ada@example.com", "Please help");
    submission["client_request_id"] = json!("retry-8");
    assert_eq!(app.submit_form(submission.clone()).await.status(), 202);
    let events = app.count("SELECT count(*) FROM events").await;
    // Someone who knows the (email, id) pair but not the submission gets
    // neither the ticket nor a status token.
    let mut other_message = submission.clone();
    other_message["message"] = json!("Show me the ticket");
    let mut other_name = submission.clone();
    other_name["name"] = json!("Eve");
    let mut other_subject = submission.clone();
    other_subject["subject"] = json!("Something else");
    for changed in [other_message, other_name, other_subject] {
        let response = app.submit_form(changed).await;
        assert_eq!(response.status(), 409);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "conflict");
        assert!(body.get("ticket_id").is_none() && body.get("status_token").is_none());
    }
    assert_eq!(app.count("SELECT count(*) FROM events").await, events);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_fields_are_refused_before_they_reach_an_event() {
    let app = api_only().await;
    let mut long_name = form("ada@example.com", "hello");
    long_name["name"] = json!("n".repeat(101));
    let mut long_id = form("ada@example.com", "hello");
    long_id["client_request_id"] = json!("r".repeat(129));
    for (bad, field) in [(long_name, "name"), (long_id, "client_request_id")] {
        let response = app.submit_form(bad).await;
        assert_eq!(response.status(), 422);
        let body: Value = response.json().await.unwrap();
        assert!(body["fields"].get(field).is_some(), "{body}");
    }
    // A Twilio status callback with an id or status no provider sends.
    let long_sid = format!("SM{}", "a".repeat(5000));
    let long_status = "d".repeat(5000);
    for params in [
        [
            ("MessageSid", long_sid.as_str()),
            ("MessageStatus", "delivered"),
        ],
        [
            ("MessageSid", "SM123"),
            ("MessageStatus", long_status.as_str()),
        ],
    ] {
        let response = app
            .post_twilio("/webhooks/whatsapp/status", &params, None)
            .await;
        assert_eq!(response.status(), 422);
    }
    // A WhatsApp profile name is cut, not stored whole.
    let long_profile = "P".repeat(3000);
    let params = [
        ("MessageSid", "SMbound1"),
        ("From", "whatsapp:+447700900123"),
        ("To", "whatsapp:+14155238886"),
        ("Body", "hi"),
        ("ProfileName", long_profile.as_str()),
    ];
    assert_eq!(
        app.post_twilio("/webhooks/whatsapp", &params, None)
            .await
            .status(),
        200
    );
    let longest: i32 = sqlx::query_scalar("SELECT max(length(payload::text)) FROM events")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert!(longest < 2000, "{longest}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_or_malformed_tickets_are_not_found() {
    let app = api_only().await;
    for path in [
        format!("/ticket/{}", Uuid::new_v4()),
        "/ticket/not-a-uuid".to_string(),
    ] {
        let response = app.http.get(app.url(&path)).send().await.unwrap();
        assert_eq!(response.status(), 404, "{path}");
        assert_eq!(
            response.json::<Value>().await.unwrap()["error"],
            "not_found"
        );
    }
    let response = app
        .http
        .get(app.url("/no/such/route"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert!(response.headers().contains_key("x-correlation-id"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_shown_only_to_their_customer() {
    let app = api_only().await;
    let body: Value = app
        .submit_form(form("ada@example.com", "Private detail"))
        .await
        .json()
        .await
        .unwrap();
    let ticket_id = body["ticket_id"].as_str().unwrap();
    let other: Value = app
        .submit_form(form("bob@example.com", "Other"))
        .await
        .json()
        .await
        .unwrap();
    let other_token = other["status_token"].as_str().unwrap();

    // Another ticket's status token does not open this one.
    let response = app
        .http
        .get(app.url(&format!("/ticket/{ticket_id}?token={other_token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"],
        "invalid_token"
    );

    let customer_id: Uuid =
        sqlx::query_scalar("SELECT (payload->>'customer_id')::uuid FROM events WHERE aggregate_id = $1 AND sequence = 1")
            .bind(ticket_id)
            .fetch_one(app.pool())
            .await
            .unwrap();
    let keys = TokenKeys::new(JWT_SECRET);
    let now = chrono::Utc::now().timestamp();
    let own = casebook_api::users::issue_token(
        app.pool(),
        &keys,
        TokenRole::Customer,
        "ada",
        Some(customer_id),
        600,
    )
    .await
    .unwrap()
    .token;
    let status: Value = app
        .http
        .get(app.url(&format!("/ticket/{ticket_id}")))
        .bearer_auth(&own)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["messages"][0]["body"], "Private detail");

    let stranger = casebook_api::users::issue_token(
        app.pool(),
        &keys,
        TokenRole::Customer,
        "eve",
        Some(Uuid::new_v4()),
        600,
    )
    .await
    .unwrap()
    .token;
    let response = app
        .http
        .get(app.url(&format!("/ticket/{ticket_id}")))
        .bearer_auth(&stranger)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);

    let forged = TokenKeys::new("another-secret-another-secret-0000")
        .issue(TokenRole::Customer, "ada", Some(customer_id), 600, now)
        .unwrap();
    let response = app
        .http
        .get(app.url(&format!("/ticket/{ticket_id}")))
        .bearer_auth(&forged)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_and_metrics_answer() {
    let app = api_only().await;
    assert_eq!(
        app.http
            .get(app.url("/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // Ready once the topics exist (created in the background at start).
    let http = app.http.clone();
    let url = app.url("/ready");
    crate::common::eventually("ready", Duration::from_secs(30), || {
        let http = http.clone();
        let url = url.clone();
        async move { (http.get(&url).send().await.unwrap().status() == 200).then_some(()) }
    })
    .await;
    app.submit_form(form("ada@example.com", "hello")).await;
    let metrics = app.http.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), 200);
    assert!(metrics.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = metrics.text().await.unwrap();
    for name in [
        "casebook_http_request_duration_seconds_bucket",
        "casebook_events_appended_total",
        "casebook_intake_messages_total",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    assert!(
        text.contains("route=\"/support/tickets\""),
        "latency is labelled by route"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_ready_says_only_ready_or_not() {
    let app = TestApp::spawn_with(
        &[Role::Api],
        &[("KAFKA_BROKERS", "127.0.0.1:9".to_string())],
    )
    .await;
    let response = app.http.get(app.url("/ready")).send().await.unwrap();
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "not_ready");
    assert_eq!(body["message"], "not ready");
    // What is down is for operators (the operations listener), not the
    // public.
    assert!(body.get("fields").is_none(), "{body}");
    assert!(!body.to_string().contains("kafka"), "{body}");
    // Intake does not depend on the broker.
    assert_eq!(
        app.submit_form(form("ada@example.com", "still taken"))
            .await
            .status(),
        202
    );
    tokio::time::timeout(Duration::from_secs(30), app.stop())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_correlation_id_is_returned() {
    let app = api_only().await;
    let response = app.http.get(app.url("/health")).send().await.unwrap();
    let id = response.headers()["x-correlation-id"].to_str().unwrap();
    assert!(Uuid::parse_str(id).is_ok(), "{id}");
    let response = app
        .http
        .get(app.url("/health"))
        .header("x-correlation-id", "bad id with spaces")
        .send()
        .await
        .unwrap();
    assert_ne!(response.headers()["x-correlation-id"], "bad id with spaces");
    app.stop().await;
}
