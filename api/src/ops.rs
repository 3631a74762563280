//! Probes and metrics for operators: `/health`, `/ready`, `/metrics`.
//!
//! Every role serves them on its own operations listener
//! (`CASEBOOK_OPS_ADDR`, [`ops_router`]), apart from the public one; the
//! public listener's `/ready` says only "ready" or "not ready".

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use serde::Serialize;
use sqlx::PgPool;

use crate::error::ApiError;
use crate::state::AppState;

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// Probes arrive every few seconds from several places; one check serves
/// them all for this long.
const CACHE_FOR: Duration = Duration::from_secs(1);

pub async fn health() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok"}))
}

#[derive(Debug, Clone, Serialize)]
pub struct ReadyReport {
    pub postgres: String,
    pub migrations: String,
    pub kafka: String,
}

impl ReadyReport {
    fn ok(&self) -> bool {
        self.postgres == "ok" && self.migrations == "ok" && self.kafka == "ok"
    }
}

/// What `/ready` checks: Postgres answers, every migration this build
/// knows is applied, and the broker answers with the events topic.
pub struct Readiness {
    kafka: Option<std::sync::Arc<BaseConsumer>>,
    kafka_error: Option<String>,
    events_topic: String,
    migrations: Vec<i64>,
    cache: Mutex<Option<(Instant, ReadyReport)>>,
}

impl Readiness {
    pub fn new(brokers: &str, events_topic: String, migrations: Vec<i64>) -> Self {
        let client = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("socket.timeout.ms", "2000")
            .set("log_level", "2")
            .create::<BaseConsumer>();
        let (kafka, kafka_error) = match client {
            Ok(c) => (Some(std::sync::Arc::new(c)), None),
            Err(e) => (None, Some(e.to_string())),
        };
        Self {
            kafka,
            kafka_error,
            events_topic,
            migrations,
            cache: Mutex::new(None),
        }
    }

    pub async fn check(&self, pool: &PgPool) -> ReadyReport {
        if let Some((at, report)) = self.cache.lock().expect("not poisoned").as_ref() {
            if at.elapsed() < CACHE_FOR {
                return report.clone();
            }
        }
        let (postgres, migrations) = self.check_postgres(pool).await;
        let kafka = self.check_kafka().await;
        let report = ReadyReport {
            postgres,
            migrations,
            kafka,
        };
        *self.cache.lock().expect("not poisoned") = Some((Instant::now(), report.clone()));
        report
    }

    async fn check_postgres(&self, pool: &PgPool) -> (String, String) {
        let applied = tokio::time::timeout(
            CHECK_TIMEOUT,
            sqlx::query_scalar::<_, i64>(
                "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version",
            )
            .fetch_all(pool),
        )
        .await;
        match applied {
            Err(_) => ("down: no answer within 2 s".into(), "unknown".into()),
            Ok(Err(sqlx::Error::Database(e))) if e.code().as_deref() == Some("42P01") => {
                ("ok".into(), "pending: no migrations applied".into())
            }
            Ok(Err(e)) => (format!("down: {e}"), "unknown".into()),
            Ok(Ok(applied)) => {
                let missing: Vec<String> = self
                    .migrations
                    .iter()
                    .filter(|v| !applied.contains(v))
                    .map(|v| v.to_string())
                    .collect();
                let state = if missing.is_empty() {
                    "ok".to_string()
                } else {
                    format!("pending: {}", missing.join(", "))
                };
                ("ok".into(), state)
            }
        }
    }

    async fn check_kafka(&self) -> String {
        let Some(client) = self.kafka.clone() else {
            return format!(
                "down: {}",
                self.kafka_error.as_deref().unwrap_or("no client")
            );
        };
        // The metadata call blocks (bounded by its own timeout): off the
        // async workers.
        let topic = self.events_topic.clone();
        let metadata = match tokio::task::spawn_blocking(move || {
            client.fetch_metadata(Some(&topic), CHECK_TIMEOUT)
        })
        .await
        {
            Ok(result) => result,
            Err(e) => return format!("down: {e}"),
        };
        match metadata {
            Err(e) => format!("down: {e}"),
            Ok(m) => match m.topics().iter().find(|t| t.name() == self.events_topic) {
                Some(t) if t.error().is_none() && !t.partitions().is_empty() => "ok".into(),
                _ => format!("down: topic {} missing", self.events_topic),
            },
        }
    }
}

/// What the operations listener needs: the database and the checks.
#[derive(Clone)]
pub struct OpsState {
    pub pool: PgPool,
    pub readiness: Arc<Readiness>,
    /// The roles this process runs, reported by `/ready`.
    pub roles: Vec<String>,
}

/// The operations listener's routes.
pub fn ops_router(state: OpsState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ops_ready))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Serves the operations listener until `shutdown` resolves.
pub async fn serve_ops(
    listener: tokio::net::TcpListener,
    state: OpsState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, ops_router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// `/ready` on the ops listener: every check by name, and the roles.
async fn ops_ready(State(state): State<OpsState>) -> Response {
    let report = state.readiness.check(&state.pool).await;
    if report.ok() {
        return (
            StatusCode::OK,
            Json(serde_json::json!({"status": "ready", "checks": report, "roles": state.roles})),
        )
            .into_response();
    }
    let mut fields = BTreeMap::new();
    for (name, value) in [
        ("postgres", &report.postgres),
        ("migrations", &report.migrations),
        ("kafka", &report.kafka),
    ] {
        if value != "ok" {
            fields.insert(name.to_string(), value.clone());
        }
    }
    let down: Vec<&str> = fields.keys().map(String::as_str).collect();
    let body = serde_json::json!({
        "error": "not_ready",
        "message": format!("not ready: {}", down.join(", ")),
        "fields": fields,
        "roles": state.roles,
    });
    tracing::warn!(checks = ?report, "not ready");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, "5")],
        Json(body),
    )
        .into_response()
}

/// `/ready` on the public listener: only whether the service is ready; what
/// is down (and why) is for operators, on the ops listener.
pub async fn ready(State(state): State<AppState>) -> Response {
    if state.readiness.check(&state.pool).await.ok() {
        return (StatusCode::OK, Json(serde_json::json!({"status": "ready"}))).into_response();
    }
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, "5")],
        Json(serde_json::json!({"error": "not_ready", "message": "not ready"})),
    )
        .into_response()
}

pub async fn metrics() -> Response {
    let encoder = prometheus::TextEncoder::new();
    match encoder.encode_to_string(&prometheus::gather()) {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => ApiError::Internal(format!("metrics could not be encoded: {e}")).into_response(),
    }
}
