//! The customer's status page in a real browser (Debian's headless
//! Chromium, installed by `deploy/local/chromium.sh`), and "was this
//! helpful?" through the page's form and as JSON.

use std::path::PathBuf;
use std::time::Duration;

use casebook::app::Role;
use casebook_commands::EventStore;
use casebook_domain::{Actor, Channel, EventMetadata, Ticket, TicketCommand};
use reqwest::header::{ACCEPT, CONTENT_TYPE, LOCATION};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::common::{eventually, form, TestApp, BACKBONE, JWT_SECRET};

const WAIT: Duration = Duration::from_secs(60);
/// What Chromium sends when it navigates.
const BROWSER_ACCEPT: &str = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7";
const HOSTILE: &str =
    "My export fails <script>document.title='pwned'</script> \"quoted\" & <b>bold</b>";

/// Chromium, or a failure that says how to get it: this test never passes
/// without a browser.
fn chromium() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("chromium"))
            .find(|p| p.is_file())
    });
    let candidates = [
        std::env::var("CASEBOOK_CHROMIUM").ok().map(PathBuf::from),
        Some(PathBuf::from("/usr/bin/chromium")),
        on_path,
    ];
    candidates.into_iter().flatten().find(|p| p.is_file()).expect(
        "headless Chromium is needed for the status page's browser test: run deploy/local/chromium.sh \
         (make test does), or set CASEBOOK_CHROMIUM",
    )
}

/// Runs headless Chromium on `url` with `args`, bounded in time; returns
/// its stdout.
async fn browse(url: &str, args: &[String]) -> String {
    let profile = tempdir("chromium-profile");
    let mut command = tokio::process::Command::new(chromium());
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(90), command.output())
        .await
        .expect("Chromium finished within 90 s")
        .expect("Chromium starts");
    let _ = std::fs::remove_dir_all(&profile);
    assert!(
        output.status.success(),
        "Chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("the DOM is UTF-8")
}

fn tempdir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("casebook-{what}-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A web-form ticket with `message`; returns (ticket id, status token).
async fn submit(app: &TestApp, email: &str, message: &str) -> (Uuid, String) {
    let response = app.submit_form(form(email, message)).await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    (
        body["ticket_id"].as_str().unwrap().parse().unwrap(),
        body["status_token"].as_str().unwrap().to_string(),
    )
}

/// A reply on the ticket, as the agent or a person would send it.
async fn reply(app: &TestApp, ticket: Uuid, text: &str) {
    EventStore::new(app.pool().clone())
        .execute::<Ticket>(
            &ticket.to_string(),
            TicketCommand::SendResponse {
                response_id: Uuid::now_v7(),
                draft_id: None,
                channel: Channel::Webform,
                body: text.to_string(),
                parts: vec![],
                in_reply_to: None,
                automatic: None,
                holding: false,
                template: None,
                at: chrono::Utc::now(),
            },
            &EventMetadata::new("status-page-test", Actor::system("test")),
        )
        .await
        .unwrap();
}

/// Waits until the read model shows `n` messages.
async fn projected(app: &TestApp, ticket: Uuid, token: &str, n: usize) {
    eventually("the conversation projected", WAIT, || async {
        let v = app
            .get_json(&format!("/ticket/{ticket}?token={token}"))
            .await;
        (v["messages"].as_array().map(Vec::len) == Some(n)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_browser_shows_the_status_the_conversation_as_text_and_the_helpful_question() {
    let app = TestApp::spawn().await;
    let (ticket, token) = submit(&app, "ada@example.com", HOSTILE).await;
    reply(&app, ticket, "Open the project menu, then choose Export.").await;
    projected(&app, ticket, &token, 2).await;
    let url = app.url(&format!("/ticket/{ticket}?token={token}"));

    let dom = browse(&url, &["--dump-dom".to_string()]).await;
    assert!(dom.contains("Status: <strong>Answered</strong>"), "{dom}");
    assert!(
        dom.contains("Open the project menu, then choose Export."),
        "{dom}"
    );
    assert!(dom.contains("Was this helpful?"), "{dom}");
    assert!(dom.contains(r#"<form method="post""#), "{dom}");
    // The customer's markup is text: shown escaped, never run or parsed.
    assert!(
        dom.contains("My export fails &lt;script&gt;document.title='pwned'&lt;/script&gt; \"quoted\" &amp; &lt;b&gt;bold&lt;/b&gt;"),
        "{dom}"
    );
    assert!(!dom.contains("<script"), "{dom}");
    assert!(!dom.contains("<b>bold"), "{dom}");
    assert!(!dom.contains("pwned</title>"), "{dom}");

    let shots = tempdir("screenshot");
    let png = shots.join("status.png");
    browse(
        &url,
        &[
            format!("--screenshot={}", png.display()),
            "--window-size=1000,1400".to_string(),
        ],
    )
    .await;
    let bytes = std::fs::read(&png).expect("Chromium wrote the screenshot");
    assert!(
        bytes.len() > 5_000,
        "a screenshot of a whole page: {} bytes",
        bytes.len()
    );
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    // IHDR: width and height, big-endian, at bytes 16..24.
    let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((width, height), (1000, 1400));
    if let Ok(dir) = std::env::var("CASEBOOK_SCREENSHOT_DIR") {
        std::fs::copy(&png, PathBuf::from(dir).join("status-page.png")).unwrap();
    }
    let _ = std::fs::remove_dir_all(&shots);

    // Without the token: the status, but not the conversation, nor the form.
    let dom = browse(
        &app.url(&format!("/ticket/{ticket}")),
        &["--dump-dom".to_string()],
    )
    .await;
    assert!(dom.contains("Status: <strong>Answered</strong>"), "{dom}");
    assert!(!dom.contains("My export fails"), "{dom}");
    assert!(!dom.contains("Was this helpful?"), "{dom}");
    // An unknown ticket is a page too.
    let dom = browse(
        &app.url(&format!("/ticket/{}", Uuid::now_v7())),
        &["--dump-dom".to_string()],
    )
    .await;
    assert!(dom.contains("We could not find this request"), "{dom}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn browsers_get_a_locked_down_page_and_api_clients_the_same_json_as_before() {
    let app = TestApp::spawn().await;
    let (ticket, token) = submit(&app, "grace@example.com", HOSTILE).await;
    let path = format!("/ticket/{ticket}?token={token}");

    let page = app
        .http
        .get(app.url(&path))
        .header(ACCEPT, BROWSER_ACCEPT)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let h = page.headers().clone();
    assert_eq!(h[CONTENT_TYPE], "text/html; charset=utf-8");
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(
        csp.starts_with("default-src 'none'; style-src 'sha256-"),
        "{csp}"
    );
    assert!(
        csp.contains("form-action 'self'") && !csp.contains("unsafe"),
        "{csp}"
    );
    assert!(
        !csp.contains("script-src"),
        "no script allowed at all: {csp}"
    );
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["referrer-policy"], "no-referrer");
    assert_eq!(h["cache-control"], "no-store");
    assert!(h.get_all("vary").iter().any(|v| v == "Accept"));
    let html = page.text().await.unwrap();
    assert!(
        html.contains("&lt;script&gt;") && !html.contains("<script"),
        "{html}"
    );
    // Not answered yet: no form.
    assert!(!html.contains("Was this helpful?"), "{html}");

    for accept in [
        None,
        Some("application/json"),
        Some("*/*"),
        Some("text/html;q=0.5, application/json"),
    ] {
        let mut request = app.http.get(app.url(&path));
        if let Some(a) = accept {
            request = request.header(ACCEPT, a);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.headers()[CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/json"));
        let body: Value = response.json().await.unwrap();
        let mut keys: Vec<&str> = body
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "channel",
                "created_at",
                "first_response_at",
                "messages",
                "messages_count",
                "priority",
                "sla_due_at",
                "status",
                "ticket_id",
                "updated_at"
            ],
            "{accept:?}"
        );
    }
    let unknown = format!("/ticket/{}", Uuid::now_v7());
    let missing = app.http.get(app.url(&unknown)).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.json::<Value>().await.unwrap()["error"], "not_found");
    let missing = app
        .http
        .get(app.url(&unknown))
        .header(ACCEPT, BROWSER_ACCEPT)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.headers()[CONTENT_TYPE], "text/html; charset=utf-8");
    assert!(missing.headers().contains_key("content-security-policy"));
    let wrong = app
        .http
        .get(app.url(&format!("/ticket/{ticket}?token=not-it")))
        .header(ACCEPT, BROWSER_ACCEPT)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 403);
    assert!(wrong
        .text()
        .await
        .unwrap()
        .contains("This link does not work"));
    app.stop().await;
}

async fn feedback_events(app: &TestApp, ticket: Uuid) -> Vec<(Value, Value)> {
    sqlx::query_as::<_, (Value, Value)>(
        "SELECT payload, metadata FROM events WHERE aggregate_id = $1 AND event_type = 'FeedbackReceived' ORDER BY sequence",
    )
    .bind(ticket.to_string())
    .fetch_all(app.pool())
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_helpful_form_records_feedback_once_and_thanks_the_customer() {
    let app = TestApp::spawn().await;
    let (ticket, token) = submit(&app, "lin@example.com", "The CSV export fails.").await;
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let post_form = |pairs: Vec<(&'static str, String)>, token: String| {
        let client = no_redirects.clone();
        let url = app.url(&format!("/ticket/{ticket}/feedback?token={token}"));
        async move {
            client
                .post(url)
                .header(ACCEPT, BROWSER_ACCEPT)
                .form(&pairs)
                .send()
                .await
                .unwrap()
        }
    };

    // Nothing to rate before an answer.
    let early = post_form(vec![("helpful", "yes".into())], token.clone()).await;
    assert_eq!(early.status(), 409);
    reply(&app, ticket, "Try the JSON export instead.").await;
    // A form without an answer, or with a comment too long, is refused.
    let missing = post_form(vec![("comment", "hm".into())], token.clone()).await;
    assert_eq!(missing.status(), 422);
    let long = post_form(
        vec![("helpful", "no".into()), ("comment", "x".repeat(2001))],
        token.clone(),
    )
    .await;
    assert_eq!(long.status(), 422);
    let forged = post_form(vec![("helpful", "no".into())], "forged".into()).await;
    assert_eq!(forged.status(), 403);
    assert!(feedback_events(&app, ticket).await.is_empty());

    let comment = "Worked <script>alert(1)</script>, thanks!";
    let sent = post_form(
        vec![("helpful", "yes".into()), ("comment", comment.into())],
        token.clone(),
    )
    .await;
    assert_eq!(sent.status(), 303);
    let location = sent.headers()[LOCATION].to_str().unwrap().to_string();
    assert_eq!(
        location,
        format!("/ticket/{ticket}?token={token}&feedback=thanks")
    );
    assert_eq!(sent.headers()["referrer-policy"], "no-referrer");
    let thanks = app
        .http
        .get(app.url(&location))
        .header(ACCEPT, BROWSER_ACCEPT)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(thanks.contains("Thank you for your feedback."), "{thanks}");

    let events = feedback_events(&app, ticket).await;
    assert_eq!(events.len(), 1);
    let (payload, metadata) = &events[0];
    assert_eq!(payload["helpful"], true);
    assert_eq!(payload["comment"], comment);
    let customer: Value = sqlx::query_scalar(
        "SELECT payload->'customer_id' FROM events WHERE aggregate_id = $1 AND event_type = 'TicketOpened'",
    )
    .bind(ticket.to_string())
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_eq!(metadata["actor_kind"], "customer", "{metadata}");
    assert_eq!(metadata["actor_id"], customer, "{metadata}");

    // Once per ticket: the form again is thanked, the JSON again refused,
    // and nothing more is recorded.
    let again = post_form(vec![("helpful", "no".into())], token.clone()).await;
    assert_eq!(again.status(), 303);
    assert!(again.headers()[LOCATION]
        .to_str()
        .unwrap()
        .ends_with("&feedback=already"));
    let json_again = app
        .http
        .post(app.url(&format!("/ticket/{ticket}/feedback?token={token}")))
        .json(&json!({"helpful": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(json_again.status(), 409);
    assert_eq!(feedback_events(&app, ticket).await.len(), 1);
    // The read model has it, for the metrics to come.
    eventually("feedback in crm_tickets", WAIT, || async {
        let helpful: Option<Option<bool>> =
            sqlx::query_scalar("SELECT feedback_helpful FROM crm_tickets WHERE ticket_id = $1")
                .bind(ticket)
                .fetch_optional(app.pool())
                .await
                .unwrap();
        (helpful.flatten() == Some(true)).then_some(())
    })
    .await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn json_feedback_takes_the_token_or_the_customers_own_bearer_only() {
    let app = TestApp::spawn_with(
        BACKBONE,
        &[("CASEBOOK_RATE_LIMIT_PER_CLIENT", "12".to_string())],
    )
    .await;
    let (ticket, token) = submit(&app, "ada@example.com", "Export fails.").await;
    let (other, _) = submit(&app, "bob@example.com", "Import fails.").await;
    reply(&app, ticket, "Try again now.").await;
    reply(&app, other, "Try again now.").await;
    let post = |ticket: Uuid, query: String, bearer: Option<String>, body: Value| {
        let request = app
            .http
            .post(app.url(&format!("/ticket/{ticket}/feedback{query}")))
            .json(&body);
        let request = match bearer {
            Some(b) => request.bearer_auth(b),
            None => request,
        };
        async move { request.send().await.unwrap() }
    };
    let customer: Uuid = sqlx::query_scalar(
        "SELECT (payload->>'customer_id')::uuid FROM events WHERE aggregate_id = $1 AND event_type = 'TicketOpened'",
    )
    .bind(ticket.to_string())
    .fetch_one(app.pool())
    .await
    .unwrap();
    let keys = casebook_api::TokenKeys::new(JWT_SECRET);
    let own = casebook_api::users::issue_token(
        app.pool(),
        &keys,
        casebook_api::Role::Customer,
        "ada",
        Some(customer),
        600,
    )
    .await
    .unwrap()
    .token;
    let agent = casebook_api::users::issue_token(
        app.pool(),
        &keys,
        casebook_api::Role::Agent,
        "grace",
        None,
        600,
    )
    .await
    .unwrap()
    .token;

    let nobody = post(ticket, String::new(), None, json!({"helpful": true})).await;
    assert_eq!(nobody.status(), 401);
    let bad = post(
        ticket,
        String::new(),
        None,
        json!({"helpful": "yes", "comment": 3}),
    )
    .await;
    assert_eq!(bad.status(), 401, "who comes first");
    let bad = post(
        ticket,
        format!("?token={token}"),
        None,
        json!({"helpful": "yes", "comment": 3}),
    )
    .await;
    assert_eq!(bad.status(), 422);
    let fields: Value = bad.json().await.unwrap();
    assert!(
        fields["fields"]["helpful"].is_string() && fields["fields"]["comment"].is_string(),
        "{fields}"
    );
    let staff = post(ticket, String::new(), Some(agent), json!({"helpful": true})).await;
    assert_eq!(staff.status(), 403);
    // Ada's bearer on Bob's ticket: as good as absent.
    let theirs = post(
        other,
        String::new(),
        Some(own.clone()),
        json!({"helpful": true}),
    )
    .await;
    assert_eq!(theirs.status(), 404);
    let mine = post(
        ticket,
        String::new(),
        Some(own),
        json!({"helpful": false, "comment": null}),
    )
    .await;
    assert_eq!(mine.status(), 204);
    let events = feedback_events(&app, ticket).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0["helpful"], false);
    assert_eq!(events[0].1["actor_id"], customer.to_string());
    assert!(feedback_events(&app, other).await.is_empty());
    // The public rate limit covers the route: over it, 429 and nothing stored.
    let mut limited = false;
    for _ in 0..12 {
        let r = post(other, String::new(), None, json!({"helpful": true})).await;
        if r.status() == 429 {
            assert!(r.headers().contains_key("retry-after"));
            limited = true;
            break;
        }
    }
    assert!(limited, "the feedback route is rate limited");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_feedback_route_needs_the_api_role_only() {
    // The API alone answers the page and takes feedback: no projector
    // needed (the page folds an unprojected ticket from the store).
    let app = TestApp::spawn_with(&[Role::Api], &[]).await;
    let (ticket, token) = submit(&app, "ada@example.com", "Export fails.").await;
    reply(&app, ticket, "Fixed.").await;
    let page = app
        .http
        .get(app.url(&format!("/ticket/{ticket}?token={token}")))
        .header(ACCEPT, BROWSER_ACCEPT)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("Fixed.") && page.contains("Was this helpful?"),
        "{page}"
    );
    let r = app
        .http
        .post(app.url(&format!("/ticket/{ticket}/feedback?token={token}")))
        .json(&json!({"helpful": true, "comment": "  "}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let events = feedback_events(&app, ticket).await;
    assert_eq!(
        events[0].0["comment"],
        Value::Null,
        "a blank comment is none"
    );
    app.stop().await;
}
