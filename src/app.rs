//! Wires the crates into the running service, one role or all.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use casebook_agent::embeddings::{Embedder, EmbeddingSource};
use casebook_agent::knowledge::KnowledgeBase;
use casebook_agent::llm::{Provider, ProviderKind, ProviderSettings};
use casebook_agent::{Agent, AgentHandler};
use casebook_api::graphql::knowledge::LazyKnowledge;
use casebook_api::graphql::subscriptions::LiveHub;
use casebook_api::{ApiSettings, AppState, Inner, OpsState, Readiness, Sessions, TokenKeys};
use casebook_commands::claims::LinkKeys;
use casebook_commands::delivery::{
    AcknowledgementSettings, Delivery, DeliveryHandler, GmailSendSettings, TwilioSettings,
};
use casebook_commands::gmail::{GmailClient, GmailSync};
use casebook_commands::kafka::KafkaSettings;
use casebook_commands::limits::Limit;
use casebook_commands::relay::{Relay, RelaySettings};
use casebook_commands::sla;
use casebook_commands::staff::Staff;
use casebook_commands::worker::{self, RetryPolicy, WorkerSettings};
use casebook_commands::{EventStore, Intake};
use casebook_domain::retry::Backoff;
use casebook_domain::topics::Topics;
use casebook_domain::Channel;
use casebook_projections::{ConsumerSettings, ProjectorRunner};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, EmbeddingsConfig};
use crate::db;

/// What `casebook serve --role` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Every role in one process.
    All,
    /// HTTP: intake, status, probes, metrics.
    Api,
    /// Publishes the event store to Kafka.
    Relay,
    /// Builds the read models.
    Projector,
    /// Answers customers (and watches SLAs).
    Agent,
    /// Sends replies through Gmail and Twilio.
    Delivery,
}

impl Role {
    fn expand(roles: &[Role]) -> Vec<Role> {
        if roles.is_empty() || roles.contains(&Role::All) {
            return vec![
                Role::Api,
                Role::Relay,
                Role::Projector,
                Role::Agent,
                Role::Delivery,
            ];
        }
        let mut out = roles.to_vec();
        out.dedup();
        out
    }
}

pub fn kafka_settings(config: &Config) -> KafkaSettings {
    KafkaSettings {
        brokers: config.kafka_brokers.clone(),
        topics: Topics::new(config.topic_prefix.clone()),
        partitions: config.kafka_partitions,
        replication: 1,
    }
}

pub fn embedder(config: &Config) -> anyhow::Result<Embedder> {
    let source = embedding_source(config)?;
    Embedder::new(&source).context("CASEBOOK_EMBEDDINGS: the embedding model could not be loaded")
}

/// Where embeddings come from, as configured.
pub fn embedding_source(config: &Config) -> anyhow::Result<EmbeddingSource> {
    Ok(match &config.embeddings {
        EmbeddingsConfig::Local(dir) => EmbeddingSource::Local(dir.clone()),
        EmbeddingsConfig::OpenAi { model } => {
            let llm = config
                .llm
                .as_ref()
                .context("CASEBOOK_EMBEDDINGS=openai needs LLM_BASE_URL")?;
            EmbeddingSource::OpenAi {
                base_url: llm.base_url.clone(),
                api_key: llm.api_key.clone(),
                model: model.clone(),
            }
        }
    })
}

/// The remote models, in the order they are tried.
pub fn providers(config: &Config) -> anyhow::Result<Vec<Provider>> {
    let mut providers = Vec::new();
    for (kind, llm, name, price) in [
        (
            ProviderKind::OpenAi,
            &config.llm,
            "LLM_BASE_URL",
            config.llm_price,
        ),
        (
            ProviderKind::Anthropic,
            &config.llm_fallback,
            "LLM_FALLBACK_BASE_URL",
            config.llm_fallback_price,
        ),
    ] {
        if let Some(llm) = llm {
            let settings = ProviderSettings {
                base_url: llm.base_url.clone(),
                api_key: llm.api_key.clone(),
                model: llm.model.clone(),
            };
            providers.push(
                Provider::new(kind, settings)
                    .with_context(|| format!("{name}: client"))?
                    .with_price(price),
            );
        }
    }
    Ok(providers)
}

fn delivery(config: &Config, store: EventStore) -> anyhow::Result<Delivery> {
    let twilio = match (
        &config.twilio_account_sid,
        &config.twilio_auth_token,
        &config.twilio_whatsapp_from,
    ) {
        (Some(sid), Some(token), Some(from)) => Some(TwilioSettings {
            api_base: config.twilio_api_base.clone(),
            account_sid: sid.clone(),
            auth_token: token.clone(),
            from: from.clone(),
            status_callback: Some(format!("{}/webhooks/whatsapp/status", config.public_url)),
        }),
        _ => {
            tracing::warn!("TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN or TWILIO_WHATSAPP_FROM unset: WhatsApp replies cannot be delivered");
            None
        }
    };
    let gmail = match &config.gmail_support_address {
        Some(from) => Some(GmailSendSettings {
            api_base: config.gmail_api_base.clone(),
            access_token: config.gmail_access_token.clone(),
            from: from.clone(),
        }),
        None => {
            tracing::warn!(
                "GMAIL_SUPPORT_ADDRESS unset: email and web form replies cannot be delivered"
            );
            None
        }
    };
    let links = match config.jwt_secret() {
        Ok(secret) => Some((LinkKeys::new(secret), config.public_url.clone())),
        Err(_) => {
            tracing::warn!("CASEBOOK_JWT_SECRET unset: web form acknowledgements cannot carry links and are not sent");
            None
        }
    };
    Ok(Delivery::new(store, twilio, gmail)
        .with_timeout(Duration::from_secs(config.provider_timeout_secs))
        .with_acknowledgements(AcknowledgementSettings {
            links,
            recipient_limit: Limit::per_hour(config.auto_emails_per_recipient_per_hour),
        }))
}

/// A Kafka worker's settings, with the configured retry bounds.
pub fn worker_settings(
    config: &Config,
    kafka: &KafkaSettings,
    group: String,
    topics: Vec<String>,
) -> WorkerSettings {
    WorkerSettings {
        retry: RetryPolicy {
            max_attempts: config.worker_max_attempts,
            max_retry: Duration::from_secs(config.worker_max_retry_secs),
            ..RetryPolicy::default()
        },
        ..WorkerSettings::new(kafka, group, topics)
    }
}

/// A started service: its tasks and, with the API role, its address.
pub struct Running {
    pub addr: Option<SocketAddr>,
    /// The operations listener (`/health`, `/ready`, `/metrics`).
    pub ops_addr: SocketAddr,
    pub pool: PgPool,
    shutdown: CancellationToken,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
}

impl Running {
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops taking new work, lets work in flight finish (at most `grace`),
    /// and returns when every role has stopped.
    pub async fn stop(self, grace: Duration) {
        self.shutdown.cancel();
        let deadline = tokio::time::Instant::now() + grace;
        for (name, task) in self.tasks {
            match tokio::time::timeout_at(deadline, task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(role = name, error = %e, "role ended abnormally"),
                Err(_) => tracing::warn!(role = name, "role did not stop within the grace period"),
            }
        }
        self.pool.close().await;
        tracing::info!("stopped");
    }
}

/// Creates the deployment's topics, retrying while the broker is away:
/// intake must not wait for Kafka.
async fn ensure_topics_until_done(kafka: &KafkaSettings, shutdown: &CancellationToken) -> bool {
    let backoff = Backoff::new(
        Duration::from_millis(200),
        Duration::from_secs(10),
        u32::MAX,
    );
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = tokio::select! {
            r = kafka.ensure_topics() => r,
            _ = shutdown.cancelled() => return false,
        };
        match result {
            Ok(()) => return true,
            Err(e) => {
                tracing::warn!(attempt, error = %e, "topics not created yet; retrying");
                tokio::select! {
                    _ = casebook_commands::retry::sleep_backoff(&backoff, attempt.min(10)) => {}
                    _ = shutdown.cancelled() => return false,
                }
            }
        }
    }
}

/// Starts `roles`. The API listens on `listener` (or the configured address).
pub async fn start(
    config: &Config,
    roles: &[Role],
    listener: Option<TcpListener>,
) -> anyhow::Result<Running> {
    let roles = Role::expand(roles);
    let pool = db::connect(
        &config.database_url,
        config.db_max_connections,
        db::Purpose::Serve,
    )
    .await?;
    // One event store for every role: one aggregate cache.
    let store = EventStore::with_aggregate_cache(pool.clone(), config.aggregate_cache)
        .with_append_group(config.append_group);
    let kafka = kafka_settings(config);
    let shutdown = CancellationToken::new();
    let mut tasks: Vec<(&'static str, JoinHandle<()>)> = Vec::new();
    let mut addr = None;
    let readiness = Arc::new(Readiness::new(
        &config.kafka_brokers,
        kafka.topics.events(),
        db::migration_versions(),
    ));

    // Every role can be probed and scraped, on a listener of its own.
    let ops_listener = TcpListener::bind(config.ops_addr)
        .await
        .with_context(|| format!("CASEBOOK_OPS_ADDR: cannot listen on {}", config.ops_addr))?;
    let ops_addr = ops_listener.local_addr()?;
    let ops_state = OpsState {
        pool: pool.clone(),
        readiness: readiness.clone(),
        roles: roles
            .iter()
            .map(|r| format!("{r:?}").to_lowercase())
            .collect(),
    };
    let token = shutdown.clone();
    tasks.push((
        "ops",
        tokio::spawn(async move {
            if let Err(e) =
                casebook_api::serve_ops(ops_listener, ops_state, token.cancelled_owned()).await
            {
                tracing::error!(error = %e, "operations listener failed");
            }
        }),
    ));
    tracing::info!(addr = %ops_addr, "operations listener up");

    if roles.contains(&Role::Api) {
        let secret = config.jwt_secret()?;
        let store = store.clone();
        let intake = Intake::new(store.clone());
        let gmail = GmailClient::new(&config.gmail_api_base, config.gmail_access_token.clone())
            .context("GMAIL_API_BASE: cannot build the Gmail client")?;
        let gmail = GmailSync::new(
            gmail,
            intake.clone(),
            pool.clone(),
            config.gmail_support_address.clone(),
        );
        tasks.push((
            "mail-sync",
            tokio::spawn(gmail.clone().run(shutdown.clone())),
        ));
        let limits_pool = db::connect(
            &config.database_url,
            (config.db_max_connections / 4).max(2),
            db::Purpose::Bookkeeping,
        )
        .await?;
        let state = AppState(Arc::new(Inner {
            pool: pool.clone(),
            limits_pool,
            store: store.clone(),
            intake,
            gmail: Some(gmail),
            tokens: TokenKeys::new(secret),
            sessions: Sessions::new(
                pool.clone(),
                TokenKeys::new(secret),
                Duration::from_secs(config.session_idle_secs),
            ),
            links: LinkKeys::new(secret),
            settings: ApiSettings {
                public_url: config.public_url.clone(),
                twilio_auth_token: config.twilio_auth_token.clone(),
                gmail_push_token: config.gmail_push_token.clone(),
                rate_limit_per_client: config.rate_limit_per_client,
                graphql_concurrency: config.graphql_concurrency as usize,
                trusted_proxies: config.trusted_proxies.clone(),
                submissions_per_email_per_hour: config.webform_per_email_per_hour,
                model_budget_usd_per_year: config.model_budget_usd_per_year,
            },
            readiness: readiness.clone(),
            knowledge: Arc::new(LazyKnowledge::new(
                pool.clone(),
                embedding_source(config)?,
                config.kb_ef_search,
            )),
            live: Arc::new(LiveHub::new(pool.clone())),
            staff: Staff::new(store.clone(), config.support_signature.clone())
                .with_public_url(config.public_url.clone())
                .with_followup_template(config.twilio_followup_content_sid.clone()),
        }));
        let listener = match listener {
            Some(l) => l,
            None => TcpListener::bind(config.http_addr).await.with_context(|| {
                format!("CASEBOOK_HTTP_ADDR: cannot listen on {}", config.http_addr)
            })?,
        };
        addr = Some(listener.local_addr()?);
        let token = shutdown.clone();
        tasks.push((
            "api",
            tokio::spawn(async move {
                if let Err(e) = casebook_api::serve(listener, state, token.cancelled_owned()).await
                {
                    tracing::error!(error = %e, "HTTP server failed");
                }
            }),
        ));
        tracing::info!(addr = %addr.expect("bound"), "api listening");
    }

    if roles.contains(&Role::Relay) {
        let relay = Relay::new(
            pool.clone(),
            config.database_url.clone(),
            kafka.clone(),
            RelaySettings::default(),
        );
        let token = shutdown.clone();
        tasks.push(("relay", tokio::spawn(relay.run(token))));
    }

    // Signed audit checkpoints and the daily retention pass ride with the
    // relay (advisory locks keep replicas from racing).
    if roles.contains(&Role::Relay) {
        match config.audit_signing_key() {
            Ok(key) => {
                tasks.push((
                    "retention",
                    tokio::spawn(crate::audit::run_retention(
                        pool.clone(),
                        config.archive_dir.clone(),
                        key.clone(),
                        shutdown.clone(),
                    )),
                ));
                tasks.push((
                    "audit-checkpoints",
                    tokio::spawn(crate::audit::run(
                        pool.clone(),
                        key,
                        kafka.clone(),
                        Duration::from_secs(config.checkpoint_secs),
                        shutdown.clone(),
                    )),
                ));
            }
            Err(e) => tracing::warn!(error = %e, "no audit checkpoints"),
        }
    }

    if roles.contains(&Role::Agent) {
        let kb =
            KnowledgeBase::new(pool.clone(), embedder(config)?).with_ef_search(config.kb_ef_search);
        let store = store.clone();
        let agent = Arc::new(
            Agent::new(
                store.clone(),
                kb,
                providers(config)?,
                config.support_signature.clone(),
            )
            .with_auto_reply_cap(config.auto_reply_cap_per_hour)
            .with_public_url(config.public_url.clone())
            .with_followup_template(config.twilio_followup_content_sid.clone())
            .with_experiment(config.experiment.clone()),
        );
        let worker = worker::spawn(
            &kafka,
            worker_settings(
                config,
                &kafka,
                kafka.topics.group("agent"),
                vec![kafka.topics.tickets_incoming()],
            ),
            Arc::new(AgentHandler(agent)),
            shutdown.clone(),
        )
        .context("KAFKA_BROKERS: agent consumer")?;
        tasks.push(("agent", worker));
        let every = Duration::from_secs(config.sla_check_every_secs);
        tasks.push((
            "sla",
            tokio::spawn(sla::run(
                store.clone(),
                pool.clone(),
                every,
                shutdown.clone(),
            )),
        ));
        // Resolved tickets close after 7 quiet days; checked with the SLAs.
        let staff = Staff::new(store, config.support_signature.clone());
        tasks.push((
            "auto-close",
            tokio::spawn(casebook_commands::staff::run_auto_close(
                staff,
                every,
                shutdown.clone(),
            )),
        ));
    }

    if roles.contains(&Role::Delivery) {
        let delivery = Arc::new(delivery(config, store.clone())?);
        let topics = Channel::ALL
            .iter()
            .map(|c| kafka.topics.outbound(*c))
            .collect();
        let worker = worker::spawn(
            &kafka,
            worker_settings(config, &kafka, kafka.topics.group("delivery"), topics),
            Arc::new(DeliveryHandler(delivery)),
            shutdown.clone(),
        )
        .context("KAFKA_BROKERS: delivery consumer")?;
        tasks.push(("delivery", worker));
    }

    if roles.contains(&Role::Projector) {
        let token = shutdown.clone();
        let pool = pool.clone();
        let kafka = kafka.clone();
        let snapshots = casebook_projections::analytics::snapshot::SnapshotSettings {
            brokers: kafka.brokers.clone(),
            topic: kafka.topics.metrics(),
            every: Duration::from_secs(config.metrics_snapshot_secs),
            budget_usd_per_year: config.model_budget_usd_per_year,
        };
        tasks.push((
            "projector",
            tokio::spawn(async move {
                if !ensure_topics_until_done(&kafka, &token).await {
                    return;
                }
                let settings = ConsumerSettings::new(kafka.brokers.clone(), kafka.topics.clone());
                let mut runners: Vec<JoinHandle<()>> = casebook_projections::all_projectors()
                    .into_iter()
                    .map(|p| {
                        ProjectorRunner::new(pool.clone(), settings.clone(), p).spawn(token.clone())
                    })
                    .collect();
                // `<prefix>.metrics` snapshots and the model budget gauges.
                runners.push(tokio::spawn(
                    casebook_projections::analytics::snapshot::run(
                        pool.clone(),
                        snapshots,
                        token.clone(),
                    ),
                ));
                for runner in runners {
                    let _ = runner.await;
                }
            }),
        ));
    } else if roles.contains(&Role::Relay) || roles.contains(&Role::Api) {
        // Topics exist before anything is published or checked for.
        let token = shutdown.clone();
        let kafka = kafka.clone();
        tasks.push((
            "topics",
            tokio::spawn(async move {
                ensure_topics_until_done(&kafka, &token).await;
            }),
        ));
    }

    Ok(Running {
        addr,
        ops_addr,
        pool,
        shutdown,
        tasks,
    })
}

/// Runs until SIGINT or SIGTERM, then stops gracefully. The signal handlers
/// are installed before anything starts: a pod stopped the moment it turns
/// ready still shuts down cleanly.
pub async fn serve(config: &Config, roles: &[Role]) -> anyhow::Result<()> {
    let stop = stop_signal()?;
    let running = start(config, roles, None).await?;
    stop.await;
    tracing::info!("shutting down: finishing work in flight");
    running.stop(Duration::from_secs(30)).await;
    Ok(())
}

/// Resolves on the first SIGINT or SIGTERM received after this call.
fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    #[cfg(unix)]
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("installing the SIGINT handler")?;
    Ok(async move {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = term.recv() => {}
                _ = interrupt.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    })
}
