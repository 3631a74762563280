//! The staff API: one GraphQL schema (async-graphql) at `POST /graphql`,
//! GraphiQL at `GET /graphql`, and subscriptions over graphql-transport-ws
//! at `GET /graphql/ws`. A module per area; every read goes through a
//! transaction scoped to the caller (row-level security), every nested list
//! through a data loader, and every mutation is a command on the ticket.

mod audit;
pub mod context;
mod customers;
pub mod knowledge;
mod loaders;
pub mod metrics;
mod mutations;
mod queues;
pub mod subscriptions;
mod tickets;
mod types;

use async_graphql::http::{GraphiQLSource, ALL_WEBSOCKET_PROTOCOLS};
use async_graphql::{Data, MergedObject, MergedSubscription, Schema, SchemaBuilder};
use async_graphql_axum::{GraphQLProtocol, GraphQLRequest, GraphQLResponse, GraphQLWebSocket};
use axum::extract::{State, WebSocketUpgrade};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde_json::json;
use std::sync::Arc;
use tokio::sync::Semaphore;

use crate::observe::CorrelationId;
use crate::session;
use crate::state::AppState;
use context::{Db, Viewer};
use loaders::Loaders;

/// The deepest query accepted (the contract's bound).
pub const MAX_DEPTH: usize = 10;
/// The most complex query accepted: a field costs 1, a page multiplies its
/// fields by its size, a ticket's messages count 5 times and a customer's
/// tickets 10 times (a page of 50 tickets with their customers, messages
/// and queues fits; asking for everything of everything does not).
pub const MAX_COMPLEXITY: usize = 2_000;

#[derive(MergedObject, Default)]
pub struct Query(
    tickets::TicketQuery,
    customers::CustomerQuery,
    queues::QueueQuery,
    knowledge::KnowledgeQuery,
    audit::AuditQuery,
    metrics::MetricsQuery,
);

#[derive(MergedObject, Default)]
pub struct Mutation(mutations::TicketMutation, knowledge::KnowledgeMutation);

#[derive(MergedSubscription, Default)]
pub struct Subscription(subscriptions::LiveSubscription);

pub type CasebookSchema = Schema<Query, Mutation, Subscription>;

fn builder() -> SchemaBuilder<Query, Mutation, Subscription> {
    Schema::build(
        Query::default(),
        Mutation::default(),
        Subscription::default(),
    )
    .limit_depth(MAX_DEPTH)
    .limit_complexity(MAX_COMPLEXITY)
    .limit_recursive_depth(64)
}

/// The schema in SDL (committed as `api/schema.graphql`).
pub fn sdl() -> String {
    builder().finish().sdl()
}

/// The schema, with what resolvers share.
pub fn schema(state: &AppState) -> CasebookSchema {
    builder()
        .data(state.clone())
        .data(state.knowledge.clone())
        .data(state.live.clone())
        .data(metrics::DashboardCache::default())
        .finish()
}

/// `/graphql` and `/graphql/ws`.
pub fn routes(app: &AppState) -> Router<AppState> {
    Router::new()
        .route("/graphql", get(graphiql).post(execute))
        .route("/graphql/ws", get(websocket))
        .layer(Extension(schema(app)))
        .layer(Extension(Admission(Arc::new(Semaphore::new(
            app.settings
                .graphql_concurrency
                .clamp(1, Semaphore::MAX_PERMITS),
        )))))
}

/// Admission to execution: at most `CASEBOOK_GRAPHQL_CONCURRENCY` operations
/// run at once and the rest queue in arrival order (tokio's semaphore is
/// fair). On a busy API this keeps the cores on the operations in hand
/// instead of switching between dozens of half-done ones and their
/// Postgres backends: more pages a second and a shorter tail. Subscriptions
/// hold no permit; each event they resolve is small.
#[derive(Clone)]
struct Admission(Arc<Semaphore>);

async fn graphiql() -> impl IntoResponse {
    Html(
        GraphiQLSource::build()
            .endpoint("/graphql")
            .subscription_endpoint("/graphql/ws")
            .title("Casebook")
            .finish(),
    )
}

/// Why a caller is refused before anything runs: `unauthorized`,
/// `session_expired`, …
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: &'static str,
    pub message: String,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        // Both shapes: the API's JSON error, and a GraphQL error whose
        // `extensions.code` says the same, for GraphQL clients.
        let status = if self.code == "unavailable" {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::UNAUTHORIZED
        };
        (
            status,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            Json(json!({
                "error": self.code,
                "message": self.message,
                "errors": [{"message": self.message, "extensions": {"code": self.code}}],
            })),
        )
            .into_response()
    }
}

/// The caller behind a bearer token, checked against their session now.
pub async fn authenticate(app: &AppState, token: &str) -> Result<Viewer, Refusal> {
    app.sessions.authenticate(token).await.map_err(refusal)
}

fn refusal(e: session::SessionError) -> Refusal {
    let code = e.code();
    let message = if code == "unavailable" {
        tracing::error!(error = %e, "session check failed");
        "sessions cannot be checked right now; retry shortly".to_string()
    } else {
        e.to_string()
    };
    Refusal { code, message }
}

/// Request data every operation gets: the viewer, their scoped reads (`db`)
/// and (for a request, not a subscription connection) cached loaders, and
/// the correlation id commands carry.
fn request_data(db: &Db, viewer: Viewer, correlation: String, cached_loaders: bool) -> Data {
    let mut data = Data::default();
    if cached_loaders {
        data.insert(Loaders::new(db));
    }
    data.insert(db.clone());
    data.insert(viewer);
    data.insert(mutations::Correlation(correlation));
    data
}

async fn execute(
    State(app): State<AppState>,
    Extension(schema): Extension<CasebookSchema>,
    Extension(correlation): Extension<CorrelationId>,
    Extension(admission): Extension<Admission>,
    headers: HeaderMap,
    request: GraphQLRequest,
) -> Response {
    let _permit = admission
        .0
        .acquire()
        .await
        .expect("the admission semaphore is never closed");
    let Some(token) = session::bearer(&headers) else {
        return Refusal {
            code: "unauthorized",
            message: "an Authorization: Bearer token is required".into(),
        }
        .into_response();
    };
    let (viewer, open) = match app.sessions.authenticate_scoped(token).await {
        Ok(found) => found,
        Err(e) => return refusal(e).into_response(),
    };
    let db = Db::for_request_in(app.pool.clone(), viewer.clone(), open);
    let data = request_data(&db, viewer, correlation.0.clone(), true);
    let mut request = request.into_inner();
    request.data = data;
    let mut response = schema.execute(request).await;
    db.finish().await;
    explain_limits(&mut response);
    // What the operation cost: read queries it ran (batched loaders make
    // this independent of the page size).
    response.extensions.insert(
        "cost".to_string(),
        async_graphql::Value::from_json(json!({"reads": db.reads()})).unwrap_or_default(),
    );
    GraphQLResponse::from(response).into_response()
}

/// Names the limit a refused query broke, with a code clients can test.
fn explain_limits(response: &mut async_graphql::Response) {
    for e in &mut response.errors {
        let (code, limit) = match e.message.as_str() {
            "Query is nested too deep." => ("QUERY_TOO_DEEP", format!("at most {MAX_DEPTH} levels")),
            "Query is too complex." => (
                "QUERY_TOO_COMPLEX",
                format!("a complexity of at most {MAX_COMPLEXITY}; ask for smaller pages or fewer nested lists"),
            ),
            _ => continue,
        };
        e.message = format!("{} It was refused before running: {limit}.", e.message);
        e.extensions
            .get_or_insert_with(Default::default)
            .set("code", code);
    }
}

/// The bearer token of a `connection_init` payload: `Authorization`
/// (any case), at the top or under `headers`.
fn init_token(payload: &serde_json::Value) -> Option<String> {
    let find = |v: &serde_json::Value| {
        v.as_object()?.iter().find_map(|(k, v)| {
            k.eq_ignore_ascii_case("authorization")
                .then(|| v.as_str())
                .flatten()
                .and_then(session::bearer_value)
                .map(str::to_string)
        })
    };
    find(payload).or_else(|| find(payload.get("headers")?))
}

async fn websocket(
    State(app): State<AppState>,
    Extension(schema): Extension<CasebookSchema>,
    Extension(correlation): Extension<CorrelationId>,
    protocol: GraphQLProtocol,
    upgrade: WebSocketUpgrade,
) -> Response {
    upgrade
        .protocols(ALL_WEBSOCKET_PROTOCOLS)
        .on_upgrade(move |stream| {
            GraphQLWebSocket::new(stream, schema, protocol)
                .on_connection_init(move |payload| async move {
                    let token = init_token(&payload).ok_or_else(|| {
                        async_graphql::Error::new(
                            "connection_init needs Authorization: Bearer <token>",
                        )
                    })?;
                    let viewer = authenticate(&app, &token).await.map_err(|r| {
                        async_graphql::Error::new(format!("{}: {}", r.code, r.message))
                    })?;
                    let db = Db::per_read(app.pool.clone(), viewer.clone());
                    let mut data = request_data(&db, viewer, correlation.0, false);
                    data.insert(subscriptions::SessionToken(token));
                    data.insert(subscriptions::Slots::default());
                    Ok(data)
                })
                .serve()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_found_wherever_clients_put_it() {
        assert_eq!(
            init_token(&json!({"Authorization": "Bearer abc"})).as_deref(),
            Some("abc")
        );
        assert_eq!(
            init_token(&json!({"authorization": "Bearer abc"})).as_deref(),
            Some("abc")
        );
        assert_eq!(
            init_token(&json!({"headers": {"Authorization": "Bearer abc"}})).as_deref(),
            Some("abc")
        );
        assert_eq!(init_token(&json!({})), None);
    }

    /// `CASEBOOK_WRITE_SCHEMA=1 cargo test -p casebook-api sdl` rewrites
    /// the file after a deliberate change.
    #[test]
    fn the_committed_sdl_is_the_schema() {
        // A developer's switch for this test, not a setting of the service.
        const WRITE: &str = "CASEBOOK_WRITE_SCHEMA";
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/schema.graphql");
        if std::env::var_os(WRITE).is_some() {
            std::fs::write(path, sdl()).unwrap();
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == sdl(),
            "api/schema.graphql differs from the code; review the change and rewrite it with \
             `CASEBOOK_WRITE_SCHEMA=1 cargo test -p casebook-api sdl`"
        );
    }
}
