//! `casebook bench intake|pipeline|append [--json]`: measurements on the
//! machine at hand, each against a scratch database (and topic prefix)
//! created for the run and dropped after it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use casebook_commands::EventStore;
use casebook_domain::knowledge::{EvalQuestion, Judged, RetrievalScores};
use casebook_domain::{Actor, EventMetadata};
use chrono::{DateTime, Utc};
use clap::{Args, ValueEnum};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::Semaphore;
use uuid::Uuid;

mod audit;
mod graphql;
mod metrics;
mod replay;

use crate::app::{self, Role};
use crate::config::Config;
use crate::db;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchName {
    /// Web form submissions per second and latency at N concurrent clients.
    Intake,
    /// Submission to row in the tickets read model at a fixed rate.
    Pipeline,
    /// Events/s through the event store (stream loads, the writer's chain
    /// hashes, multi-row appends) against plain multi-row INSERTs.
    Append,
    /// `audit verify` (chains, Merkle tree, signed checkpoint) over a log
    /// of `--events` generated events.
    Verify,
    /// The agent's own processing time per message (no model latency).
    Agent,
    /// Knowledge base search latency (hybrid, and vectors alone with
    /// recall@10) on a generated corpus of text and vectors.
    Kb,
    /// The staff API on a full store: a filtered page of 50 tickets with
    /// customers under concurrent readers, and subscription delivery.
    Graphql,
    /// Right answers on the evaluation set kb/eval over kb/demo: retrieval
    /// hit@1, hit@3, MRR, the knowledge-gap decision, and end to end
    /// through the agent with the built-in responder.
    Answers,
    /// Rebuilding every read model from a full store (`--replay-events`,
    /// default 1,000,000, generated through the command path).
    Replay,
    /// The metrics projection's throughput rebuilding from a full store
    /// (`--events`), and `dashboard` and 30-day `metrics` latency under
    /// `--readers` concurrent clients.
    Metrics,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    pub name: BenchName,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// How long to drive load (intake: 20, pipeline: 60).
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Concurrent clients (intake), or writers generating tickets (graphql, metrics).
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Submissions per second (pipeline).
    #[arg(long, default_value_t = 500)]
    pub rate: u64,
    /// Concurrent writers (append).
    #[arg(long, default_value_t = 32)]
    pub writers: usize,
    /// Events to append in all (append, verify), or to generate (metrics).
    #[arg(long, default_value_t = 64_000)]
    pub events: usize,
    /// Events per commit (append).
    #[arg(long, default_value_t = 5)]
    pub per_commit: usize,
    /// Rounds of the event store then the baseline, each on rows of its
    /// own (append): the medians are compared, so that a checkpoint or a
    /// neighbour's load in one phase does not decide the ratio.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub rounds: u32,
    /// Messages to handle (agent) or queries to run (kb).
    #[arg(long, default_value_t = 300)]
    pub messages: usize,
    /// HNSW candidates per search (kb).
    #[arg(long, default_value_t = casebook_agent::knowledge::EF_SEARCH)]
    pub ef_search: u32,
    /// Chunks in the generated corpus (kb).
    #[arg(long, default_value_t = 100_000)]
    pub chunks: usize,
    /// Tickets to generate through the command path (graphql).
    #[arg(long, default_value_t = 200_000)]
    pub tickets: usize,
    /// Concurrent GraphQL readers (graphql).
    #[arg(long, default_value_t = 32)]
    pub readers: usize,
    /// Open subscriptions, one per ticket (graphql).
    #[arg(long, default_value_t = 1_000)]
    pub subscriptions: usize,
    /// Commits per stream before a writer starts a new one (append); streams
    /// are loaded before every commit, so this sets how much is read.
    #[arg(long, default_value_t = 10)]
    pub commits_per_stream: usize,
    /// Events to generate before rebuilding every read model (replay).
    #[arg(long, default_value_t = 1_000_000)]
    pub replay_events: usize,
    /// Generated tickets to resolve, then archive a year and a day later
    /// (replay).
    #[arg(long, default_value_t = 100_000)]
    pub archive_tickets: usize,
    /// Tuning aid (answers): first print retrieval on the tuning split over
    /// a grid of ranking weights.
    #[arg(long)]
    pub grid: bool,
    /// Tuning aid (answers): the tuning split only, retrieval and end to
    /// end; the report split is not run (it is for reporting, not tuning).
    #[arg(long)]
    pub tune_only: bool,
    /// Tuning aid (answers): how the questions' typos are corrected (the
    /// knowledge base's default: words-and-embedding).
    #[arg(long, value_enum, default_value_t = SpellingArg::WordsAndEmbedding)]
    pub spelling: SpellingArg,
}

/// `casebook_agent::knowledge::SpellingCorrection`, as `--spelling` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SpellingArg {
    /// The questions as written.
    Off,
    /// Corrected words searched for; the question embedded as written.
    Words,
    /// The corrected question searched for and embedded.
    WordsAndEmbedding,
}

pub async fn run(config: &Config, args: BenchArgs) -> anyhow::Result<()> {
    let scratch = Scratch::create(config).await?;
    let result = match args.name {
        BenchName::Intake => intake(&scratch, &args).await,
        BenchName::Pipeline => pipeline(&scratch, &args).await,
        BenchName::Append => append(&scratch, &args).await,
        BenchName::Verify => audit::verify(&scratch, &args).await,
        BenchName::Agent => agent(&scratch, &args).await,
        BenchName::Kb => kb(&scratch, &args).await,
        BenchName::Graphql => graphql::run(&scratch, &args).await,
        BenchName::Answers => answers(&scratch, &args).await,
        BenchName::Replay => replay::run(&scratch, &args).await,
        BenchName::Metrics => metrics::run(&scratch, &args).await,
    };
    scratch.drop_all().await;
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    Ok(())
}

/// A database and topic prefix of the run's own.
struct Scratch {
    config: Config,
    admin_url: String,
    name: String,
    pool: PgPool,
}

fn with_database(url: &str, name: &str) -> anyhow::Result<String> {
    let mut u = url::Url::parse(url).context("DATABASE_URL is not a URL")?;
    u.set_path(&format!("/{name}"));
    Ok(u.to_string())
}

impl Scratch {
    async fn create(config: &Config) -> anyhow::Result<Self> {
        let id = Uuid::new_v4().simple().to_string();
        let name = format!("casebook_bench_{}", &id[..12]);
        let admin_url = with_database(&config.database_url, "postgres")?;
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .context("DATABASE_URL: the bench needs a role that may create databases")?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await?;
        admin.close().await?;
        let mut config = config.clone();
        config.database_url = with_database(&config.database_url, &name)?;
        config.topic_prefix = format!("bench{}", &id[..8]);
        config.http_addr = "127.0.0.1:0".parse()?;
        config.ops_addr = "127.0.0.1:0".parse()?;
        // All load comes from one address: the per-client limit would
        // measure itself. (Each submission names its own address, so the
        // per-address limit stays on and is part of what is measured.)
        config.rate_limit_per_client = 0;
        if config.jwt_secret().is_err() {
            config = config.with_jwt_secret(Uuid::new_v4().simple().to_string().repeat(2));
        }
        let pool = db::connect(&config.database_url, 40, db::Purpose::Maintenance).await?;
        db::migrate(&pool).await?;
        Ok(Self {
            config,
            admin_url,
            name,
            pool,
        })
    }

    async fn drop_all(self) {
        self.pool.close().await;
        let kafka = app::kafka_settings(&self.config);
        let _ = tokio::time::timeout(
            Duration::from_secs(10),
            casebook_commands::kafka::delete_topics(&kafka, &kafka.topics.all()),
        )
        .await;
        if let Ok(mut admin) = PgConnection::connect(&self.admin_url).await {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&mut admin)
            .await;
        }
    }
}

#[derive(Debug, Clone, Serialize)]
struct Latency {
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl Latency {
    fn of(samples: &mut [Duration]) -> Self {
        samples.sort_unstable();
        let at = |q: f64| -> f64 {
            if samples.is_empty() {
                return 0.0;
            }
            let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[i].as_secs_f64() * 1000.0
        };
        Self {
            p50_ms: at(0.50),
            p95_ms: at(0.95),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        }
    }
}

/// One round of `bench append`: each side's rate over the same rows.
#[derive(Debug, Clone, Serialize)]
pub struct AppendRound {
    event_store_per_second: f64,
    baseline_per_second: f64,
    ratio: f64,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Report {
    Verify(Box<audit::VerifyReport>),
    Intake {
        bench: &'static str,
        clients: usize,
        seconds: f64,
        accepted: usize,
        errors: usize,
        per_second: f64,
        latency: Latency,
        /// Durable single-row INSERT transactions at the same concurrency,
        /// measured in the same run.
        baseline_per_second: f64,
        ratio: f64,
    },
    Pipeline {
        bench: &'static str,
        rate: u64,
        seconds: u64,
        submitted: usize,
        projected: usize,
        errors: usize,
        latency: Latency,
        windows: Vec<Window>,
    },
    Agent {
        bench: &'static str,
        messages: usize,
        answered: usize,
        awaiting_approval: usize,
        escalated: usize,
        processing: Latency,
        knowledge_search: Latency,
    },
    Kb {
        bench: &'static str,
        chunks: usize,
        queries: usize,
        ef_search: u32,
        search: Latency,
        exact_search: Latency,
        recall_at_10: f64,
        recall_at_10_topical: f64,
        recall_at_10_between_topics: f64,
        query_embedding: Latency,
        index_build_seconds: f64,
        /// `search_hybrid` (full text and vectors, ranked) with the
        /// question's text and vector, every query.
        hybrid_search: Latency,
        /// Questions phrased from their topic's words.
        hybrid_search_topical: Latency,
        /// Questions in common words, matching tens of thousands of sections.
        hybrid_search_common_words: Latency,
        /// Share of the topical questions whose best passage is of their topic.
        hybrid_top_in_topic: f64,
    },
    Graphql {
        bench: &'static str,
        tickets: usize,
        events: i64,
        generation_seconds: f64,
        rebuild_seconds: f64,
        readers: usize,
        seconds: u64,
        queries: usize,
        errors: usize,
        /// A filtered page of 50 tickets with their customers.
        page: Latency,
        subscriptions: usize,
        subscriptions_open: usize,
        messages_written: usize,
        deliveries: usize,
        /// From the command's commit to the subscriber.
        delivery: Latency,
    },
    Append {
        bench: &'static str,
        writers: usize,
        /// Events each side appends per round.
        events: usize,
        per_commit: usize,
        /// Medians over the rounds.
        event_store_per_second: f64,
        baseline_per_second: f64,
        /// Of the medians.
        ratio: f64,
        rounds: Vec<AppendRound>,
    },
    Answers(Box<AnswersReport>),
    Replay(replay::ReplayReport),
    Metrics(Box<metrics::MetricsReport>),
}

#[derive(Debug, Serialize)]
struct Window {
    from_second: u64,
    submissions: usize,
    p50_ms: f64,
    p99_ms: f64,
}

impl Report {
    fn text(&self) -> String {
        match self {
            Report::Intake {
                clients,
                seconds,
                accepted,
                errors,
                per_second,
                latency,
                baseline_per_second,
                ratio,
                ..
            } => format!(
                "intake: {clients} clients for {seconds:.1} s\n  accepted {accepted}, errors {errors}\n  {per_second:.0} submissions/s\n  latency p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms\n  baseline (durable single-row INSERT transactions, {clients} at once): {baseline_per_second:.0}/s\n  ratio {ratio:.2}\n",
                latency.p50_ms, latency.p95_ms, latency.p99_ms, latency.max_ms
            ),
            Report::Graphql {
                tickets,
                events,
                generation_seconds,
                rebuild_seconds,
                readers,
                seconds,
                queries,
                errors,
                page,
                subscriptions,
                subscriptions_open,
                messages_written,
                deliveries,
                delivery,
                ..
            } => format!(
                "graphql: {tickets} tickets, {events} events (generated through intake in {generation_seconds:.0} s, read models rebuilt in {rebuild_seconds:.0} s)\n  filtered page of 50 with customers, {readers} readers for {seconds} s: {queries} pages, {errors} errors\n    p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms\n  {subscriptions} subscriptions ({subscriptions_open} open), {messages_written} messages written, {deliveries} delivered\n    commit to subscriber: p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms\n",
                page.p50_ms, page.p95_ms, page.p99_ms, page.max_ms,
                delivery.p50_ms, delivery.p95_ms, delivery.p99_ms, delivery.max_ms
            ),
            Report::Pipeline {
                rate,
                seconds,
                submitted,
                projected,
                errors,
                latency,
                windows,
                ..
            } => {
                let mut out = format!(
                    "pipeline: {rate}/s for {seconds} s\n  submitted {submitted}, projected {projected}, errors {errors}\n  submission to crm_tickets row: p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms\n  per 10 s window (p50 / p99 ms):\n",
                    latency.p50_ms, latency.p95_ms, latency.p99_ms, latency.max_ms
                );
                for w in windows {
                    out.push_str(&format!(
                        "    {:>3}-{:<3} s  {:>5} submissions  {:>7.1} / {:>7.1}\n",
                        w.from_second,
                        w.from_second + 10,
                        w.submissions,
                        w.p50_ms,
                        w.p99_ms
                    ));
                }
                out
            }
            Report::Agent {
                messages,
                answered,
                awaiting_approval,
                escalated,
                processing,
                knowledge_search,
                ..
            } => format!(
                "agent: {messages} messages (local responder, no model latency)\n  answered {answered}, awaiting approval {awaiting_approval}, escalated {escalated}\n  processing per message: p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms\n  of which knowledge base search: p50 {:.1} ms, p95 {:.1} ms\n",
                processing.p50_ms, processing.p95_ms, processing.p99_ms, knowledge_search.p50_ms, knowledge_search.p95_ms
            ),
            Report::Kb {
                chunks,
                queries,
                ef_search,
                search,
                exact_search,
                recall_at_10,
                recall_at_10_topical,
                recall_at_10_between_topics,
                query_embedding,
                index_build_seconds,
                hybrid_search,
                hybrid_search_topical,
                hybrid_search_common_words,
                hybrid_top_in_topic,
                ..
            } => format!(
                "kb: {chunks} chunks (384 dimensions), {queries} queries, HNSW m=16 ef_construction=64 ef_search={ef_search}\n  index built in {index_build_seconds:.1} s\n  hybrid search (full text and vectors, ranked; the agent's search without embedding): p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms\n    questions in a topic's words: p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms; best passage of that topic {hybrid_top_in_topic:.3}\n    questions in common words: p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms\n  vector search alone: p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms\n  recall@10 against exact search: {recall_at_10:.3} (queries near a topic {recall_at_10_topical:.3}, between topics {recall_at_10_between_topics:.3})\n  exact search: p50 {:.1} ms\n  embedding a query (all-MiniLM-L6-v2, in-process): p50 {:.1} ms, p95 {:.1} ms\n",
                hybrid_search.p50_ms, hybrid_search.p95_ms, hybrid_search.p99_ms,
                hybrid_search_topical.p50_ms, hybrid_search_topical.p95_ms, hybrid_search_topical.p99_ms,
                hybrid_search_common_words.p50_ms, hybrid_search_common_words.p95_ms, hybrid_search_common_words.p99_ms,
                search.p50_ms, search.p95_ms, search.p99_ms, exact_search.p50_ms, query_embedding.p50_ms, query_embedding.p95_ms
            ),
            Report::Append {
                writers,
                events,
                per_commit,
                event_store_per_second,
                baseline_per_second,
                ratio,
                rounds,
                ..
            } => {
                let each: Vec<String> = rounds
                    .iter()
                    .map(|r| {
                        format!(
                            "{:.0} / {:.0} ({:.2})",
                            r.event_store_per_second, r.baseline_per_second, r.ratio
                        )
                    })
                    .collect();
                format!(
                    "append: {events} events a round, {writers} writers, {per_commit} events per commit, {} rounds (median)\n  event store (load, append, chain): {event_store_per_second:.0} events/s\n  plain multi-row INSERT:            {baseline_per_second:.0} events/s\n  ratio {ratio:.2}\n  rounds (event store / INSERT): {}\n",
                    rounds.len(),
                    each.join(", ")
                )
            }
            Report::Answers(a) => a.text(),
            Report::Replay(r) => r.text(),
            Report::Metrics(m) => m.text(),
            Report::Verify(v) => v.text(),
        }
    }
}

/// Intake and pipeline measure the event backbone (API, relay, projectors);
/// the agent's own cost is `bench agent`.
const BACKBONE: &[Role] = &[Role::Api, Role::Relay, Role::Projector];

fn bench_form(i: usize) -> serde_json::Value {
    // A mix of new and returning customers, as in real traffic.
    serde_json::json!({
        "name": format!("Bench Customer {i}"),
        "email": format!("bench{i}@example.com"),
        "subject": "Export to CSV fails",
        "message": "Hello, when I export my workspace to CSV the download never finishes. It worked last week. Could you help?",
        "category": "technical",
    })
}

async fn intake(scratch: &Scratch, args: &BenchArgs) -> anyhow::Result<Report> {
    let seconds = args.seconds.unwrap_or(20);
    let running = app::start(&scratch.config, BACKBONE, None).await?;
    let url = format!(
        "http://{}/support/tickets",
        running.addr.expect("api listens")
    );
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.clients)
        .timeout(Duration::from_secs(30))
        .build()?;
    // Warm up connections and caches.
    for i in 0..args.clients {
        let _ = http.post(&url).json(&bench_form(i)).send().await;
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut tasks = Vec::with_capacity(args.clients);
    for c in 0..args.clients {
        let http = http.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0;
            let mut i = c;
            while Instant::now() < deadline {
                let t = Instant::now();
                match http.post(&url).json(&bench_form(i)).send().await {
                    Ok(r) if r.status() == 202 => latencies.push(t.elapsed()),
                    _ => errors += 1,
                }
                i += 64;
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        latencies.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    running.stop(Duration::from_secs(20)).await;
    let accepted = latencies.len();
    let per_second = accepted as f64 / elapsed;
    let baseline_per_second = insert_baseline(scratch, args.clients, seconds).await?;
    Ok(Report::Intake {
        bench: "intake",
        clients: args.clients,
        seconds: elapsed,
        accepted,
        errors,
        per_second,
        latency: Latency::of(&mut latencies),
        baseline_per_second,
        ratio: per_second / baseline_per_second,
    })
}

/// What the machine's Postgres does at the same concurrency without
/// Casebook: durable single-row INSERT transactions of a submission's size,
/// so intake's rate reads as a ratio that holds across machines.
async fn insert_baseline(scratch: &Scratch, clients: usize, seconds: u64) -> anyhow::Result<f64> {
    sqlx::query(
        "CREATE TABLE bench_intake_baseline (id uuid PRIMARY KEY, payload jsonb NOT NULL,
            at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(&scratch.pool)
    .await?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut tasks = Vec::with_capacity(clients);
    for c in 0..clients {
        let pool = scratch.pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0usize;
            let mut i = c;
            while Instant::now() < deadline {
                sqlx::query("INSERT INTO bench_intake_baseline (id, payload) VALUES ($1, $2)")
                    .bind(uuid::Uuid::now_v7())
                    .bind(bench_form(i))
                    .execute(&pool)
                    .await?;
                done += 1;
                i += 64;
            }
            anyhow::Ok(done)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

async fn pipeline(scratch: &Scratch, args: &BenchArgs) -> anyhow::Result<Report> {
    let seconds = args.seconds.unwrap_or(60);
    let running = app::start(&scratch.config, BACKBONE, None).await?;
    let url = format!(
        "http://{}/support/tickets",
        running.addr.expect("api listens")
    );
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    // Let the projectors join their groups before the clock starts.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let in_flight = Arc::new(Semaphore::new(512));
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let total = (args.rate * seconds) as usize;
    let started = Utc::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        ticker.tick().await;
        let permit = in_flight.clone().acquire_owned().await?;
        let http = http.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let submitted_at = Utc::now();
            let response = http.post(&url).json(&bench_form(i)).send().await.ok()?;
            if response.status() != 202 {
                return None;
            }
            let body: serde_json::Value = response.json().await.ok()?;
            let id: Uuid = body["ticket_id"].as_str()?.parse().ok()?;
            Some((id, submitted_at))
        }));
    }
    let mut submitted: HashMap<Uuid, DateTime<Utc>> = HashMap::with_capacity(total);
    let mut errors = 0;
    for t in tasks {
        match t.await? {
            Some((id, at)) => {
                submitted.insert(id, at);
            }
            None => errors += 1,
        }
    }
    // Wait for the read model to catch up (bounded).
    let ids: Vec<Uuid> = submitted.keys().copied().collect();
    let wait_until = Instant::now() + Duration::from_secs(60);
    let mut projected: Vec<(Uuid, DateTime<Utc>)>;
    loop {
        projected = sqlx::query_as(
            "SELECT ticket_id, projected_at FROM crm_tickets WHERE ticket_id = ANY($1)",
        )
        .bind(&ids)
        .fetch_all(&scratch.pool)
        .await?;
        if projected.len() >= ids.len() || Instant::now() > wait_until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    running.stop(Duration::from_secs(20)).await;
    let mut all = Vec::with_capacity(projected.len());
    let mut windows: Vec<Vec<Duration>> = (0..seconds.div_ceil(10)).map(|_| Vec::new()).collect();
    for (id, at) in &projected {
        let sent = submitted[id];
        let latency = (*at - sent).to_std().unwrap_or_default();
        all.push(latency);
        let window = ((sent - started).num_seconds().max(0) as u64 / 10) as usize;
        let last = windows.len() - 1;
        windows[window.min(last)].push(latency);
    }
    let windows = windows
        .into_iter()
        .enumerate()
        .map(|(i, mut w)| {
            let l = Latency::of(&mut w);
            Window {
                from_second: i as u64 * 10,
                submissions: w.len(),
                p50_ms: l.p50_ms,
                p99_ms: l.p99_ms,
            }
        })
        .collect();
    Ok(Report::Pipeline {
        bench: "pipeline",
        rate: args.rate,
        seconds,
        submitted: submitted.len(),
        projected: projected.len(),
        errors,
        latency: Latency::of(&mut all),
        windows,
    })
}

/// A minimal aggregate for the append benchmark: each command appends a
/// given number of events of a realistic size.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct BenchStream {
    appended: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppendBench {
    pub count: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum BenchEvent {
    Appended {
        n: usize,
        body: String,
        at: DateTime<Utc>,
    },
}

impl DomainEvent for BenchEvent {
    fn event_type(&self) -> String {
        "Appended".into()
    }

    fn event_version(&self) -> String {
        "1".into()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("never")]
pub struct Never;

impl BenchStream {
    fn decide(&self, command: AppendBench) -> Result<Vec<BenchEvent>, Never> {
        Ok((0..command.count)
            .map(|i| BenchEvent::Appended {
                n: self.appended + i,
                body: "Hello, when I export my workspace to CSV the download never finishes. It worked last week; \
                       since then every attempt stops at 99%. Could you have a look? Thanks, Ada"
                    .into(),
                at: Utc::now(),
            })
            .collect())
    }

    fn apply_event(&mut self, _event: BenchEvent) {
        self.appended += 1;
    }
}

casebook_domain::impl_aggregate!(BenchStream, "bench_stream", AppendBench, BenchEvent, Never);

/// The event store's side of `bench append` (and `bench verify`'s log):
/// `writers` tasks each append `commits_per_writer` commits of `per_commit`
/// events through the command path, on streams of `per_stream` commits
/// whose ids begin with `prefix`.
async fn append_streams(
    store: &EventStore,
    meta: &EventMetadata,
    prefix: &str,
    writers: usize,
    commits_per_writer: usize,
    per_commit: usize,
    per_stream: usize,
) -> anyhow::Result<()> {
    let per_stream = per_stream.max(1);
    let mut tasks = Vec::with_capacity(writers);
    for w in 0..writers {
        let (store, meta, prefix) = (store.clone(), meta.clone(), prefix.to_string());
        tasks.push(tokio::spawn(async move {
            for c in 0..commits_per_writer {
                let id = format!("{prefix}w{w}-s{}", c / per_stream);
                store
                    .execute::<BenchStream>(&id, AppendBench { count: per_commit }, &meta)
                    .await
                    .map_err(|e| anyhow::anyhow!("append failed: {e}"))?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn append(scratch: &Scratch, args: &BenchArgs) -> anyhow::Result<Report> {
    let writers = args.writers.max(1);
    let per_commit = args.per_commit.max(1);
    let commits_per_writer = args.events / per_commit / writers;
    let events = commits_per_writer * per_commit * writers;
    anyhow::ensure!(events > 0, "--events must allow a commit per writer");
    let meta = EventMetadata::new("bench", Actor::system("bench"));

    // As `serve` would: CASEBOOK_AGGREGATE_CACHE=0 measures without the
    // cache, CASEBOOK_APPEND_GROUP=1 without group commit.
    let store =
        EventStore::with_aggregate_cache(scratch.pool.clone(), scratch.config.aggregate_cache)
            .with_append_group(scratch.config.append_group);
    // The baseline: the same columns and key, no chain, no other index.
    sqlx::query(
        "CREATE TABLE bench_baseline (aggregate_type text NOT NULL, aggregate_id text NOT NULL,
            sequence bigint NOT NULL, event_type text NOT NULL, event_version text NOT NULL,
            payload jsonb NOT NULL, metadata jsonb NOT NULL, PRIMARY KEY (aggregate_type, aggregate_id, sequence))",
    )
    .execute(&scratch.pool)
    .await?;
    let mut rounds = Vec::new();
    for round in 0..args.rounds {
        let prefix = format!("r{round}-");
        let started = Instant::now();
        append_streams(
            &store,
            &meta,
            &prefix,
            writers,
            commits_per_writer,
            per_commit,
            args.commits_per_stream,
        )
        .await?;
        let es = events as f64 / started.elapsed().as_secs_f64();
        let base =
            events as f64 / insert_again(scratch, &prefix, events, writers, per_commit).await?;
        rounds.push(AppendRound {
            event_store_per_second: es,
            baseline_per_second: base,
            ratio: es / base,
        });
    }
    let es = median(rounds.iter().map(|r| r.event_store_per_second));
    let base = median(rounds.iter().map(|r| r.baseline_per_second));
    Ok(Report::Append {
        bench: "append",
        writers,
        events,
        per_commit,
        event_store_per_second: es,
        baseline_per_second: base,
        ratio: es / base,
        rounds,
    })
}

/// Inserts the `events` rows the event store appended under `prefix` again
/// into the baseline table, by plain multi-row INSERT, one statement per
/// commit of `per_commit` rows, from `writers` tasks; the seconds it took.
async fn insert_again(
    scratch: &Scratch,
    prefix: &str,
    events: usize,
    writers: usize,
    per_commit: usize,
) -> anyhow::Result<f64> {
    type Row = (
        String,
        String,
        i64,
        String,
        String,
        serde_json::Value,
        serde_json::Value,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata
           FROM events WHERE starts_with(aggregate_id, $1) ORDER BY aggregate_id, sequence",
    )
    .bind(prefix)
    .fetch_all(&scratch.pool)
    .await?;
    anyhow::ensure!(
        rows.len() == events,
        "the event store holds {} events of this round, not {events}",
        rows.len()
    );
    let mut per_writer: Vec<Vec<Vec<Row>>> = (0..writers).map(|_| Vec::new()).collect();
    for (i, commit) in rows.chunks(per_commit).enumerate() {
        per_writer[i % writers].push(commit.to_vec());
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for commits in per_writer {
        let pool = scratch.pool.clone();
        tasks.push(tokio::spawn(async move {
            for commit in commits {
                let mut q = sqlx::QueryBuilder::new(
                    "INSERT INTO bench_baseline (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) ",
                );
                q.push_values(commit, |mut b, r| {
                    b.push_bind(r.0).push_bind(r.1).push_bind(r.2).push_bind(r.3).push_bind(r.4).push_bind(r.5).push_bind(r.6);
                });
                q.build().execute(&pool).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// The middle value (the mean of the two middle ones for an even count).
fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

const QUESTIONS: &[&str] = &[
    "How do I export my project data to CSV?",
    "I forgot my password, how can I reset it?",
    "How do I set up two-factor authentication?",
    "Can I use Tasklane offline on my phone?",
    "How do I invite my team and what roles are there?",
    "How do recurring tasks work?",
    "What is the API rate limit for personal access tokens?",
    "How do I connect Slack to my workspace?",
    "Where can I download my invoices?",
    "How long are deleted projects kept in the trash?",
    "How do I import tasks from a CSV file?",
    "Can I sync my tasks with Google Calendar?",
    "How do I mute notifications for a project?",
    "What is the maximum size of a file attachment?",
    "How do I set up single sign-on with SAML?",
    "Which browsers are supported?",
    "How do I create an automation rule?",
    "I need to talk to a human about my account",
    "Do you have keyboard shortcuts?",
    "What does error 42 export timed out mean?",
];

async fn agent(scratch: &Scratch, args: &BenchArgs) -> anyhow::Result<Report> {
    use casebook_agent::knowledge::KnowledgeBase;
    use casebook_agent::{Agent, Outcome};
    use casebook_commands::{InboundMessage, Intake, Sender};
    use casebook_domain::identity::IdentityKey;
    use casebook_domain::{Category, Channel, Priority};

    let kb = KnowledgeBase::new(scratch.pool.clone(), app::embedder(&scratch.config)?);
    let demo = std::path::Path::new("kb/demo");
    anyhow::ensure!(
        demo.is_dir(),
        "run from the repository root: kb/demo is the corpus"
    );
    kb.ingest_path(demo).await?;
    let store = EventStore::new(scratch.pool.clone());
    let intake = Intake::new(store.clone());
    // No remote model: what is measured is the agent's own work.
    let agent = Agent::new(store, kb.clone(), Vec::new(), "The Support Team");
    let (mut answered, mut approval, mut escalated) = (0, 0, 0);
    let mut processing = Vec::with_capacity(args.messages);
    let mut searching = Vec::new();
    for i in 0..args.messages {
        // Each text is new, so no query embedding comes from the cache.
        let text = format!("{} (ref {i})", QUESTIONS[i % QUESTIONS.len()]);
        let message = InboundMessage {
            channel: Channel::Whatsapp,
            channel_message_id: format!("SMbench{i}"),
            sender: Sender {
                identities: vec![IdentityKey::whatsapp(&format!(
                    "whatsapp:+4477009{:05}",
                    i % 500
                ))?],
                name: Some("Bench".into()),
            },
            conversation_id: None,
            thread: None,
            subject: None,
            body: text.clone(),
            attachments: 0,
            category: Category::General,
            priority: Priority::Medium,
            received_at: Utc::now(),
            automated: None,
        };
        let outcome = intake.receive(&message, "bench").await?;
        let row = sqlx::query(&format!(
            "SELECT {} FROM events WHERE aggregate_id = $1 AND event_type = 'CustomerMessageReceived'",
            casebook_projections::store::EVENT_COLUMNS
        ))
        .bind(outcome.ticket_id.to_string())
        .fetch_one(&scratch.pool)
        .await?;
        let envelope: casebook_domain::EventEnvelope =
            casebook_projections::store::stored_event(&row)?.into();
        let started = Instant::now();
        let result = agent.handle(&envelope).await?;
        processing.push(started.elapsed());
        match result {
            Outcome::Sent { .. } => answered += 1,
            Outcome::AwaitingApproval { .. } => approval += 1,
            Outcome::Escalated(_) | Outcome::Withheld(_) => escalated += 1,
            Outcome::Skipped | Outcome::QueuedForHuman { .. } => {}
        }
        let started = Instant::now();
        kb.search(
            &format!("{text} again"),
            5,
            casebook_agent::knowledge::RELEVANCE_THRESHOLD,
        )
        .await?;
        searching.push(started.elapsed());
    }
    Ok(Report::Agent {
        bench: "agent",
        messages: args.messages,
        answered,
        awaiting_approval: approval,
        escalated,
        processing: Latency::of(&mut processing),
        knowledge_search: Latency::of(&mut searching),
    })
}

/// A corpus shaped like real embeddings: chunks cluster around topics.
fn clustered_vectors(n: usize, topics: usize, seed: u64) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let unit = |v: Vec<f32>| {
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / norm).collect::<Vec<f32>>()
    };
    let mut gaussian = move |rng: &mut rand::rngs::StdRng| -> f32 {
        // Box-Muller.
        let (u1, u2): (f32, f32) = (rng.random_range(1e-7..1.0), rng.random());
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    };
    let dims = casebook_agent::embeddings::DIMENSIONS;
    let centroids: Vec<Vec<f32>> = (0..topics)
        .map(|_| unit((0..dims).map(|_| gaussian(&mut rng)).collect()))
        .collect();
    let near = |c: &Vec<f32>,
                spread: f32,
                rng: &mut rand::rngs::StdRng,
                g: &mut dyn FnMut(&mut rand::rngs::StdRng) -> f32| {
        unit(
            c.iter()
                .map(|x| x + spread * g(rng) / (dims as f32).sqrt())
                .collect(),
        )
    };
    let chunks = (0..n)
        .map(|i| near(&centroids[i % topics], 0.8, &mut rng, &mut gaussian))
        .collect();
    // Half the queries near a topic, half anywhere on the sphere (between
    // topics, the hard case for a graph index).
    let queries = (0..1000)
        .map(|i| {
            if i % 2 == 0 {
                near(
                    &centroids[(i * 7919) % topics],
                    0.8,
                    &mut rng,
                    &mut gaussian,
                )
            } else {
                unit((0..dims).map(|_| gaussian(&mut rng)).collect())
            }
        })
        .collect();
    (chunks, queries)
}

/// Words that many sections of any knowledge base share, with the share of
/// the generated sections holding each: "project" is in half of them, the
/// worst case for a full-text ranking that scores every matching row.
const KB_COMMON_WORDS: &[(&str, f64)] = &[
    ("project", 0.5),
    ("task", 0.4),
    ("workspace", 0.3),
    ("account", 0.25),
    ("settings", 0.2),
    ("team", 0.15),
    ("open", 0.1),
    ("change", 0.08),
    ("member", 0.05),
    ("email", 0.03),
];
/// Words of each topic's own vocabulary (two from kb/demo, the rest
/// generated).
const KB_TOPIC_WORDS: usize = 6;
/// Sections per generated article.
const KB_SECTIONS_PER_ARTICLE: usize = 5;

/// The text of the generated corpus, coherent with its vectors: every topic
/// cluster has its own vocabulary (words of kb/demo and generated ones),
/// each section's title, heading and text use its topic's words, some
/// common words (`KB_COMMON_WORDS`) and other words of kb/demo; queries near
/// a topic are phrased from its words, queries between topics from common
/// words only (matching tens of thousands of sections).
struct KbCorpusText {
    topic_words: Vec<Vec<String>>,
    filler: Vec<String>,
}

/// One generated section.
struct KbSection {
    document_id: String,
    ordinal: i32,
    title: String,
    section: String,
    body: String,
}

impl KbCorpusText {
    fn new(demo: &std::path::Path, topics: usize, seed: u64) -> anyhow::Result<Self> {
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        let mut words = std::collections::BTreeSet::new();
        for entry in std::fs::read_dir(demo)
            .with_context(|| format!("{}: run from the repository root", demo.display()))?
        {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("md") {
                continue;
            }
            let text =
                std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
            for w in text.split(|c: char| !c.is_ascii_alphabetic()) {
                if w.len() >= 4 {
                    words.insert(w.to_ascii_lowercase());
                }
            }
        }
        for (common, _) in KB_COMMON_WORDS {
            words.remove(*common);
        }
        let mut demo_words: Vec<String> = words.into_iter().collect();
        anyhow::ensure!(
            demo_words.len() >= 100,
            "{}: too few words for the corpus",
            demo.display()
        );
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        demo_words.shuffle(&mut rng);
        // Generated words: three consonant-vowel syllables, distinct by
        // construction (the number of the word in base 75).
        const CONSONANTS: &[u8] = b"bdfgklmnprstvzh";
        const VOWELS: &[u8] = b"aeiou";
        let generated = |n: usize| -> String {
            let mut n = n;
            let mut w = String::new();
            for _ in 0..3 {
                let s = n % 75;
                n /= 75;
                w.push(CONSONANTS[s / 5] as char);
                w.push(VOWELS[s % 5] as char);
            }
            // A closing consonant keeps the stemmer from trimming a vowel
            // two words share.
            w.push('x');
            w
        };
        let mut numbers: Vec<usize> = (0..75usize.pow(3)).collect();
        numbers.shuffle(&mut rng);
        let topic_words = (0..topics)
            .map(|t| {
                let mut own = vec![
                    demo_words[(2 * t) % demo_words.len()].clone(),
                    demo_words[(2 * t + 1) % demo_words.len()].clone(),
                ];
                own.extend(
                    (0..KB_TOPIC_WORDS - 2).map(|j| generated(numbers[t * KB_TOPIC_WORDS + j])),
                );
                own
            })
            .collect();
        Ok(Self {
            topic_words,
            filler: demo_words,
        })
    }

    /// Section `i` of the corpus (topic `i % topics`, as its vector).
    fn section(&self, i: usize, rng: &mut rand::rngs::StdRng) -> KbSection {
        use rand::seq::SliceRandom;
        use rand::Rng;
        let topics = self.topic_words.len();
        let topic = i % topics;
        let own = &self.topic_words[topic];
        let nth = i / topics;
        let article = nth / KB_SECTIONS_PER_ARTICLE;
        let capital = |w: &str| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        };
        let title = format!(
            "{} {} {}",
            capital(&own[(article + 2) % KB_TOPIC_WORDS]),
            own[(article + 3) % KB_TOPIC_WORDS],
            self.filler[(topic * 31 + article) % self.filler.len()]
        );
        let section = format!(
            "{title} › {} {}",
            capital(&own[rng.random_range(0..KB_TOPIC_WORDS)]),
            self.filler[rng.random_range(0..self.filler.len())]
        );
        let mut body: Vec<&str> = Vec::with_capacity(64);
        for (word, share) in KB_COMMON_WORDS {
            if rng.random_bool(*share) {
                body.push(word);
            }
        }
        for _ in 0..18 {
            body.push(&own[rng.random_range(0..KB_TOPIC_WORDS)]);
        }
        while body.len() < 60 {
            body.push(&self.filler[rng.random_range(0..self.filler.len())]);
        }
        body.shuffle(rng);
        let mut text = String::with_capacity(body.len() * 8);
        for (k, w) in body.iter().enumerate() {
            if k > 0 {
                text.push_str(if k % 12 == 0 { ". " } else { " " });
            }
            text.push_str(w);
        }
        text.push('.');
        KbSection {
            document_id: format!("t{topic}-a{article}"),
            ordinal: (nth % KB_SECTIONS_PER_ARTICLE) as i32,
            title,
            section,
            body: text,
        }
    }

    /// A question about `topic`: two of its words and a common one.
    fn topical_query(&self, topic: usize, rng: &mut rand::rngs::StdRng) -> String {
        use rand::Rng;
        let own = &self.topic_words[topic];
        let a = rng.random_range(0..KB_TOPIC_WORDS);
        let b = (a + rng.random_range(1..KB_TOPIC_WORDS)) % KB_TOPIC_WORDS;
        let common = KB_COMMON_WORDS[rng.random_range(0..KB_COMMON_WORDS.len())].0;
        format!("How do I {} the {} in my {common}?", own[a], own[b])
    }

    /// A vague question in common words only (every generated section
    /// holds one of them, half hold "project"), sometimes with one word of
    /// kb/demo (held by a couple of thousand sections).
    fn common_query(&self, k: usize, rng: &mut rand::rngs::StdRng) -> String {
        use rand::Rng;
        let pick = |rng: &mut rand::rngs::StdRng| {
            KB_COMMON_WORDS[rng.random_range(0..KB_COMMON_WORDS.len())].0
        };
        let (a, b, c) = (pick(rng), pick(rng), pick(rng));
        if k % 2 == 0 {
            format!("How do I change the {a} {b} for my {c}?")
        } else {
            let w = &self.filler[rng.random_range(0..self.filler.len())];
            format!("Where is the {w} of my {a} {b}?")
        }
    }
}

/// Passages per hybrid search: as many as the agent asks for.
const HYBRID_PASSAGES: usize = 5;

async fn kb(scratch: &Scratch, args: &BenchArgs) -> anyhow::Result<Report> {
    use casebook_agent::knowledge::KnowledgeBase;
    use pgvector::Vector;
    use rand::SeedableRng;

    let topics = args.chunks / 100 + 1;
    let (chunks, queries) = clustered_vectors(args.chunks, topics, 42);
    let text = KbCorpusText::new(std::path::Path::new("kb/demo"), topics, 43)?;
    let pool = &scratch.pool;
    let kb = KnowledgeBase::new(pool.clone(), app::embedder(&scratch.config)?)
        .with_ef_search(args.ef_search);
    let model = kb.embedder().model_name().to_string();
    // Both indexes are built once the rows are in (faster than row by row).
    for index in ["kb_chunks_embedding_idx", "kb_chunks_search_text_idx"] {
        sqlx::query(&format!("DROP INDEX {index}"))
            .execute(pool)
            .await?;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(44);
    let sections: Vec<KbSection> = (0..chunks.len())
        .map(|i| text.section(i, &mut rng))
        .collect();
    let mut articles: Vec<(&str, &str)> = sections
        .iter()
        .map(|s| (s.document_id.as_str(), s.title.as_str()))
        .collect();
    articles.sort_unstable();
    articles.dedup_by(|a, b| a.0 == b.0);
    for batch in articles.chunks(1000) {
        let mut q = sqlx::QueryBuilder::new(
            "INSERT INTO kb_documents (document_id, title, source, content_hash, body, model) ",
        );
        q.push_values(batch, |mut row, (id, title)| {
            row.push_bind(*id)
                .push_bind(*title)
                .push_bind("bench")
                .push_bind("-")
                .push_bind("-")
                .push_bind(&model);
        });
        q.build().execute(pool).await?;
    }
    for (b, batch) in chunks.chunks(500).enumerate() {
        let mut q = sqlx::QueryBuilder::new(
            "INSERT INTO kb_chunks (chunk_id, document_id, ordinal, title, section, body, embedding, heading_embedding, model) ",
        );
        // The heading's vector is the text's here: what a search pays for
        // reading it is what is measured, not what it adds to the ranking
        // (`casebook bench answers` measures that).
        q.push_values(batch.iter().enumerate(), |mut row, (i, v)| {
            let n = b * 500 + i;
            let s = &sections[n];
            row.push_bind(format!("{}#{}", s.document_id, s.ordinal))
                .push_bind(&s.document_id)
                .push_bind(s.ordinal)
                .push_bind(&s.title)
                .push_bind(&s.section)
                .push_bind(&s.body)
                .push_bind(Vector::from(v.clone()))
                .push_bind(Vector::from(v.clone()))
                .push_bind(&model);
        });
        q.build().execute(pool).await?;
    }
    let started = Instant::now();
    sqlx::query(
        "CREATE INDEX kb_chunks_embedding_idx ON kb_chunks USING hnsw (embedding vector_cosine_ops)
         WITH (m = 16, ef_construction = 64)",
    )
    .execute(pool)
    .await?;
    let index_build_seconds = started.elapsed().as_secs_f64();
    sqlx::query("CREATE INDEX kb_chunks_search_text_idx ON kb_chunks USING gin (search_text)")
        .execute(pool)
        .await?;
    sqlx::query("ANALYZE kb_chunks").execute(pool).await?;

    let n = args.messages.min(queries.len());
    let mut latencies = Vec::with_capacity(n);
    let mut exact_latencies = Vec::with_capacity(n);
    let mut recall = [0.0f64; 2];
    for (qi, q) in queries.iter().take(n).enumerate() {
        let started = Instant::now();
        let found = kb.search_vector(q, 10, -1.0).await?;
        latencies.push(started.elapsed());
        let started = Instant::now();
        let mut tx = pool.begin().await?;
        sqlx::query("SET LOCAL enable_indexscan = off")
            .execute(&mut *tx)
            .await?;
        let exact: Vec<(String,)> =
            sqlx::query_as("SELECT chunk_id FROM kb_chunks ORDER BY embedding <=> $1 LIMIT 10")
                .bind(Vector::from(q.clone()))
                .fetch_all(&mut *tx)
                .await?;
        tx.commit().await?;
        exact_latencies.push(started.elapsed());
        let truth: std::collections::HashSet<String> = exact.into_iter().map(|r| r.0).collect();
        let hits = found.iter().filter(|p| truth.contains(&p.chunk_id)).count();
        recall[qi % 2] += hits as f64 / truth.len().max(1) as f64;
    }
    // The hybrid search the agent runs (`search_hybrid`: full text and
    // vectors, ranked), with the question's text and its vector: queries
    // near a topic phrased from its words, the others in common words.
    let mut rng = rand::rngs::StdRng::seed_from_u64(45);
    let mut hybrid = Vec::with_capacity(n);
    let mut hybrid_topical = Vec::with_capacity(n);
    let mut hybrid_common = Vec::with_capacity(n);
    let mut top_in_topic = 0usize;
    for (qi, q) in queries.iter().take(n).enumerate() {
        let topic = (qi * 7919) % topics;
        let question = if qi % 2 == 0 {
            text.topical_query(topic, &mut rng)
        } else {
            text.common_query(qi / 2, &mut rng)
        };
        let started = Instant::now();
        let found = kb
            .search_hybrid(&question, q, HYBRID_PASSAGES, -1.0)
            .await?;
        let took = started.elapsed();
        hybrid.push(took);
        if qi % 2 == 0 {
            hybrid_topical.push(took);
            let prefix = format!("t{topic}-");
            if found
                .first()
                .is_some_and(|p| p.document_id.starts_with(&prefix))
            {
                top_in_topic += 1;
            }
        } else {
            hybrid_common.push(took);
        }
    }
    let mut embedding = Vec::new();
    for i in 0..100 {
        let text = format!("{} {i}", QUESTIONS[i % QUESTIONS.len()]);
        let started = Instant::now();
        kb.embedder().embed_query(&text).await?;
        embedding.push(started.elapsed());
    }
    Ok(Report::Kb {
        bench: "kb",
        chunks: chunks.len(),
        queries: n,
        ef_search: args.ef_search,
        search: Latency::of(&mut latencies),
        exact_search: Latency::of(&mut exact_latencies),
        recall_at_10: (recall[0] + recall[1]) / n as f64,
        recall_at_10_topical: recall[0] / n.div_ceil(2) as f64,
        recall_at_10_between_topics: recall[1] / (n / 2).max(1) as f64,
        query_embedding: Latency::of(&mut embedding),
        index_build_seconds,
        hybrid_search: Latency::of(&mut hybrid),
        hybrid_search_topical: Latency::of(&mut hybrid_topical),
        hybrid_search_common_words: Latency::of(&mut hybrid_common),
        hybrid_top_in_topic: top_in_topic as f64 / n.div_ceil(2).max(1) as f64,
    })
}

/// The evaluation set in the repository, read from the working directory
/// (the repository root).
pub fn load_eval(path: &std::path::Path) -> anyhow::Result<Vec<EvalQuestion>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: run from the repository root", path.display()))?;
    casebook_domain::knowledge::parse_eval(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Passages per search when judging retrieval: as many as the agent gets.
const JUDGED_PASSAGES: usize = 5;

/// What retrieval returns for each question, as the agent's first search.
pub async fn judge_retrieval(
    kb: &casebook_agent::knowledge::KnowledgeBase,
    questions: &[EvalQuestion],
) -> anyhow::Result<Vec<Judged>> {
    let mut out = Vec::with_capacity(questions.len());
    for q in questions {
        let passages = kb.search(&q.question, JUDGED_PASSAGES, -1.0).await?;
        out.push(Judged {
            expected: q.expected.clone(),
            ranked_documents: passages.iter().map(|p| p.document_id.clone()).collect(),
            top_similarity: passages.iter().map(|p| p.score).fold(-1.0, f64::max),
        });
    }
    Ok(out)
}

/// Questions answered through the real agent, with no remote model (the
/// built-in responder answers).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct EndToEnd {
    pub answerable: usize,
    /// Replies sent to the customer from the expected article.
    pub right_article: usize,
    /// Drafts held for a human's approval.
    pub held_for_approval: usize,
    /// Replies asking which of two articles is meant.
    pub clarified: usize,
    pub unanswerable: usize,
    /// Unanswerable questions escalated as knowledge gaps.
    pub gaps_escalated: usize,
    /// Unanswerable questions escalated for any reason (a pricing question
    /// goes to a person as such before the knowledge base is asked).
    pub unanswerable_escalated: usize,
    pub right_article_rate: f64,
    pub held_for_approval_share: f64,
    pub gap_escalation_rate: f64,
    pub unanswerable_escalation_rate: f64,
}

/// Runs each question through intake and the agent (WhatsApp, a customer
/// of its own each: numbers from `numbers_from`, so that two sets do not
/// share customers) and checks what the agent drafted: a reply from the
/// expected article ends with that article's title (`crate::responder`).
pub async fn answer_through_agent(
    pool: &PgPool,
    kb: &casebook_agent::knowledge::KnowledgeBase,
    questions: &[EvalQuestion],
    numbers_from: usize,
) -> anyhow::Result<EndToEnd> {
    use casebook_agent::{Agent, Outcome};
    use casebook_commands::{InboundMessage, Intake, Sender};
    use casebook_domain::identity::IdentityKey;
    use casebook_domain::ticket::EscalationReason;
    use casebook_domain::{Category, Channel, Priority};

    let titles: HashMap<String, String> =
        sqlx::query_as::<_, (String, String)>("SELECT document_id, title FROM kb_documents")
            .fetch_all(pool)
            .await?
            .into_iter()
            .collect();
    let store = EventStore::new(pool.clone());
    let intake = Intake::new(store.clone());
    let agent = Agent::new(store, kb.clone(), Vec::new(), "The Support Team");
    let mut e = EndToEnd::default();
    for (i, q) in questions.iter().enumerate() {
        let message = InboundMessage {
            channel: Channel::Whatsapp,
            channel_message_id: format!("SMeval{i}-{}", Uuid::new_v4().simple()),
            sender: Sender {
                identities: vec![IdentityKey::whatsapp(&format!(
                    "whatsapp:+4477008{:05}",
                    (numbers_from + i) % 100_000
                ))?],
                name: Some("Eval".into()),
            },
            conversation_id: None,
            thread: None,
            subject: None,
            body: q.question.clone(),
            attachments: 0,
            category: Category::General,
            priority: Priority::Medium,
            received_at: Utc::now(),
            automated: None,
        };
        let outcome = intake.receive(&message, "eval").await?;
        let row = sqlx::query(&format!(
            "SELECT {} FROM events WHERE aggregate_id = $1 AND event_type = 'CustomerMessageReceived' ORDER BY sequence DESC LIMIT 1",
            casebook_projections::store::EVENT_COLUMNS
        ))
        .bind(outcome.ticket_id.to_string())
        .fetch_one(pool)
        .await?;
        let envelope: casebook_domain::EventEnvelope =
            casebook_projections::store::stored_event(&row)?.into();
        let result = agent.handle(&envelope).await?;
        let drafted: Option<String> = sqlx::query_scalar(
            "SELECT payload->>'body' FROM events WHERE aggregate_id = $1 AND event_type = 'ResponseDrafted' ORDER BY sequence DESC LIMIT 1",
        )
        .bind(outcome.ticket_id.to_string())
        .fetch_optional(pool)
        .await?
        .flatten();
        match &q.expected {
            Some(expected) => {
                e.answerable += 1;
                let from_expected = match (titles.get(expected), &drafted) {
                    (Some(title), Some(body)) => body.ends_with(&format!("More in \"{title}\".")),
                    _ => false,
                };
                if drafted
                    .as_deref()
                    .is_some_and(|b| b.starts_with("Which do you mean:"))
                {
                    e.clarified += 1;
                }
                match result {
                    Outcome::Sent { .. } if from_expected => e.right_article += 1,
                    Outcome::AwaitingApproval { .. } => e.held_for_approval += 1,
                    _ => {}
                }
            }
            None => {
                e.unanswerable += 1;
                if matches!(result, Outcome::Escalated(EscalationReason::KnowledgeGap)) {
                    e.gaps_escalated += 1;
                }
                if matches!(result, Outcome::Escalated(_)) {
                    e.unanswerable_escalated += 1;
                }
            }
        }
    }
    let rate = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    e.right_article_rate = rate(e.right_article, e.answerable);
    e.held_for_approval_share = rate(e.held_for_approval, e.answerable);
    e.gap_escalation_rate = rate(e.gaps_escalated, e.unanswerable);
    e.unanswerable_escalation_rate = rate(e.unanswerable_escalated, e.unanswerable);
    Ok(e)
}

#[derive(Debug, Serialize)]
pub struct AnswersReport {
    bench: &'static str,
    /// The knowledge-gap line calibrated on the tuning split, and the one
    /// the agent uses (`knowledge::RELEVANCE_THRESHOLD`).
    calibrated_threshold: f64,
    threshold_in_use: f64,
    tune: RetrievalScores,
    /// The baseline, in the same run: the tuning split ranked by the
    /// sections' text vectors alone (`RankingParams::heading_weight` 0),
    /// at the line calibrated for that ranking.
    tune_text_vector_only: BaselineScores,
    /// None with `--tune-only`.
    report: Option<RetrievalScores>,
    end_to_end: Option<EndToEnd>,
    /// The same on the tuning split (what to tune the agent's side on).
    tune_end_to_end: EndToEnd,
    search: Latency,
    /// Report-split questions retrieval got wrong at the threshold in use.
    misses: Option<Vec<Miss>>,
    /// The same for the tuning split: what to study when tuning (the
    /// report split's misses are for reporting, not for tuning).
    tune_misses: Vec<Miss>,
}

#[derive(Debug, Serialize)]
struct BaselineScores {
    calibrated_threshold: f64,
    scores: RetrievalScores,
}

#[derive(Debug, Serialize)]
struct Miss {
    question: String,
    expected: Option<String>,
    found: Option<String>,
    top_similarity: f64,
    /// The articles of the ranked passages, best first, each once.
    ranked: Vec<String>,
}

impl AnswersReport {
    fn text(&self) -> String {
        let line = |name: &str, s: &RetrievalScores| {
            format!(
                "  {name:<7} {} questions ({} unanswerable): hit@1 {:.3}  hit@3 {:.3}  MRR {:.3}  gap precision {:.3}  gap recall {:.3}\n",
                s.questions, s.unanswerable, s.hit_at_1, s.hit_at_3, s.mrr, s.gap_precision, s.gap_recall
            )
        };
        let mut out = format!(
            "answers: threshold calibrated on tune {:.3}, in use {:.3}\n{}",
            self.calibrated_threshold,
            self.threshold_in_use,
            line("tune", &self.tune),
        );
        out.push_str(&format!(
            "  baseline, the sections' text vectors alone (tune, its line {:.3}):
{}",
            self.tune_text_vector_only.calibrated_threshold,
            line("tune", &self.tune_text_vector_only.scores),
        ));
        if let Some(report) = &self.report {
            out.push_str(&line("report", report));
        }
        if let Some(e) = &self.end_to_end {
            out.push_str(&format!(
                "  end to end (report split, built-in responder): right article {:.3} ({}/{}), held for approval {:.3}, asked which topic {}, gaps escalated {:.3} ({}/{}), for any reason {:.3}\n",
                e.right_article_rate,
                e.right_article,
                e.answerable,
                e.held_for_approval_share,
                e.clarified,
                e.gap_escalation_rate,
                e.gaps_escalated,
                e.unanswerable,
                e.unanswerable_escalation_rate,
            ));
        }
        let t = &self.tune_end_to_end;
        out.push_str(&format!(
            "  end to end (tune split): right article {:.3} ({}/{}), held for approval {:.3}, gaps escalated {:.3} ({}/{}), for any reason {:.3}\n  search p50 {:.1} ms, p95 {:.1} ms\n",
            t.right_article_rate,
            t.right_article,
            t.answerable,
            t.held_for_approval_share,
            t.gap_escalation_rate,
            t.gaps_escalated,
            t.unanswerable,
            t.unanswerable_escalation_rate,
            self.search.p50_ms,
            self.search.p95_ms,
        ));
        out
    }
}

async fn answers(scratch: &Scratch, args: &BenchArgs) -> anyhow::Result<Report> {
    use casebook_agent::knowledge::{KnowledgeBase, SpellingCorrection, RELEVANCE_THRESHOLD};
    use casebook_domain::knowledge::{calibrate_threshold, retrieval_scores, EvalSplit};
    use casebook_domain::retrieval::{strip_pleasantries, RankingParams};

    let (grid_search, tune_only, spelling) = (args.grid, args.tune_only, args.spelling);

    let questions = load_eval(std::path::Path::new("kb/eval/questions.tsv"))?;
    let kb = KnowledgeBase::new(scratch.pool.clone(), app::embedder(&scratch.config)?);
    let kb = kb.with_spelling_correction(match spelling {
        SpellingArg::Off => SpellingCorrection::Off,
        SpellingArg::Words => SpellingCorrection::Words,
        SpellingArg::WordsAndEmbedding => SpellingCorrection::WordsAndEmbedding,
    });
    kb.ingest_path(std::path::Path::new("kb/demo")).await?;
    let split = |s: EvalSplit| -> Vec<EvalQuestion> {
        questions.iter().filter(|q| q.split == s).cloned().collect()
    };
    let (tune, report) = (split(EvalSplit::Tune), split(EvalSplit::Report));
    if grid_search {
        grid(&kb, &tune).await?;
    }
    if tune_only {
        // What was corrected, to study (tuning split only).
        for q in &tune {
            let typos = kb.typos(&strip_pleasantries(&q.question)).await?;
            if !typos.is_empty() {
                eprintln!("bench answers: corrected {typos:?} in {:?}", q.question);
            }
        }
    }
    // Search latency is measured on the report split, or on the tuning
    // split when only that runs: each question once, so that the embedding
    // cache does not hide the model's time.
    let timed = |questions: Vec<EvalQuestion>| {
        let kb = kb.clone();
        async move {
            let mut latencies = Vec::with_capacity(questions.len());
            let mut judged = Vec::with_capacity(questions.len());
            for q in &questions {
                let started = Instant::now();
                judged.extend(judge_retrieval(&kb, std::slice::from_ref(q)).await?);
                latencies.push(started.elapsed());
            }
            anyhow::Ok((judged, latencies))
        }
    };
    let (tune_judged, mut latencies) = if tune_only {
        timed(tune.clone()).await?
    } else {
        (judge_retrieval(&kb, &tune).await?, Vec::new())
    };
    let threshold = calibrate_threshold(&tune_judged);
    let tune_text_vector_only = {
        let text_only = kb.clone().with_ranking(RankingParams {
            heading_weight: 0.0,
            ..RankingParams::default()
        });
        let judged = judge_retrieval(&text_only, &tune).await?;
        let line = calibrate_threshold(&judged);
        BaselineScores {
            calibrated_threshold: (line * 1000.0).round() / 1000.0,
            scores: retrieval_scores(&judged, line),
        }
    };
    if tune_only {
        // How near the line the unanswerable questions come (tuning split
        // only: the answerable ones under it are among the misses).
        for (q, j) in tune.iter().zip(&tune_judged) {
            if q.expected.is_none() {
                eprintln!(
                    "bench answers: gap at {:.3} ({}): {:?}",
                    j.top_similarity,
                    j.ranked_documents.first().map_or("-", String::as_str),
                    q.question
                );
            }
        }
    }
    let (report_scores, end_to_end, misses) = if tune_only {
        (None, None, None)
    } else {
        let (report_judged, report_latencies) = timed(report.clone()).await?;
        latencies = report_latencies;
        let end_to_end = answer_through_agent(&scratch.pool, &kb, &report, 0).await?;
        (
            Some(retrieval_scores(&report_judged, RELEVANCE_THRESHOLD)),
            Some(end_to_end),
            Some(misses_of(&report, &report_judged)),
        )
    };
    let tune_end_to_end = answer_through_agent(&scratch.pool, &kb, &tune, 50_000).await?;
    let tune_misses = misses_of(&tune, &tune_judged);
    Ok(Report::Answers(Box::new(AnswersReport {
        bench: "answers",
        calibrated_threshold: (threshold * 1000.0).round() / 1000.0,
        threshold_in_use: RELEVANCE_THRESHOLD,
        tune: retrieval_scores(&tune_judged, RELEVANCE_THRESHOLD),
        tune_text_vector_only,
        report: report_scores,
        end_to_end,
        tune_end_to_end,
        search: Latency::of(&mut latencies),
        misses,
        tune_misses,
    })))
}

/// Tuning aid (`casebook bench answers --grid`): the
/// ranking's weights over a grid, judged on the tuning split only (each
/// with the threshold calibrated for it), printed to stderr.
async fn grid(
    kb: &casebook_agent::knowledge::KnowledgeBase,
    tune: &[EvalQuestion],
) -> anyhow::Result<()> {
    use casebook_domain::knowledge::{calibrate_threshold, retrieval_scores};
    use casebook_domain::retrieval::RankingParams;
    let mut found = Vec::with_capacity(tune.len());
    for q in tune {
        found.push(kb.find(&q.question, JUDGED_PASSAGES).await?);
    }
    for lexical_weight in [0.1, 0.2, 0.3, 0.4] {
        for body_weight in [0.3, 0.5, 0.7, 1.0] {
            for (article_support, specificity) in [0.0, 0.3, 0.6, 1.0, 1.5]
                .into_iter()
                .flat_map(|a| [0.0, 0.25, 0.5, 0.75, 1.0].map(|s| (a, s)))
            {
                let params = RankingParams {
                    lexical_weight,
                    body_weight,
                    article_support,
                    specificity,
                    ..RankingParams::default()
                };
                let judged: Vec<Judged> = tune
                    .iter()
                    .zip(&found)
                    .map(|(q, c)| {
                        let passages = c.ranked(&params, JUDGED_PASSAGES, -1.0);
                        Judged {
                            expected: q.expected.clone(),
                            ranked_documents: passages
                                .iter()
                                .map(|p| p.document_id.clone())
                                .collect(),
                            top_similarity: passages.iter().map(|p| p.score).fold(-1.0, f64::max),
                        }
                    })
                    .collect();
                let t = calibrate_threshold(&judged);
                let s = retrieval_scores(&judged, t);
                eprintln!(
                    "grid {:.3} lexical_weight={lexical_weight} body_weight={body_weight} article_support={article_support} specificity={specificity}: threshold {t:.3} hit@1 {:.3} hit@3 {:.3} gap precision {:.3} gap recall {:.3}",
                    s.hit_at_1.min(s.gap_recall), s.hit_at_1, s.hit_at_3, s.gap_precision, s.gap_recall
                );
            }
        }
    }
    Ok(())
}

/// The questions retrieval got wrong at the threshold in use: the wrong
/// article first, or a gap called wrongly either way.
fn misses_of(questions: &[EvalQuestion], judged: &[Judged]) -> Vec<Miss> {
    use casebook_agent::knowledge::RELEVANCE_THRESHOLD;
    questions
        .iter()
        .zip(judged)
        .filter_map(|(q, j)| {
            let found = Some(j.ranked_documents.first().cloned())
                .flatten()
                .filter(|_| j.top_similarity >= RELEVANCE_THRESHOLD);
            (found != q.expected).then(|| Miss {
                question: q.question.clone(),
                expected: q.expected.clone(),
                found,
                top_similarity: (j.top_similarity * 1000.0).round() / 1000.0,
                ranked: j.ranked_documents.iter().fold(Vec::new(), |mut seen, d| {
                    if !seen.contains(d) {
                        seen.push(d.clone());
                    }
                    seen
                }),
            })
        })
        .collect()
}

/// Starts the relay's checkpoint after the last stored event: the read
/// models were rebuilt from the store, so the live pipeline carries on from
/// there instead of publishing the whole generated log.
async fn relay_after_last_event(scratch: &Scratch) -> anyhow::Result<()> {
    let kafka = app::kafka_settings(&scratch.config);
    sqlx::query(
        "INSERT INTO relay_checkpoints (relay, last_transaction_id, last_position)
         SELECT $1, max(transaction_id), max(position) FROM events
         ON CONFLICT (relay) DO UPDATE SET last_transaction_id = EXCLUDED.last_transaction_id,
                                           last_position = EXCLUDED.last_position",
    )
    .bind(format!("relay:{}", kafka.topics.prefix()))
    .execute(&scratch.pool)
    .await?;
    Ok(())
}

/// Runs `make(i)` for every `i` in `range`, from `clients` tasks at once,
/// printing progress as `bench <what>: N tickets generated`; fails naming
/// how many could not be made (the first three errors are printed).
async fn generate<F, Fut, E>(
    what: &'static str,
    range: std::ops::Range<usize>,
    clients: usize,
    make: F,
) -> anyhow::Result<()>
where
    F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), E>> + Send,
    E: std::fmt::Display,
{
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = std::sync::Arc::new(AtomicUsize::new(range.start));
    let failed = std::sync::Arc::new(AtomicUsize::new(0));
    let step = (range.len() / 10).max(1);
    let mut writers = Vec::new();
    for _ in 0..clients.clamp(1, 256) {
        let (make, next, failed, range) =
            (make.clone(), next.clone(), failed.clone(), range.clone());
        writers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= range.end {
                    break;
                }
                if let Err(e) = make(i).await {
                    if failed.fetch_add(1, Ordering::Relaxed) < 3 {
                        eprintln!("bench {what}: generating failed: {e}");
                    }
                }
                if i > range.start && (i - range.start) % step == 0 {
                    eprintln!("bench {what}: {} tickets generated", i - range.start);
                }
            }
        }));
    }
    for w in writers {
        w.await?;
    }
    let failed = failed.load(Ordering::Relaxed);
    anyhow::ensure!(failed == 0, "{failed} tickets could not be generated");
    Ok(())
}
