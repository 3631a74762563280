//! `GET /ticket/{id}`: where a ticket stands, for the customer, as JSON
//! (the contract's default) or, for a browser (`Accept: text/html`), as a
//! page; and `POST /ticket/{id}/feedback`: "was this helpful?".
//!
//! Served from the CRM read model; a submission acknowledged moments ago
//! that the projectors have not reached yet is folded straight from the
//! event store, so the answer is never "not found" for an acknowledged
//! ticket. Messages are shown with the ticket's status token or the owning
//! customer's bearer token, never otherwise; feedback is taken on the same
//! terms, and through the public rate limit like every public route.

mod negotiate;
mod page;

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use casebook_commands::feedback::{self, FeedbackError, MAX_COMMENT_CHARS};
use casebook_domain::ticket::transcript;
use casebook_domain::{Ticket, TicketEvent};
use casebook_projections::queries::{self, MessageView, TicketSummary};
use casebook_projections::{begin_scoped, ReadScope};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use self::negotiate::Wanted;
use self::page::FeedbackState;
use crate::auth::Role;
use crate::body::{self, Format};
use crate::error::ApiError;
use crate::observe::CorrelationId;
use crate::session::{self, Caller};
use crate::state::AppState;

/// The longest `?token=` looked at (ours are 32 characters).
const TOKEN_MAX: usize = 128;

#[derive(Debug, Deserialize)]
pub struct StatusQuery {
    token: Option<String>,
    /// `thanks` or `already`, after a feedback form post.
    feedback: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct TicketStatusResponse {
    #[serde(flatten)]
    summary: TicketSummary,
    #[serde(skip_serializing_if = "Option::is_none")]
    messages: Option<Vec<MessageView>>,
}

const NOT_FOUND: ApiError = ApiError::NotFound("no such ticket");

/// An error in the representation the client asked for, with the page's
/// headers either way.
fn refuse(wanted: Wanted, error: ApiError) -> Response {
    match wanted {
        Wanted::Json => {
            let mut response = error.into_response();
            page::private(&mut response);
            response
        }
        Wanted::Html => {
            let status = error.status();
            let message = error.to_string();
            // Logged as every refusal is (the JSON body is dropped).
            drop(error.into_response());
            page::error(status, &message)
        }
    }
}

/// The caller: a bearer token checked against its session (idle, revoked,
/// disabled, current role), before anything is looked up, so a bad token is
/// refused the same whether or not the ticket exists.
async fn bearer(state: &AppState, headers: &HeaderMap) -> Result<Option<Caller>, ApiError> {
    match session::bearer(headers) {
        Some(token) => Ok(Some(state.sessions.authenticate(token).await?)),
        None => Ok(None),
    }
}

fn check_token(state: &AppState, ticket_id: Uuid, token: Option<&str>) -> Result<(), ApiError> {
    match token {
        Some(t) if t.len() > TOKEN_MAX || !state.tokens.check_status_token(ticket_id, t) => Err(
            ApiError::InvalidToken("status token does not belong to this ticket"),
        ),
        _ => Ok(()),
    }
}

pub async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<StatusQuery>,
    headers: HeaderMap,
) -> Response {
    let wanted = negotiate::wanted(&headers);
    match status(&state, &id, &query, &headers, wanted).await {
        Ok(response) => response,
        Err(e) => refuse(wanted, e),
    }
}

async fn status(
    state: &AppState,
    id: &str,
    query: &StatusQuery,
    headers: &HeaderMap,
    wanted: Wanted,
) -> Result<Response, ApiError> {
    let ticket_id: Uuid = id.parse().map_err(|_| NOT_FOUND)?;
    let claims = bearer(state, headers).await?;
    check_token(state, ticket_id, query.token.as_deref())?;

    // A signed-in caller reads under row-level security, as themselves.
    let projected = match &claims {
        Some(c) => {
            let mut tx = begin_scoped(&state.pool, &c.scope()).await?;
            let summary = queries::ticket_summary(&mut *tx, ticket_id).await?;
            tx.commit().await?;
            summary
        }
        None => queries::ticket_summary(&state.pool, ticket_id).await?,
    };
    let mut events: Option<Vec<TicketEvent>> = None;
    let summary = match projected {
        Some(summary) => summary,
        None => {
            let stored = state.store.events::<Ticket>(&ticket_id.to_string()).await?;
            let mut ticket = Ticket::default();
            for e in &stored {
                ticket.apply_event(e.clone());
            }
            events = Some(stored);
            match TicketSummary::from_state(&ticket) {
                Some(summary) => summary,
                // Retention moved it to the archive: gone, and said so.
                None if archived(state, ticket_id).await? => {
                    let mut response = (
                        StatusCode::GONE,
                        Json(serde_json::json!({ "status": "archived" })),
                    )
                        .into_response();
                    page::private(&mut response);
                    return Ok(response);
                }
                None => return Err(NOT_FOUND),
            }
        }
    };

    let may_read = match &claims {
        Some(c) if c.role == Role::Customer => {
            if c.customer_id != Some(summary.customer_id) {
                // Another customer's ticket: as good as absent.
                return Err(NOT_FOUND);
            }
            true
        }
        // Staff read conversations through GraphQL, with their role's masking.
        Some(_) | None => query.token.is_some(),
    };
    let messages = if may_read {
        // As the ticket's customer: the owner's bearer token, or the
        // status token, which stands for whoever owns the ticket.
        let mut tx = begin_scoped(&state.pool, &ReadScope::customer(summary.customer_id)).await?;
        let mut messages = queries::ticket_messages(&mut *tx, ticket_id).await?;
        tx.commit().await?;
        if (messages.len() as i32) < summary.messages_count {
            // The messages read model is behind the tickets one.
            let stored = match events {
                Some(e) => e,
                None => state.store.events::<Ticket>(&ticket_id.to_string()).await?,
            };
            messages = transcript(&stored)
                .into_iter()
                .map(|m| MessageView {
                    direction: m.direction.as_str().to_string(),
                    channel: m.channel.as_str().to_string(),
                    body: m.body,
                    at: m.at,
                })
                .collect();
        }
        Some(messages)
    } else {
        None
    };
    match wanted {
        Wanted::Json => {
            let mut response = Json(TicketStatusResponse { summary, messages }).into_response();
            page::private(&mut response);
            Ok(response)
        }
        Wanted::Html => {
            let feedback = match query.feedback.as_deref() {
                Some("thanks") => FeedbackState::Thanks,
                Some("already") => FeedbackState::Given,
                _ if query.token.is_none() || summary.first_response_at.is_none() => {
                    FeedbackState::Hidden
                }
                // The read model may lag: a second answer is refused by
                // the ticket itself and shown as given.
                _ if feedback_given(state, ticket_id).await? => FeedbackState::Given,
                _ => FeedbackState::Open,
            };
            let markup = page::render(&page::Page {
                summary: &summary,
                messages: messages.as_deref(),
                token: query.token.as_deref(),
                feedback,
            });
            Ok(page::respond(StatusCode::OK, markup))
        }
    }
}

/// Whether retention archived the ticket (and no investigation restored it).
async fn archived(state: &AppState, ticket_id: Uuid) -> Result<bool, ApiError> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM archived_tickets WHERE ticket_id = $1 AND restored_at IS NULL)",
    )
    .bind(ticket_id.to_string())
    .fetch_one(&state.pool)
    .await?)
}

async fn feedback_given(state: &AppState, ticket_id: Uuid) -> Result<bool, ApiError> {
    let given: Option<Option<bool>> =
        sqlx::query_scalar("SELECT feedback_helpful FROM crm_tickets WHERE ticket_id = $1")
            .bind(ticket_id)
            .fetch_optional(&state.pool)
            .await?;
    Ok(given.flatten().is_some())
}

/// `{"helpful": bool, "comment"?: string}`, or the page's form
/// (`helpful=yes|no`, `comment`).
struct FeedbackBody {
    helpful: bool,
    comment: Option<String>,
}

fn feedback_body(format: Format, raw: &[u8]) -> Result<FeedbackBody, ApiError> {
    let mut errors = BTreeMap::new();
    let (helpful, comment) = match format {
        Format::Json => {
            let value: serde_json::Value = serde_json::from_slice(raw)
                .map_err(|e| ApiError::BadRequest(format!("body is not valid JSON: {e}")))?;
            let serde_json::Value::Object(map) = value else {
                return Err(ApiError::BadRequest("body must be a JSON object".into()));
            };
            let helpful = match map.get("helpful") {
                Some(serde_json::Value::Bool(b)) => Some(*b),
                Some(_) => {
                    errors.insert("helpful".into(), "must be true or false".into());
                    None
                }
                None => {
                    errors.insert("helpful".into(), "is required".into());
                    None
                }
            };
            let comment = match map.get("comment") {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(_) => {
                    errors.insert("comment".into(), "must be a string".into());
                    None
                }
            };
            (helpful, comment)
        }
        Format::Form => {
            let mut helpful = None;
            let mut comment = None;
            for (name, value) in body::form_pairs(raw)? {
                match name.as_str() {
                    "helpful" => {
                        helpful = match value.as_str() {
                            "yes" | "true" => Some(true),
                            "no" | "false" => Some(false),
                            _ => {
                                errors.insert("helpful".into(), "must be yes or no".into());
                                None
                            }
                        }
                    }
                    "comment" => comment = Some(value),
                    _ => {}
                }
            }
            if helpful.is_none() && !errors.contains_key("helpful") {
                errors.insert("helpful".into(), "is required: yes or no".into());
            }
            (helpful, comment)
        }
    };
    if let Some(c) = &comment {
        if feedback::clean_comment(Some(c)).is_err() {
            errors.insert(
                "comment".into(),
                format!("must be at most {MAX_COMMENT_CHARS} characters"),
            );
        }
    }
    match helpful {
        Some(helpful) if errors.is_empty() => Ok(FeedbackBody { helpful, comment }),
        _ => Err(ApiError::validation(errors)),
    }
}

pub async fn submit_feedback(
    State(state): State<AppState>,
    Extension(correlation): Extension<CorrelationId>,
    Path(id): Path<String>,
    Query(query): Query<StatusQuery>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    // A browser's form post wants a page back; anything else JSON.
    let form = body::format(&headers).ok() == Some(Format::Form);
    let wanted = match (form, negotiate::wanted(&headers)) {
        (true, Wanted::Html) => Wanted::Html,
        _ => Wanted::Json,
    };
    match record_feedback(&state, &correlation, &id, &query, &headers, body).await {
        Ok(ticket_id) => match (wanted, query.token.as_deref()) {
            (Wanted::Html, Some(token)) => {
                see_other(&page::after_feedback(ticket_id, token, "thanks"))
            }
            _ => {
                let mut response = StatusCode::NO_CONTENT.into_response();
                page::private(&mut response);
                response
            }
        },
        Err((Some(ticket_id), ApiError::Conflict(reason)))
            if wanted == Wanted::Html && reason == ALREADY_GIVEN =>
        {
            let token = query.token.as_deref().unwrap_or_default();
            see_other(&page::after_feedback(ticket_id, token, "already"))
        }
        Err((_, e)) => refuse(wanted, e),
    }
}

const ALREADY_GIVEN: &str = "feedback was already given on this ticket";

fn see_other(location: &str) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    page::private(&mut response);
    response
}

async fn record_feedback(
    state: &AppState,
    correlation: &CorrelationId,
    id: &str,
    query: &StatusQuery,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Uuid, (Option<Uuid>, ApiError)> {
    let ticket_id: Uuid = id.parse().map_err(|_| (None, NOT_FOUND))?;
    let fail = |e: ApiError| (Some(ticket_id), e);
    let claims = bearer(state, headers).await.map_err(fail)?;
    check_token(state, ticket_id, query.token.as_deref()).map_err(fail)?;
    let customer = match (&claims, &query.token) {
        (Some(c), _) if c.role == Role::Customer => match c.customer_id {
            Some(id) => Some(id),
            None => {
                return Err(fail(ApiError::Forbidden(
                    "a customer token names its customer",
                )))
            }
        },
        // The token's holder speaks for the ticket's customer.
        (_, Some(_)) => None,
        (Some(_), None) => {
            return Err(fail(ApiError::Forbidden(
                "only the ticket's customer gives feedback",
            )))
        }
        (None, None) => {
            return Err(fail(ApiError::Unauthorized(
                "feedback needs the ticket's status token or the customer's bearer token".into(),
            )))
        }
    };
    let format = body::format(headers).map_err(fail)?;
    let raw = body::bytes(body).map_err(fail)?;
    let input = feedback_body(format, &raw).map_err(fail)?;
    feedback::record(
        &state.store,
        ticket_id,
        customer,
        input.helpful,
        input.comment.as_deref(),
        &correlation.0,
    )
    .await
    .map_err(|e| {
        fail(match e {
            FeedbackError::NotFound => NOT_FOUND,
            FeedbackError::CommentTooLong => ApiError::validation(BTreeMap::from([(
                "comment".to_string(),
                format!("must be at most {MAX_COMMENT_CHARS} characters"),
            )])),
            FeedbackError::NothingToRate => {
                ApiError::Conflict("there is no answer to rate yet".into())
            }
            FeedbackError::AlreadyGiven => ApiError::Conflict(ALREADY_GIVEN.into()),
            FeedbackError::Refused(reason) => ApiError::Conflict(reason),
            FeedbackError::Store(e) => e.into(),
        })
    })?;
    tracing::info!(%ticket_id, helpful = input.helpful, "feedback received");
    Ok(ticket_id)
}
