//! `POST /support/tickets`: the public web form.
//!
//! The email a submission names is a claim, not an identity: the
//! submission opens its own ticket for a customer of its own, with no
//! access to earlier conversations until the address is confirmed through
//! the link in the acknowledgement email (`crate::confirm`). At most
//! `CASEBOOK_WEBFORM_PER_EMAIL_PER_HOUR` submissions name one address in
//! an hour; a repeated `client_request_id` answers with the earlier ticket
//! only when it is the same submission, soon after, and is a `409`
//! otherwise.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::{Extension, Json};
use casebook_commands::claims::NewClaim;
use casebook_commands::limits::{self, Gate, Limit};
use casebook_commands::{InboundMessage, IntakeError, KeyOrigin, Sender};
use casebook_domain::identity::IdentityKey;
use casebook_domain::masking::mask_email;
use casebook_domain::webform::RawWebForm;
use casebook_domain::Channel;
use chrono::Utc;
use serde::Serialize;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::body::{self, Format};
use crate::error::ApiError;
use crate::observe::CorrelationId;
use crate::state::AppState;

#[derive(Debug, Serialize)]
pub struct Accepted {
    pub ticket_id: Uuid,
    pub status_url: String,
    pub status_token: String,
}

fn raw_form(fields: BTreeMap<String, String>) -> RawWebForm {
    let mut fields = fields;
    RawWebForm {
        name: fields.remove("name"),
        email: fields.remove("email"),
        subject: fields.remove("subject"),
        message: fields.remove("message"),
        category: fields.remove("category"),
        priority: fields.remove("priority"),
        client_request_id: fields.remove("client_request_id"),
    }
}

/// The channel message id of a submission: a retry with the same
/// `client_request_id` from the same address is the same message; without
/// one, the key is made up for this request.
fn submission_key(email: &str, client_request_id: Option<&str>) -> (String, KeyOrigin) {
    match client_request_id {
        Some(id) => {
            let digest = Sha256::digest(format!("{email}\u{0}{id}").as_bytes());
            (
                format!("req-{}", &hex_prefix(&digest, 16)),
                KeyOrigin::Client,
            )
        }
        None => (Uuid::now_v7().to_string(), KeyOrigin::Fresh),
    }
}

fn hex_prefix(bytes: &[u8], n: usize) -> String {
    bytes.iter().take(n).map(|b| format!("{b:02x}")).collect()
}

pub async fn submit(
    State(state): State<AppState>,
    Extension(correlation): Extension<CorrelationId>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let format = body::format(&headers)?;
    let body = body::bytes(body)?;
    let mut type_errors = BTreeMap::new();
    let fields: BTreeMap<String, String> = match format {
        Format::Json => body::json_strings(&body, &mut type_errors)?,
        Format::Form => body::form_pairs(&body)?.into_iter().collect(),
    };
    let form = match raw_form(fields).validate() {
        Ok(form) if type_errors.is_empty() => form,
        Ok(_) => return Err(ApiError::validation(type_errors)),
        Err(mut errors) => {
            // A field of the wrong JSON type is reported as such, not as
            // missing.
            errors.extend(type_errors);
            return Err(ApiError::validation(errors));
        }
    };
    let identity = IdentityKey::email(&form.email).map_err(|_| {
        ApiError::validation(BTreeMap::from([(
            "email".to_string(),
            "must be a valid email address".to_string(),
        )]))
    })?;
    let (channel_message_id, origin) =
        submission_key(&form.email, form.client_request_id.as_deref());
    let message = InboundMessage {
        channel: Channel::Webform,
        channel_message_id,
        sender: Sender {
            identities: vec![identity],
            name: Some(form.name),
        },
        conversation_id: None,
        thread: None,
        subject: Some(form.subject),
        body: form.message,
        attachments: 0,
        category: form.category,
        priority: form.priority,
        received_at: Utc::now(),
        automated: None,
    };
    let claim = NewClaim::new(&state.links);
    // The per-address limit is taken in the submission's own commit: a
    // retry of a stored submission takes no hit, a limited one stores
    // nothing.
    let gate = Gate::for_value(
        limits::WEBFORM_EMAIL,
        &form.email,
        Limit::per_hour(state.settings.submissions_per_email_per_hour),
    );
    let outcome = match state
        .intake
        .receive_claimed(&message, &claim, gate.as_ref(), origin, &correlation.0)
        .await
    {
        Err(IntakeError::Limited { retry_after }) => {
            tracing::info!(email = %mask_email(&form.email), "web form: address over its hourly limit");
            return Err(ApiError::RateLimited {
                retry_after: retry_after.as_secs().max(1),
            });
        }
        other => other?,
    };
    tracing::info!(email = %mask_email(&form.email), ticket_id = %outcome.ticket_id, "web form submission taken in");
    Ok((
        StatusCode::ACCEPTED,
        Json(Accepted {
            ticket_id: outcome.ticket_id,
            status_url: format!("/ticket/{}", outcome.ticket_id),
            status_token: state.tokens.status_token(outcome.ticket_id),
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_request_id_from_the_same_address_is_one_submission() {
        let a = submission_key("ada@example.com", Some("r-1"));
        assert_eq!(a, submission_key("ada@example.com", Some("r-1")));
        assert_eq!(a.1, KeyOrigin::Client);
        assert_ne!(a.0, submission_key("bob@example.com", Some("r-1")).0);
        let fresh = submission_key("ada@example.com", None);
        assert_eq!(fresh.1, KeyOrigin::Fresh);
        assert_ne!(fresh.0, submission_key("ada@example.com", None).0);
    }
}
