//! Casebook's HTTP layer: intake webhooks and the web form, the customer's
//! ticket status, probes and metrics. The only crate that knows HTTP.

pub mod auth;
mod body;
mod confirm;
pub mod error;
mod gmail;
pub mod graphql;
pub mod observe;
pub mod ops;
pub mod ratelimit;
pub mod session;
pub mod state;
mod status;
pub mod users;
mod webform;
pub mod whatsapp;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, Method, StatusCode};
use axum::middleware::{from_fn, from_fn_with_state};
use axum::routing::{get, post};
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{Any, CorsLayer};
use tower_http::timeout::TimeoutLayer;

pub use auth::{Claims, Role, TokenKeys};
pub use error::ApiError;
pub use ops::{serve_ops, OpsState, Readiness};
pub use session::{Caller, SessionError, Sessions};
pub use state::{ApiSettings, AppState, Inner};

/// How long any request may take before it is answered with 408.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route")
}

/// Every route, with its middleware.
pub fn router(state: AppState) -> Router {
    // The web form and the status page are called from customers' browsers
    // on other origins.
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            observe::CORRELATION_HEADER.parse().expect("valid"),
        ]);
    let limiter = ratelimit::ClientLimiter::new(
        state.settings.rate_limit_per_client,
        state.settings.trusted_proxies.clone(),
    );
    let public = Router::new()
        .route("/support/tickets", post(webform::submit))
        .route("/ticket/{id}", get(status::show))
        .route("/ticket/{id}/feedback", post(status::submit_feedback))
        .route("/confirm/{token}", get(confirm::confirm))
        .route("/me", get(session::me))
        .route_layer(from_fn_with_state(limiter, ratelimit::limit))
        .layer(cors);
    let webhooks = Router::new()
        .route("/webhooks/whatsapp", post(whatsapp::inbound))
        .route("/webhooks/whatsapp/status", post(whatsapp::status))
        .route("/webhooks/gmail", post(gmail::push));
    let ops = Router::new()
        .route("/health", get(ops::health))
        .route("/ready", get(ops::ready))
        .route("/metrics", get(ops::metrics));
    Router::new()
        .merge(public)
        .merge(webhooks)
        .merge(ops)
        .merge(graphql::routes(&state))
        .route_layer(from_fn(observe::http_metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(body::BODY_LIMIT))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .layer(CatchPanicLayer::new())
        .layer(from_fn(observe::correlation))
        .with_state(state)
}

/// Serves until `shutdown` resolves, then finishes in-flight requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // The peer address keys the per-client rate limit.
    let live = state.live.clone();
    let served = axum::serve(
        listener,
        router(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
        // Subscriptions end with the server.
        live.close();
    })
    .await;
    served
}
