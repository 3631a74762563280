//! `casebook audit verify`: one pass over the whole log in log order
//! (transaction id, position) that checks
//! - every stream's chain: sequences 1, 2, 3… and each stored hash
//!   recomputed from the event's content and its predecessor's hash;
//! - the log-wide Merkle tree against every stored checkpoint (signature
//!   under the trusted key, size, last position and root), which is what
//!   catches a removed tail, a removed stream and a reordered log;
//! - purged events: their leaves stay in the tree (`events_purged`), their
//!   content is checked against the archive by `archive::verify_purged`.
//!
//! It stops at the first failure.

use std::collections::HashMap;

use casebook_domain::audit::{ChainBreak, ChainInput, StreamVerifier};
use casebook_domain::merkle::{self, CompactTree};
use ed25519_dalek::VerifyingKey;
use futures::TryStreamExt;
use sqlx::{PgPool, Row};

use crate::checkpoint::{self, CheckpointStoreError, StoredCheckpoint};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenStream {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub at: ChainBreak,
}

/// The first thing found wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// A stream's chain does not hold (an edited event, a gap, events of a
    /// stream out of order).
    Chain(BrokenStream),
    /// A checkpoint's signature does not verify with the trusted key.
    Signature { checkpoint: i64 },
    /// The log's first `size` events do not give the checkpoint's root.
    Root {
        checkpoint: i64,
        size: u64,
        expected_last_position: i64,
        found_last_position: i64,
    },
    /// The log is shorter than a checkpoint says it was.
    Missing {
        checkpoint: i64,
        size: u64,
        found: u64,
    },
    /// Checkpoints exist but no key to check them was given.
    NoKey { checkpoint: i64 },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Chain(b) => write!(
                f,
                "hash chain broken in stream {}/{} at sequence {} (stored {}, recomputed {})",
                b.aggregate_type, b.aggregate_id, b.at.sequence, b.at.stored, b.at.expected
            ),
            Failure::Signature { checkpoint } => write!(
                f,
                "checkpoint {checkpoint}: signature does not verify with the trusted key"
            ),
            Failure::Root {
                checkpoint,
                size,
                expected_last_position,
                found_last_position,
            } => write!(
                f,
                "checkpoint {checkpoint}: the log's first {size} events do not give its Merkle root \
                 (it ends at position {expected_last_position}, the log's event {size} is at position \
                 {found_last_position}): events removed, inserted or reordered"
            ),
            Failure::Missing {
                checkpoint,
                size,
                found,
            } => write!(
                f,
                "checkpoint {checkpoint} commits to {size} events but the log holds {found}: events removed"
            ),
            Failure::NoKey { checkpoint } => write!(
                f,
                "checkpoint {checkpoint} cannot be checked: set CASEBOOK_AUDIT_SIGNING_KEY or pass --public-key"
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VerifyReport {
    pub streams: u64,
    pub events: u64,
    /// Leaves of purged events (checked against the archive separately).
    pub purged: u64,
    /// Checkpoints whose root and signature were checked.
    pub checkpoints: u64,
    /// The first stream (in log order) whose chain does not hold.
    pub first_break: Option<BrokenStream>,
    /// The first failure of any kind.
    pub failure: Option<Failure>,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointStoreError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Chains only (no checkpoint): the check `auditTrail`'s `chainValid` and
/// older callers rely on.
pub async fn verify_chains(pool: &PgPool) -> Result<VerifyReport, VerifyError> {
    verify(pool, None, false, |_| {}).await
}

/// The full check. `key` is the trusted public key; with checkpoints stored
/// and no key, verification fails (a checkpoint nobody can check proves
/// nothing). `progress` is called with the number of events read so far,
/// every 10,000.
pub async fn verify_log(
    pool: &PgPool,
    key: Option<&VerifyingKey>,
    progress: impl FnMut(u64),
) -> Result<VerifyReport, VerifyError> {
    verify(pool, key, true, progress).await
}

/// How many events (hot and purged) the log holds: the progress bar's length.
pub async fn log_size(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let n: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM events)
              + (SELECT count(*) FROM events_purged p WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.position = p.position))",
    )
    .fetch_one(pool)
    .await?;
    Ok(n.max(0) as u64)
}

struct Head {
    verifier: StreamVerifier,
}

async fn verify(
    pool: &PgPool,
    key: Option<&VerifyingKey>,
    with_checkpoints: bool,
    mut progress: impl FnMut(u64),
) -> Result<VerifyReport, VerifyError> {
    let mut report = VerifyReport::default();
    let checkpoints: Vec<StoredCheckpoint> = if with_checkpoints {
        checkpoint::all(pool).await?
    } else {
        Vec::new()
    };
    for c in &checkpoints {
        let Some(key) = key else {
            report.failure = Some(Failure::NoKey { checkpoint: c.id });
            return Ok(report);
        };
        if c.checkpoint.verify(key).is_err() {
            report.failure = Some(Failure::Signature { checkpoint: c.id });
            return Ok(report);
        }
    }
    let mut pending = checkpoints.iter().peekable();
    // Checkpoints of an empty log commit to nothing.
    while pending.peek().is_some_and(|c| c.checkpoint.body.size == 0) {
        pending.next();
    }

    let mut rows = sqlx::query(
        "SELECT false AS purged, position, aggregate_type, aggregate_id, sequence, event_id::text AS event_id,
                event_type, event_version, (extract(epoch FROM occurred_at) * 1000000)::bigint AS micros,
                payload::text AS payload, metadata::text AS metadata, hash, transaction_id
           FROM events
         UNION ALL
         SELECT true, position, aggregate_type, aggregate_id, sequence, NULL, NULL, NULL, NULL, NULL, NULL, hash,
                transaction_id
           FROM events_purged p
          WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.position = p.position)
          ORDER BY transaction_id, position",
    )
    .fetch(pool);
    let mut heads: HashMap<String, Head> = HashMap::new();
    let mut tree = CompactTree::default();
    let mut key_buf = String::new();
    let mut read = 0u64;
    while let Some(row) = rows.try_next().await? {
        read += 1;
        if read.is_multiple_of(10_000) {
            progress(read);
        }
        let purged: bool = row.try_get("purged")?;
        let aggregate_type: &str = row.try_get("aggregate_type")?;
        let aggregate_id: &str = row.try_get("aggregate_id")?;
        let sequence: i64 = row.try_get("sequence")?;
        let stored: &str = row.try_get("hash")?;
        let position: i64 = row.try_get("position")?;
        key_buf.clear();
        key_buf.push_str(aggregate_type);
        key_buf.push('\0');
        key_buf.push_str(aggregate_id);
        let head = match heads.get_mut(key_buf.as_str()) {
            Some(h) => h,
            None => {
                report.streams += 1;
                heads.entry(key_buf.clone()).or_insert(Head {
                    verifier: StreamVerifier::default(),
                })
            }
        };
        let checked = if purged {
            report.purged += 1;
            head.verifier.skip(sequence, stored)
        } else {
            let input = ChainInput {
                event_id: row.try_get("event_id")?,
                aggregate_type,
                aggregate_id,
                sequence,
                event_type: row.try_get("event_type")?,
                event_version: row.try_get("event_version")?,
                occurred_at_micros: row.try_get("micros")?,
                payload: row.try_get("payload")?,
                metadata: row.try_get("metadata")?,
            };
            head.verifier.check(&input, stored)
        };
        if let Err(at) = checked {
            let broken = BrokenStream {
                aggregate_type: aggregate_type.to_string(),
                aggregate_id: aggregate_id.to_string(),
                at,
            };
            report.first_break = Some(broken.clone());
            report.failure = Some(Failure::Chain(broken));
            return Ok(report);
        }
        if !purged {
            report.events += 1;
        }
        tree.push(merkle::event_leaf(position, stored));
        while let Some(c) = pending.peek() {
            if c.checkpoint.body.size != tree.size() {
                break;
            }
            let body = &c.checkpoint.body;
            if body.last_position != position || hex::encode(tree.root()) != body.root {
                report.failure = Some(Failure::Root {
                    checkpoint: c.id,
                    size: body.size,
                    expected_last_position: body.last_position,
                    found_last_position: position,
                });
                return Ok(report);
            }
            report.checkpoints += 1;
            pending.next();
        }
    }
    progress(read);
    if let Some(c) = pending.next() {
        report.failure = Some(Failure::Missing {
            checkpoint: c.id,
            size: c.checkpoint.body.size,
            found: tree.size(),
        });
    }
    Ok(report)
}
