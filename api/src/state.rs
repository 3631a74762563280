//! What every handler shares.

use std::sync::Arc;

use casebook_commands::claims::LinkKeys;
use casebook_commands::gmail::GmailSync;
use casebook_commands::staff::Staff;
use casebook_commands::{EventStore, Intake};
use sqlx::PgPool;

use crate::auth::TokenKeys;
use crate::graphql::knowledge::LazyKnowledge;
use crate::graphql::subscriptions::LiveHub;
use crate::ops::Readiness;
use crate::ratelimit::TrustedProxies;
use crate::session::Sessions;

/// Settings of the HTTP layer.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// The URL Twilio signs: scheme, host and port, no trailing slash.
    pub public_url: String,
    pub twilio_auth_token: Option<String>,
    pub gmail_push_token: Option<String>,
    /// `CASEBOOK_RATE_LIMIT_PER_CLIENT`: public requests a minute per client
    /// address (0: off).
    pub rate_limit_per_client: u32,
    /// `CASEBOOK_GRAPHQL_CONCURRENCY`: GraphQL operations run at once; the
    /// rest wait in arrival order (bounded by the request timeout).
    pub graphql_concurrency: usize,
    /// `CASEBOOK_TRUSTED_PROXIES`: peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: TrustedProxies,
    /// `CASEBOOK_WEBFORM_PER_EMAIL_PER_HOUR`: web-form submissions naming one
    /// address, an hour (0: off).
    pub submissions_per_email_per_hour: u32,
    /// `CASEBOOK_MODEL_BUDGET_USD_PER_YEAR`: the dashboard's budget line.
    pub model_budget_usd_per_year: f64,
}

pub struct Inner {
    pub pool: PgPool,
    /// For rate-limit bookkeeping: its commits do not wait for the WAL
    /// flush (a hit lost in a crash lets one more request through).
    pub limits_pool: PgPool,
    pub store: EventStore,
    pub intake: Intake,
    pub gmail: Option<GmailSync>,
    pub tokens: TokenKeys,
    /// Bearer tokens checked against their session rows, every request.
    pub sessions: Sessions,
    /// Confirmation tokens of web-form email claims (same secret as `tokens`).
    pub links: LinkKeys,
    pub settings: ApiSettings,
    pub readiness: Arc<Readiness>,
    /// The knowledge base staff search (its model loads on first use).
    pub knowledge: Arc<LazyKnowledge>,
    /// Live updates for GraphQL subscriptions.
    pub live: Arc<LiveHub>,
    /// What people do on tickets (the GraphQL mutations).
    pub staff: Staff,
}

#[derive(Clone)]
pub struct AppState(pub Arc<Inner>);

impl std::ops::Deref for AppState {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.0
    }
}
