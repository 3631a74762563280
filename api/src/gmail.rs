//! `POST /webhooks/gmail`: Gmail's change notifications through a Pub/Sub
//! push subscription. The push is recorded and answered at once; the mail
//! sync worker (`casebook_commands::gmail::GmailSync::run`) reads the mail.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Extension;
use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use base64::Engine;
use casebook_commands::gmail::GmailError;
use casebook_domain::masking::mask_email;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::body;
use crate::error::ApiError;
use crate::observe::CorrelationId;
use crate::state::AppState;

#[derive(Debug, Deserialize)]
pub struct PushQuery {
    token: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Push {
    message: PushMessage,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PushMessage {
    data: String,
    message_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Notification {
    email_address: String,
    history_id: HistoryId,
}

/// Gmail sends the history id as a number; some relays stringify it.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum HistoryId {
    Number(u64),
    Text(String),
}

pub async fn push(
    State(state): State<AppState>,
    Extension(correlation): Extension<CorrelationId>,
    Query(query): Query<PushQuery>,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let Some(expected) = state.settings.gmail_push_token.as_deref() else {
        return Err(ApiError::Forbidden(
            "Gmail push cannot be checked: GMAIL_PUSH_TOKEN is not set",
        ));
    };
    let given = query.token.unwrap_or_default();
    if !bool::from(expected.as_bytes().ct_eq(given.as_bytes())) {
        return Err(ApiError::Forbidden("push token does not match"));
    }
    let body = body::bytes(body)?;
    let push: Push = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("not a Pub/Sub push message: {e}")))?;
    let data = STANDARD
        .decode(push.message.data.trim())
        .or_else(|_| URL_SAFE.decode(push.message.data.trim()))
        .map_err(|_| ApiError::BadRequest("message.data is not base64".into()))?;
    let notification: Notification = serde_json::from_slice(&data).map_err(|e| {
        ApiError::BadRequest(format!("message.data is not a Gmail notification: {e}"))
    })?;
    let history_id = match notification.history_id {
        HistoryId::Number(n) => n,
        HistoryId::Text(t) => t
            .parse()
            .map_err(|_| ApiError::BadRequest("historyId is not a number".into()))?,
    };
    let Some(gmail) = state.gmail.as_ref() else {
        return Err(ApiError::Unavailable(
            "Gmail API is not configured (GMAIL_API_BASE)".into(),
        ));
    };
    gmail
        .notify(&notification.email_address, history_id, &correlation.0)
        .await
        .map_err(|e| match e {
            GmailError::BadMailbox => ApiError::BadRequest(GmailError::BadMailbox.to_string()),
            other => ApiError::Unavailable(other.to_string()),
        })?;
    // Recorded: the mail sync worker reads the mailbox from here on, so the
    // push is answered at once however large the backlog.
    tracing::info!(
        mailbox = %mask_email(&notification.email_address),
        pubsub_message_id = push.message.message_id.as_deref().unwrap_or(""),
        history_id,
        "Gmail push recorded"
    );
    Ok(StatusCode::NO_CONTENT)
}
