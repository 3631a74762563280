//! One error type for every route, rendered as
//! `{"error": "<snake_case_code>", "message": "...", "fields": {...}?}`.

use std::collections::BTreeMap;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use casebook_commands::{IntakeError, StoreError};
use serde::Serialize;

use crate::session::SessionError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    NotFound(&'static str),
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{message}")]
    Validation {
        message: String,
        fields: BTreeMap<String, String>,
    },
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{0}")]
    InvalidToken(&'static str),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Upstream(String),
    #[error("internal error")]
    Internal(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Gone(&'static str),
    #[error("too many requests; try again in {retry_after} s")]
    RateLimited { retry_after: u64 },
    /// A bearer token refused by its session: 401 with the session's code
    /// (`unauthorized`, `session_expired`, `user_disabled`).
    #[error("{0}")]
    Session(SessionError),
}

#[derive(Serialize)]
struct Body<'a> {
    error: &'a str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    fields: Option<&'a BTreeMap<String, String>>,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Validation { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Forbidden(_) | ApiError::InvalidToken(_) => StatusCode::FORBIDDEN,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Gone(_) => StatusCode::GONE,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Session(_) => StatusCode::UNAUTHORIZED,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::NotFound(_) => "not_found",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::Validation { .. } => "validation_failed",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::InvalidToken(_) => "invalid_token",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Upstream(_) => "upstream_error",
            ApiError::Internal(_) => "internal_error",
            ApiError::Conflict(_) => "conflict",
            ApiError::Gone(_) => "gone",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::Session(e) => e.code(),
        }
    }

    pub fn validation(fields: BTreeMap<String, String>) -> Self {
        let names: Vec<&str> = fields.keys().map(String::as_str).collect();
        ApiError::Validation {
            message: format!("invalid fields: {}", names.join(", ")),
            fields,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            ApiError::Internal(detail) => tracing::error!(error = %detail, "request failed"),
            ApiError::Unavailable(detail) | ApiError::Upstream(detail) => {
                tracing::warn!(error = %detail, status = status.as_u16(), "request not served")
            }
            _ => tracing::info!(
                error = self.code(),
                status = status.as_u16(),
                "request refused"
            ),
        }
        let body = Body {
            error: self.code(),
            message: self.to_string(),
            fields: match &self {
                ApiError::Validation { fields, .. } => Some(fields),
                _ => None,
            },
        };
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        if let ApiError::RateLimited { retry_after } = &self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(detail) => {
                ApiError::Unavailable(format!("event store unavailable: {detail}"))
            }
            StoreError::Conflict => {
                ApiError::Unavailable("too many concurrent changes; try again".into())
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<IntakeError> for ApiError {
    fn from(e: IntakeError) -> Self {
        match e {
            IntakeError::Rejected(reason) => ApiError::Validation {
                message: reason.clone(),
                fields: BTreeMap::from([("message".to_string(), reason)]),
            },
            IntakeError::Conflict(reason) => ApiError::Conflict(reason),
            IntakeError::Limited { retry_after } => ApiError::RateLimited {
                retry_after: retry_after.as_secs().max(1),
            },
            IntakeError::Store(e) => e.into(),
        }
    }
}

impl From<SessionError> for ApiError {
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::Store(e) => {
                ApiError::Unavailable(format!("sessions cannot be checked: {e}"))
            }
            other => ApiError::Session(other),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::from(e).into()
    }
}
