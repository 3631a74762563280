//! The staff GraphQL API through HTTP and graphql-transport-ws: people work
//! escalations and held drafts end to end (the real service, broker and
//! fakes of Twilio and the model), roles and sessions are enforced on
//! every request, limits refuse a query before it runs, nested lists are
//! batched, and subscriptions see events as the read model gets them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use casebook::app::Role;
use casebook_api::auth::Role as TokenRole;
use casebook_api::users;
use casebook_api::TokenKeys;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use uuid::Uuid;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer};

use crate::agent::{event_of, start_with, whatsapp, Fakes, ScriptedOpenAi, WAIT};
use crate::common::{eventually, form, TestApp, JWT_SECRET};

/// A token for a new session of `sub` as `role` (the user is created or
/// updated, as `casebook token issue` does).
async fn token(app: &TestApp, role: TokenRole, sub: &str, customer: Option<Uuid>) -> String {
    users::issue_token(
        app.pool(),
        &TokenKeys::new(JWT_SECRET),
        role,
        sub,
        customer,
        3600,
    )
    .await
    .unwrap()
    .token
}

/// Posts a GraphQL operation; the HTTP status and the JSON body.
async fn gql_raw(app: &TestApp, token: &str, query: &str, variables: Value) -> (u16, Value) {
    let response = app
        .http
        .post(app.url("/graphql"))
        .bearer_auth(token)
        .json(&json!({"query": query, "variables": variables}))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// Posts a GraphQL operation that must succeed; its `data`.
async fn gql(app: &TestApp, token: &str, query: &str, variables: Value) -> Value {
    let (status, body) = gql_raw(app, token, query, variables).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.get("errors").is_none(), "{body}");
    body["data"].clone()
}

/// The `extensions.code` of the first error.
fn error_code(body: &Value) -> &str {
    body["errors"][0]["extensions"]["code"]
        .as_str()
        .unwrap_or("")
}

/// Submits a web form and waits until the tickets read model has it.
async fn ticket_from_form(app: &TestApp, email: &str, message: &str) -> (Uuid, Uuid) {
    let response = app.submit_form(form(email, message)).await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    let ticket: Uuid = body["ticket_id"].as_str().unwrap().parse().unwrap();
    let pool = app.pool().clone();
    let customer = eventually("the ticket in the read model", WAIT, || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, Uuid>(
                "SELECT customer_id FROM crm_tickets WHERE ticket_id = $1",
            )
            .bind(ticket)
            .fetch_optional(&pool)
            .await
            .unwrap()
        }
    })
    .await;
    (ticket, customer)
}

fn backbone() -> [Role; 3] {
    [Role::Api, Role::Relay, Role::Projector]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_finds_claims_answers_and_resolves_an_escalation_and_gets_the_ticket_back_when_the_customer_writes_again(
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
    let agent = token(&app, TokenRole::Agent, "grace", None).await;
    let from = "whatsapp:+447700900061";

    // The customer asks for a person; their next message reaches no model.
    let ticket = whatsapp(&app, from, "SMg1", "I want to talk to a human").await;
    event_of(&app, ticket, "TicketEscalated").await;
    // The one holding reply of this hand-off reaches Twilio.
    let holding = eventually("the holding reply at Twilio", WAIT, || async {
        let sent = fakes.whatsapp_sent().await;
        (!sent.is_empty()).then_some(sent)
    })
    .await;
    let _ = whatsapp(&app, from, "SMg2", "How do I export my project data?").await;
    event_of(&app, ticket, "CustomerMessageQueuedForHuman").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        llm.received_requests().await.unwrap().len(),
        0,
        "the AI stays silent"
    );
    assert_eq!(
        fakes.whatsapp_sent().await.len(),
        holding.len(),
        "one holding reply at most"
    );
    assert_eq!(holding.len(), 1, "{holding:?}");

    // The agent finds the escalation in the queue.
    let escalation = eventually("the escalation in the queue", WAIT, || {
        let app = &app;
        let agent = &agent;
        async move {
            let data = gql(
                app,
                agent,
                "{ escalations(status: OPEN) { id reason status ticket { id status channel } } }",
                json!({}),
            )
            .await;
            data["escalations"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["ticket"]["id"] == ticket.to_string())
                .cloned()
        }
    })
    .await;
    assert_eq!(escalation["reason"], "human_requested");
    assert_eq!(escalation["ticket"]["channel"], "WHATSAPP");

    // Claims it, replies (delivered through Twilio), resolves it.
    let claimed = gql(
        &app,
        &agent,
        "mutation($t: ID!) { assignTicket(ticketId: $t) { id assignee { id } } }",
        json!({"t": ticket}),
    )
    .await;
    assert_eq!(claimed["assignTicket"]["assignee"]["id"], "grace");
    let before = fakes.whatsapp_sent().await.len();
    gql(
        &app,
        &agent,
        "mutation($t: ID!, $b: String!) { replyToTicket(ticketId: $t, body: $b) { id } }",
        json!({"t": ticket, "b": "Hello, this is Grace. Settings → Export does it."}),
    )
    .await;
    let sent = eventually("the reply at Twilio", WAIT, || async {
        let sent = fakes.whatsapp_sent().await;
        (sent.len() > before).then_some(sent)
    })
    .await;
    assert!(sent.last().unwrap().contains("this is Grace"), "{sent:?}");
    gql(
        &app,
        &agent,
        "mutation($e: ID!) { resolveEscalation(escalationId: $e, note: \"answered\") { id } }",
        json!({"e": escalation["id"]}),
    )
    .await;
    let resolved = gql(
        &app,
        &agent,
        "mutation($t: ID!) { resolveTicket(ticketId: $t) { status } }",
        json!({"t": ticket}),
    )
    .await;
    assert_eq!(resolved["resolveTicket"]["status"], "RESOLVED");

    // The customer writes again: reopened, back in Grace's queue.
    let again = whatsapp(&app, from, "SMg3", "One more thing about the export").await;
    assert_eq!(again, ticket);
    eventually("the ticket back in the agent's queue", WAIT, || {
        let app = &app;
        let agent = &agent;
        async move {
            let data = gql(app, agent, "{ myQueue { id status } }", json!({})).await;
            data["myQueue"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["id"] == ticket.to_string() && t["status"] != "RESOLVED")
                .cloned()
        }
    })
    .await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_held_draft_is_sent_as_edited_and_a_rejected_one_is_never_sent() {
    let fakes = Fakes::start(true).await;
    let llm = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(ScriptedOpenAi {
            query: "export project data",
            body: "Maybe try Settings, then Export?".into(),
            confidence: 0.5,
        })
        .mount(&llm)
        .await;
    let app = start_with(&fakes, Some(&llm), None, &[Role::All], &[]).await;
    let agent = token(&app, TokenRole::Agent, "alan", None).await;
    let first = whatsapp(
        &app,
        "whatsapp:+447700900071",
        "SMa1",
        "How do I export my project data?",
    )
    .await;
    let second = whatsapp(
        &app,
        "whatsapp:+447700900072",
        "SMa2",
        "How do I export my project data?",
    )
    .await;

    let pending = |ticket: Uuid| {
        let app = &app;
        let agent = &agent;
        async move {
            eventually("the held draft", WAIT, || async {
                let data = gql(
                    app,
                    agent,
                    "{ approvals(status: PENDING) { id status draftBody confidence ticket { id } } }",
                    json!({}),
                )
                .await;
                data["approvals"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|a| a["ticket"]["id"] == ticket.to_string())
                    .cloned()
            })
            .await
        }
    };
    let held = pending(first).await;
    assert!(
        held["draftBody"].as_str().unwrap().contains("Settings"),
        "{held}"
    );
    assert!(held["confidence"].as_f64().unwrap() < 0.8);
    let other = pending(second).await;
    assert!(
        fakes
            .whatsapp_sent()
            .await
            .iter()
            .all(|b| !b.contains("Maybe try")),
        "nothing sent while held"
    );

    let approved = gql(
        &app,
        &agent,
        "mutation($a: ID!) { approveResponse(approvalId: $a, editedBody: \"Go to Settings → Export and pick a format.\") { id status } }",
        json!({"a": held["id"]}),
    )
    .await;
    assert_eq!(approved["approveResponse"]["status"], "APPROVED");
    let rejected = gql(
        &app,
        &agent,
        "mutation($a: ID!) { rejectResponse(approvalId: $a, reason: \"too vague\") { id status } }",
        json!({"a": other["id"]}),
    )
    .await;
    assert_eq!(rejected["rejectResponse"]["status"], "REJECTED");

    let sent = eventually("the edited reply at Twilio", WAIT, || async {
        let sent = fakes.whatsapp_sent().await;
        sent.iter()
            .any(|b| b.contains("pick a format"))
            .then_some(sent)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sent_now = fakes.whatsapp_sent().await;
    assert!(
        sent.iter()
            .chain(&sent_now)
            .all(|b| !b.contains("Maybe try")),
        "the draft text is never sent: {sent_now:?}"
    );
    assert_eq!(
        sent_now
            .iter()
            .filter(|b| b.contains("pick a format"))
            .count(),
        1,
        "the edit is sent once, the rejected draft never"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_customer_reads_only_their_own_tickets_by_id_connection_and_nested_fields() {
    let app = TestApp::spawn_with(&backbone(), &[]).await;
    let (own, ada) = ticket_from_form(&app, "ada@example.com", "My own question").await;
    let (theirs, bob) = ticket_from_form(&app, "bob@example.com", "Bob's private matter").await;
    let customer = token(&app, TokenRole::Customer, "ada", Some(ada)).await;

    let by_id = gql(
        &app,
        &customer,
        "query($o: ID!, $t: ID!) { own: ticket(id: $o) { id messages { body } } other: ticket(id: $t) { id messages { body } } }",
        json!({"o": own, "t": theirs}),
    )
    .await;
    assert_eq!(by_id["own"]["id"], own.to_string());
    assert!(by_id["other"].is_null(), "{by_id}");

    let page = gql(
        &app,
        &customer,
        "{ tickets(first: 50) { totalCount edges { node { id } } } }",
        json!({}),
    )
    .await;
    assert_eq!(page["tickets"]["totalCount"], 1, "{page}");
    assert_eq!(page["tickets"]["edges"][0]["node"]["id"], own.to_string());
    // Asking for another customer's tickets by filter gives nothing.
    let filtered = gql(
        &app,
        &customer,
        "query($c: ID!) { tickets(filter: {customerId: $c}) { totalCount edges { node { id } } } }",
        json!({"c": bob}),
    )
    .await;
    assert_eq!(filtered["tickets"]["totalCount"], 0, "{filtered}");

    let nested = gql(
        &app,
        &customer,
        "query($b: ID!) { customer(id: $b) { id tickets { id } } customerByIdentifier(kind: EMAIL, value: \"bob@example.com\") { id } }",
        json!({"b": bob}),
    )
    .await;
    assert!(
        nested["customer"].is_null() && nested["customerByIdentifier"].is_null(),
        "{nested}"
    );
    let own_nested = gql(
        &app,
        &customer,
        "query($o: ID!) { ticket(id: $o) { customer { tickets { id messages { body } } } } }",
        json!({"o": own}),
    )
    .await;
    let text = own_nested.to_string();
    assert!(
        !text.contains("Bob's private matter") && !text.contains(&theirs.to_string()),
        "{text}"
    );

    // Staff-only queues and acts.
    let (_, queue) = gql_raw(&app, &customer, "{ escalations { id } }", json!({})).await;
    assert_eq!(error_code(&queue), "FORBIDDEN", "{queue}");
    let (_, act) = gql_raw(
        &app,
        &customer,
        "mutation($t: ID!) { resolveTicket(ticketId: $t) { id } }",
        json!({"t": own}),
    )
    .await;
    assert_eq!(error_code(&act), "FORBIDDEN", "{act}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn analysts_see_masked_identifiers_and_auditors_and_analysts_cannot_act() {
    let app = TestApp::spawn_with(&backbone(), &[]).await;
    // A WhatsApp number and an email address proven by their channels.
    let wa = whatsapp(
        &app,
        "whatsapp:+447700900081",
        "SMm1",
        "Call me on +44 7700 900081 please",
    )
    .await;
    let pool = app.pool().clone();
    let customer: Uuid = eventually("the ticket in the read model", WAIT, || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar("SELECT customer_id FROM crm_tickets WHERE ticket_id = $1")
                .bind(wa)
                .fetch_optional(&pool)
                .await
                .unwrap()
        }
    })
    .await;
    let query = "query($c: ID!, $t: ID!) { customer(id: $c) { phones emails } ticket(id: $t) { messages { body } } }";
    let vars = json!({"c": customer, "t": wa});
    let analyst = token(&app, TokenRole::Analyst, "ana", None).await;
    let supervisor = token(&app, TokenRole::Supervisor, "sue", None).await;
    let seen = eventually("the identifiers in the read model", WAIT, || {
        let app = &app;
        let supervisor = &supervisor;
        let vars = vars.clone();
        async move {
            let d = gql(app, supervisor, query, vars).await;
            (d["customer"]["phones"]
                .as_array()
                .is_some_and(|p| !p.is_empty())
                && d["ticket"]["messages"]
                    .as_array()
                    .is_some_and(|m| !m.is_empty()))
            .then_some(d)
        }
    })
    .await;
    assert!(seen.to_string().contains("447700900081"), "{seen}");
    let masked = gql(&app, &analyst, query, vars.clone()).await;
    let text = masked.to_string();
    assert!(
        !text.contains("7700900081") && !text.contains("7700 900081"),
        "{text}"
    );
    assert!(
        masked["customer"]["phones"][0]
            .as_str()
            .unwrap()
            .ends_with("81"),
        "{text}"
    );

    for (role, sub) in [(TokenRole::Auditor, "aud"), (TokenRole::Analyst, "ana2")] {
        let t = token(&app, role, sub, None).await;
        let (_, body) = gql_raw(
            &app,
            &t,
            "mutation($t: ID!) { assignTicket(ticketId: $t) { id } }",
            json!({"t": wa}),
        )
        .await;
        assert_eq!(error_code(&body), "FORBIDDEN", "{role:?}: {body}");
    }
    let assigned: i64 = app
        .count(&format!("SELECT count(*) FROM events WHERE aggregate_id = '{wa}' AND event_type = 'TicketAssigned'"))
        .await;
    assert_eq!(assigned, 0, "a refused mutation records nothing");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_demoted_and_disabled_sessions_are_refused_on_their_next_request() {
    let app = TestApp::spawn_with(&[Role::Api], &[]).await;
    let query = "mutation { escalateTicket(ticketId: \"00000000-0000-0000-0000-000000000000\", reason: \"x\") { id } }";

    // Idle for more than an hour.
    let idle = token(&app, TokenRole::Agent, "idle-agent", None).await;
    assert_eq!(
        gql_raw(&app, &idle, "{ myQueue { id } }", json!({}))
            .await
            .0,
        200
    );
    sqlx::query(
        "UPDATE sessions SET last_seen_at = now() - interval '61 minutes' WHERE sub = 'idle-agent'",
    )
    .execute(app.pool())
    .await
    .unwrap();
    let (status, body) = gql_raw(&app, &idle, "{ myQueue { id } }", json!({})).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"], "session_expired", "{body}");
    assert_eq!(body["errors"][0]["extensions"]["code"], "session_expired");

    // Demoted: the very next request has the new role.
    let demoted = token(&app, TokenRole::Agent, "demoted", None).await;
    let (_, before) = gql_raw(&app, &demoted, query, json!({})).await;
    assert_ne!(error_code(&before), "FORBIDDEN", "{before}");
    users::set_role(app.pool(), "demoted", TokenRole::Analyst, None)
        .await
        .unwrap();
    let (_, after) = gql_raw(&app, &demoted, query, json!({})).await;
    assert_eq!(error_code(&after), "FORBIDDEN", "{after}");

    // Disabled: refused outright.
    let disabled = token(&app, TokenRole::Supervisor, "gone", None).await;
    assert_eq!(
        gql_raw(&app, &disabled, "{ myQueue { id } }", json!({}))
            .await
            .0,
        200
    );
    users::disable_user(app.pool(), "gone").await.unwrap();
    let (status, body) = gql_raw(&app, &disabled, "{ myQueue { id } }", json!({})).await;
    assert_eq!(status, 401, "{body}");

    // No token, or a forged one.
    let response = app
        .http
        .post(app.url("/graphql"))
        .json(&json!({"query": "{ myQueue { id } }"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let (status, _) = gql_raw(&app, "not.a.token", "{ myQueue { id } }", json!({})).await;
    assert_eq!(status, 401);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_deep_and_over_complex_queries_are_refused_before_they_run() {
    let app = TestApp::spawn_with(&[Role::Api], &[]).await;
    let agent = token(&app, TokenRole::Agent, "deep", None).await;
    // Eleven levels, cheap at each: ticket → escalations → ticket → …
    let deep = "{ ticket(id: \"00000000-0000-0000-0000-000000000000\") { escalations { ticket { escalations { ticket { escalations { ticket { escalations { ticket { escalations { id } } } } } } } } } } }";
    let (status, body) = gql_raw(&app, &agent, deep, json!({})).await;
    assert_eq!(status, 200);
    assert!(body["data"].is_null(), "{body}");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("nested too deep"),
        "{body}"
    );
    assert_eq!(error_code(&body), "QUERY_TOO_DEEP", "{body}");
    assert_eq!(
        body["extensions"]["cost"]["reads"], 0,
        "nothing ran: {body}"
    );

    let wide = "{ tickets(first: 100) { edges { node { id status channel subject category priority createdAt updatedAt slaDueAt slaBreached messagesCount assignee { id } customer { id name emails phones tickets { id status channel subject createdAt } } messages { id body at direction channel } escalations { id reason } approvals { id draftBody } } } } }";
    let (_, body) = gql_raw(&app, &agent, wide, json!({})).await;
    assert!(body["data"].is_null(), "{body}");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("complex"),
        "{body}"
    );
    assert_eq!(error_code(&body), "QUERY_TOO_COMPLEX", "{body}");
    assert_eq!(
        body["extensions"]["cost"]["reads"], 0,
        "nothing ran: {body}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_page_of_fifty_tickets_with_customers_and_messages_takes_the_same_few_reads_as_a_page_of_two(
) {
    let app = TestApp::spawn_with(
        &backbone(),
        &[("CASEBOOK_WEBFORM_PER_EMAIL_PER_HOUR", "0".to_string())],
    )
    .await;
    for i in 0..52 {
        let response = app
            .submit_form(form(&format!("c{i}@example.com"), &format!("question {i}")))
            .await;
        assert_eq!(response.status(), 202);
    }
    app_waits_for_tickets(&app, 52).await;
    let agent = token(&app, TokenRole::Supervisor, "reader", None).await;
    let query = "query($n: Int!) { tickets(first: $n, filter: {status: RECEIVED}) { totalCount pageInfo { hasNextPage endCursor } edges { node { id customer { id name emails tickets { id } } messages { body } escalations { id } approvals { id } } } } }";
    let reads = |n: i64| {
        let app = &app;
        let agent = &agent;
        async move {
            let (status, body) = gql_raw(app, agent, query, json!({"n": n})).await;
            assert_eq!(status, 200);
            assert!(body.get("errors").is_none(), "{body}");
            assert_eq!(
                body["data"]["tickets"]["edges"].as_array().unwrap().len() as i64,
                n
            );
            for edge in body["data"]["tickets"]["edges"].as_array().unwrap() {
                assert!(edge["node"]["customer"]["id"].is_string(), "{edge}");
                assert_eq!(edge["node"]["messages"].as_array().unwrap().len(), 1);
            }
            assert_eq!(body["data"]["tickets"]["totalCount"], 52);
            assert_eq!(body["data"]["tickets"]["pageInfo"]["hasNextPage"], true);
            body["extensions"]["cost"]["reads"].as_i64().unwrap()
        }
    };
    let two = reads(2).await;
    let fifty = reads(50).await;
    // The page with its customers and their identifiers, the count, the
    // customers' tickets, messages, escalations, approvals: one batched read
    // each, whatever the page size (a loader may split a batch when the
    // machine is slow, never per row: one read per row would be 50 more for
    // each nested list).
    assert!(two >= 6, "{two}");
    assert!(
        fifty <= 16 && fifty <= two + 8,
        "{fifty} reads for 50 tickets, {two} for 2: N+1"
    );
    app.stop().await;
}

async fn app_waits_for_tickets(app: &TestApp, n: i64) {
    let pool = app.pool().clone();
    // Each read model has a consumer of its own: the tickets may be there
    // before their customers are.
    eventually("tickets, messages and customers projected", WAIT, || {
        let pool = pool.clone();
        async move {
            let (t, m, c): (i64, i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM crm_tickets), (SELECT count(*) FROM crm_messages),
                        (SELECT count(*) FROM crm_tickets t
                          WHERE EXISTS (SELECT 1 FROM crm_customers c WHERE c.customer_id = t.customer_id))",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            (t >= n && m >= n && c >= n).then_some(())
        }
    })
    .await;
}

/// A graphql-transport-ws client: connected, initialised with `token`.
async fn subscribe(
    app: &TestApp,
    token: &str,
    id: &str,
    query: &str,
    variables: Value,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let url = app.url("/graphql/ws").replacen("http", "ws", 1);
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let init =
        json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {token}")}});
    ws.send(WsMessage::text(init.to_string())).await.unwrap();
    let ack = next_json(&mut ws).await;
    assert_eq!(ack["type"], "connection_ack", "{ack}");
    let start =
        json!({"id": id, "type": "subscribe", "payload": {"query": query, "variables": variables}});
    ws.send(WsMessage::text(start.to_string())).await.unwrap();
    ws
}

async fn next_json(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> Value {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("a message within 30 s")
            .expect("the socket open")
            .unwrap();
        if let WsMessage::Text(text) = message {
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["type"] == "ping" {
                continue;
            }
            return v;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscriber_sees_a_tickets_events_as_they_happen_and_a_stranger_cannot_subscribe() {
    let app = TestApp::spawn_with(&backbone(), &[]).await;
    let (ticket, customer) = ticket_from_form(&app, "ada@example.com", "First question").await;
    let agent = token(&app, TokenRole::Agent, "watcher", None).await;
    let mut events = subscribe(
        &app,
        &agent,
        "1",
        "subscription($t: ID!) { ticketEvents(ticketId: $t) { eventType position occurredAt payload } }",
        json!({"t": ticket}),
    )
    .await;
    let mut queue = subscribe(
        &app,
        &agent,
        "2",
        "subscription { queueChanged { ticketId eventType } }",
        json!({}),
    )
    .await;
    // Subscriptions are live once the server has them; give it a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // An act on the ticket, through the API.
    gql(
        &app,
        &agent,
        "mutation($t: ID!) { escalateTicket(ticketId: $t, reason: \"needs a specialist\") { id } }",
        json!({"t": ticket}),
    )
    .await;
    let next = next_json(&mut events).await;
    assert_eq!(next["type"], "next", "{next}");
    assert_eq!(next["id"], "1");
    assert_eq!(
        next["payload"]["data"]["ticketEvents"]["eventType"], "TicketEscalated",
        "{next}"
    );
    let changed = next_json(&mut queue).await;
    assert_eq!(
        changed["payload"]["data"]["queueChanged"]["ticketId"],
        ticket.to_string(),
        "{changed}"
    );

    // A customer may follow only their own ticket.
    let (other, _) = ticket_from_form(&app, "bob@example.com", "Bob's").await;
    let own = token(&app, TokenRole::Customer, "ada", Some(customer)).await;
    let mut stranger = subscribe(
        &app,
        &own,
        "3",
        "subscription($t: ID!) { ticketEvents(ticketId: $t) { eventType } }",
        json!({"t": other}),
    )
    .await;
    let refused = next_json(&mut stranger).await;
    assert!(
        refused["type"] == "error"
            || (refused["payload"]["data"].is_null()
                && refused["payload"]["errors"][0]["extensions"]["code"] == "NOT_FOUND"),
        "{refused}"
    );
    let refused_text = refused.to_string();
    assert!(!refused_text.contains("Bob's"), "{refused_text}");

    // Without a token there is no connection.
    let url = app.url("/graphql/ws").replacen("http", "ws", 1);
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    ws.send(WsMessage::text(
        json!({"type": "connection_init", "payload": {}}).to_string(),
    ))
    .await
    .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .unwrap();
    assert!(
        !matches!(closed, Some(Ok(WsMessage::Text(ref t))) if t.contains("connection_ack")),
        "{closed:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graphiql_is_served_to_browsers() {
    let app = TestApp::spawn_with(&[Role::Api], &[]).await;
    let page = app.http.get(app.url("/graphql")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let text = page.text().await.unwrap();
    assert!(
        text.contains("graphiql") || text.contains("GraphiQL"),
        "{}",
        &text[..200.min(text.len())]
    );
    app.stop().await;
}

fn refusal_code(message: &Value) -> &str {
    let errors = if message["type"] == "error" {
        &message["payload"]
    } else {
        &message["payload"]["errors"]
    };
    errors[0]["extensions"]["code"].as_str().unwrap_or_default()
}

/// Refusals of subscriptions that arrive on `ws` within `window`.
async fn errors_within(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    window: Duration,
) -> Vec<Value> {
    let mut errors = Vec::new();
    let until = tokio::time::Instant::now() + window;
    while let Ok(Some(Ok(message))) = tokio::time::timeout_at(until, ws.next()).await {
        if let WsMessage::Text(text) = message {
            let v: Value = serde_json::from_str(&text).unwrap();
            // A refused subscription ends with a `next` carrying errors (an
            // `error` message is for a request that is not valid at all).
            if v["type"] == "error" || v["payload"]["errors"].is_array() {
                errors.push(v);
            }
        }
    }
    errors
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_holds_at_most_a_hundred_subscriptions_and_a_completed_one_frees_its_slot() {
    let app = TestApp::spawn_with(&backbone(), &[]).await;
    let agent = token(&app, TokenRole::Agent, "greedy", None).await;
    let query = "subscription { queueChanged { ticketId } }";
    let mut ws = subscribe(&app, &agent, "1", query, json!({})).await;
    for id in 2..=101 {
        let start = json!({"id": id.to_string(), "type": "subscribe", "payload": {"query": query}});
        ws.send(WsMessage::text(start.to_string())).await.unwrap();
    }
    let errors = errors_within(&mut ws, Duration::from_secs(3)).await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(
        refusal_code(&errors[0]),
        "TOO_MANY_SUBSCRIPTIONS",
        "{errors:?}"
    );
    let refused = errors[0]["id"].as_str().unwrap().to_string();

    // Completing one frees one slot: of two more, exactly one is refused.
    let done = if refused == "1" { "2" } else { "1" };
    let complete = json!({"id": done, "type": "complete"});
    ws.send(WsMessage::text(complete.to_string()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for id in ["x1", "x2"] {
        let start = json!({"id": id, "type": "subscribe", "payload": {"query": query}});
        ws.send(WsMessage::text(start.to_string())).await.unwrap();
    }
    let errors = errors_within(&mut ws, Duration::from_secs(3)).await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(refusal_code(&errors[0]), "TOO_MANY_SUBSCRIPTIONS");

    // Another connection has slots of its own.
    let mut other = subscribe(&app, &agent, "1", query, json!({})).await;
    assert!(errors_within(&mut other, Duration::from_secs(1))
        .await
        .is_empty());
}

/// A retried reply (the same idempotency key) is recorded, and so sent,
/// once; another key is another reply; an over-long key is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reply_retried_with_its_idempotency_key_is_recorded_once() {
    let app = TestApp::spawn_with(&backbone(), &[]).await;
    let (ticket, _) = ticket_from_form(&app, "kay@example.com", "Where is my export?").await;
    let agent = token(&app, TokenRole::Agent, "grace", None).await;
    let reply = "mutation($t: ID!, $b: String!, $k: String) { replyToTicket(ticketId: $t, body: $b, idempotencyKey: $k) { id } }";
    let replies = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM events WHERE aggregate_id = $1 AND event_type = 'ResponseSent'",
        )
        .bind(ticket.to_string())
        .fetch_one(app.pool())
        .await
        .unwrap()
    };
    for _ in 0..3 {
        let data = gql(
            &app,
            &agent,
            reply,
            json!({"t": ticket, "b": "It is on its way.", "k": "reply-7f3a"}),
        )
        .await;
        assert_eq!(data["replyToTicket"]["id"], ticket.to_string());
    }
    assert_eq!(replies().await, 1, "three attempts, one reply");
    gql(
        &app,
        &agent,
        reply,
        json!({"t": ticket, "b": "And one more thing.", "k": "reply-8b21"}),
    )
    .await;
    assert_eq!(replies().await, 2, "another key is another reply");
    // Another person with the same key is not a retry of Grace's reply.
    let other = token(&app, TokenRole::Agent, "hopper", None).await;
    gql(
        &app,
        &other,
        reply,
        json!({"t": ticket, "b": "Hopper here.", "k": "reply-7f3a"}),
    )
    .await;
    assert_eq!(replies().await, 3);
    let (_, refused) = gql_raw(
        &app,
        &agent,
        reply,
        json!({"t": ticket, "b": "x", "k": "k".repeat(201)}),
    )
    .await;
    assert_eq!(error_code(&refused), "BAD_USER_INPUT", "{refused}");
    assert_eq!(replies().await, 3);
    app.stop().await;
}

/// GraphQL operations' read transactions open in the app's database: each
/// begins with the scoped `BEGIN READ ONLY` and then reads the read models.
async fn busy_backends(sampler: &mut sqlx::PgConnection, database: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
          WHERE datname = $1 AND pid <> pg_backend_pid() AND xact_start IS NOT NULL
            AND backend_type = 'client backend'
            AND (query LIKE 'BEGIN READ ONLY%' OR query LIKE '%crm\\_%')",
    )
    .bind(database)
    .fetch_one(sampler)
    .await
    .unwrap()
}

/// Many operations at once beyond `CASEBOOK_GRAPHQL_CONCURRENCY` wait their
/// turn and all succeed; no more than the limit ever run in Postgres at
/// once. The same burst without the limit does overlap, so the sampling
/// can see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operations_beyond_the_concurrency_limit_wait_their_turn_and_all_succeed() {
    use sqlx::Connection;
    let query = "query { tickets(first: 50) { edges { node { id customer { id emails phones } messages { body } } } } }";
    let mut overlaps = Vec::new();
    for limit in ["1", "10000"] {
        let app = TestApp::spawn_with(
            &[Role::Api],
            &[("CASEBOOK_GRAPHQL_CONCURRENCY", limit.to_string())],
        )
        .await;
        for i in 0..20 {
            let r = app
                .submit_form(form(&format!("burst{i}@example.com"), "Where is my order?"))
                .await;
            assert_eq!(r.status(), 202);
        }
        let supervisor = token(&app, TokenRole::Supervisor, "sup-burst", None).await;
        let mut sampler = sqlx::PgConnection::connect(&app.db.url).await.unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let mut requests = Vec::new();
        for _ in 0..3 {
            for _ in 0..16 {
                let (http, url, token) =
                    (app.http.clone(), app.url("/graphql"), supervisor.clone());
                requests.push(tokio::spawn(async move {
                    let r = http
                        .post(url)
                        .bearer_auth(token)
                        .json(&json!({ "query": query }))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200);
                    let body: serde_json::Value = r.json().await.unwrap();
                    assert!(body.get("errors").is_none(), "{body}");
                    assert!(body["data"]["tickets"]["edges"].as_array().is_some());
                }));
            }
        }
        let sampling = {
            let done = done.clone();
            let name = app.db.name.clone();
            tokio::spawn(async move {
                let mut most = 0;
                while !done.load(Ordering::Relaxed) {
                    most = most.max(busy_backends(&mut sampler, &name).await);
                }
                most
            })
        };
        for r in requests {
            r.await.unwrap();
        }
        done.store(true, Ordering::Relaxed);
        overlaps.push(sampling.await.unwrap());
        app.stop().await;
    }
    // pg_stat_activity reads each backend's entry in turn, not all at one
    // instant: a sample may catch one operation ending as the next begins.
    assert!(
        overlaps[0] <= 2,
        "with a limit of 1, {} ran at once",
        overlaps[0]
    );
    assert!(
        overlaps[1] >= 4,
        "without a limit the burst overlapped only {} deep, so the sampling proves nothing",
        overlaps[1]
    );
}
