//! Kafka plumbing shared by the relay and the workers: client settings,
//! topic creation (the broker may not auto-create), readiness.

use std::time::Duration;

use casebook_domain::topics::Topics;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;
use rdkafka::types::RDKafkaErrorCode;

#[derive(Debug, Clone)]
pub struct KafkaSettings {
    pub brokers: String,
    pub topics: Topics,
    /// Partitions for topics this deployment creates.
    pub partitions: i32,
    pub replication: i32,
}

impl KafkaSettings {
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("socket.timeout.ms", "10000")
            .set("socket.keepalive.enable", "true")
            .set("reconnect.backoff.ms", "100")
            .set("reconnect.backoff.max.ms", "2000")
            .set("log_level", "3");
        config
    }

    /// An idempotent producer with `acks=all`: retries inside librdkafka
    /// never duplicate or reorder a partition's messages.
    pub fn producer(&self) -> Result<FutureProducer, KafkaError> {
        self.client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("max.in.flight.requests.per.connection", "5")
            .set("linger.ms", "2")
            .set("batch.num.messages", "1000")
            .set("message.timeout.ms", "15000")
            .set("request.timeout.ms", "5000")
            .set("queue.buffering.max.messages", "200000")
            .create()
    }

    /// Creates every topic of the deployment that does not exist yet.
    pub async fn ensure_topics(&self) -> Result<(), KafkaError> {
        ensure_topics(self, &self.topics.all()).await
    }
}

/// How long topics keep messages: a year, as the event store's hot tables.
pub const RETENTION_MS: &str = "31536000000";

/// Creates the named topics with 365-day retention, treating "already
/// exists" as success. A broker that refuses the retention setting gets the
/// topic without it.
pub async fn ensure_topics(settings: &KafkaSettings, names: &[String]) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = settings.client_config().create()?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let create = |names: Vec<String>, with_retention: bool| {
        let admin = &admin;
        let options = &options;
        async move {
            let new_topics: Vec<NewTopic<'_>> = names
                .iter()
                .map(|name| {
                    let topic = NewTopic::new(
                        name,
                        settings.partitions,
                        TopicReplication::Fixed(settings.replication),
                    );
                    if with_retention {
                        topic.set("retention.ms", RETENTION_MS)
                    } else {
                        topic
                    }
                })
                .collect();
            admin.create_topics(&new_topics, options).await
        }
    };
    let mut refused_config = Vec::new();
    for result in create(names.to_vec(), true).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((
                topic,
                RDKafkaErrorCode::InvalidConfig | RDKafkaErrorCode::UnsupportedVersion,
            )) => refused_config.push(topic),
            Err((topic, code)) => {
                return Err(KafkaError::AdminOp(code)).inspect_err(|_| {
                    tracing::error!(topic, error = %code, "could not create topic");
                })
            }
        }
    }
    if refused_config.is_empty() {
        return Ok(());
    }
    tracing::warn!(
        topics = refused_config.len(),
        "the broker refused retention.ms: topics created with its default retention"
    );
    for result in create(refused_config, false).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaError::AdminOp(code)).inspect_err(|_| {
                    tracing::error!(topic, error = %code, "could not create topic");
                })
            }
        }
    }
    Ok(())
}

/// Deletes the named topics (tests clean up their own prefix).
pub async fn delete_topics(settings: &KafkaSettings, names: &[String]) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = settings.client_config().create()?;
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    admin.delete_topics(&refs, &options).await?;
    Ok(())
}
