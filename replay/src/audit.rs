//! `casebook audit verify`: recomputes every stream's hash chain.

use casebook_domain::audit::{ChainBreak, ChainInput, StreamVerifier};
use futures::TryStreamExt;
use sqlx::{PgPool, Row};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenStream {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub at: ChainBreak,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VerifyReport {
    pub streams: u64,
    pub events: u64,
    /// The first stream (in stream order) whose chain does not hold.
    pub first_break: Option<BrokenStream>,
}

/// Walks every stream in (aggregate type, id, sequence) order and checks
/// each stored hash against the one recomputed from the event's content and
/// its predecessor's hash; also that sequences run 1, 2, 3… without gaps.
/// Stops at the first break.
pub async fn verify_chains(pool: &PgPool) -> Result<VerifyReport, sqlx::Error> {
    let mut rows = sqlx::query(
        "SELECT aggregate_type, aggregate_id, sequence, event_id::text AS event_id, event_type, event_version,
                (extract(epoch FROM occurred_at) * 1000000)::bigint AS micros,
                payload::text AS payload, metadata::text AS metadata, hash
           FROM events
          ORDER BY aggregate_type, aggregate_id, sequence",
    )
    .fetch(pool);
    let mut report = VerifyReport::default();
    let mut current: Option<(String, String)> = None;
    let mut verifier = StreamVerifier::default();
    while let Some(row) = rows.try_next().await? {
        let aggregate_type: String = row.try_get("aggregate_type")?;
        let aggregate_id: String = row.try_get("aggregate_id")?;
        let key = (aggregate_type, aggregate_id);
        if current.as_ref() != Some(&key) {
            report.streams += 1;
            current = Some(key.clone());
            verifier = StreamVerifier::default();
        }
        let event_id: String = row.try_get("event_id")?;
        let event_type: String = row.try_get("event_type")?;
        let event_version: String = row.try_get("event_version")?;
        let payload: String = row.try_get("payload")?;
        let metadata: String = row.try_get("metadata")?;
        let stored: String = row.try_get("hash")?;
        let sequence: i64 = row.try_get("sequence")?;
        let input = ChainInput {
            event_id: &event_id,
            aggregate_type: &key.0,
            aggregate_id: &key.1,
            sequence,
            event_type: &event_type,
            event_version: &event_version,
            occurred_at_micros: row.try_get("micros")?,
            payload: &payload,
            metadata: &metadata,
        };
        if let Err(at) = verifier.check(&input, &stored) {
            report.first_break = Some(BrokenStream {
                aggregate_type: key.0,
                aggregate_id: key.1,
                at,
            });
            return Ok(report);
        }
        report.events += 1;
    }
    Ok(report)
}
