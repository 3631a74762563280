//! `GET /confirm/{token}`: the one-time link of a web-form acknowledgement.
//! Following it proves the submitter reads that mailbox: the claim joins
//! the address's proven identity, and only from then on does the
//! customer's history flow into that ticket.

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::{Extension, Json};
use casebook_commands::claims::{self, ConfirmError};
use casebook_domain::formatting::ticket_reference;

use crate::error::ApiError;
use crate::observe::CorrelationId;
use crate::state::AppState;

pub async fn confirm(
    State(state): State<AppState>,
    Extension(correlation): Extension<CorrelationId>,
    Path(token): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let confirmed = claims::confirm(&state.store, &token, &correlation.0)
        .await
        .map_err(|e| match e {
            ConfirmError::NotFound => ApiError::NotFound("no such confirmation link"),
            ConfirmError::Used => {
                ApiError::Conflict("this confirmation link was already used".into())
            }
            ConfirmError::Expired => ApiError::Gone("this confirmation link has expired"),
            ConfirmError::Store(e) => e.into(),
        })?;
    let reference = ticket_reference(confirmed.ticket_id);
    let wants_html = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"));
    if wants_html {
        return Ok((
            StatusCode::OK,
            Html(format!(
                "<!doctype html><html><head><meta charset=\"utf-8\"><title>Email confirmed</title></head>\
                 <body><h1>Thank you</h1><p>Your email address is confirmed for support request {reference}.</p></body></html>"
            )),
        )
            .into_response());
    }
    Ok((
        StatusCode::OK,
        Json(serde_json::json!({
            "status": "confirmed",
            "ticket_id": confirmed.ticket_id,
            "reference": reference,
        })),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use casebook_commands::claims::LinkKeys;
    use uuid::Uuid;

    use crate::auth::TokenKeys;

    #[test]
    fn the_mailed_status_link_is_the_one_the_api_hands_out() {
        for id in [Uuid::from_u128(1), Uuid::new_v4()] {
            assert_eq!(
                LinkKeys::new("a-secret").status_token(id),
                TokenKeys::new("a-secret").status_token(id)
            );
        }
    }
}
