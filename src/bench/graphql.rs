//! `casebook bench graphql`: the staff API on a full store.
//!
//! 1. Generates `--tickets` tickets (default 200,000: about a million
//!    events) through the real command path: `Intake::receive`, as the
//!    WhatsApp, Gmail and web-form routes call it, `--clients` at once.
//! 2. Builds the read models from the store (`replay projections`), and
//!    starts the relay after the last generated event.
//! 3. Serves the API, relay and projectors, and measures a filtered page of
//!    50 tickets with their customers under `--readers` concurrent clients
//!    (default 32) for `--seconds`.
//! 4. Opens `--subscriptions` graphql-transport-ws subscriptions (default
//!    1,000), each on its own ticket, writes a new customer message to a
//!    sample of those tickets, and measures from the command's commit to
//!    the subscriber receiving the event.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use casebook_api::users;
use casebook_api::{Role as TokenRole, TokenKeys};
use casebook_commands::{EventStore, InboundMessage, Intake, Sender};
use casebook_domain::conversation::whatsapp_conversation_id;
use casebook_domain::identity::IdentityKey;
use casebook_domain::{Category, Channel, Priority};
use chrono::Utc;
use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio::sync::{Mutex, Semaphore};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use uuid::Uuid;

use super::{BenchArgs, Latency, Report, Scratch, BACKBONE};
use crate::app;

/// The page every reader asks for, with one of a few filters.
const PAGE_QUERY: &str = "query($f: TicketFilter) { tickets(first: 50, filter: $f) { pageInfo { hasNextPage endCursor } edges { node { id status channel priority subject createdAt slaDueAt customer { id name emails phones } } } } }";

/// Subscription events written per second in the delivery phase.
const DELIVERY_RATE: u64 = 50;
/// How many of them.
const DELIVERIES: usize = 500;

pub(super) fn message(i: usize, follow_up: Option<usize>) -> InboundMessage {
    let channel = match i % 3 {
        0 => Channel::Whatsapp,
        1 => Channel::Email,
        _ => Channel::Webform,
    };
    let phone = format!("+1555{:07}", i);
    let email = format!("customer{i}@bench.example");
    let (identities, conversation_id) = match channel {
        Channel::Whatsapp => {
            let from = IdentityKey::whatsapp(&format!("whatsapp:{phone}")).expect("valid number");
            let conversation = whatsapp_conversation_id(&from.value);
            (
                vec![from, IdentityKey::phone(&phone).expect("valid number")],
                Some(conversation),
            )
        }
        _ => (
            vec![IdentityKey::email(&email).expect("valid address")],
            None,
        ),
    };
    let priority = [
        Priority::Low,
        Priority::Medium,
        Priority::High,
        Priority::Urgent,
    ][i % 4];
    let category = [
        Category::General,
        Category::Technical,
        Category::Billing,
        Category::Account,
    ][i % 4];
    InboundMessage {
        channel,
        channel_message_id: match follow_up {
            None => format!("bench-{i}"),
            Some(n) => format!("bench-{i}-{n}"),
        },
        sender: Sender {
            identities,
            name: Some(format!("Customer {i}")),
        },
        conversation_id,
        thread: None,
        subject: (channel != Channel::Whatsapp).then(|| format!("Question {i} about exports")),
        body: format!(
            "Hello, this is message {} from customer {i}: how do I export my data?",
            follow_up.unwrap_or(0)
        ),
        attachments: 0,
        category,
        priority,
        received_at: Utc::now(),
        automated: None,
    }
}

pub(super) async fn run(scratch: &Scratch, args: &BenchArgs) -> anyhow::Result<Report> {
    let tickets = args.tickets;
    let seconds = args.seconds.unwrap_or(20);

    // 1. The store, through the command path.
    let started = Instant::now();
    let intake = Intake::new(EventStore::new(scratch.pool.clone()));
    let writer = intake.clone();
    super::generate("graphql", 0..tickets, args.clients, move |i| {
        let intake = writer.clone();
        async move { intake.receive(&message(i, None), "bench").await.map(|_| ()) }
    })
    .await?;
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&scratch.pool)
        .await?;
    let generation_seconds = started.elapsed().as_secs_f64();
    eprintln!("bench graphql: {tickets} tickets, {events} events in {generation_seconds:.0} s; building read models");

    // 2. Read models from the store; the relay starts after the last event.
    let started = Instant::now();
    casebook_replay::rebuild(&scratch.pool, &casebook_projections::all_projectors()).await?;
    let rebuild_seconds = started.elapsed().as_secs_f64();
    sqlx::query("VACUUM ANALYZE").execute(&scratch.pool).await?;
    // Write back what generating the store left dirty (a million events and
    // the read models: gigabytes of WAL), so that the checkpoint it would
    // otherwise trigger does not run during the measurement. Best effort:
    // a role without the right measures with it.
    if let Err(e) = sqlx::query("CHECKPOINT").execute(&scratch.pool).await {
        eprintln!(
            "bench graphql: no CHECKPOINT before measuring ({e}); a checkpoint may run during it"
        );
    }
    super::relay_after_last_event(scratch).await?;
    eprintln!("bench graphql: read models built in {rebuild_seconds:.0} s");

    // 3. Pages under concurrent readers.
    let running = app::start(&scratch.config, BACKBONE, None).await?;
    let addr = running.addr.context("the api listens")?;
    let secret = scratch.config.jwt_secret()?;
    let token = users::issue_token(
        &scratch.pool,
        &TokenKeys::new(secret),
        TokenRole::Supervisor,
        "bench",
        None,
        3600,
    )
    .await?
    .token;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let url = format!("http://{addr}/graphql");
    let since = Utc::now() - chrono::TimeDelta::hours(1);
    let filters = [
        json!({"status": "RECEIVED", "channel": "WHATSAPP"}),
        json!({"channel": "EMAIL", "priority": ["HIGH", "URGENT"]}),
        json!({"status": ["RECEIVED", "ESCALATED"], "slaBreached": false}),
        json!({"channel": "WEBFORM", "createdFrom": since}),
    ];
    // Warm up (connections, plans), then measure.
    for f in &filters {
        page(&http, &url, &token, f).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let samples = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(AtomicUsize::new(0));
    let mut readers = Vec::new();
    for r in 0..args.readers.max(1) {
        let (http, url, token, filters) =
            (http.clone(), url.clone(), token.clone(), filters.clone());
        let (samples, errors) = (samples.clone(), errors.clone());
        readers.push(tokio::spawn(async move {
            let mut n = r;
            let mut own = Vec::new();
            while Instant::now() < deadline {
                let at = Instant::now();
                match page(&http, &url, &token, &filters[n % filters.len()]).await {
                    Ok(()) => own.push(at.elapsed()),
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                n += 1;
            }
            samples.lock().await.extend(own);
        }));
    }
    for r in readers {
        r.await?;
    }
    let mut pages = std::mem::take(&mut *samples.lock().await);
    let queries = pages.len();
    let page_latency = Latency::of(&mut pages);
    let query_errors = errors.load(Ordering::Relaxed);
    eprintln!(
        "bench graphql: {queries} pages, p95 {:.1} ms",
        page_latency.p95_ms
    );

    // 4. Subscriptions: one per ticket, on the first `subscriptions`
    // WhatsApp tickets.
    let subscribed: Vec<(usize, Uuid)> = {
        let rows: Vec<(String, Uuid)> = sqlx::query_as(
            "SELECT payload->>'channel_message_id', aggregate_id::uuid FROM events
              WHERE event_type = 'CustomerMessageReceived' AND payload->>'channel' = 'whatsapp'
              ORDER BY position LIMIT $1",
        )
        .bind(args.subscriptions as i64)
        .fetch_all(&scratch.pool)
        .await?;
        rows.into_iter()
            .filter_map(|(sid, ticket)| Some((sid.strip_prefix("bench-")?.parse().ok()?, ticket)))
            .collect()
    };
    let arrivals: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
    let ws_url = format!("ws://{addr}/graphql/ws");
    let connecting = Arc::new(Semaphore::new(50));
    let ready = Arc::new(AtomicUsize::new(0));
    let opened = Arc::new(AtomicUsize::new(0));
    let mut sockets = Vec::new();
    for (_, ticket) in &subscribed {
        let permit = connecting.clone().acquire_owned().await?;
        let (ws_url, token, arrivals, ticket) =
            (ws_url.clone(), token.clone(), arrivals.clone(), *ticket);
        let (ready, opened) = (ready.clone(), opened.clone());
        sockets.push(tokio::spawn(async move {
            let ws = subscribe(&ws_url, &token, ticket).await;
            drop(permit);
            ready.fetch_add(1, Ordering::Relaxed);
            let Ok(mut ws) = ws else { return false };
            opened.fetch_add(1, Ordering::Relaxed);
            let _ = tokio::time::timeout(Duration::from_secs(seconds + 60), async {
                while let Some(Ok(message)) = ws.next().await {
                    if let WsMessage::Text(text) = message {
                        if text.contains("\"next\"") && text.contains("CustomerMessageReceived") {
                            arrivals
                                .lock()
                                .await
                                .entry(ticket)
                                .or_insert_with(Instant::now);
                            break;
                        }
                    }
                }
            })
            .await;
            true
        }));
    }
    // Every socket connected (bounded), then a moment for the server to
    // start the last subscriptions.
    let wait_until = Instant::now() + Duration::from_secs(120);
    while ready.load(Ordering::Relaxed) < subscribed.len() && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut committed: HashMap<Uuid, Instant> = HashMap::new();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / DELIVERY_RATE as f64));
    for (n, (i, ticket)) in subscribed.iter().take(DELIVERIES).enumerate() {
        ticker.tick().await;
        let outcome = intake
            .receive(&message(*i, Some(n + 1)), "bench-live")
            .await?;
        committed.insert(*ticket, Instant::now());
        debug_assert_eq!(outcome.ticket_id, *ticket);
    }
    // Wait (bounded) for the deliveries.
    let wait_until = Instant::now() + Duration::from_secs(30);
    while arrivals.lock().await.len() < committed.len() && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let arrived = arrivals.lock().await.clone();
    let mut delivery: Vec<Duration> = committed
        .iter()
        .filter_map(|(t, at)| Some(arrived.get(t)?.saturating_duration_since(*at)))
        .collect();
    let deliveries = delivery.len();
    let delivery_latency = Latency::of(&mut delivery);
    for s in sockets {
        s.abort();
    }
    running.stop(Duration::from_secs(20)).await;
    Ok(Report::Graphql {
        bench: "graphql",
        tickets,
        events,
        generation_seconds,
        rebuild_seconds,
        readers: args.readers,
        seconds,
        queries,
        errors: query_errors,
        page: page_latency,
        subscriptions: subscribed.len(),
        subscriptions_open: opened.load(Ordering::Relaxed),
        messages_written: committed.len(),
        deliveries,
        delivery: delivery_latency,
    })
}

async fn page(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    filter: &serde_json::Value,
) -> anyhow::Result<()> {
    let response = http
        .post(url)
        .bearer_auth(token)
        .json(&json!({"query": PAGE_QUERY, "variables": {"f": filter}}))
        .send()
        .await?;
    anyhow::ensure!(response.status() == 200, "status {}", response.status());
    let bytes = response.bytes().await?;
    let body: PageBody = serde_json::from_slice(&bytes)?;
    if let Some(errors) = body.errors {
        anyhow::bail!("errors: {errors}");
    }
    let edges = body.data.context("no data")?.tickets.edges;
    anyhow::ensure!(!edges.is_empty(), "an empty page");
    Ok(())
}

/// What the load generator checks of a page: no errors and some tickets.
/// Its nodes are skipped, not built into a JSON tree: the generator shares
/// the cores with the server it measures, so it should cost little.
#[derive(serde::Deserialize)]
struct PageBody {
    data: Option<PageData>,
    errors: Option<serde_json::Value>,
}

#[derive(serde::Deserialize)]
struct PageData {
    tickets: PageTickets,
}

#[derive(serde::Deserialize)]
struct PageTickets {
    edges: Vec<serde::de::IgnoredAny>,
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn subscribe(url: &str, token: &str, ticket: Uuid) -> anyhow::Result<Socket> {
    let mut request = url.into_client_request()?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "graphql-transport-ws".parse()?);
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await?;
    let init =
        json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {token}")}});
    ws.send(WsMessage::text(init.to_string())).await?;
    loop {
        match ws.next().await {
            Some(Ok(WsMessage::Text(t))) if t.contains("connection_ack") => break,
            Some(Ok(_)) => continue,
            other => anyhow::bail!("no connection_ack: {other:?}"),
        }
    }
    let start = json!({"id": "1", "type": "subscribe", "payload": {
        "query": "subscription($t: ID!) { ticketEvents(ticketId: $t) { eventType position } }",
        "variables": {"t": ticket}}});
    ws.send(WsMessage::text(start.to_string())).await?;
    Ok(ws)
}
