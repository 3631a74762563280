//! Audit checkpoints in the service: written every `CASEBOOK_CHECKPOINT_SECS`
//! and on `casebook audit checkpoint`, stored in Postgres by
//! `casebook_replay::checkpoint`, then published to `fte.audit` (key
//! `checkpoint`) so that a copy lives outside the database.

use std::time::Duration;

use anyhow::Context;
use casebook_commands::kafka::KafkaSettings;
use casebook_replay::checkpoint::{self, Created};
use ed25519_dalek::SigningKey;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// One retention pass, then its tombstones: one `TicketsPurged` event per
/// archive file, appended through the event store.
pub async fn archive_pass(
    pool: &PgPool,
    dir: &std::path::Path,
    as_of: chrono::DateTime<chrono::Utc>,
    key: &SigningKey,
) -> anyhow::Result<casebook_replay::archive::PassReport> {
    use casebook_domain::retention::{ArchiveCommand, ArchiveFile};
    use casebook_domain::{Actor, EventMetadata};
    let report = casebook_replay::archive::run_pass(pool, dir, as_of, key).await?;
    let store = casebook_commands::EventStore::new(pool.clone());
    let meta = EventMetadata::new("retention", Actor::system("retention"));
    for record in &report.purged {
        store
            .execute::<ArchiveFile>(
                &record.file,
                ArchiveCommand::RecordPurge(record.clone()),
                &meta,
            )
            .await
            .map_err(|e| anyhow::anyhow!("recording the purge of {}: {e}", record.file))?;
    }
    Ok(report)
}

/// `serve`'s daily retention pass, until `shutdown`.
pub async fn run_retention(
    pool: PgPool,
    dir: std::path::PathBuf,
    key: SigningKey,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(24 * 60 * 60));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match archive_pass(&pool, &dir, chrono::Utc::now(), &key).await {
            Ok(r) => tracing::info!(
                files = r.purged.len(),
                eligible = r.eligible,
                held = r.held,
                "retention pass done"
            ),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "retention pass failed, retrying tomorrow")
            }
        }
    }
}

/// How long one publish may wait for the broker.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(15);

/// Publishes every checkpoint not yet published, oldest first, and marks
/// each once the broker has it. Returns how many went out.
pub async fn publish_pending(
    pool: &PgPool,
    kafka: &KafkaSettings,
    producer: &FutureProducer,
) -> anyhow::Result<usize> {
    let topic = kafka.topics.audit();
    let mut sent = 0;
    for c in checkpoint::unpublished(pool).await? {
        let payload = serde_json::to_vec(&c.checkpoint)?;
        producer
            .send(
                FutureRecord::to(&topic).key("checkpoint").payload(&payload),
                PUBLISH_TIMEOUT,
            )
            .await
            .map_err(|(e, _)| anyhow::anyhow!("publishing checkpoint {}: {e}", c.id))?;
        checkpoint::mark_published(pool, c.id).await?;
        sent += 1;
    }
    Ok(sent)
}

/// One checkpoint now, then publishing.
pub async fn checkpoint_now(
    pool: &PgPool,
    key: &SigningKey,
    kafka: &KafkaSettings,
    producer: &FutureProducer,
) -> anyhow::Result<Created> {
    let created = checkpoint::create(pool, key).await?;
    publish_pending(pool, kafka, producer)
        .await
        .context("KAFKA_BROKERS: the checkpoint is stored but not yet published")?;
    Ok(created)
}

/// `serve`'s periodic checkpoints, until `shutdown`. A failure is logged
/// and retried at the next tick (unpublished checkpoints go out then).
pub async fn run(
    pool: PgPool,
    key: SigningKey,
    kafka: KafkaSettings,
    every: Duration,
    shutdown: CancellationToken,
) {
    let producer = match kafka.producer() {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "audit checkpoints: no Kafka producer");
            return;
        }
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = checkpoint_now(&pool, &key, &kafka, &producer).await {
            tracing::warn!(error = %format!("{e:#}"), "audit checkpoint failed, retrying next tick");
        }
    }
}
