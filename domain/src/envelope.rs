//! The message every stored event becomes on Kafka: one JSON object, the same
//! bytes on every topic it is published to.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Channel;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ActorKind {
    Customer,
    Ai,
    Agent,
    #[default]
    System,
}

impl ActorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ActorKind::Customer => "customer",
            ActorKind::Ai => "ai",
            ActorKind::Agent => "agent",
            ActorKind::System => "system",
        }
    }
}

/// Who caused an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Actor {
    pub kind: ActorKind,
    pub id: String,
}

impl Actor {
    pub fn new(kind: ActorKind, id: impl Into<String>) -> Self {
        Self {
            kind,
            id: id.into(),
        }
    }

    pub fn system(component: &str) -> Self {
        Self::new(ActorKind::System, component)
    }
}

/// The published form of a stored event (see CONTRACT.md, Kafka).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventEnvelope {
    pub event_id: Uuid,
    pub position: i64,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub occurred_at: DateTime<Utc>,
    pub correlation_id: String,
    pub causation_id: String,
    pub actor: Actor,
    pub channel: Option<Channel>,
    pub payload: serde_json::Value,
    pub hash: String,
}

/// One row of the `events` table, as every reader of the store sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub event_id: Uuid,
    pub position: i64,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub occurred_at: DateTime<Utc>,
    pub payload: serde_json::Value,
    pub metadata: serde_json::Value,
    pub hash: String,
}

impl From<StoredEvent> for EventEnvelope {
    fn from(e: StoredEvent) -> Self {
        let meta = crate::EventMetadata::from_json(&e.metadata);
        Self {
            event_id: e.event_id,
            position: e.position,
            aggregate_type: e.aggregate_type,
            aggregate_id: e.aggregate_id,
            sequence: e.sequence,
            event_type: e.event_type,
            event_version: e.event_version,
            occurred_at: e.occurred_at,
            correlation_id: meta.correlation_id,
            causation_id: meta.causation_id,
            actor: meta.actor,
            channel: meta.channel,
            payload: e.payload,
            hash: e.hash,
        }
    }
}

impl EventEnvelope {
    /// Decodes the payload as the event type of an aggregate, upcast from
    /// its stored version to the one this build reads (`crate::upcast`).
    pub fn decode<E: serde::de::DeserializeOwned>(&self) -> Result<E, serde_json::Error> {
        let payload = crate::upcast::upcast(
            &self.aggregate_type,
            &self.event_type,
            &self.event_version,
            &self.payload,
        )
        .map_err(<serde_json::Error as serde::de::Error>::custom)?;
        E::deserialize(payload.as_ref())
    }
}
