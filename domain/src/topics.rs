//! Kafka topic names (CONTRACT.md, Kafka). Every name starts with the
//! deployment's prefix (`fte` by default; tests use their own).

use crate::Channel;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn name(&self, suffix: &str) -> String {
        format!("{}.{}", self.prefix, suffix)
    }

    /// Every inbound customer message event, all channels.
    pub fn tickets_incoming(&self) -> String {
        self.name("tickets.incoming")
    }

    /// Every stored event.
    pub fn events(&self) -> String {
        self.name("events")
    }

    pub fn inbound(&self, channel: Channel) -> String {
        self.name(&format!("channels.{}.inbound", channel.as_str()))
    }

    pub fn outbound(&self, channel: Channel) -> String {
        self.name(&format!("channels.{}.outbound", channel.as_str()))
    }

    pub fn escalations(&self) -> String {
        self.name("escalations")
    }

    pub fn metrics(&self) -> String {
        self.name("metrics")
    }

    pub fn dlq(&self) -> String {
        self.name("dlq")
    }

    /// Signed checkpoints of the whole log (key `checkpoint`).
    pub fn audit(&self) -> String {
        self.name("audit")
    }

    /// Every topic of the deployment.
    pub fn all(&self) -> Vec<String> {
        let mut all = vec![
            self.tickets_incoming(),
            self.events(),
            self.escalations(),
            self.metrics(),
            self.dlq(),
            self.audit(),
        ];
        for channel in Channel::ALL {
            all.push(self.inbound(channel));
            all.push(self.outbound(channel));
        }
        all
    }

    /// A consumer group id of this deployment.
    pub fn group(&self, name: &str) -> String {
        format!("{}.{}", self.prefix, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        let t = Topics::new("fte");
        assert_eq!(t.tickets_incoming(), "fte.tickets.incoming");
        assert_eq!(
            t.inbound(Channel::Whatsapp),
            "fte.channels.whatsapp.inbound"
        );
        assert_eq!(t.outbound(Channel::Email), "fte.channels.email.outbound");
        assert_eq!(t.all().len(), 12);
    }
}
