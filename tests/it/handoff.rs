//! The human hand-off end to end: the real service (API, relay, projectors,
//! agent, delivery) on the real broker, with fakes of Twilio, Gmail and the
//! model, and people acting through the staff command service
//! (`casebook_commands::staff::Staff`), as the GraphQL mutations do.

use std::collections::HashMap;
use std::time::Duration;

use casebook::app::Role;
use casebook_commands::claims::LinkKeys;
use casebook_commands::intake::{InboundMessage, Intake, Sender};
use casebook_commands::staff::Staff;
use casebook_commands::{CommandError, EventStore};
use casebook_domain::conversation::whatsapp_conversation_id;
use casebook_domain::identity::IdentityKey;
use casebook_domain::{Category, Channel, Priority, TicketError};
use chrono::{TimeDelta, Utc};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer};

use crate::agent::{count, event_of, start_with, whatsapp, Fakes, ScriptedOpenAi, WAIT};
use crate::common::{eventually, JWT_SECRET, PUBLIC_URL};

const TEMPLATE: &str = "HX0123456789abcdef0123456789abcdef";

/// Every message Twilio was asked to create, as its form fields (`Body`,
/// or `ContentSid` and `ContentVariables` for a template).
async fn twilio_posts(fakes: &Fakes) -> Vec<HashMap<String, String>> {
    fakes
        .twilio
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.method.as_str() == "POST" && r.url.path().ends_with("/Messages.json"))
        .map(|r| serde_urlencoded::from_bytes(&r.body).unwrap())
        .collect()
}

async fn twilio_posts_reach(fakes: &Fakes, n: usize) -> Vec<HashMap<String, String>> {
    eventually(&format!("{n} messages at Twilio"), WAIT, || async {
        let posts = twilio_posts(fakes).await;
        (posts.len() >= n).then_some(posts)
    })
    .await
}

async fn model_calls(llm: &MockServer) -> usize {
    llm.received_requests().await.unwrap().len()
}

/// Waits until `sql` (one `$1` bind: `id`) returns a row that `ok` accepts.
async fn read_model<T, F>(pool: &PgPool, what: &str, sql: &'static str, id: Uuid, ok: F) -> T
where
    T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin + Clone,
    F: Fn(&T) -> bool,
{
    eventually(what, WAIT, || {
        let pool = pool.clone();
        let ok = &ok;
        async move {
            let row: Option<T> = sqlx::query_as(sql)
                .bind(id)
                .fetch_optional(&pool)
                .await
                .unwrap();
            row.filter(|r| ok(r))
        }
    })
    .await
}

fn staff(pool: &PgPool, template: Option<&str>) -> Staff {
    Staff::new(EventStore::new(pool.clone()), "The Support Team")
        .with_followup_template(template.map(str::to_string))
}

/// Rebuilding the read models from the store (what `casebook replay
/// projections` does) gives the queues, hand-off columns, messages,
/// conversations and customers the live projector built, whether each
/// page holds one event or thousands (projectors fold a page and write it
/// with a few set-based statements, so a page's size must not matter).
async fn rebuild_gives_the_same_queues(pool: &PgPool) {
    let snapshot = "SELECT COALESCE((SELECT jsonb_agg(a ORDER BY approval_id) FROM crm_approvals a)::text, '-')
                 || '|' || COALESCE((SELECT jsonb_agg(e ORDER BY escalation_id) FROM crm_escalations e)::text, '-')
                 || '|' || (SELECT jsonb_agg(to_jsonb(t) - 'projected_at' ORDER BY ticket_id) FROM crm_tickets t)::text
                 || '|' || COALESCE((SELECT jsonb_agg(m ORDER BY message_id) FROM crm_messages m)::text, '-')
                 || '|' || COALESCE((SELECT jsonb_agg(v ORDER BY ticket_id) FROM crm_conversations v)::text, '-')
                 || '|' || COALESCE((SELECT jsonb_agg(c ORDER BY customer_id) FROM crm_customers c)::text, '-')
                 || '|' || COALESCE((SELECT jsonb_agg(i ORDER BY kind, value) FROM crm_customer_identifiers i)::text, '-')";
    // What the live projectors built once the workers are done (a
    // delivery status may still be on its way): the store and the read
    // models each unchanged over half a second.
    let mut before: Option<String> = None;
    let mut last_events = -1i64;
    for _ in 0..60 {
        let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(pool)
            .await
            .unwrap();
        let now: Option<String> = sqlx::query_scalar(snapshot).fetch_one(pool).await.unwrap();
        if events == last_events && now == before {
            break;
        }
        (last_events, before) = (events, now);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(before.is_some());
    for page in [1, casebook_replay::rebuild::CHUNK] {
        let reports =
            casebook_replay::rebuild_paged(pool, &casebook_projections::all_projectors(), page)
                .await
                .unwrap();
        assert!(!reports.is_empty());
        let after: Option<String> = sqlx::query_scalar(snapshot).fetch_one(pool).await.unwrap();
        assert_eq!(before, after, "rebuilt in pages of {page} events");
    }
}

/// The event's actor, as the audit trail shows it.
async fn actor_of(pool: &PgPool, ticket: Uuid, event_type: &str) -> Value {
    sqlx::query_scalar(
        "SELECT jsonb_build_object('kind', metadata->>'actor_kind', 'id', metadata->>'actor_id')
           FROM events WHERE aggregate_id = $1 AND event_type = $2 ORDER BY sequence DESC LIMIT 1",
    )
    .bind(ticket.to_string())
    .bind(event_type)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_person_takes_over_answers_resolves_and_gets_the_ticket_back_when_the_customer_writes_again(
) {
    let fakes = Fakes::start(true).await;
    let llm = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(ScriptedOpenAi {
            query: "export project data",
            body: "Open Settings and choose Export.".into(),
            confidence: 0.95,
        })
        .mount(&llm)
        .await;
    let app = start_with(&fakes, Some(&llm), None, &[Role::All], &[]).await;
    let pool = app.pool().clone();
    let from = "whatsapp:+447700900051";

    // The customer asks for a person: escalated, one holding reply.
    let ticket = whatsapp(&app, from, "SMh1", "human").await;
    let escalated = event_of(&app, ticket, "TicketEscalated").await;
    assert_eq!(escalated["reason"], "human_requested");
    let escalation_id: Uuid = escalated["escalation_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    twilio_posts_reach(&fakes, 1).await;

    // The next message: the AI stays silent. It waits for a person; no
    // model call, no draft, nothing sent (the hand-off had its holding
    // reply already).
    let again = whatsapp(&app, from, "SMh2", "How do I export my project data?").await;
    assert_eq!(again, ticket);
    let queued = event_of(&app, ticket, "CustomerMessageQueuedForHuman").await;
    assert!(queued["assignee"].is_null(), "{queued}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(model_calls(&llm).await, 0, "the model is never asked");
    assert_eq!(count(&app, ticket, "ResponseDrafted").await, 0);
    assert_eq!(twilio_posts(&fakes).await.len(), 1, "nothing more is sent");
    let (handler, first_response): (String, Option<chrono::DateTime<Utc>>) = read_model(
        &pool,
        "the ticket held by people",
        "SELECT handler, first_response_at FROM crm_tickets WHERE ticket_id = $1",
        ticket,
        |r: &(String, Option<chrono::DateTime<Utc>>)| r.0 == "human",
    )
    .await;
    assert_eq!(handler, "human");
    assert_eq!(first_response, None, "a holding reply is not a response");

    // An agent finds the escalation and claims the ticket.
    let service = staff(&pool, None);
    let _: (String,) = read_model(
        &pool,
        "the open escalation",
        "SELECT status FROM crm_escalations WHERE escalation_id = $1",
        escalation_id,
        |r: &(String,)| r.0 == "open",
    )
    .await;
    assert_eq!(
        service.ticket_of_escalation(escalation_id).await.unwrap(),
        Some(ticket)
    );
    let acted = service
        .assign(ticket, None, "grace", "corr-h1")
        .await
        .unwrap();
    assert!(acted.changed);
    let _: (Option<String>, Option<String>) = read_model(
        &pool,
        "the escalation in grace's queue",
        "SELECT t.assignee, e.assigned_to FROM crm_tickets t JOIN crm_escalations e USING (ticket_id)
          WHERE t.ticket_id = $1",
        ticket,
        |r: &(Option<String>, Option<String>)| {
            r.0.as_deref() == Some("grace") && r.1.as_deref() == Some("grace")
        },
    )
    .await;
    assert_eq!(
        actor_of(&pool, ticket, "TicketAssigned").await,
        serde_json::json!({"kind": "agent", "id": "grace"})
    );

    // She replies: formatted for WhatsApp, delivered through Twilio.
    let reply = service
        .reply(
            ticket,
            "Hi Ada, I'm Grace. Open **Settings** and choose Export.",
            "grace",
            "corr-h2",
        )
        .await
        .unwrap();
    assert!(reply.response_id.is_some());
    let posts = twilio_posts_reach(&fakes, 2).await;
    assert_eq!(
        posts[1]["Body"],
        "Hi Ada, I'm Grace. Open *Settings* and choose Export."
    );
    assert_eq!(posts[1]["To"], from);
    assert_eq!(
        actor_of(&pool, ticket, "ResponseSent").await,
        serde_json::json!({"kind": "agent", "id": "grace"})
    );
    let _: (Option<chrono::DateTime<Utc>>,) = read_model(
        &pool,
        "the first response",
        "SELECT first_response_at FROM crm_tickets WHERE ticket_id = $1",
        ticket,
        |r: &(Option<chrono::DateTime<Utc>>,)| r.0.is_some(),
    )
    .await;

    // She settles the escalation and resolves the ticket.
    service
        .resolve_escalation(escalation_id, Some("answered"), "grace", "corr-h3")
        .await
        .unwrap();
    service
        .resolve(ticket, Some("export explained"), "grace", "corr-h4")
        .await
        .unwrap();
    let (status, resolved_at, resolved_by): (String, Option<chrono::DateTime<Utc>>, Option<String>) =
        read_model(
            &pool,
            "the resolved ticket",
            "SELECT t.status, t.resolved_at, e.resolved_by FROM crm_tickets t JOIN crm_escalations e USING (ticket_id)
              WHERE t.ticket_id = $1",
            ticket,
            |r: &(String, Option<chrono::DateTime<Utc>>, Option<String>)| r.0 == "resolved",
        )
        .await;
    assert_eq!(status, "resolved");
    assert!(resolved_at.is_some());
    assert_eq!(resolved_by.as_deref(), Some("grace"));
    let err = service
        .resolve_escalation(escalation_id, None, "grace", "corr-h5")
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        CommandError::Rejected(TicketError::EscalationAlreadyResolved(_))
    ));

    // The customer writes again: the same ticket reopens into grace's
    // queue, and the AI still stays silent; the customer hears once that a
    // person will reply.
    let third = whatsapp(&app, from, "SMh3", "It still fails").await;
    assert_eq!(third, ticket);
    let _: (String, Option<String>, String) = read_model(
        &pool,
        "the reopened ticket in grace's queue",
        "SELECT status, assignee, handler FROM crm_tickets WHERE ticket_id = $1",
        ticket,
        |r: &(String, Option<String>, String)| {
            r.0 != "resolved" && r.1.as_deref() == Some("grace") && r.2 == "human"
        },
    )
    .await;
    eventually("the message queued for grace", WAIT, || {
        let pool = pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM events WHERE aggregate_id = $1 AND event_type = 'CustomerMessageQueuedForHuman'
                   AND payload->>'assignee' = 'grace'",
            )
            .bind(ticket.to_string())
            .fetch_one(&pool)
            .await
            .unwrap();
            (n == 1).then_some(())
        }
    })
    .await;
    let posts = twilio_posts_reach(&fakes, 3).await;
    assert!(posts[2]["Body"].contains("will reply"), "{:?}", posts[2]);
    assert_eq!(model_calls(&llm).await, 0);

    // Resolved again and left alone: closed after 7 days, not before.
    service
        .resolve(ticket, None, "grace", "corr-h6")
        .await
        .unwrap();
    let (resolved_at,): (Option<chrono::DateTime<Utc>>,) = read_model(
        &pool,
        "resolved again",
        "SELECT resolved_at FROM crm_tickets WHERE ticket_id = $1 AND status = 'resolved'",
        ticket,
        |r: &(Option<chrono::DateTime<Utc>>,)| r.0.is_some(),
    )
    .await;
    let resolved_at = resolved_at.unwrap();
    assert_eq!(
        service
            .close_stale(resolved_at + TimeDelta::days(6))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        service
            .close_stale(resolved_at + TimeDelta::days(7) + TimeDelta::seconds(1))
            .await
            .unwrap(),
        1
    );
    let _: (String, Option<chrono::DateTime<Utc>>) = read_model(
        &pool,
        "the closed ticket",
        "SELECT status, closed_at FROM crm_tickets WHERE ticket_id = $1",
        ticket,
        |r: &(String, Option<chrono::DateTime<Utc>>)| r.0 == "closed" && r.1.is_some(),
    )
    .await;
    let err = service
        .reply(ticket, "One more thing", "grace", "corr-h7")
        .await
        .unwrap_err();
    assert!(matches!(err, CommandError::Rejected(TicketError::Closed)));

    // WhatsApp after closure: a new ticket, linked to the closed one.
    let fourth = whatsapp(&app, from, "SMh4", "Hello again").await;
    assert_ne!(fourth, ticket);
    let (previous,): (Option<Uuid>,) = read_model(
        &pool,
        "the follow-on ticket",
        "SELECT previous_ticket_id FROM crm_tickets WHERE ticket_id = $1",
        fourth,
        |r: &(Option<Uuid>,)| r.0.is_some(),
    )
    .await;
    assert_eq!(previous, Some(ticket));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_held_draft_approved_with_an_edit_sends_the_edit_and_a_rejected_one_sends_nothing() {
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
    let app = start_with(&fakes, Some(&llm), None, &[Role::All], &[]).await;
    let pool = app.pool().clone();
    let approved = whatsapp(
        &app,
        "whatsapp:+447700900061",
        "SMp1",
        "I forgot my password, what now?",
    )
    .await;
    let rejected = whatsapp(
        &app,
        "whatsapp:+447700900062",
        "SMp2",
        "Password reset please?",
    )
    .await;
    let mut ids = Vec::new();
    for ticket in [approved, rejected] {
        let requested = event_of(&app, ticket, "ApprovalRequested").await;
        let id: Uuid = requested["approval_id"].as_str().unwrap().parse().unwrap();
        // The approval queue shows it, with the draft and its confidence.
        let (status, body, confidence, customer): (String, String, f64, Uuid) = read_model(
            &pool,
            "the pending approval",
            "SELECT status, draft_body, confidence, customer_id FROM crm_approvals WHERE approval_id = $1",
            id,
            |_| true,
        )
        .await;
        assert_eq!(status, "pending");
        assert!(body.contains("Forgot password"), "{body}");
        assert!((confidence - 0.5).abs() < 0.3, "{confidence}");
        let owner: Uuid =
            sqlx::query_scalar("SELECT customer_id FROM crm_tickets WHERE ticket_id = $1")
                .bind(ticket)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(customer, owner);
        ids.push(id);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        twilio_posts(&fakes).await.is_empty(),
        "nothing before approval"
    );

    let service = staff(&pool, None);
    let edit = "Choose Forgot password on the sign-in page, then follow the email we send.";
    let acted = service
        .approve(ids[0], Some(edit), "grace", "corr-a1")
        .await
        .unwrap();
    assert_eq!(acted.ticket_id, approved);
    service
        .reject(ids[1], "not our product's flow", "sam", "corr-a2")
        .await
        .unwrap();
    let posts = twilio_posts_reach(&fakes, 1).await;
    assert_eq!(posts[0]["Body"], edit);
    // Deciding again is refused; so is a rejection without a reason.
    assert!(matches!(
        service.approve(ids[0], None, "grace", "corr-a3").await,
        Err(CommandError::Rejected(TicketError::ApprovalAlreadyDecided(
            _
        )))
    ));
    assert!(matches!(
        service.reject(ids[1], "  ", "sam", "corr-a4").await,
        Err(CommandError::Rejected(TicketError::EmptyReason))
    ));
    assert!(matches!(
        service
            .approve(Uuid::new_v4(), None, "grace", "corr-a5")
            .await,
        Err(CommandError::Rejected(TicketError::UnknownApproval(_)))
    ));
    let _: (String, Option<String>, Option<String>) = read_model(
        &pool,
        "the approved edit",
        "SELECT status, edited_body, decided_by FROM crm_approvals WHERE approval_id = $1",
        ids[0],
        |r: &(String, Option<String>, Option<String>)| {
            r.0 == "approved" && r.1.as_deref() == Some(edit) && r.2.as_deref() == Some("grace")
        },
    )
    .await;
    let _: (String, Option<String>) = read_model(
        &pool,
        "the rejection",
        "SELECT status, reason FROM crm_approvals WHERE approval_id = $1",
        ids[1],
        |r: &(String, Option<String>)| {
            r.0 == "rejected" && r.1.as_deref() == Some("not our product's flow")
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        twilio_posts(&fakes).await.len(),
        1,
        "the rejected draft is never sent"
    );
    assert_eq!(count(&app, rejected, "ResponseSent").await, 0);
    rebuild_gives_the_same_queues(&pool).await;
    app.stop().await;
}

/// A WhatsApp message the customer sent `hours_ago`, taken in as intake
/// takes in the webhook's.
async fn old_whatsapp(pool: &PgPool, number: &str, sid: &str, hours_ago: i64) -> Uuid {
    let key = IdentityKey::whatsapp(&format!("whatsapp:{number}")).unwrap();
    let message = InboundMessage {
        channel: Channel::Whatsapp,
        channel_message_id: sid.into(),
        sender: Sender {
            identities: vec![key.clone()],
            name: Some("Ada".into()),
        },
        conversation_id: Some(whatsapp_conversation_id(&key.value)),
        thread: None,
        subject: None,
        body: "How do I export my project data?".into(),
        attachments: 0,
        category: Category::General,
        priority: Priority::Medium,
        received_at: Utc::now() - TimeDelta::hours(hours_ago),
        automated: None,
    };
    Intake::new(EventStore::new(pool.clone()))
        .receive(&message, "corr-old")
        .await
        .unwrap()
        .ticket_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_whatsapp_reply_a_day_after_the_customers_last_message_goes_as_the_template() {
    let fakes = Fakes::start(true).await;
    let app = start_with(
        &fakes,
        None,
        None,
        &[Role::All],
        &[("TWILIO_FOLLOWUP_CONTENT_SID", TEMPLATE.to_string())],
    )
    .await;
    let pool = app.pool().clone();
    let ticket = old_whatsapp(&pool, "+447700900071", "SMw1", 25).await;
    // The AI's own answer, this late, goes as the template.
    event_of(&app, ticket, "ResponseSent").await;
    let service = staff(&pool, Some(TEMPLATE));
    service
        .assign(ticket, None, "grace", "corr-w1")
        .await
        .unwrap();
    service
        .reply(
            ticket,
            "Your export is ready in Settings.",
            "grace",
            "corr-w2",
        )
        .await
        .unwrap();
    let posts = twilio_posts_reach(&fakes, 2).await;
    let token = LinkKeys::new(JWT_SECRET).status_token(ticket);
    let link = format!("{PUBLIC_URL}/ticket/{ticket}?token={token}");
    for post in &posts {
        assert_eq!(post["ContentSid"], TEMPLATE);
        assert!(!post.contains_key("Body"), "{post:?}");
        let variables: Value = serde_json::from_str(&post["ContentVariables"]).unwrap();
        assert_eq!(variables["1"], link.as_str());
    }
    // The link opens the conversation, the person's reply included.
    let status_path = format!("/ticket/{ticket}?token={token}");
    eventually("the reply on the status page", WAIT, || {
        let (app, status_path) = (&app, &status_path);
        async move {
            let status = app.get_json(status_path).await;
            status["messages"]
                .as_array()?
                .iter()
                .any(|m| {
                    m["body"]
                        .as_str()
                        .is_some_and(|b| b.contains("Your export is ready"))
                })
                .then_some(())
        }
    })
    .await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_template_a_late_whatsapp_reply_is_refused_and_the_ai_escalates() {
    let fakes = Fakes::start(true).await;
    let app = start_with(&fakes, None, None, &[Role::All], &[]).await;
    let pool = app.pool().clone();
    let ticket = old_whatsapp(&pool, "+447700900081", "SMw2", 25).await;
    let escalated = event_of(&app, ticket, "TicketEscalated").await;
    assert_eq!(escalated["reason"], "whatsapp_window_closed");
    let service = staff(&pool, None);
    let err = service
        .reply(ticket, "Your export is ready.", "grace", "corr-w3")
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CommandError::Rejected(TicketError::WhatsappWindowClosed)
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("TWILIO_FOLLOWUP_CONTENT_SID"),
        "{err}"
    );
    // A message within the window may be answered free-form.
    let recent = old_whatsapp(&pool, "+447700900082", "SMw3", 23).await;
    event_of(&app, recent, "ResponseSent").await;
    service
        .assign(recent, None, "grace", "corr-w4")
        .await
        .unwrap();
    service
        .reply(recent, "Anything else?", "grace", "corr-w5")
        .await
        .unwrap();
    let posts = twilio_posts_reach(&fakes, 2).await;
    assert!(posts
        .iter()
        .all(|p| p.contains_key("Body") && !p.contains_key("ContentSid")));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        count(&app, ticket, "ResponseSent").await,
        0,
        "nothing sent late"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn handed_back_the_ai_answers_again() {
    let fakes = Fakes::start(true).await;
    let app = start_with(&fakes, None, None, &[Role::All], &[]).await;
    let pool = app.pool().clone();
    let from = "whatsapp:+447700900091";
    let ticket = whatsapp(&app, from, "SMb1", "How do I export my project data?").await;
    event_of(&app, ticket, "ResponseSent").await;
    let service = staff(&pool, None);
    service
        .escalate(ticket, "VIP customer", "sam", "corr-b1")
        .await
        .unwrap();
    whatsapp(&app, from, "SMb2", "Can I export to CSV?").await;
    event_of(&app, ticket, "CustomerMessageQueuedForHuman").await;
    let (handler,): (String,) = read_model(
        &pool,
        "held by people",
        "SELECT handler FROM crm_tickets WHERE ticket_id = $1",
        ticket,
        |r: &(String,)| r.0 == "human",
    )
    .await;
    assert_eq!(handler, "human");
    service
        .hand_back_to_ai(ticket, "sam", "corr-b2")
        .await
        .unwrap();
    assert!(matches!(
        service.hand_back_to_ai(ticket, "sam", "corr-b3").await,
        Err(CommandError::Rejected(TicketError::NotWithHuman))
    ));
    assert!(matches!(
        service.unassign(ticket, "sam", "corr-b4").await,
        Err(CommandError::Rejected(TicketError::NotAssigned))
    ));
    whatsapp(
        &app,
        from,
        "SMb3",
        "How do I export my project data as JSON?",
    )
    .await;
    eventually("the AI's second answer", WAIT, || {
        let app = &app;
        async move { (count(app, ticket, "ResponseDrafted").await >= 2).then_some(()) }
    })
    .await;
    let _: (String, i64) = read_model(
        &pool,
        "back with the AI, which answered, the manual escalation settled",
        "SELECT t.handler, (SELECT count(*) FROM crm_escalations e WHERE e.ticket_id = t.ticket_id AND e.status = 'open')
           FROM crm_tickets t WHERE t.ticket_id = $1 AND t.status = 'responded'",
        ticket,
        |r: &(String, i64)| r.0 == "ai" && r.1 == 0,
    )
    .await;
    rebuild_gives_the_same_queues(&pool).await;
    app.stop().await;
}
