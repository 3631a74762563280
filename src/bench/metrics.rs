//! `casebook bench metrics`: the metrics projection and its queries on a
//! full store.
//!
//! 1. Generates about `--events` ticket events (`--events 1000000` for the
//!    issue's figure) through the command path (the ticket aggregate in
//!    units of work, `--clients` writers): tickets spread over the last 30
//!    days on WhatsApp and the web form, each with its message, search,
//!    model usage, then an answer and its delivery or an escalation, and
//!    for some feedback and a resolution.
//! 2. Builds the CRM read models, then rebuilds the metrics projection
//!    from the store and reports its throughput (events read per second).
//! 3. Serves the API and measures `dashboard` and a 30-day `metrics` query
//!    (by day) under `--readers` concurrent clients (default 32) for
//!    `--seconds` (default 20).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use casebook_api::users;
use casebook_api::{Role as TokenRole, TokenKeys};
use casebook_commands::EventStore;
use casebook_domain::ticket::{
    AiConfiguration, DeliveryStatus, EscalationReason, KnowledgeHit, ModelUsage,
};
use casebook_domain::{
    Actor, ActorKind, Category, Channel, EventMetadata, Priority, Ticket, TicketCommand,
};
use casebook_projections::analytics::MetricsProjector;
use casebook_projections::Projector;
use chrono::{TimeDelta, Utc};
use serde::Serialize;
use serde_json::json;
use tokio::sync::Mutex;
use uuid::Uuid;

use super::{BenchArgs, Latency, Report, Scratch, BACKBONE};
use crate::app;

const DASHBOARD: &str = "{ dashboard { openTickets pendingApprovals openEscalations slaAtRisk queues { agentId openTickets } lastHour { ticketsOpened firstResponseP95Ms } today { ticketsOpened escalationRate helpfulRate modelCostUsd } kpis { name value met } modelSpendYtdUsd modelBudgetAlert } }";
const MONTH: &str = "query($f: DateTime!, $t: DateTime!) { metrics(from: $f, to: $t, bucket: DAY) { start ticketsOpened messagesIn responsesSent escalations escalationRate firstResponseP50Ms firstResponseP95Ms resolutionP50Ms resolutionP95Ms slaBreaches autoResolved helpfulRate modelCalls modelTokensIn modelTokensOut modelCostUsd } }";
/// Events one generated ticket has on average (see `ticket`).
const EVENTS_PER_TICKET: f64 = 7.4;

#[derive(Debug, Serialize)]
pub(super) struct MetricsReport {
    bench: &'static str,
    tickets: usize,
    events: i64,
    generation_seconds: f64,
    /// The metrics projection rebuilt from the store.
    projection_events: u64,
    projection_seconds: f64,
    projection_events_per_second: f64,
    readers: usize,
    seconds: u64,
    dashboard_queries: usize,
    dashboard: Latency,
    month_queries: usize,
    /// `metrics` over 30 days, by day.
    month: Latency,
    errors: usize,
}

impl MetricsReport {
    pub(super) fn text(&self) -> String {
        format!(
            "metrics: {} tickets, {} events (generated in {:.0} s)\n  projection rebuilt from the store: {} events in {:.1} s = {:.0} events/s\n  {} readers for {} s, {} errors:\n    dashboard ({} queries): p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms\n    30-day metrics by day ({} queries): p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms\n",
            self.tickets,
            self.events,
            self.generation_seconds,
            self.projection_events,
            self.projection_seconds,
            self.projection_events_per_second,
            self.readers,
            self.seconds,
            self.errors,
            self.dashboard_queries,
            self.dashboard.p50_ms,
            self.dashboard.p95_ms,
            self.dashboard.p99_ms,
            self.dashboard.max_ms,
            self.month_queries,
            self.month.p50_ms,
            self.month.p95_ms,
            self.month.p99_ms,
            self.month.max_ms,
        )
    }
}

/// One generated ticket, in one unit of work: returns the events written.
async fn ticket(store: &EventStore, i: usize, tickets: usize) -> anyhow::Result<usize> {
    let now = Utc::now();
    let span = TimeDelta::days(30).num_milliseconds();
    let opened = now - TimeDelta::days(30)
        + TimeDelta::milliseconds(span * i as i64 / tickets.max(1) as i64);
    let channel = if i % 2 == 0 {
        Channel::Whatsapp
    } else {
        Channel::Webform
    };
    let ticket_id = Uuid::now_v7();
    let key = ticket_id.to_string();
    let customer_id = Uuid::now_v7();
    let message_id = Uuid::now_v7();
    let meta = EventMetadata::new(format!("bench-{i}"), Actor::new(ActorKind::Ai, "bench"))
        .on_channel(channel);
    let mut uow = store.unit_of_work(meta);
    let ms = |n: i64| opened + TimeDelta::milliseconds(n);
    let mut commands = vec![
        TicketCommand::Open {
            ticket_id,
            customer_id,
            channel,
            subject: Some(format!("Question {i}")),
            category: Category::Technical,
            priority: [Priority::Low, Priority::Medium, Priority::High][i % 3],
            previous_ticket_id: None,
            at: opened,
        },
        TicketCommand::ReceiveCustomerMessage {
            message_id,
            customer_id,
            channel,
            channel_message_id: format!("bench-{i}"),
            body: format!("How do I export my data? ({i})"),
            attachments: 0,
            thread: None,
            automated: None,
            at: opened,
        },
        TicketCommand::RecordKnowledgeSearch {
            in_reply_to: Some(message_id),
            query: "export data".into(),
            hits: vec![KnowledgeHit {
                document_id: "export".into(),
                chunk_id: "export#0".into(),
                title: "Export".into(),
                score: 0.8,
            }],
            at: ms(300),
        },
        TicketCommand::RecordModelUsage {
            in_reply_to: message_id,
            usage: vec![ModelUsage {
                provider: "openai".into(),
                model: "bench-model".into(),
                calls: 2,
                tokens_in: 2000,
                tokens_out: 100 + (i % 50) as u64,
                cost_micro_usd: 6000 + (i % 50) as u64 * 10,
            }],
            configuration: AiConfiguration {
                model: "bench-model".into(),
                prompt_version: "p-bench".into(),
                kb_version: "kb-bench".into(),
                experiment: Some(if i % 2 == 0 { "a" } else { "b" }.into()),
            },
            at: ms(1_000),
        },
    ];
    // A first response between 0.5 and 4.5 s.
    let answered_at = ms(500 + (i as i64 * 7919) % 4000);
    if i % 5 == 0 {
        commands.push(TicketCommand::Escalate {
            escalation_id: Uuid::now_v7(),
            in_reply_to: Some(message_id),
            reason: [
                EscalationReason::HumanRequested,
                EscalationReason::RefundRequest,
                EscalationReason::KnowledgeGap,
            ][i % 3],
            note: None,
            at: answered_at,
        });
    } else {
        let draft_id = Uuid::now_v7();
        let response_id = Uuid::now_v7();
        let body = "Open Settings and choose Export.".to_string();
        commands.extend([
            TicketCommand::DraftResponse {
                draft_id,
                in_reply_to: Some(message_id),
                body: body.clone(),
                confidence: 0.9,
                sources: vec!["export#0".into()],
                generated_by: "bench-model".into(),
                at: answered_at,
            },
            TicketCommand::SendResponse {
                response_id,
                draft_id: Some(draft_id),
                channel,
                body: body.clone(),
                parts: vec![body],
                in_reply_to: Some(message_id),
                automatic: None,
                holding: false,
                template: None,
                at: answered_at,
            },
            TicketCommand::RecordDeliveryStatus {
                response_id,
                status: if i % 97 == 0 {
                    DeliveryStatus::Failed
                } else {
                    DeliveryStatus::Delivered
                },
                provider_message_id: None,
                error: None,
                at: answered_at + TimeDelta::seconds(1),
            },
        ]);
        if i % 3 == 0 {
            commands.push(TicketCommand::RecordFeedback {
                helpful: i % 7 != 0,
                comment: None,
                at: opened + TimeDelta::minutes(30),
            });
        }
    }
    if i % 2 == 0 {
        commands.push(TicketCommand::Resolve {
            resolved_by: "bench".into(),
            resolution: None,
            at: opened + TimeDelta::hours(2) + TimeDelta::seconds((i % 3600) as i64),
        });
    }
    for command in commands {
        uow.execute::<Ticket>(&key, command)
            .await
            .map_err(|e| anyhow::anyhow!("ticket {i}: {e}"))?;
    }
    Ok(uow.commit().await?)
}

pub(super) async fn run(scratch: &Scratch, args: &BenchArgs) -> anyhow::Result<Report> {
    let seconds = args.seconds.unwrap_or(20);
    let tickets = ((args.events as f64 / EVENTS_PER_TICKET).ceil() as usize).max(1);

    // 1. The store, through the command path.
    let started = Instant::now();
    let store = EventStore::new(scratch.pool.clone());
    let writer = store.clone();
    super::generate("metrics", 0..tickets, args.clients.clamp(1, 64), move |i| {
        let store = writer.clone();
        async move { ticket(&store, i, tickets).await.map(|_| ()) }
    })
    .await?;
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&scratch.pool)
        .await?;
    let generation_seconds = started.elapsed().as_secs_f64();
    eprintln!("bench metrics: {tickets} tickets, {events} events in {generation_seconds:.0} s");

    // 2. The CRM read models (the dashboard's open work), then the metrics
    //    projection, timed.
    casebook_replay::rebuild(&scratch.pool, &casebook_projections::crm::projectors()).await?;
    let metrics: Vec<Arc<dyn Projector>> = vec![Arc::new(MetricsProjector)];
    let started = Instant::now();
    let reports = casebook_replay::rebuild(&scratch.pool, &metrics).await?;
    let projection_seconds = started.elapsed().as_secs_f64();
    let projection_events = reports.first().map(|r| r.events_read).unwrap_or(0);
    let projection_events_per_second = projection_events as f64 / projection_seconds.max(1e-9);
    eprintln!(
        "bench metrics: projection rebuilt, {projection_events} events in {projection_seconds:.1} s"
    );
    sqlx::query("VACUUM ANALYZE").execute(&scratch.pool).await?;
    super::relay_after_last_event(scratch).await?;

    // 3. Readers.
    let running = app::start(&scratch.config, BACKBONE, None).await?;
    let addr = running.addr.context("the api listens")?;
    let token = users::issue_token(
        &scratch.pool,
        &TokenKeys::new(scratch.config.jwt_secret()?),
        TokenRole::Analyst,
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
    let now = Utc::now();
    let month_vars = json!({"f": now - TimeDelta::days(30), "t": now});
    for _ in 0..3 {
        query(&http, &url, &token, DASHBOARD, json!({})).await?;
        query(&http, &url, &token, MONTH, month_vars.clone()).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let samples = Arc::new(Mutex::new((Vec::new(), Vec::new())));
    let errors = Arc::new(AtomicUsize::new(0));
    let mut readers = Vec::new();
    for r in 0..args.readers.max(1) {
        let (http, url, token, month_vars) =
            (http.clone(), url.clone(), token.clone(), month_vars.clone());
        let (samples, errors) = (samples.clone(), errors.clone());
        readers.push(tokio::spawn(async move {
            let (mut dash, mut month) = (Vec::new(), Vec::new());
            let mut n = r;
            while Instant::now() < deadline {
                let at = Instant::now();
                let dashboard = n % 2 == 0;
                let result = if dashboard {
                    query(&http, &url, &token, DASHBOARD, json!({})).await
                } else {
                    query(&http, &url, &token, MONTH, month_vars.clone()).await
                };
                match result {
                    Ok(()) if dashboard => dash.push(at.elapsed()),
                    Ok(()) => month.push(at.elapsed()),
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                n += 1;
            }
            let mut s = samples.lock().await;
            s.0.extend(dash);
            s.1.extend(month);
        }));
    }
    for r in readers {
        r.await?;
    }
    let (mut dash, mut month) = std::mem::take(&mut *samples.lock().await);
    running.stop(Duration::from_secs(20)).await;
    Ok(Report::Metrics(Box::new(MetricsReport {
        bench: "metrics",
        tickets,
        events,
        generation_seconds,
        projection_events,
        projection_seconds,
        projection_events_per_second,
        readers: args.readers,
        seconds,
        dashboard_queries: dash.len(),
        dashboard: Latency::of(&mut dash),
        month_queries: month.len(),
        month: Latency::of(&mut month),
        errors: errors.load(Ordering::Relaxed),
    })))
}

async fn query(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    query: &str,
    variables: serde_json::Value,
) -> anyhow::Result<()> {
    let response = http
        .post(url)
        .bearer_auth(token)
        .json(&json!({"query": query, "variables": variables}))
        .send()
        .await?;
    anyhow::ensure!(response.status() == 200, "status {}", response.status());
    let body: serde_json::Value = response.json().await?;
    anyhow::ensure!(body.get("errors").is_none(), "errors: {}", body["errors"]);
    Ok(())
}
