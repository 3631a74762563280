//! Bounded request bodies, decoded by content type.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{header, HeaderMap, StatusCode};

use crate::error::ApiError;

/// The largest body any route accepts.
pub const BODY_LIMIT: usize = 64 * 1024;

/// The body, or the JSON error for one that is too large or unreadable.
pub fn bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge { limit: BODY_LIMIT }
        } else {
            ApiError::BadRequest(format!("request body could not be read: {rejection}"))
        }
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Form,
}

pub fn format(headers: &HeaderMap) -> Result<Format, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let essence = content_type.split(';').next().unwrap_or("").trim();
    match essence {
        "application/json" => Ok(Format::Json),
        "application/x-www-form-urlencoded" => Ok(Format::Form),
        "" => Err(ApiError::UnsupportedMediaType(
            "missing content type: send application/json or application/x-www-form-urlencoded".into(),
        )),
        other => Err(ApiError::UnsupportedMediaType(format!(
            "unsupported content type {other:?}: send application/json or application/x-www-form-urlencoded"
        ))),
    }
}

/// Form fields as (name, value) pairs, in order.
pub fn form_pairs(body: &[u8]) -> Result<Vec<(String, String)>, ApiError> {
    serde_urlencoded::from_bytes(body)
        .map_err(|e| ApiError::BadRequest(format!("body is not a valid form: {e}")))
}

/// A JSON object's string fields. Fields of another type are reported in
/// `errors`; `null` counts as absent.
pub fn json_strings(
    body: &[u8],
    errors: &mut BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("body is not valid JSON: {e}")))?;
    let serde_json::Value::Object(map) = value else {
        return Err(ApiError::BadRequest("body must be a JSON object".into()));
    };
    let mut out = BTreeMap::new();
    for (key, value) in map {
        match value {
            serde_json::Value::String(s) => {
                out.insert(key, s);
            }
            serde_json::Value::Null => {}
            _ => {
                errors.insert(key, "must be a string".into());
            }
        }
    }
    Ok(out)
}
