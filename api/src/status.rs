//! `GET /ticket/{id}`: where a ticket stands, for the customer.
//!
//! Served from the CRM read model; a submission acknowledged moments ago
//! that the projectors have not reached yet is folded straight from the
//! event store, so the answer is never "not found" for an acknowledged
//! ticket. Messages are shown with the ticket's status token or the owning
//! customer's bearer token, never otherwise.

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::Json;
use casebook_domain::ticket::transcript;
use casebook_domain::{Ticket, TicketEvent};
use casebook_projections::queries::{self, MessageView, TicketSummary};
use casebook_projections::{begin_scoped, ReadScope};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::auth::Role;
use crate::error::ApiError;
use crate::session;
use crate::state::AppState;

#[derive(Debug, Deserialize)]
pub struct StatusQuery {
    token: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct TicketStatusResponse {
    #[serde(flatten)]
    summary: TicketSummary,
    #[serde(skip_serializing_if = "Option::is_none")]
    messages: Option<Vec<MessageView>>,
}

const NOT_FOUND: ApiError = ApiError::NotFound("no such ticket");

pub async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<StatusQuery>,
    headers: HeaderMap,
) -> Result<Json<TicketStatusResponse>, ApiError> {
    let ticket_id: Uuid = id.parse().map_err(|_| NOT_FOUND)?;

    // Who may read the messages: decided before anything is looked up, so a
    // bad token is refused the same whether or not the ticket exists. A
    // bearer token is checked against its session (idle, revoked, disabled).
    let caller = match session::bearer(&headers) {
        Some(token) => Some(state.sessions.authenticate(token).await?),
        None => None,
    };
    if let Some(token) = &query.token {
        if !state.tokens.check_status_token(ticket_id, token) {
            return Err(ApiError::InvalidToken(
                "status token does not belong to this ticket",
            ));
        }
    }

    // A signed-in caller reads under row-level security, as themselves.
    let projected = match &caller {
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
            TicketSummary::from_state(&ticket).ok_or(NOT_FOUND)?
        }
    };

    let may_read = match &caller {
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
    Ok(Json(TicketStatusResponse { summary, messages }))
}
