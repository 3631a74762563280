//! The audit trail: a ticket's stored events up to a moment (a time, a
//! global position, or both), the state they fold into then, and whether
//! their hash chain holds, exactly as `casebook replay ticket --as-of`
//! answers (both call `casebook_replay::ticket_at`).
//!
//! Auditors and supervisors read any ticket's trail; agents, analysts and
//! customers are refused (`FORBIDDEN`). An auditor sees emails and phone
//! numbers masked, in payloads and state alike, unless they hold the
//! `auditor_pii` permission. Every query is itself recorded, before it is
//! answered, as an `AuditTrailViewed` event (who, which ticket, which
//! moment, whether unmasked) on the ticket's `audit_trail` stream.
//!
//! `payload` is the event as stored (the bytes its hash covers); `state`
//! is folded from the events read through the upcasters, as every reader
//! of the store does.

use async_graphql::{Context, Enum, Json, Object, SimpleObject, ID};
use casebook_commands::trail::{record_view, TrailView};
use casebook_domain::{ActorKind, EventEnvelope};
use casebook_replay::history::{ticket_at, AsOf, HistoryError};
use casebook_replay::mask_identifiers;
use chrono::{DateTime, Utc};

use super::context::{bad_input, coded, forbidden, internal, uuid_arg, viewer};
use super::mutations::Correlation;
use crate::auth::Role;
use crate::state::AppState;
use crate::users::Permission;

#[derive(Default)]
pub struct AuditQuery;

/// Who caused an event.
#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum EventActorKind {
    Customer,
    Ai,
    Agent,
    System,
}

impl From<ActorKind> for EventActorKind {
    fn from(k: ActorKind) -> Self {
        match k {
            ActorKind::Customer => EventActorKind::Customer,
            ActorKind::Ai => EventActorKind::Ai,
            ActorKind::Agent => EventActorKind::Agent,
            ActorKind::System => EventActorKind::System,
        }
    }
}

#[derive(SimpleObject, Clone, Debug)]
pub struct EventActor {
    pub kind: EventActorKind,
    /// A customer's id, a staff member's sub, or a component's name.
    pub id: String,
}

/// One stored event of the trail.
#[derive(SimpleObject, Clone, Debug)]
pub struct AuditEvent {
    /// The event's place in the whole log.
    pub position: i64,
    /// Its place in the ticket's stream (1, 2, 3…).
    pub sequence: i64,
    pub event_id: ID,
    pub event_type: String,
    /// The version it was stored as (older ones are upcast when read).
    pub event_version: String,
    pub occurred_at: DateTime<Utc>,
    pub actor: EventActor,
    /// The payload as stored (identifiers masked for an auditor without
    /// `auditor_pii`).
    pub payload: Json<serde_json::Value>,
    /// The chain hash stored with it.
    pub hash: String,
}

/// A ticket as it stood at a moment.
#[derive(SimpleObject, Clone, Debug)]
pub struct AuditTrail {
    pub ticket_id: ID,
    pub as_of: Option<DateTime<Utc>>,
    pub as_of_position: Option<i64>,
    pub events: Vec<AuditEvent>,
    /// The ticket then: status, assignee, handler, messages, drafts,
    /// approvals, escalations, SLA (as `casebook replay ticket --json`'s
    /// `state`).
    pub state: Json<serde_json::Value>,
    /// Whether every event shown carries the hash recomputed from its
    /// content and its predecessor's, with no sequence missing.
    pub chain_valid: bool,
    /// Whether emails and phone numbers are shown masked.
    pub masked: bool,
}

fn event_of(e: EventEnvelope, masked: bool) -> AuditEvent {
    let mut payload = e.payload;
    let mut actor_id = serde_json::Value::String(e.actor.id);
    if masked {
        mask_identifiers(&mut payload);
        mask_identifiers(&mut actor_id);
    }
    AuditEvent {
        position: e.position,
        sequence: e.sequence,
        event_id: ID(e.event_id.to_string()),
        event_type: e.event_type,
        event_version: e.event_version,
        occurred_at: e.occurred_at,
        actor: EventActor {
            kind: e.actor.kind.into(),
            id: match actor_id {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            },
        },
        payload: Json(payload),
        hash: e.hash,
    }
}

#[Object]
impl AuditQuery {
    /// A ticket's events up to `asOf` (a time) and/or `asOfPosition` (a
    /// global position), all of them without either, with its state then
    /// and whether the chain holds. Auditors and supervisors only; every
    /// query is recorded. Null for a ticket with no event by then.
    #[graphql(complexity = "50 + child_complexity")]
    async fn audit_trail(
        &self,
        ctx: &Context<'_>,
        ticket_id: ID,
        as_of: Option<DateTime<Utc>>,
        as_of_position: Option<i64>,
    ) -> async_graphql::Result<Option<AuditTrail>> {
        let v = viewer(ctx)?;
        if !matches!(v.role, Role::Auditor | Role::Supervisor) {
            return Err(forbidden("read audit trails"));
        }
        let ticket = uuid_arg(&ticket_id, "ticketId")?;
        if as_of_position.is_some_and(|p| p < 0) {
            return Err(bad_input("asOfPosition must be 0 or more"));
        }
        let masked = v.role == Role::Auditor && !v.has_permission(Permission::AuditorPii);
        let app = ctx.data::<AppState>()?;
        let moment = AsOf {
            time: as_of,
            position: as_of_position,
        };
        let found = match ticket_at(&app.pool, &ticket.to_string(), moment).await {
            Ok(h) => Some(h),
            Err(HistoryError::NotFound(_)) => None,
            Err(HistoryError::TooLong) => {
                return Err(coded(HistoryError::TooLong.to_string(), "TRAIL_TOO_LONG"))
            }
            Err(e) => return Err(internal(e)),
        };
        // Recorded before it is answered: no record, no answer.
        let correlation = ctx
            .data::<Correlation>()
            .map(|c| c.0.clone())
            .unwrap_or_default();
        record_view(
            &app.store,
            &TrailView {
                ticket_id: ticket,
                viewer: &v.sub,
                role: v.role.as_str(),
                as_of,
                as_of_position,
                events_shown: found.as_ref().map_or(0, |h| h.events.len()),
                pii_unmasked: !masked,
            },
            &correlation,
        )
        .await
        .map_err(internal)?;
        let Some(history) = found else {
            return Ok(None);
        };
        let mut state = serde_json::to_value(&history.state).map_err(internal)?;
        if masked {
            mask_identifiers(&mut state);
        }
        Ok(Some(AuditTrail {
            ticket_id: ID(ticket.to_string()),
            as_of,
            as_of_position,
            events: history
                .events
                .into_iter()
                .map(|e| event_of(e, masked))
                .collect(),
            state: Json(state),
            chain_valid: history.chain_valid,
            masked,
        }))
    }
}
