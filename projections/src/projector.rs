//! What a projector is, and the one transaction that applies a batch.

use std::borrow::Cow;
use std::collections::HashMap;

use async_trait::async_trait;
use casebook_domain::EventEnvelope;
use sqlx::{PgConnection, PgPool};

use crate::metrics::{APPLIED, GAP_FILLED, SKIPPED};
use crate::store::{stored_event, EVENT_COLUMNS};

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("read model database: {0}")]
    Database(#[from] sqlx::Error),
}

/// A read model built from events.
#[async_trait]
pub trait Projector: Send + Sync + 'static {
    /// The consumer group suffix and bookkeeping key (`crm-tickets`, …).
    fn name(&self) -> &'static str;
    /// Aggregate types whose events this projector reads.
    fn aggregate_types(&self) -> &'static [&'static str];
    /// Tables this projector owns (emptied before a rebuild).
    fn tables(&self) -> &'static [&'static str];
    /// Applies events (new ones only, each stream in order) inside `tx`.
    async fn apply(
        &self,
        tx: &mut PgConnection,
        events: &[EventEnvelope],
    ) -> Result<(), ProjectionError>;
    /// Called after the batch's transaction committed.
    fn after_commit(&self, _applied: &[EventEnvelope]) {}
    /// Whether a live batch announces what it applied on
    /// [`crate::live::CHANNEL`] (one projector does, so each event is
    /// announced once, when the read model that queues read has it).
    fn announces(&self) -> bool {
        false
    }
    /// Indexes of its tables that only readers use: the projector never
    /// looks its rows up by them (it writes by primary key). A rebuild
    /// fills its shadow tables without them, which spares their upkeep on
    /// every row written, and the swap compares by primary key. Listing an
    /// index the projector does read by would slow its rebuild (a scan
    /// instead of a lookup) but never change a row.
    fn reader_indexes(&self) -> &'static [&'static str] {
        &[]
    }
    /// A projector that fills a rebuild's shadow in this one's place, for
    /// one rebuild: nobody else writes the shadow while it fills, so it may
    /// keep what it wrote in memory rather than read it back for the next
    /// page. It must write exactly the rows this projector would (its own
    /// name, types and tables). Dropped, with whatever it holds, when the
    /// fill ends or fails; the swap's catch-up uses this projector.
    fn shadow_filler(&self) -> Option<Box<dyn Projector>> {
        None
    }
    /// A shadow filler's last step, once its last page is applied:
    /// whatever it kept back, in parts whose rows do not overlap. A rebuild
    /// writes them side by side, each in a transaction of its own on the
    /// shadow, so a large read model's last write is not one connection's
    /// work while the others idle.
    fn finish_fill(&self) -> Vec<Box<dyn FillPart>> {
        Vec::new()
    }
}

/// A part of what a shadow filler kept back ([`Projector::finish_fill`]).
#[async_trait]
pub trait FillPart: Send {
    /// Writes the part in `tx` (table names resolve through the search
    /// path: a rebuild sets its shadow's).
    async fn write(self: Box<Self>, tx: &mut PgConnection) -> Result<(), ProjectionError>;
}

/// Writes every part of what `filler` kept back, one after another in `tx`
/// (a rebuild writes them side by side instead).
pub async fn finish_fill_in(
    tx: &mut PgConnection,
    filler: &dyn Projector,
) -> Result<(), ProjectionError> {
    for part in filler.finish_fill() {
        part.write(&mut *tx).await?;
    }
    Ok(())
}

/// A consumed Kafka position to record with the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumedOffset {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
}

/// The advisory lock class (`pg_advisory_xact_lock(class, hashtext(name))`)
/// of a projector's live batches: each takes it shared, and a rebuild's
/// swap (`casebook_replay::rebuild`) takes it exclusively, so the swap
/// never interleaves with a live batch. `REBUILD_LOCK_CLASS + 1` keeps
/// two rebuilds of one projector apart.
pub const REBUILD_LOCK_CLASS: i32 = 20_261_127;

/// Applies `events` to the projector's read model in one transaction with
/// the offsets consumed and the per-stream sequences reached. Events of
/// other aggregate types, and copies of events already applied, are
/// skipped. Returns the number applied.
pub async fn apply_batch(
    pool: &PgPool,
    projector: &dyn Projector,
    events: &[EventEnvelope],
    offsets: &[ConsumedOffset],
) -> Result<usize, ProjectionError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1, hashtext($2))")
        .bind(REBUILD_LOCK_CLASS)
        .bind(projector.name())
        .execute(&mut *tx)
        .await?;
    let applied = apply_batch_in(&mut tx, projector, events, offsets).await?;
    if projector.announces() {
        // Delivered to listeners only when (and if) the batch commits.
        crate::live::announce(&mut tx, &applied).await?;
    }
    tx.commit().await?;
    APPLIED
        .with_label_values(&[projector.name()])
        .inc_by(applied.len() as u64);
    projector.after_commit(&applied);
    Ok(applied.len())
}

/// [`apply_batch`] inside a transaction the caller owns (rebuilds apply many
/// batches in one). Returns the events applied; the caller reports them
/// once committed. When every event is the projector's and new (a rebuild's
/// page, most live batches), that is `events` itself, not a copy.
pub async fn apply_batch_in<'a>(
    tx: &mut PgConnection,
    projector: &dyn Projector,
    events: &'a [EventEnvelope],
    offsets: &[ConsumedOffset],
) -> Result<Cow<'a, [EventEnvelope]>, ProjectionError> {
    let name = projector.name();
    let relevant = relevant_events(projector, events);
    let mut keys: Vec<StreamKey> = relevant
        .iter()
        .map(|e| (e.aggregate_type.clone(), e.aggregate_id.clone()))
        .collect();
    keys.sort();
    keys.dedup();
    let last = stored_sequences(&mut *tx, name, keys).await?;
    let (fresh, touched) = fresh_events(&mut *tx, name, events, relevant, &last).await?;
    if !fresh.is_empty() {
        projector.apply(&mut *tx, &fresh).await?;
        write_sequences(&mut *tx, name, touched).await?;
    }
    record_offsets(&mut *tx, name, offsets).await?;
    record_progress(&mut *tx, name, events, fresh.len()).await?;
    Ok(fresh)
}

/// What a shadow filler keeps in memory between a rebuild's pages: taken
/// out for a page (one task applies a page at a time) and put back once
/// the page is written. The filler bounds what it puts back.
pub struct PageMemory<T> {
    kept: std::sync::Mutex<T>,
}

impl<T: Default> PageMemory<T> {
    pub fn new() -> Self {
        Self {
            kept: std::sync::Mutex::new(T::default()),
        }
    }

    /// What the previous pages left, for this page.
    pub fn take(&self) -> T {
        std::mem::take(
            &mut *self
                .kept
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// What this page leaves for the next.
    pub fn put_back(&self, kept: T) {
        *self
            .kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = kept;
    }
}

impl<T: Default> Default for PageMemory<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// A stream: (aggregate type, aggregate id).
pub type StreamKey = (String, String);

/// Applies one page of a rebuild to a shadow in `tx`: the events of the
/// projector's aggregate types, read once each and in commit order
/// (`(transaction_id, position)`), so every one is new to the shadow and
/// every stream's events come in sequence. No per-stream sequence is read
/// or written: once the fill ends, the shadow's baseline
/// ([`set_baseline`]) says how far every stream got. Returns the number
/// applied.
pub async fn apply_rebuild_page(
    tx: &mut PgConnection,
    projector: &dyn Projector,
    events: &[EventEnvelope],
) -> Result<usize, ProjectionError> {
    let relevant: Cow<'_, [EventEnvelope]> = if events.iter().all(|e| {
        projector
            .aggregate_types()
            .contains(&e.aggregate_type.as_str())
    }) {
        Cow::Borrowed(events)
    } else {
        Cow::Owned(
            relevant_events(projector, events)
                .into_iter()
                .cloned()
                .collect(),
        )
    };
    if !relevant.is_empty() {
        projector.apply(&mut *tx, &relevant).await?;
    }
    // No progress row: the swap keeps the live one (the live consumer's).
    Ok(relevant.len())
}

/// Records in `tx` that the projector has applied every event of its
/// aggregate types up to `(transaction_id, position)`, in commit order: a
/// stream without a `projector_streams` row has reached its highest
/// sequence at or before that point (see `stored_sequences`), and rows
/// record what was applied after it. Table names resolve through the
/// search path: a rebuild sets its shadow's.
pub async fn set_baseline(
    tx: &mut PgConnection,
    projector: &dyn Projector,
    transaction_id: &str,
    position: i64,
) -> Result<(), ProjectionError> {
    let types: Vec<&str> = projector.aggregate_types().to_vec();
    sqlx::query(
        "INSERT INTO projector_baselines (projector, aggregate_types, transaction_id, last_position)
         VALUES ($1, $2, $3::text::xid8, $4)
         ON CONFLICT (projector) DO UPDATE
            SET aggregate_types = EXCLUDED.aggregate_types, transaction_id = EXCLUDED.transaction_id,
                last_position = EXCLUDED.last_position, set_at = now()",
    )
    .bind(projector.name())
    .bind(&types)
    .bind(transaction_id)
    .bind(position)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// The batch's events of the projector's aggregate types.
fn relevant_events<'a>(
    projector: &dyn Projector,
    events: &'a [EventEnvelope],
) -> Vec<&'a EventEnvelope> {
    let types = projector.aggregate_types();
    events
        .iter()
        .filter(|e| types.contains(&e.aggregate_type.as_str()))
        .collect()
}

/// The last sequences the projector reached in `keys` (sorted), its
/// `projector_streams` rows locked for the transaction. A stream without
/// a row, of its baseline's types, has reached its highest sequence at or
/// before the baseline (after a rebuild, a stream the projector has not
/// applied since has no row; a row is written only after the baseline, so
/// where there is one it is never behind).
async fn stored_sequences(
    tx: &mut PgConnection,
    projector: &str,
    keys: Vec<StreamKey>,
) -> Result<HashMap<StreamKey, i64>, ProjectionError> {
    let mut last: HashMap<StreamKey, i64> = HashMap::new();
    if keys.is_empty() {
        return Ok(last);
    }
    let (types, ids): (Vec<String>, Vec<String>) = keys.into_iter().unzip();
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "WITH k AS (SELECT * FROM unnest($2::text[], $3::text[]) AS k(aggregate_type, aggregate_id)),
              held AS (SELECT p.aggregate_type, p.aggregate_id, p.last_sequence
                         FROM k JOIN projector_streams p ON p.projector = $1
                          AND p.aggregate_type = k.aggregate_type AND p.aggregate_id = k.aggregate_id
                        ORDER BY p.aggregate_type, p.aggregate_id
                          FOR UPDATE OF p),
              base AS (SELECT * FROM projector_baselines WHERE projector = $1)
         SELECT k.aggregate_type, k.aggregate_id, coalesce(h.last_sequence, d.last_sequence)
           FROM k
           LEFT JOIN held h ON h.aggregate_type = k.aggregate_type AND h.aggregate_id = k.aggregate_id
           LEFT JOIN LATERAL (
                SELECT max(e.sequence) AS last_sequence
                  FROM base b JOIN public.events e
                    ON e.aggregate_type = k.aggregate_type AND e.aggregate_id = k.aggregate_id
                   AND (e.transaction_id, e.position) <= (b.transaction_id, b.last_position)
                 WHERE h.last_sequence IS NULL AND k.aggregate_type = ANY (b.aggregate_types)) d ON true
          WHERE h.last_sequence IS NOT NULL OR d.last_sequence IS NOT NULL",
    )
    .bind(projector)
    .bind(&types)
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    for (t, id, seq) in rows {
        last.insert((t, id), seq);
    }
    Ok(last)
}

/// The events to apply, each once and in order, with the earlier events
/// of a stream whose start the batch lacks read from the store; and the
/// last sequence each stream reaches. `last` answers what a stream had
/// reached before the batch.
async fn fresh_events<'a>(
    tx: &mut PgConnection,
    name: &str,
    events: &'a [EventEnvelope],
    relevant: Vec<&'a EventEnvelope>,
    last: &HashMap<StreamKey, i64>,
) -> Result<(Cow<'a, [EventEnvelope]>, HashMap<StreamKey, i64>), ProjectionError> {
    let all_relevant = relevant.len() == events.len();
    let mut fresh = Vec::with_capacity(relevant.len());
    let mut copied = false;
    let mut touched: HashMap<StreamKey, i64> = HashMap::new();
    for e in relevant {
        let key = (e.aggregate_type.clone(), e.aggregate_id.clone());
        let seen = touched
            .get(&key)
            .copied()
            .or_else(|| last.get(&key).copied())
            .unwrap_or(0);
        if e.sequence <= seen {
            SKIPPED.with_label_values(&[name, "duplicate"]).inc();
            copied = true;
            continue;
        }
        if e.sequence > seen + 1 {
            // Earlier events of this stream have not arrived (yet, or ever:
            // one the relay set aside). The store is the source of truth:
            // apply them from there first, so the stream stays whole and
            // their copies, if they come later, are recognised as applied.
            let missing = missing_events(&mut *tx, e, seen).await?;
            GAP_FILLED
                .with_label_values(&[name])
                .inc_by(missing.len() as u64);
            tracing::warn!(
                projector = name,
                aggregate_type = %e.aggregate_type,
                aggregate_id = %e.aggregate_id,
                correlation_id = %e.correlation_id,
                expected = seen + 1,
                got = e.sequence,
                read_from_store = missing.len(),
                "gap in stream; missing events read from the event store"
            );
            fresh.extend(missing.into_iter().map(Cow::Owned));
            copied = true;
        }
        touched.insert(key, e.sequence);
        fresh.push(Cow::Borrowed(e));
    }
    // Every event, each once and in order: the batch as it came.
    let fresh: Cow<'a, [EventEnvelope]> = if all_relevant && !copied {
        Cow::Borrowed(events)
    } else {
        Cow::Owned(fresh.into_iter().map(Cow::into_owned).collect())
    };
    Ok((fresh, touched))
}

/// Records the last sequence each stream reached (never moving one back).
async fn write_sequences(
    tx: &mut PgConnection,
    name: &str,
    touched: HashMap<StreamKey, i64>,
) -> Result<(), ProjectionError> {
    let (types, rest): (Vec<String>, Vec<(String, i64)>) = touched
        .into_iter()
        .map(|((t, id), seq)| (t, (id, seq)))
        .unzip();
    let (ids, seqs): (Vec<String>, Vec<i64>) = rest.into_iter().unzip();
    sqlx::query(
        "INSERT INTO projector_streams (projector, aggregate_type, aggregate_id, last_sequence)
         SELECT $1, * FROM unnest($2::text[], $3::text[], $4::bigint[])
         ON CONFLICT (projector, aggregate_type, aggregate_id)
         DO UPDATE SET last_sequence = GREATEST(projector_streams.last_sequence, EXCLUDED.last_sequence)",
    )
    .bind(name)
    .bind(&types)
    .bind(&ids)
    .bind(&seqs)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

async fn record_offsets(
    tx: &mut PgConnection,
    name: &str,
    offsets: &[ConsumedOffset],
) -> Result<(), ProjectionError> {
    for o in offsets {
        sqlx::query(
            "INSERT INTO projector_offsets (projector, topic, partition, next_offset) VALUES ($1, $2, $3, $4)
             ON CONFLICT (projector, topic, partition)
             DO UPDATE SET next_offset = EXCLUDED.next_offset, updated_at = now()",
        )
        .bind(name)
        .bind(&o.topic)
        .bind(o.partition)
        .bind(o.next_offset)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

async fn record_progress(
    tx: &mut PgConnection,
    name: &str,
    events: &[EventEnvelope],
    applied: usize,
) -> Result<(), ProjectionError> {
    if let Some(furthest) = events.iter().max_by_key(|e| e.position) {
        sqlx::query(
            "INSERT INTO projector_progress (projector, last_position, last_event_at, events_applied)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (projector) DO UPDATE
                SET last_position = GREATEST(projector_progress.last_position, EXCLUDED.last_position),
                    last_event_at = GREATEST(projector_progress.last_event_at, EXCLUDED.last_event_at),
                    events_applied = projector_progress.events_applied + EXCLUDED.events_applied,
                    updated_at = now()",
        )
        .bind(name)
        .bind(furthest.position)
        .bind(furthest.occurred_at)
        .bind(applied as i64)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// The events of `e`'s stream after sequence `seen` and before `e`, from the
/// event store.
async fn missing_events(
    tx: &mut PgConnection,
    e: &EventEnvelope,
    seen: i64,
) -> Result<Vec<EventEnvelope>, ProjectionError> {
    let rows = sqlx::query(&format!(
        "SELECT {EVENT_COLUMNS} FROM events
          WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence > $3 AND sequence < $4
          ORDER BY sequence"
    ))
    .bind(&e.aggregate_type)
    .bind(&e.aggregate_id)
    .bind(seen)
    .bind(e.sequence)
    .fetch_all(&mut *tx)
    .await?;
    rows.iter()
        .map(|row| Ok(EventEnvelope::from(stored_event(row)?)))
        .collect()
}

/// The batch's ticket events with their ticket id, decoded; unreadable
/// ones are skipped as [`decode_or_skip`] does.
pub fn ticket_events<'a>(
    projector: &'a str,
    events: &'a [EventEnvelope],
) -> impl Iterator<Item = (uuid::Uuid, casebook_domain::TicketEvent, &'a EventEnvelope)> + 'a {
    events.iter().filter_map(move |e| {
        let id = e.aggregate_id.parse().ok()?;
        decode_or_skip(projector, e).map(|event| (id, event, e))
    })
}

/// Decodes an envelope's payload as an aggregate's event type. An event this
/// build cannot read (written by a newer version, say) is logged, counted
/// and skipped rather than stalling the projector.
pub fn decode_or_skip<E: serde::de::DeserializeOwned>(
    projector: &str,
    e: &EventEnvelope,
) -> Option<E> {
    match e.decode() {
        Ok(event) => Some(event),
        Err(err) => {
            SKIPPED.with_label_values(&[projector, "unreadable"]).inc();
            tracing::error!(
                projector,
                event_id = %e.event_id,
                event_type = %e.event_type,
                correlation_id = %e.correlation_id,
                causation_id = %e.causation_id,
                error = %err,
                "event could not be read; skipped"
            );
            None
        }
    }
}
