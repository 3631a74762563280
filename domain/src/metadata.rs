//! What travels with every event besides its payload: correlation and
//! causation ids, the actor and the channel. cqrs-es stores metadata as a
//! string map; this is its typed form.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::envelope::{Actor, ActorKind};
use crate::Channel;

pub const CORRELATION_ID: &str = "correlation_id";
pub const CAUSATION_ID: &str = "causation_id";
pub const ACTOR_KIND: &str = "actor_kind";
pub const ACTOR_ID: &str = "actor_id";
pub const CHANNEL: &str = "channel";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct EventMetadata {
    pub correlation_id: String,
    /// The id of what caused this event: the request, or the event a worker
    /// reacted to.
    pub causation_id: String,
    pub actor: Actor,
    pub channel: Option<Channel>,
}

impl EventMetadata {
    pub fn new(correlation_id: impl Into<String>, actor: Actor) -> Self {
        let correlation_id = correlation_id.into();
        Self {
            causation_id: correlation_id.clone(),
            correlation_id,
            actor,
            channel: None,
        }
    }

    pub fn caused_by(mut self, causation_id: impl Into<String>) -> Self {
        self.causation_id = causation_id.into();
        self
    }

    pub fn on_channel(mut self, channel: Channel) -> Self {
        self.channel = Some(channel);
        self
    }

    pub fn to_map(&self) -> HashMap<String, String> {
        let mut map = HashMap::with_capacity(5);
        map.insert(CORRELATION_ID.into(), self.correlation_id.clone());
        map.insert(CAUSATION_ID.into(), self.causation_id.clone());
        map.insert(ACTOR_KIND.into(), self.actor.kind.as_str().into());
        map.insert(ACTOR_ID.into(), self.actor.id.clone());
        if let Some(channel) = self.channel {
            map.insert(CHANNEL.into(), channel.as_str().into());
        }
        map
    }

    /// Reads metadata back; unknown or missing values fall back to the
    /// defaults rather than failing, so old events stay readable.
    pub fn from_map(map: &HashMap<String, String>) -> Self {
        let get = |k: &str| map.get(k).cloned().unwrap_or_default();
        let kind = map
            .get(ACTOR_KIND)
            .and_then(|k| {
                serde_json::from_value::<ActorKind>(serde_json::Value::String(k.clone())).ok()
            })
            .unwrap_or_default();
        Self {
            correlation_id: get(CORRELATION_ID),
            causation_id: get(CAUSATION_ID),
            actor: Actor::new(kind, get(ACTOR_ID)),
            channel: map.get(CHANNEL).and_then(|c| c.parse().ok()),
        }
    }

    /// Same as [`from_map`](Self::from_map) for metadata read as JSON.
    pub fn from_json(value: &serde_json::Value) -> Self {
        let map: HashMap<String, String> =
            serde_json::from_value(value.clone()).unwrap_or_default();
        Self::from_map(&map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trips_through_the_string_map() {
        let meta = EventMetadata::new("corr-1", Actor::new(ActorKind::Customer, "c-1"))
            .caused_by("req-9")
            .on_channel(Channel::Whatsapp);
        assert_eq!(EventMetadata::from_map(&meta.to_map()), meta);
        let json = serde_json::to_value(meta.to_map()).unwrap();
        assert_eq!(EventMetadata::from_json(&json), meta);
    }

    #[test]
    fn missing_metadata_reads_as_system() {
        let meta = EventMetadata::from_map(&HashMap::new());
        assert_eq!(meta.actor.kind, ActorKind::System);
        assert_eq!(meta.channel, None);
    }
}
