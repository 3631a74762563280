//! What every handler shares.

use std::sync::Arc;

use casebook_commands::gmail::GmailSync;
use casebook_commands::{EventStore, Intake};
use sqlx::PgPool;

use crate::auth::TokenKeys;
use crate::ops::Readiness;

/// Settings of the HTTP layer.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// The URL Twilio signs: scheme, host and port, no trailing slash.
    pub public_url: String,
    pub twilio_auth_token: Option<String>,
    pub gmail_push_token: Option<String>,
}

pub struct Inner {
    pub pool: PgPool,
    pub store: EventStore,
    pub intake: Intake,
    pub gmail: Option<GmailSync>,
    pub tokens: TokenKeys,
    pub settings: ApiSettings,
    pub readiness: Arc<Readiness>,
}

#[derive(Clone)]
pub struct AppState(pub Arc<Inner>);

impl std::ops::Deref for AppState {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.0
    }
}
