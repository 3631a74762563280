//! `casebook replay projections`: rebuilds read models from the event store.
//!
//! Each projector is rebuilt in one transaction: its tables are emptied
//! (which also holds off its live consumer until the rebuild commits), every
//! stored event is applied in store order, and its per-stream sequences are
//! recomputed. Its Kafka offsets stay: the live consumer carries on where it
//! was and recognises what the rebuild already applied. While a rebuild
//! runs, its long transaction holds the relay back; run it when that is
//! acceptable.

use std::sync::Arc;
use std::time::{Duration, Instant};

use casebook_domain::EventEnvelope;
use casebook_projections::store::{stored_event, EVENT_COLUMNS};
use casebook_projections::{apply_batch_in, ProjectionError, Projector};
use futures::TryStreamExt;
use sqlx::{PgPool, Row};

/// Events read from the store per page.
pub const CHUNK: usize = 1000;
/// How soon to look again while an older transaction holds events back.
const PENDING_POLL: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildReport {
    pub projector: &'static str,
    pub events_read: u64,
    pub events_applied: u64,
    pub millis: u128,
}

pub async fn rebuild(
    pool: &PgPool,
    projectors: &[Arc<dyn Projector>],
) -> Result<Vec<RebuildReport>, ProjectionError> {
    rebuild_paged(pool, projectors, CHUNK).await
}

/// [`rebuild`], reading `chunk` events per page.
pub async fn rebuild_paged(
    pool: &PgPool,
    projectors: &[Arc<dyn Projector>],
    chunk: usize,
) -> Result<Vec<RebuildReport>, ProjectionError> {
    let mut reports = Vec::with_capacity(projectors.len());
    for projector in projectors {
        reports.push(rebuild_one(pool, projector.as_ref(), chunk.max(1)).await?);
    }
    Ok(reports)
}

async fn rebuild_one(
    pool: &PgPool,
    projector: &dyn Projector,
    chunk_size: usize,
) -> Result<RebuildReport, ProjectionError> {
    let started = Instant::now();
    let name = projector.name();
    let mut tx = pool.begin().await?;
    let tables = projector.tables().join(", ");
    sqlx::query(&format!("TRUNCATE {tables}"))
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM projector_streams WHERE projector = $1")
        .bind(name)
        .execute(&mut *tx)
        .await?;
    let types: Vec<String> = projector
        .aggregate_types()
        .iter()
        .map(|t| t.to_string())
        .collect();
    let mut read = 0u64;
    let mut applied_total = 0u64;
    // Paged in (transaction_id, position) order behind the snapshot's xmin,
    // as the relay reads: a transaction that took its positions early and
    // commits late is below the barrier only once it has finished, so no
    // page can be passed by an event that becomes visible afterwards.
    //
    // The rebuild takes every event of a transaction older than its own
    // (whose xid it got with the TRUNCATE): while one of those still runs,
    // an empty page means "not yet", not "done", so it waits. Younger
    // transactions cannot be published by the relay before this one ends
    // (the relay's barrier is behind it), so the live consumer, held off by
    // the TRUNCATE, applies them afterwards.
    let own_xid: String = sqlx::query_scalar("SELECT pg_current_xact_id()::text")
        .fetch_one(&mut *tx)
        .await?;
    let mut last_tx = String::from("0");
    let mut last_position = 0i64;
    let mut waited = Duration::ZERO;
    let mut next_report = Duration::from_secs(1);
    loop {
        let settled: bool =
            sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot()) >= $1::text::xid8")
                .bind(&own_xid)
                .fetch_one(&mut *tx)
                .await?;
        let rows = sqlx::query(&format!(
            "SELECT transaction_id::text AS tx, {EVENT_COLUMNS} FROM events
              WHERE (transaction_id, position) > ($1::text::xid8, $2)
                AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())
                AND aggregate_type = ANY($3)
              ORDER BY transaction_id, position LIMIT $4"
        ))
        .bind(&last_tx)
        .bind(last_position)
        .bind(&types)
        .bind(chunk_size as i64)
        .fetch(&mut *tx)
        .map_ok(|row| {
            (
                row.try_get::<String, _>("tx"),
                row.try_get::<i64, _>("position"),
                stored_event(&row),
            )
        })
        .try_collect::<Vec<_>>()
        .await?;
        if rows.is_empty() {
            if settled {
                break;
            }
            if waited >= next_report {
                tracing::info!(
                    projector = name,
                    waited_secs = waited.as_secs(),
                    "rebuild waits for older transactions to finish"
                );
                next_report += Duration::from_secs(10);
            }
            tokio::time::sleep(PENDING_POLL).await;
            waited += PENDING_POLL;
            continue;
        }
        let mut chunk: Vec<EventEnvelope> = Vec::with_capacity(rows.len());
        for (txid, position, event) in rows {
            last_tx = txid?;
            last_position = position?;
            chunk.push(event?.into());
        }
        read += chunk.len() as u64;
        let applied = apply_batch_in(&mut tx, projector, &chunk, &[]).await?;
        applied_total += applied.len() as u64;
    }
    tx.commit().await?;
    tracing::info!(
        projector = name,
        events = applied_total,
        "read model rebuilt"
    );
    Ok(RebuildReport {
        projector: name,
        events_read: read,
        events_applied: applied_total,
        millis: started.elapsed().as_millis(),
    })
}
