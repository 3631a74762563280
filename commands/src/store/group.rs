//! Group commit: plain appends that arrive while others are being written
//! share one statement and one commit.
//!
//! Every commit costs Postgres a transaction, a WAL flush and a round trip,
//! whatever it holds; under load most of an append's time is that. A unit
//! of work waits in a queue only while [`IN_FLIGHT`] statements are already
//! running: an append on a quiet store goes out at once, alone, as it would
//! without this. Whoever finds a slot free takes the queue's head, up to
//! `max_units` units whose streams do not overlap, and writes them with one
//! statement that checks every unit's heads as the single append does: a
//! unit whose stream moved gets [`StoreError::Conflict`] and is left out,
//! the others are written. A statement that fails as a whole (another
//! process won a key, or a unit's rows are refused) writes nothing, and each
//! unit is then appended alone for its own answer.
//!
//! The statement runs in a task of its own, so a caller that stops waiting
//! (a request timed out) never abandons the others' appends halfway.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use sqlx::PgPool;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use super::{with_transient_retry, Columns, StoreError, Unit};

/// Units of work combined into one statement at most, by default
/// (`CASEBOOK_APPEND_GROUP`; 1 appends every unit alone).
pub const DEFAULT_GROUP: usize = 32;
/// The most units a group may be set to combine.
pub const MAX_GROUP: usize = 1_000;
/// Append statements this process runs at once; units arriving while all
/// are busy queue for the next free one.
const IN_FLIGHT: usize = 4;
/// Events in one group statement at most (a larger unit goes alone).
const MAX_GROUP_EVENTS: usize = 2_000;
/// Bytes of payload and metadata in one group statement at most (a larger
/// unit goes alone): the group's arrays are a copy of its units'.
const MAX_GROUP_BYTES: usize = 8 << 20;
/// How often a waiting append checks that a writer is running: one that
/// stopped (its task panicked, or its runtime shut down) leaves the queue
/// to the next caller that finds a slot free.
const WRITER_CHECK: std::time::Duration = std::time::Duration::from_secs(1);
/// Queued units looked at for one group: those behind a unit that must
/// wait (its stream is already in the group) still get their turn.
const MAX_SCANNED: usize = 4 * MAX_GROUP;

/// A queued unit and where its answer goes.
struct Waiting {
    unit: Unit,
    reply: oneshot::Sender<Result<usize, StoreError>>,
}

/// The queue of appends waiting for a statement, shared by an
/// [`EventStore`](super::EventStore) and its clones.
pub(crate) struct GroupCommit {
    max_units: usize,
    queue: Mutex<VecDeque<Waiting>>,
    slots: Arc<Semaphore>,
    /// Callers waiting for their append's answer, queued or being written.
    pending: AtomicUsize,
}

/// Counts a caller as pending for as long as it waits, cancelled or not.
struct Pending<'a>(&'a AtomicUsize);

impl<'a> Pending<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl GroupCommit {
    pub(crate) fn new(max_units: usize) -> Self {
        Self {
            max_units: max_units.clamp(1, MAX_GROUP),
            queue: Mutex::new(VecDeque::new()),
            slots: Arc::new(Semaphore::new(IN_FLIGHT)),
            pending: AtomicUsize::new(0),
        }
    }

    /// Appends `unit`, alone or with others; how many events it wrote.
    pub(crate) async fn append(
        self: &Arc<Self>,
        pool: &PgPool,
        unit: Unit,
    ) -> Result<usize, StoreError> {
        if self.max_units == 1 {
            return with_transient_retry(|| unit.append_alone(pool)).await;
        }
        let _pending = Pending::new(&self.pending);
        let (reply, mut answer) = oneshot::channel();
        self.lock().push_back(Waiting { unit, reply });
        self.start(pool);
        loop {
            match tokio::time::timeout(WRITER_CHECK, &mut answer).await {
                Ok(answered) => {
                    return answered.unwrap_or_else(|_| {
                        // The writer holding this unit stopped before it
                        // answered: whether it was written is not known.
                        Err(StoreError::Other(
                            "the append's writer stopped without an answer".into(),
                        ))
                    });
                }
                Err(_) => self.start(pool),
            }
        }
    }

    /// Appends whose callers wait for their answer right now, queued or
    /// being written.
    pub(crate) fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }

    /// Units queued for a statement right now.
    pub(crate) fn waiting(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Waiting>> {
        // The queue holds no invariant a panic could break halfway.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a writer when a slot is free; otherwise a busy writer takes
    /// the queue when its statement is done.
    fn start(self: &Arc<Self>, pool: &PgPool) {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            tokio::spawn(self.clone().write(pool.clone(), slot));
        }
    }

    /// Writes groups until the queue is empty. The slot is given back
    /// before the last look at the queue: a unit queued after that look
    /// finds the slot free and starts a writer itself.
    async fn write(self: Arc<Self>, pool: PgPool, mut slot: OwnedSemaphorePermit) {
        loop {
            let group = self.take();
            if group.is_empty() {
                drop(slot);
                if self.lock().is_empty() {
                    return;
                }
                match self.slots.clone().try_acquire_owned() {
                    Ok(again) => slot = again,
                    // Another writer has it, and the queue with it.
                    Err(_) => return,
                }
                continue;
            }
            write_group(&pool, group).await;
        }
    }

    /// The queue's first units whose streams do not overlap, up to the
    /// group's bounds; in queue order. A unit left in the queue keeps its
    /// streams from later units too, so that each stream's units are
    /// written in the order they came.
    fn take(&self) -> Vec<Waiting> {
        let mut queue = self.lock();
        let mut chosen = Vec::new();
        {
            // Streams of units taken, or left in the queue ahead of the rest.
            let mut seen: HashSet<(&str, &str)> = HashSet::new();
            let (mut events, mut bytes) = (0, 0);
            for (i, waiting) in queue.iter().enumerate().take(MAX_SCANNED) {
                if chosen.len() == self.max_units {
                    break;
                }
                let unit = &waiting.unit;
                let (n, size) = (unit.columns.len(), unit.columns.bytes());
                let keys = || {
                    unit.streams
                        .iter()
                        .map(|s| (s.aggregate_type, s.aggregate_id.as_str()))
                };
                // A unit ahead of it on one of its streams goes first: it
                // was decided on the state before that unit's.
                let behind = keys().any(|key| seen.contains(&key));
                let too_big = !chosen.is_empty()
                    && (events + n > MAX_GROUP_EVENTS || bytes + size > MAX_GROUP_BYTES);
                seen.extend(keys());
                if behind || too_big {
                    continue;
                }
                events += n;
                bytes += size;
                chosen.push(i);
            }
        }
        // Removed from the back, so that the indexes stay right.
        let mut group: Vec<Waiting> = chosen
            .iter()
            .rev()
            .filter_map(|&i| queue.remove(i))
            .collect();
        group.reverse();
        group
    }
}

/// Writes one group and answers each of its units.
async fn write_group(pool: &PgPool, group: Vec<Waiting>) {
    crate::metrics::APPEND_GROUPS.observe(group.len() as f64);
    if group.len() == 1 {
        append_each(pool, group).await;
        return;
    }
    let combined = Combined::of(&group);
    match with_transient_retry(|| combined.append(pool)).await {
        Ok(moved) => {
            for (i, w) in group.into_iter().enumerate() {
                let result = if moved.contains(&(i as i32)) {
                    Err(StoreError::Conflict)
                } else {
                    Ok(w.unit.columns.len())
                };
                let _ = w.reply.send(result);
            }
        }
        // Still failing after the retries: every unit would fail alike.
        Err(StoreError::Unavailable(e)) => {
            for w in group {
                let _ = w.reply.send(Err(StoreError::Unavailable(e.clone())));
            }
        }
        // Nothing was written; which unit it was is each one's own answer.
        Err(e) => {
            tracing::debug!(units = group.len(), error = %e, "group append failed, appending its units one by one");
            append_each(pool, group).await;
        }
    }
}

/// Appends each unit with its own statement, and answers it.
async fn append_each(pool: &PgPool, units: Vec<Waiting>) {
    for w in units {
        let result = with_transient_retry(|| w.unit.append_alone(pool)).await;
        let _ = w.reply.send(result);
    }
}

/// A group's units as one statement's arrays: every unit's events, each
/// tagged with the unit's index, and every stream head they extend.
struct Combined {
    columns: Columns,
    unit: Vec<i32>,
    head_unit: Vec<i32>,
    head_type: Vec<&'static str>,
    head_id: Vec<String>,
    head_version: Vec<i64>,
    head_hash: Vec<String>,
}

impl Combined {
    fn of(group: &[Waiting]) -> Self {
        let n = group.iter().map(|w| w.unit.columns.len()).sum();
        let mut c = Self {
            columns: Columns::with_capacity(n),
            unit: Vec::with_capacity(n),
            head_unit: Vec::new(),
            head_type: Vec::new(),
            head_id: Vec::new(),
            head_version: Vec::new(),
            head_hash: Vec::new(),
        };
        for (i, w) in group.iter().enumerate() {
            let i = i as i32;
            c.columns.extend_from(&w.unit.columns);
            c.unit.extend(std::iter::repeat_n(i, w.unit.columns.len()));
            for s in &w.unit.streams {
                c.head_unit.push(i);
                c.head_type.push(s.aggregate_type);
                c.head_id.push(s.aggregate_id.clone());
                c.head_version.push(s.version);
                c.head_hash.push(s.hash.clone());
            }
        }
        c
    }

    /// Appends every unit whose heads are still the stored ones; returns
    /// the indexes of those whose stream moved (nothing of theirs written).
    async fn append(&self, pool: &PgPool) -> Result<Vec<i32>, StoreError> {
        let c = &self.columns;
        Ok(sqlx::query_scalar(GROUP_SQL)
            .bind(&c.aggregate_type)
            .bind(&c.aggregate_id)
            .bind(&c.sequence)
            .bind(&c.event_type)
            .bind(&c.event_version)
            .bind(&c.payload)
            .bind(&c.metadata)
            .bind(&c.event_id)
            .bind(&c.occurred_at)
            .bind(&c.hash)
            .bind(&self.unit)
            .bind(&self.head_unit)
            .bind(&self.head_type)
            .bind(&self.head_id)
            .bind(&self.head_version)
            .bind(&self.head_hash)
            .fetch_all(pool)
            .await?)
    }
}

/// A group's append. `expected`: each unit's streams and the heads it
/// decided on. A unit has moved when a head it extends is gone or changed
/// (locked FOR KEY SHARE, in key order, as the single append locks it: a
/// purge deleting it waits, or the append sees it gone) or when its
/// stream already has the event after that head (a writer of this process
/// got there first; one of another process, still uncommitted, fails the
/// whole statement on the key instead). Only the other units' events go
/// in, each unit's in its order, units in queue order.
const GROUP_SQL: &str = "WITH expected AS (
         SELECT * FROM unnest($12::int4[], $13::text[], $14::text[], $15::bigint[], $16::text[])
             AS h(unit, aggregate_type, aggregate_id, sequence, hash)
     ), held AS MATERIALIZED (
         SELECT h.unit, h.aggregate_type, h.aggregate_id FROM expected h
           JOIN events e ON e.aggregate_type = h.aggregate_type AND e.aggregate_id = h.aggregate_id
                        AND e.sequence = h.sequence AND e.hash = h.hash
          ORDER BY h.aggregate_type, h.aggregate_id
            FOR KEY SHARE OF e
     ), moved AS (
         SELECT DISTINCT h.unit FROM expected h
          WHERE (h.sequence > 0 AND NOT EXISTS (
                    SELECT 1 FROM held k
                     WHERE k.unit = h.unit AND k.aggregate_type = h.aggregate_type
                       AND k.aggregate_id = h.aggregate_id))
             OR EXISTS (
                    SELECT 1 FROM events n
                     WHERE n.aggregate_type = h.aggregate_type AND n.aggregate_id = h.aggregate_id
                       AND n.sequence = h.sequence + 1)
     ), appended AS (
         INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, event_id, occurred_at, hash)
         SELECT t.aggregate_type, t.aggregate_id, t.sequence, t.event_type, t.event_version, t.payload, t.metadata, t.event_id, t.occurred_at, t.hash
           FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[]::jsonb[], $7::text[]::jsonb[], $8::uuid[], $9::timestamptz[], $10::text[], $11::int4[])
                WITH ORDINALITY AS t(aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, event_id, occurred_at, hash, unit, n)
          WHERE t.unit NOT IN (SELECT unit FROM moved)
          ORDER BY t.n
         RETURNING 1
     )
     SELECT unit FROM moved";

#[cfg(test)]
mod tests {
    use super::super::StreamHead;
    use super::*;

    /// A unit of `events` events of `bytes` payload bytes each, on `streams`.
    fn unit(streams: &[&str], events: usize, bytes: usize) -> Waiting {
        let mut columns = Columns::with_capacity(events);
        for i in 0..events {
            columns.sequence.push(i as i64 + 1);
            columns.payload.push("x".repeat(bytes));
            columns.metadata.push(String::new());
        }
        let (reply, _) = oneshot::channel();
        Waiting {
            unit: Unit {
                columns,
                streams: streams
                    .iter()
                    .map(|id| StreamHead {
                        aggregate_type: "ticket",
                        aggregate_id: id.to_string(),
                        version: 0,
                        hash: String::new(),
                    })
                    .collect(),
            },
            reply,
        }
    }

    /// Takes a group from a queue of `units`; the taken units' first
    /// stream ids, and the ids left queued.
    fn take(max_units: usize, units: Vec<Waiting>) -> (Vec<String>, Vec<String>) {
        let group = GroupCommit::new(max_units);
        group.lock().extend(units);
        let first = |w: &Waiting| {
            w.unit
                .streams
                .iter()
                .map(|s| s.aggregate_id.as_str())
                .collect::<Vec<_>>()
                .join("+")
        };
        let taken = group.take().iter().map(first).collect();
        let left = group.lock().iter().map(first).collect();
        (taken, left)
    }

    #[test]
    fn a_group_takes_units_of_distinct_streams_in_queue_order_up_to_its_size() {
        let queue = (0..5).map(|i| unit(&[&format!("s{i}")], 5, 10)).collect();
        let (taken, left) = take(3, queue);
        assert_eq!(taken, ["s0", "s1", "s2"]);
        assert_eq!(left, ["s3", "s4"]);
    }

    #[test]
    fn a_unit_behind_another_on_one_of_its_streams_waits_and_keeps_its_streams_waiting() {
        // b+c waits behind a+b; c then waits behind b+c, though no unit of
        // the group has c: each stream's units go in the order they came.
        let queue = vec![
            unit(&["a", "b"], 1, 10),
            unit(&["b", "c"], 1, 10),
            unit(&["c"], 1, 10),
            unit(&["d"], 1, 10),
        ];
        let (taken, left) = take(32, queue);
        assert_eq!(taken, ["a+b", "d"]);
        assert_eq!(left, ["b+c", "c"]);
    }

    #[test]
    fn a_group_stays_within_its_events_and_bytes_and_a_larger_unit_goes_alone() {
        let queue = vec![
            unit(&["a"], MAX_GROUP_EVENTS - 10, 1),
            unit(&["b"], 20, 1),
            unit(&["c"], 10, 1),
        ];
        let (taken, left) = take(32, queue);
        assert_eq!(taken, ["a", "c"]);
        assert_eq!(left, ["b"]);

        let big = MAX_GROUP_BYTES / 2 + 1;
        let queue = vec![
            unit(&["a"], 1, big),
            unit(&["b"], 1, big),
            unit(&["c"], 1, 5),
        ];
        let (taken, left) = take(32, queue);
        assert_eq!(taken, ["a", "c"]);
        assert_eq!(left, ["b"]);

        let queue = vec![unit(&["huge"], 1, MAX_GROUP_BYTES * 2), unit(&["b"], 1, 5)];
        let (taken, left) = take(32, queue);
        assert_eq!(taken, ["huge"]);
        assert_eq!(left, ["b"]);
    }
}
