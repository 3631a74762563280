//! Live updates over graphql-transport-ws: a ticket's events as they are
//! projected, and changes to the queues. Fed by the tickets projector's
//! `NOTIFY` after each commit (see `casebook_projections::live`): one
//! listener per process reads each announced event once and fans it out.

use std::sync::Arc;
use std::time::Duration;

use async_graphql::{Context, Json, Object, Subscription, ID};
use casebook_domain::EventEnvelope;
use casebook_projections::live;
use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt};
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::{broadcast, OnceCell, Semaphore};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::context::{coded, internal, require_staff, uuid_arg, viewer};
use super::loaders::loaders;
use super::tickets::Ticket;

/// Events a slow subscriber may fall behind by before it skips some.
const BACKLOG: usize = 4096;
/// How often an open subscription checks its session again: a revoked,
/// disabled or idle-expired session ends its subscriptions within this.
const SESSION_RECHECK: Duration = Duration::from_secs(60);

/// Subscriptions one connection may hold at once: each costs a broadcast
/// receiver and a filter of every projected event, so a client may not
/// open them without end.
pub const MAX_PER_CONNECTION: usize = 100;

/// A connection's subscription slots.
#[derive(Clone)]
pub struct Slots(Arc<Semaphore>);

impl Default for Slots {
    fn default() -> Self {
        Self(Arc::new(Semaphore::new(MAX_PER_CONNECTION)))
    }
}

/// Takes one of the connection's slots for as long as `stream` lives, or
/// refuses with `TOO_MANY_SUBSCRIPTIONS`.
fn in_a_slot<S: Stream>(
    ctx: &Context<'_>,
    stream: S,
) -> async_graphql::Result<impl Stream<Item = S::Item>> {
    let permit = match ctx.data::<Slots>() {
        Ok(Slots(slots)) => Some(slots.clone().try_acquire_owned().map_err(|_| {
            coded(
                format!("at most {MAX_PER_CONNECTION} subscriptions per connection"),
                "TOO_MANY_SUBSCRIPTIONS",
            )
        })?),
        Err(_) => None,
    };
    Ok(stream.map(move |item| {
        let _held = &permit;
        item
    }))
}

/// The bearer token a subscription connection was opened with.
#[derive(Clone)]
pub struct SessionToken(pub String);

/// Ends `stream` once the connection's session is no longer valid.
fn while_signed_in<S: Stream>(ctx: &Context<'_>, stream: S) -> impl Stream<Item = S::Item> {
    let app = ctx.data::<crate::state::AppState>().ok().cloned();
    let token = ctx.data::<SessionToken>().ok().cloned();
    let revoked = async move {
        match (app, token) {
            (Some(app), Some(SessionToken(token))) => loop {
                tokio::time::sleep(SESSION_RECHECK).await;
                if let Err(e) = app.sessions.authenticate(&token).await {
                    tracing::info!(
                        code = e.code(),
                        "subscription ended: the session is no longer valid"
                    );
                    break;
                }
            },
            // Not a connection with a session (the schema run directly).
            _ => futures::future::pending::<()>().await,
        }
    };
    stream.take_until(Box::pin(revoked))
}

/// The process's one listener and its fan-out.
pub struct LiveHub {
    pool: PgPool,
    sender: broadcast::Sender<Arc<EventEnvelope>>,
    started: OnceCell<()>,
    shutdown: CancellationToken,
}

impl LiveHub {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            sender: broadcast::channel(BACKLOG).0,
            started: OnceCell::new(),
            shutdown: CancellationToken::new(),
        }
    }

    /// A receiver of every announced event from now on; the listener
    /// starts with the first subscriber.
    pub async fn subscribe(
        self: &Arc<Self>,
    ) -> Result<broadcast::Receiver<Arc<EventEnvelope>>, sqlx::Error> {
        let receiver = self.sender.subscribe();
        self.started
            .get_or_try_init(|| async {
                let mut listener = PgListener::connect_with(&self.pool).await?;
                listener.listen(live::CHANNEL).await?;
                tokio::spawn(Arc::clone(self).listen(listener));
                Ok::<_, sqlx::Error>(())
            })
            .await?;
        Ok(receiver)
    }

    /// Ends every subscription (the server is stopping).
    pub fn close(&self) {
        self.shutdown.cancel();
    }

    async fn listen(self: Arc<Self>, mut listener: PgListener) {
        loop {
            let notification = tokio::select! {
                n = listener.try_recv() => n,
                _ = self.shutdown.cancelled() => break,
            };
            let payload = match notification {
                Ok(Some(n)) => n.payload().to_string(),
                Ok(None) => {
                    // The connection dropped; the next receive reconnects.
                    // What was announced meanwhile is not replayed:
                    // subscribers re-read state on reconnect.
                    tracing::warn!(
                        "live updates: listener reconnecting; announcements may have been missed"
                    );
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "live updates: listener failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = self.shutdown.cancelled() => break,
                    }
                }
            };
            if self.sender.receiver_count() == 0 {
                continue;
            }
            let positions = live::parse_positions(&payload);
            match live::events_at(&self.pool, &positions).await {
                Ok(events) => {
                    for e in events {
                        let _ = self.sender.send(Arc::new(e));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "live updates: announced events unreadable"),
            }
        }
        tracing::debug!("live updates: listener stopped");
    }
}

/// Events a customer may follow on their own ticket, and the payload
/// fields they may see of each (the rest is the desk's).
fn customer_view(e: &EventEnvelope) -> Option<serde_json::Value> {
    let keep: &[&str] = match e.event_type.as_str() {
        "CustomerMessageReceived" => &["message_id", "body", "received_at"],
        "ResponseSent" => &["response_id", "body", "sent_at"],
        "TicketResolved" | "TicketReopened" | "TicketClosed" => &[],
        _ => return None,
    };
    let mut out = serde_json::Map::new();
    if let serde_json::Value::Object(fields) = &e.payload {
        for k in keep {
            if let Some(v) = fields.get(*k) {
                out.insert(k.to_string(), v.clone());
            }
        }
    }
    Some(serde_json::Value::Object(out))
}

/// Events that change what a queue shows.
fn changes_queues(event_type: &str) -> bool {
    matches!(
        event_type,
        "TicketOpened"
            | "TicketEscalated"
            | "EscalationResolved"
            | "TicketAssigned"
            | "TicketUnassigned"
            | "ApprovalRequested"
            | "ResponseApproved"
            | "ResponseRejected"
            | "TicketResolved"
            | "TicketReopened"
            | "TicketClosed"
            | "TicketHandedBackToAi"
            | "CustomerMessageReceived"
            | "SlaBreached"
    )
}

/// One event of a ticket, as it was stored.
#[derive(Clone, Debug)]
pub struct TicketEventItem {
    event: Arc<EventEnvelope>,
    payload: serde_json::Value,
}

#[Object]
impl TicketEventItem {
    async fn event_id(&self) -> ID {
        ID(self.event.event_id.to_string())
    }

    async fn event_type(&self) -> &str {
        &self.event.event_type
    }

    async fn occurred_at(&self) -> DateTime<Utc> {
        self.event.occurred_at
    }

    /// The event's place in the whole log.
    async fn position(&self) -> i64 {
        self.event.position
    }

    async fn sequence(&self) -> i64 {
        self.event.sequence
    }

    async fn payload(&self) -> Json<serde_json::Value> {
        Json(self.payload.clone())
    }
}

/// Something changed in the queues: which ticket, and why.
#[derive(Clone, Debug)]
pub struct QueueChange {
    event: Arc<EventEnvelope>,
    ticket_id: Uuid,
}

#[Object]
impl QueueChange {
    async fn ticket_id(&self) -> ID {
        ID(self.ticket_id.to_string())
    }

    async fn event_type(&self) -> &str {
        &self.event.event_type
    }

    async fn occurred_at(&self) -> DateTime<Utc> {
        self.event.occurred_at
    }

    async fn position(&self) -> i64 {
        self.event.position
    }

    /// The ticket as the read model has it now.
    async fn ticket(&self, ctx: &Context<'_>) -> async_graphql::Result<Option<Ticket>> {
        let loaders = loaders(ctx)?;
        Ok(loaders
            .tickets
            .load_one(self.ticket_id)
            .await
            .map_err(internal)?
            .map(Ticket::from))
    }
}

#[derive(Default)]
pub struct LiveSubscription;

#[Subscription]
impl LiveSubscription {
    /// Each event of one ticket as soon as the read model has it. A
    /// customer follows only their own ticket, and sees only its messages
    /// and status changes.
    async fn ticket_events(
        &self,
        ctx: &Context<'_>,
        ticket_id: ID,
    ) -> async_graphql::Result<impl Stream<Item = TicketEventItem>> {
        let v = viewer(ctx)?.clone();
        let id = uuid_arg(&ticket_id, "ticketId")?;
        if !v.is_staff() {
            let loaders = loaders(ctx)?;
            let row = loaders.tickets.load_one(id).await.map_err(internal)?;
            if !row.is_some_and(|r| v.may_see_customer(r.customer_id)) {
                return Err(super::context::not_found("no such ticket"));
            }
        }
        let hub = ctx.data::<Arc<LiveHub>>()?;
        let receiver = hub.subscribe().await.map_err(internal)?;
        let key = id.to_string();
        let staff = v.is_staff();
        let live = in_a_slot(ctx, while_signed_in(ctx, events(receiver)))?;
        Ok(live.filter_map(move |e| {
            let item = (e.aggregate_type == "ticket" && e.aggregate_id == key)
                .then(|| {
                    let payload = if staff {
                        Some(e.payload.clone())
                    } else {
                        customer_view(&e)
                    };
                    payload.map(|payload| TicketEventItem { event: e, payload })
                })
                .flatten();
            async move { item }
        }))
    }

    /// Every change to the escalation, approval and assignment queues.
    /// Staff only.
    async fn queue_changed(
        &self,
        ctx: &Context<'_>,
    ) -> async_graphql::Result<impl Stream<Item = QueueChange>> {
        require_staff(ctx, "follow the queues")?;
        let hub = ctx.data::<Arc<LiveHub>>()?;
        let receiver = hub.subscribe().await.map_err(internal)?;
        let live = in_a_slot(ctx, while_signed_in(ctx, events(receiver)))?;
        Ok(live.filter_map(|e| {
            let item = (e.aggregate_type == "ticket" && changes_queues(&e.event_type))
                .then(|| e.aggregate_id.parse().ok())
                .flatten()
                .map(|ticket_id| QueueChange {
                    event: e,
                    ticket_id,
                });
            async move { item }
        }))
    }
}

/// The receiver as a stream that skips what a slow subscriber missed and
/// ends when the hub closes.
fn events(
    receiver: broadcast::Receiver<Arc<EventEnvelope>>,
) -> impl Stream<Item = Arc<EventEnvelope>> {
    futures::stream::unfold(receiver, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(e) => return Some((e, rx)),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(skipped = n, "live updates: a subscriber fell behind");
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn customers_see_messages_not_the_desks_notes() {
        let mut e = EventEnvelope {
            event_id: Uuid::now_v7(),
            position: 1,
            aggregate_type: "ticket".into(),
            aggregate_id: Uuid::now_v7().to_string(),
            sequence: 1,
            event_type: "ResponseDrafted".into(),
            event_version: "1".into(),
            occurred_at: Utc::now(),
            correlation_id: "c".into(),
            causation_id: "c".into(),
            actor: casebook_domain::Actor::system("t"),
            channel: None,
            payload: serde_json::json!({"body": "draft", "confidence": 0.5}),
            hash: String::new(),
        };
        assert!(customer_view(&e).is_none());
        e.event_type = "ResponseSent".into();
        e.payload = serde_json::json!({"body": "hi", "response_id": "r", "model": "x"});
        let seen = customer_view(&e).unwrap();
        assert_eq!(seen["body"], "hi");
        assert!(seen.get("model").is_none());
    }
}
