//! Signed checkpoints of the whole log, and inclusion proofs against them.
//!
//! The log order is the relay's: (transaction id, position), and a
//! checkpoint covers only transactions below the snapshot's xmin, so no
//! event can later appear inside a range a checkpoint has already committed
//! to (an identity value is taken at insert but becomes visible at commit;
//! see ARCHITECTURE.md, "One global order"). Purged events stay in the log
//! through `events_purged` (see `archive`), so the tree over all positions
//! still recomputes after retention.

use casebook_domain::checkpoint::{
    parse_hash, Checkpoint, CheckpointBody, InclusionProof, ProvenContent,
};
use casebook_domain::merkle::{self, CompactTree, Hash};
use chrono::{DateTime, Utc};
use ed25519_dalek::SigningKey;
use futures::TryStreamExt;
use sqlx::{PgPool, Row};

/// Every event of the log, hot or purged, with what a leaf needs. Ordered
/// by (transaction_id, position) by its readers.
/// A restored ticket's events are in both tables: once is enough.
pub(crate) const LOG_LEAVES: &str = "(SELECT transaction_id, position, hash FROM events
     UNION ALL SELECT p.transaction_id, p.position, p.hash FROM events_purged p
                WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.position = p.position)) AS log";

/// Serialises checkpoint writers (replicas of `serve`, the CLI).
const CHECKPOINT_LOCK: i64 = 0x6361_7365_6b70_7431; // "casekpt1"

#[derive(Debug, thiserror::Error)]
pub enum CheckpointStoreError {
    #[error("stored checkpoint {id} is malformed: {what}")]
    Malformed { id: i64, what: String },
    #[error("no checkpoint yet: run `casebook audit checkpoint` first")]
    NoCheckpoint,
    #[error("no event {0}")]
    NoEvent(uuid::Uuid),
    #[error("event {0} is newer than the latest checkpoint: take a checkpoint first")]
    NotYetCheckpointed(uuid::Uuid),
    #[error("the log no longer matches checkpoint {id}: run `casebook audit verify`")]
    LogMismatch { id: i64 },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// A checkpoint as stored, with the state to carry on from.
#[derive(Debug, Clone)]
pub struct StoredCheckpoint {
    pub id: i64,
    pub checkpoint: Checkpoint,
    pub tree: CompactTree,
    pub published: bool,
}

const CHECKPOINT_COLUMNS: &str =
    "id, size, last_transaction_id::text AS last_tx, last_position, root, frontier,
     created_at, public_key, signature, published_at IS NOT NULL AS published";

fn stored(row: &sqlx::postgres::PgRow) -> Result<StoredCheckpoint, CheckpointStoreError> {
    let id: i64 = row.try_get("id")?;
    let malformed = |what: &str| CheckpointStoreError::Malformed {
        id,
        what: what.to_string(),
    };
    let size: i64 = row.try_get("size")?;
    let last_tx: String = row.try_get("last_tx")?;
    let frontier: Vec<Vec<u8>> = row.try_get("frontier")?;
    let frontier: Vec<Hash> = frontier
        .into_iter()
        .map(|h| h.try_into().map_err(|_| malformed("frontier hash")))
        .collect::<Result<_, _>>()?;
    let size = u64::try_from(size).map_err(|_| malformed("size"))?;
    let tree = CompactTree::from_parts(size, frontier).map_err(|e| malformed(&e.to_string()))?;
    Ok(StoredCheckpoint {
        id,
        checkpoint: Checkpoint {
            body: CheckpointBody {
                size,
                last_transaction_id: last_tx.parse().map_err(|_| malformed("transaction id"))?,
                last_position: row.try_get("last_position")?,
                root: row.try_get("root")?,
                created_at: row.try_get("created_at")?,
            },
            public_key: row.try_get("public_key")?,
            signature: row.try_get("signature")?,
        },
        tree,
        published: row.try_get("published")?,
    })
}

/// The latest checkpoint (the one over the most events).
pub async fn latest(pool: &PgPool) -> Result<Option<StoredCheckpoint>, CheckpointStoreError> {
    sqlx::query(&format!(
        "SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints ORDER BY size DESC, id DESC LIMIT 1"
    ))
    .fetch_optional(pool)
    .await?
    .as_ref()
    .map(stored)
    .transpose()
}

/// Every stored checkpoint, smallest first.
pub async fn all(pool: &PgPool) -> Result<Vec<StoredCheckpoint>, CheckpointStoreError> {
    sqlx::query(&format!(
        "SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints ORDER BY size, id"
    ))
    .fetch_all(pool)
    .await?
    .iter()
    .map(stored)
    .collect()
}

/// Checkpoints not yet published to Kafka, oldest first (at most 100).
pub async fn unpublished(pool: &PgPool) -> Result<Vec<StoredCheckpoint>, CheckpointStoreError> {
    sqlx::query(&format!(
        "SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints WHERE published_at IS NULL ORDER BY id LIMIT 100"
    ))
    .fetch_all(pool)
    .await?
    .iter()
    .map(stored)
    .collect()
}

pub async fn mark_published(pool: &PgPool, id: i64) -> Result<(), CheckpointStoreError> {
    sqlx::query("UPDATE audit_checkpoints SET published_at = now() WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

/// What [`create`] did.
#[derive(Debug, Clone)]
pub enum Created {
    /// A new checkpoint over `added` more events.
    New {
        checkpoint: StoredCheckpoint,
        added: u64,
    },
    /// Nothing new since the latest checkpoint.
    Unchanged(StoredCheckpoint),
    /// Nothing in the log yet.
    Empty,
}

/// Extends the latest checkpoint's tree with every event committed since
/// (below the snapshot's xmin), signs the result with `key` and stores it.
pub async fn create(pool: &PgPool, key: &SigningKey) -> Result<Created, CheckpointStoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(CHECKPOINT_LOCK)
        .execute(&mut *tx)
        .await?;
    let previous = sqlx::query(&format!(
        "SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints ORDER BY size DESC, id DESC LIMIT 1"
    ))
    .fetch_optional(&mut *tx)
    .await?
    .as_ref()
    .map(stored)
    .transpose()?;
    let (mut tree, mut last_tx, mut last_pos) = match &previous {
        Some(p) => (
            p.tree.clone(),
            p.checkpoint.body.last_transaction_id,
            p.checkpoint.body.last_position,
        ),
        None => (CompactTree::default(), 0, 0),
    };
    let mut added = 0u64;
    {
        let sql = format!(
            "SELECT transaction_id::text AS tx, position, hash FROM {LOG_LEAVES}
              WHERE (transaction_id, position) > ($1::text::xid8, $2)
                AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())
              ORDER BY transaction_id, position"
        );
        let mut rows = sqlx::query(&sql)
            .bind(last_tx.to_string())
            .bind(last_pos)
            .fetch(&mut *tx);
        while let Some(row) = rows.try_next().await? {
            let position: i64 = row.try_get("position")?;
            let hash: String = row.try_get("hash")?;
            let tx_text: String = row.try_get("tx")?;
            tree.push(merkle::event_leaf(position, &hash));
            last_tx = tx_text.parse().unwrap_or(last_tx);
            last_pos = position;
            added += 1;
        }
    }
    if added == 0 {
        tx.commit().await?;
        return Ok(match previous {
            Some(p) => Created::Unchanged(p),
            None => Created::Empty,
        });
    }
    let now = Utc::now();
    let created_at = DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now);
    let checkpoint = CheckpointBody {
        size: tree.size(),
        last_transaction_id: last_tx,
        last_position: last_pos,
        root: hex::encode(tree.root()),
        created_at,
    }
    .sign(key);
    let frontier: Vec<Vec<u8>> = tree.frontier().iter().map(|h| h.to_vec()).collect();
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO audit_checkpoints (size, last_transaction_id, last_position, root, frontier, created_at, public_key, signature)
         VALUES ($1, $2::text::xid8, $3, $4, $5, $6, $7, $8) RETURNING id",
    )
    .bind(tree.size() as i64)
    .bind(last_tx.to_string())
    .bind(last_pos)
    .bind(&checkpoint.body.root)
    .bind(&frontier)
    .bind(created_at)
    .bind(&checkpoint.public_key)
    .bind(&checkpoint.signature)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(
        checkpoint = id,
        size = tree.size(),
        added,
        "audit checkpoint written"
    );
    Ok(Created::New {
        checkpoint: StoredCheckpoint {
            id,
            checkpoint,
            tree,
            published: false,
        },
        added,
    })
}

/// An inclusion proof of one hot event in the latest checkpoint. Reads the
/// leaves up to the checkpoint (one pass) and refuses when they no longer
/// give the checkpoint's root.
pub async fn prove(
    pool: &PgPool,
    event_id: uuid::Uuid,
) -> Result<InclusionProof, CheckpointStoreError> {
    let latest = latest(pool)
        .await?
        .ok_or(CheckpointStoreError::NoCheckpoint)?;
    let body = &latest.checkpoint.body;
    let row = sqlx::query(
        "SELECT e.transaction_id::text AS tx, e.position, e.hash, e.event_id::text AS event_id,
                e.aggregate_type, e.aggregate_id, e.sequence, e.event_type, e.event_version,
                (extract(epoch FROM e.occurred_at) * 1000000)::bigint AS micros,
                e.payload::text AS payload, e.metadata::text AS metadata,
                coalesce((SELECT p.hash FROM events p
                           WHERE p.aggregate_type = e.aggregate_type AND p.aggregate_id = e.aggregate_id
                             AND p.sequence = e.sequence - 1),
                         (SELECT p.hash FROM events_purged p
                           WHERE p.aggregate_type = e.aggregate_type AND p.aggregate_id = e.aggregate_id
                             AND p.sequence = e.sequence - 1), '') AS previous_hash,
                (e.transaction_id, e.position) <= ($2::text::xid8, $3) AS covered
           FROM events e WHERE e.event_id = $1",
    )
    .bind(event_id)
    .bind(body.last_transaction_id.to_string())
    .bind(body.last_position)
    .fetch_optional(pool)
    .await?
    .ok_or(CheckpointStoreError::NoEvent(event_id))?;
    if !row.try_get::<bool, _>("covered")? {
        return Err(CheckpointStoreError::NotYetCheckpointed(event_id));
    }
    let position: i64 = row.try_get("position")?;
    let hash: String = row.try_get("hash")?;
    let tx_text: String = row.try_get("tx")?;

    let mut leaves: Vec<Hash> = Vec::with_capacity(body.size.min(1 << 24) as usize);
    let mut index = None;
    {
        let sql = format!(
            "SELECT transaction_id::text AS tx, position, hash FROM {LOG_LEAVES}
              WHERE (transaction_id, position) <= ($1::text::xid8, $2)
              ORDER BY transaction_id, position"
        );
        let mut rows = sqlx::query(&sql)
            .bind(body.last_transaction_id.to_string())
            .bind(body.last_position)
            .fetch(pool);
        while let Some(r) = rows.try_next().await? {
            let p: i64 = r.try_get("position")?;
            let h: String = r.try_get("hash")?;
            if p == position && r.try_get::<String, _>("tx")? == tx_text {
                index = Some(leaves.len());
            }
            leaves.push(merkle::event_leaf(p, &h));
        }
    }
    let root_ok = parse_hash(&body.root) == Some(merkle::root(&leaves));
    let (Some(index), true, true) = (index, root_ok, leaves.len() as u64 == body.size) else {
        return Err(CheckpointStoreError::LogMismatch { id: latest.id });
    };
    let path = merkle::inclusion_proof(&leaves, index)
        .ok_or(CheckpointStoreError::LogMismatch { id: latest.id })?;
    Ok(InclusionProof {
        position,
        hash,
        leaf_index: index as u64,
        path: path.iter().map(hex::encode).collect(),
        content: ProvenContent {
            previous_hash: row.try_get("previous_hash")?,
            event_id: row.try_get("event_id")?,
            aggregate_type: row.try_get("aggregate_type")?,
            aggregate_id: row.try_get("aggregate_id")?,
            sequence: row.try_get("sequence")?,
            event_type: row.try_get("event_type")?,
            event_version: row.try_get("event_version")?,
            occurred_at_micros: row.try_get("micros")?,
            payload: row.try_get("payload")?,
            metadata: row.try_get("metadata")?,
        },
        checkpoint: latest.checkpoint,
    })
}
