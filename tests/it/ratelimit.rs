//! The web form is no mail cannon: per-client, per-address and
//! per-recipient limits, through HTTP and the delivery worker.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use casebook::app::Role;
use serde_json::{json, Value};
use uuid::Uuid;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::common::{eventually, form, TestApp};

async fn events(app: &TestApp) -> i64 {
    app.count("SELECT count(*) FROM events").await
}

fn retry_after(response: &reqwest::Response) -> u64 {
    response
        .headers()
        .get("retry-after")
        .expect("Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .expect("whole seconds")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_limit_gets_429_with_retry_after_and_nothing_is_stored() {
    let app = TestApp::spawn_with(
        &[Role::Api],
        &[("CASEBOOK_RATE_LIMIT_PER_CLIENT", "3".to_string())],
    )
    .await;
    // Every public route counts.
    assert_eq!(
        app.submit_form(form("ada@example.com", "one"))
            .await
            .status(),
        202
    );
    for _ in 0..2 {
        let status = app
            .http
            .get(app.url(&format!("/ticket/{}", Uuid::new_v4())))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 404);
    }
    let before = events(&app).await;
    let response = app.submit_form(form("bob@example.com", "two")).await;
    assert_eq!(response.status(), 429);
    let wait = retry_after(&response);
    assert!((1..=60).contains(&wait), "{wait}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(events(&app).await, before, "nothing stored");
    // Probes are not public routes.
    assert_eq!(
        app.http
            .get(app.url("/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    app.stop().await;
}

async fn status_with_xff(app: &TestApp, xff: &str) -> u16 {
    app.http
        .get(app.url(&format!("/ticket/{}", Uuid::new_v4())))
        .header("x-forwarded-for", xff)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_is_honoured_only_from_a_trusted_proxy() {
    // The test client connects from 127.0.0.1: a trusted proxy here.
    let behind_proxy = TestApp::spawn_with(
        &[Role::Api],
        &[
            ("CASEBOOK_RATE_LIMIT_PER_CLIENT", "2".to_string()),
            (
                "CASEBOOK_TRUSTED_PROXIES",
                "10.0.0.0/8, 127.0.0.1".to_string(),
            ),
        ],
    )
    .await;
    assert_eq!(status_with_xff(&behind_proxy, "203.0.113.1").await, 404);
    assert_eq!(status_with_xff(&behind_proxy, "203.0.113.1").await, 404);
    assert_eq!(status_with_xff(&behind_proxy, "203.0.113.1").await, 429);
    // Another client behind the same proxy has its own budget; a forged
    // leftmost entry does not buy a new one.
    assert_eq!(status_with_xff(&behind_proxy, "203.0.113.2").await, 404);
    assert_eq!(
        status_with_xff(&behind_proxy, "198.51.100.9, 203.0.113.1").await,
        429
    );
    assert_eq!(
        status_with_xff(&behind_proxy, "203.0.113.1, 10.1.1.1").await,
        429
    );
    behind_proxy.stop().await;

    // Without trusted proxies the header is ignored: every request is
    // the peer's.
    let direct = TestApp::spawn_with(
        &[Role::Api],
        &[("CASEBOOK_RATE_LIMIT_PER_CLIENT", "2".to_string())],
    )
    .await;
    assert_eq!(status_with_xff(&direct, "203.0.113.1").await, 404);
    assert_eq!(status_with_xff(&direct, "203.0.113.2").await, 404);
    assert_eq!(status_with_xff(&direct, "203.0.113.3").await, 429);
    direct.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_email_address_gets_five_submissions_an_hour() {
    let app = TestApp::spawn_with(&[Role::Api], &[]).await;
    for i in 0..5 {
        let response = app
            .submit_form(form("Ada@Example.com", &format!("message {i}")))
            .await;
        assert_eq!(response.status(), 202, "submission {i}");
    }
    let before = events(&app).await;
    let response = app
        .submit_form(form("ada@example.com", "one too many"))
        .await;
    assert_eq!(response.status(), 429);
    let wait = retry_after(&response);
    assert!(wait > 3000 && wait <= 3600, "{wait}");
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"],
        "rate_limited"
    );
    assert_eq!(events(&app).await, before, "nothing stored");
    // Other addresses are not affected.
    assert_eq!(
        app.submit_form(form("bob@example.com", "hello"))
            .await
            .status(),
        202
    );
    let stored: i64 = app
        .count("SELECT count(*) FROM rate_limit_windows WHERE key LIKE '%ada%'")
        .await;
    assert_eq!(stored, 0, "the counters hold hashes, not addresses");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_submissions_from_one_address_store_exactly_the_limit_and_retries_take_no_hit() {
    let app = TestApp::spawn_with(&[Role::Api], &[]).await;
    let first = app
        .submit_form(json!({
            "name": "Ada", "email": "ada@example.com", "subject": "Order",
            "message": "first", "category": "general", "client_request_id": "r-0"
        }))
        .await;
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.unwrap();
    // A retry of a stored submission is the same submission: no hit.
    for _ in 0..3 {
        let again = app
            .submit_form(json!({
                "name": "Ada", "email": "ada@example.com", "subject": "Order",
                "message": "first", "category": "general", "client_request_id": "r-0"
            }))
            .await;
        assert_eq!(again.status(), 202);
        assert_eq!(
            again.json::<Value>().await.unwrap()["ticket_id"],
            first["ticket_id"]
        );
    }
    // Twenty at once: exactly the four that are left get in.
    let statuses = futures::future::join_all((0..20).map(|i| {
        let app = &app;
        async move {
            app.submit_form(form("ADA@example.com", &format!("burst {i}")))
                .await
                .status()
                .as_u16()
        }
    }))
    .await;
    assert_eq!(
        statuses.iter().filter(|s| **s == 202).count(),
        4,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        16,
        "{statuses:?}"
    );
    let opened: i64 = app
        .count("SELECT count(*) FROM events WHERE event_type = 'TicketOpened'")
        .await;
    assert_eq!(
        opened, 5,
        "one ticket per admitted submission, none for the refused"
    );
    // At its limit, the address still gets its stored submission back.
    let retry = app
        .submit_form(json!({
            "name": "Ada", "email": "ada@example.com", "subject": "Order",
            "message": "first", "category": "general", "client_request_id": "r-0"
        }))
        .await;
    assert_eq!(retry.status(), 202);
    app.stop().await;
}

struct GmailSends(AtomicUsize);

impl Respond for GmailSends {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let n = self.0.fetch_add(1, Ordering::SeqCst);
        ResponseTemplate::new(200)
            .set_body_json(json!({"id": format!("sent-{n}"), "threadId": format!("thread-{n}")}))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_recipient_gets_at_most_five_automatic_emails_an_hour() {
    let gmail = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/gmail/v1/users/me/messages/send"))
        .respond_with(GmailSends(AtomicUsize::new(0)))
        .mount(&gmail)
        .await;
    // Delivery without the agent: each submission's only email is its
    // acknowledgement. The per-address submission limit is lifted to show
    // the recipient limit on its own.
    let app = TestApp::spawn_with(
        &[Role::Api, Role::Relay, Role::Projector, Role::Delivery],
        &[
            ("GMAIL_API_BASE", gmail.uri()),
            ("GMAIL_ACCESS_TOKEN", "gmail-access".to_string()),
            ("CASEBOOK_WEBFORM_PER_EMAIL_PER_HOUR", "0".to_string()),
        ],
    )
    .await;
    for i in 0..7 {
        assert_eq!(
            app.submit_form(form("ada@example.com", &format!("message {i}")))
                .await
                .status(),
            202
        );
    }
    // Another recipient still gets theirs.
    assert_eq!(
        app.submit_form(form("bob@example.com", "hello"))
            .await
            .status(),
        202
    );
    let pool = app.pool().clone();
    eventually(
        "five acknowledgements for Ada, one for Bob",
        Duration::from_secs(90),
        || {
            let pool = pool.clone();
            async move {
                let (ada, bob): (i64, i64) = sqlx::query_as(
                    "SELECT count(*) FILTER (WHERE o.payload->'identity'->>'value' = 'ada@example.com'),
                            count(*) FILTER (WHERE o.payload->'identity'->>'value' = 'bob@example.com')
                       FROM events e JOIN events o
                         ON o.event_type = 'EmailClaimOpened' AND o.aggregate_id = e.aggregate_id
                      WHERE e.event_type = 'ClaimAcknowledgementSent'",
                )
                .fetch_one(&pool)
                .await
                .unwrap();
                (ada >= 5 && bob == 1).then_some(())
            }
        },
    )
    .await;
    // The two over the limit are handled too (skipped, not retried); had
    // they been sent, they would be here by now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        app.count("SELECT count(*) FROM events WHERE event_type = 'ClaimAcknowledgementSent'")
            .await,
        6,
        "five for Ada, one for Bob"
    );
    let sent = gmail
        .received_requests()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.url.path() == "/gmail/v1/users/me/messages/send")
        .count();
    assert_eq!(sent, 6);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_checks_of_one_key_never_pass_its_limit() {
    use casebook_commands::limits::{self, Decision, Limit};
    let db = crate::common::TestDb::create().await;
    let takes = (0..40).map(|_| {
        let pool = db.pool.clone();
        async move {
            limits::take(
                &pool,
                limits::WEBFORM_EMAIL,
                "ada@example.com",
                Limit::per_hour(5),
            )
            .await
            .unwrap()
        }
    });
    let decisions = futures::future::join_all(takes).await;
    let allowed = decisions
        .iter()
        .filter(|d| matches!(d, Decision::Allowed))
        .count();
    assert_eq!(
        allowed, 5,
        "exactly the limit passes, however the checks interleave"
    );
    assert!(decisions.iter().any(|d| matches!(
        d,
        Decision::Limited { retry_after } if retry_after.as_secs() > 3000
    )));
    // Another key has its own window.
    assert_eq!(
        limits::take(
            &db.pool,
            limits::WEBFORM_EMAIL,
            "bob@example.com",
            Limit::per_hour(5)
        )
        .await
        .unwrap(),
        Decision::Allowed
    );
}
