//! Twilio's WhatsApp webhooks: inbound messages and delivery status
//! callbacks, both signed with `X-Twilio-Signature`.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{OriginalUri, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use casebook_commands::{InboundMessage, Sender};
use casebook_domain::conversation::whatsapp_conversation_id;
use casebook_domain::identity::IdentityKey;
use casebook_domain::masking::mask_phone;
use casebook_domain::sanitize::{multi_line, single_line};
use casebook_domain::ticket::DeliveryStatus;
use casebook_domain::{Category, Channel, Priority};
use chrono::Utc;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use subtle::ConstantTimeEq;

use crate::body;
use crate::error::ApiError;
use crate::observe::CorrelationId;
use crate::state::AppState;

/// Longest WhatsApp body kept, in characters (WhatsApp's own limit is 4096).
pub const WHATSAPP_BODY_MAX: usize = 5000;

/// Twilio's request signature: HMAC-SHA1 over the full URL followed by every
/// POST parameter's name and value, sorted by name, keyed with the auth
/// token, base64-encoded.
pub fn twilio_signature(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    let mut mac =
        Hmac::<Sha1>::new_from_slice(auth_token.as_bytes()).expect("HMAC takes any key length");
    mac.update(url.as_bytes());
    for (name, value) in sorted {
        mac.update(name.as_bytes());
        mac.update(value.as_bytes());
    }
    STANDARD.encode(mac.finalize().into_bytes())
}

/// Parses the form and checks its signature; refuses before anything else
/// is looked at.
fn verified_params(
    state: &AppState,
    uri: &OriginalUri,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Vec<(String, String)>, ApiError> {
    let body = body::bytes(body)?;
    let Some(token) = state.settings.twilio_auth_token.as_deref() else {
        return Err(ApiError::Forbidden(
            "Twilio signature cannot be checked: TWILIO_AUTH_TOKEN is not set",
        ));
    };
    let given = headers
        .get("x-twilio-signature")
        .and_then(|v| v.to_str().ok())
        .ok_or(ApiError::Forbidden("missing X-Twilio-Signature"))?;
    let params = body::form_pairs(&body)?;
    let path_and_query = uri.0.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let url = format!(
        "{}{}",
        state.settings.public_url.trim_end_matches('/'),
        path_and_query
    );
    let expected = twilio_signature(token, &url, &params);
    if !bool::from(expected.as_bytes().ct_eq(given.as_bytes())) {
        return Err(ApiError::Forbidden("X-Twilio-Signature does not match"));
    }
    Ok(params)
}

fn twiml_ok() -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/xml")],
        "<Response/>",
    )
        .into_response()
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

pub async fn inbound(
    State(state): State<AppState>,
    Extension(correlation): Extension<CorrelationId>,
    uri: OriginalUri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let params = verified_params(&state, &uri, &headers, body)?;
    let mut errors = BTreeMap::new();
    let sid = param(&params, "MessageSid")
        .unwrap_or("")
        .trim()
        .to_string();
    if sid.is_empty() || sid.len() > 64 || !sid.chars().all(|c| c.is_ascii_alphanumeric()) {
        errors.insert("MessageSid".into(), "must be a Twilio message SID".into());
    }
    let from = IdentityKey::whatsapp(param(&params, "From").unwrap_or(""));
    if from.is_err() {
        errors.insert("From".into(), "must be whatsapp:+<E.164 number>".into());
    }
    let media = match param(&params, "NumMedia").map(str::trim) {
        None | Some("") => 0,
        Some(n) => n.parse::<u32>().unwrap_or_else(|_| {
            errors.insert("NumMedia".into(), "must be a whole number".into());
            0
        }),
    };
    let text: String = multi_line(param(&params, "Body").unwrap_or(""))
        .chars()
        .take(WHATSAPP_BODY_MAX)
        .collect();
    if text.is_empty() && media == 0 {
        errors.insert("Body".into(), "must not be empty without media".into());
    }
    let from = match from {
        Ok(from) if errors.is_empty() => from,
        _ => return Err(ApiError::validation(errors)),
    };
    let phone = IdentityKey::phone(&from.value).expect("a WhatsApp id is an E.164 number");
    let name = param(&params, "ProfileName")
        .map(single_line)
        .map(|n| n.chars().take(100).collect::<String>())
        .filter(|n| !n.is_empty());
    let message = InboundMessage {
        channel: Channel::Whatsapp,
        channel_message_id: sid,
        conversation_id: Some(whatsapp_conversation_id(&from.value)),
        thread: None,
        sender: Sender {
            identities: vec![from.clone(), phone],
            name,
        },
        subject: None,
        body: text,
        attachments: media,
        category: Category::General,
        priority: Priority::Medium,
        received_at: Utc::now(),
        automated: None,
    };
    let outcome = state.intake.receive(&message, &correlation.0).await?;
    tracing::info!(from = %mask_phone(&from.value), ticket_id = %outcome.ticket_id, duplicate = outcome.duplicate,
        "WhatsApp message taken in");
    Ok(twiml_ok())
}

pub async fn status(
    State(state): State<AppState>,
    Extension(correlation): Extension<CorrelationId>,
    uri: OriginalUri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let params = verified_params(&state, &uri, &headers, body)?;
    let sid = param(&params, "MessageSid").unwrap_or("").trim();
    let raw_status = param(&params, "MessageStatus").unwrap_or("").trim();
    let mut errors = BTreeMap::new();
    if sid.is_empty() {
        errors.insert("MessageSid".into(), "is required".into());
    } else if sid.len() > 64 || !sid.chars().all(|c| c.is_ascii_alphanumeric()) {
        errors.insert("MessageSid".into(), "must be a Twilio message SID".into());
    }
    if raw_status.is_empty() {
        errors.insert("MessageStatus".into(), "is required".into());
    } else if raw_status.len() > 32 {
        errors.insert(
            "MessageStatus".into(),
            "must be a Twilio message status".into(),
        );
    }
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    let Ok(status) = raw_status.parse::<DeliveryStatus>() else {
        // Statuses of inbound messages (receiving, received) and any Twilio
        // adds later: nothing to record, and nothing for Twilio to retry.
        tracing::info!(status = raw_status, "status callback ignored");
        return Ok(twiml_ok());
    };
    // Twilio error codes are five digits; anything else is not kept.
    let error = param(&params, "ErrorCode")
        .map(str::trim)
        .filter(|c| !c.is_empty() && c.len() <= 10 && c.chars().all(|ch| ch.is_ascii_digit()))
        .map(|code| format!("twilio error {code}"));
    match state
        .intake
        .record_delivery_status(Channel::Whatsapp, sid, status, error, &correlation.0)
        .await?
    {
        Some(ticket_id) => {
            tracing::info!(%ticket_id, status = status.as_str(), "delivery status recorded")
        }
        None => tracing::warn!(
            status = status.as_str(),
            "status callback for a message we did not send; ignored"
        ),
    }
    Ok(twiml_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_twilios_documented_example() {
        // The example from Twilio's "Webhooks security" documentation.
        let params = vec![
            ("CallSid".to_string(), "CA1234567890ABCDE".to_string()),
            ("Caller".to_string(), "+12349013030".to_string()),
            ("Digits".to_string(), "1234".to_string()),
            ("From".to_string(), "+12349013030".to_string()),
            ("To".to_string(), "+18005551212".to_string()),
        ];
        assert_eq!(
            twilio_signature(
                "12345",
                "https://mycompany.com/myapp.php?foo=1&bar=2",
                &params
            ),
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
        );
    }
}
