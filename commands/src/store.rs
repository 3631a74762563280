//! The event store: postgres-es's `events` table and repository.
//!
//! Aggregates are loaded through postgres-es. Appends use one multi-row
//! INSERT per commit into the same table, in the same format: postgres-es
//! 0.5 inserts one statement per event and binds the generic aggregate's
//! type to every row, so it can neither commit several streams at once
//! (intake writes a message, its dedupe key, the sender's identities and the
//! ticket together or not at all) nor append at the rate of plain INSERTs
//! (see docs/performance.md).
//!
//! Commands run against the state loaded from the store; a concurrent writer
//! that got there first turns into an optimistic-lock conflict, and the
//! command is retried against the new state.
//!
//! The writer computes each event's chain hash (domain::audit): it loads the
//! stream's head hash with the stream, and gives every event its id and time
//! itself, so the database only stores what it is given. A writer that read
//! a stale head loses the (type, id, sequence) key to the one that did not,
//! and retries against the new head: a chain never forks.
//!
//! Recently committed aggregates stay in memory ([`AggregateCache`]), so a
//! command on a stream this process just wrote needs no read. Every append
//! names the head it extends (sequence and hash) and the INSERT fails as a
//! conflict unless that is still the stored head: a stale cached state, or
//! one of a stream purged since, never gets an event appended.
//!
//! Plain appends that arrive while others are being written share one
//! statement and one commit (group commit, [`group`]): under load, most of
//! an append's cost is the transaction, not its rows.

use std::any::Any;
use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use casebook_domain::audit::{chain_hash, jsonb_text, ChainInput};
use casebook_domain::retry::Backoff;
use casebook_domain::EventMetadata;
use cqrs_es::event_sink::EventSink;
use cqrs_es::persist::{PersistedEventRepository, PersistenceError, SerializedEvent};
use cqrs_es::{Aggregate, DomainEvent};
use postgres_es::PostgresEventRepository;
use serde::Deserialize;
use sqlx::PgPool;
use tracing::Instrument;

use crate::cache::{AggregateCache, Cached};
use crate::limits::{self, Decision, Gate};
use crate::metrics;
use crate::retry::sleep_backoff;

/// How often a command is retried when another writer got to the stream
/// first, and how long to wait in between.
pub const CONFLICT_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(5), Duration::from_millis(250), 25);
/// Retries for transient database failures (connection loss, pool timeout).
const TRANSIENT_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(50), Duration::from_secs(2), 4);

/// Binds the ten column arrays as $1–$10 and the heads (none; one as four
/// values; several as four arrays) from $11.
macro_rules! bind_columns {
    ($query:expr, $c:expr, $h:expr) => {{
        let query = $query
            .bind(&$c.aggregate_type)
            .bind(&$c.aggregate_id)
            .bind(&$c.sequence)
            .bind(&$c.event_type)
            .bind(&$c.event_version)
            .bind(&$c.payload)
            .bind(&$c.metadata)
            .bind(&$c.event_id)
            .bind(&$c.occurred_at)
            .bind(&$c.hash);
        match $h.shape() {
            $crate::store::HeadsShape::None => query,
            $crate::store::HeadsShape::One => query
                .bind($h.aggregate_type[0])
                .bind(&$h.aggregate_id[0])
                .bind($h.sequence[0])
                .bind(&$h.hash[0]),
            $crate::store::HeadsShape::Many => query
                .bind(&$h.aggregate_type)
                .bind(&$h.aggregate_id)
                .bind(&$h.sequence)
                .bind(&$h.hash),
        }
    }};
}

mod group;
pub use group::{DEFAULT_GROUP, MAX_GROUP};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("another writer changed the stream first")]
    Conflict,
    #[error("event store unavailable: {0}")]
    Unavailable(String),
    #[error("stored event could not be read: {0}")]
    Corrupt(String),
    #[error("event store error: {0}")]
    Other(String),
}

impl StoreError {
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

impl From<PersistenceError> for StoreError {
    fn from(err: PersistenceError) -> Self {
        match err {
            PersistenceError::OptimisticLockError => StoreError::Conflict,
            PersistenceError::ConnectionError(e) => StoreError::Unavailable(e.to_string()),
            PersistenceError::DeserializationError(e) => StoreError::Corrupt(e.to_string()),
            PersistenceError::UnknownError(e) => match e.downcast::<sqlx::Error>() {
                Ok(sqlx_err) => StoreError::from(*sqlx_err),
                Err(e) => StoreError::Other(e.to_string()),
            },
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        match &err {
            sqlx::Error::Database(db) if db.code().as_deref() == Some("23505") => {
                StoreError::Conflict
            }
            // serialization_failure, deadlock_detected, too_many_connections,
            // admin shutdown and friends: worth another try.
            sqlx::Error::Database(db)
                if matches!(
                    db.code().as_deref(),
                    Some("40001" | "40P01" | "53300" | "57P01" | "57P03")
                ) =>
            {
                StoreError::Unavailable(err.to_string())
            }
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::Protocol(_) => StoreError::Unavailable(err.to_string()),
            _ => StoreError::Other(err.to_string()),
        }
    }
}

/// A command's outcome when it could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum CommandError<E: std::error::Error> {
    /// The aggregate refused the command; nothing was written.
    #[error(transparent)]
    Rejected(E),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An aggregate loaded from the store and the sequence of its last event.
#[derive(Debug)]
pub struct Loaded<A> {
    pub aggregate: A,
    pub version: usize,
}

#[derive(Clone)]
pub struct EventStore {
    pool: PgPool,
    repo: std::sync::Arc<PostgresEventRepository>,
    cache: std::sync::Arc<AggregateCache>,
    group: std::sync::Arc<group::GroupCommit>,
}

impl EventStore {
    /// A store keeping up to [`crate::cache::DEFAULT_CAPACITY`] recently
    /// written aggregates in memory.
    pub fn new(pool: PgPool) -> Self {
        Self::with_aggregate_cache(pool, crate::cache::DEFAULT_CAPACITY)
    }

    /// A store keeping up to `capacity` recently written aggregates in
    /// memory (`CASEBOOK_AGGREGATE_CACHE`); `0` reads every stream.
    pub fn with_aggregate_cache(pool: PgPool, capacity: usize) -> Self {
        Self {
            repo: std::sync::Arc::new(PostgresEventRepository::new(pool.clone())),
            pool,
            cache: std::sync::Arc::new(AggregateCache::new(capacity)),
            group: std::sync::Arc::new(group::GroupCommit::new(DEFAULT_GROUP)),
        }
    }

    /// The same store combining at most `units` concurrent plain appends
    /// into one statement and commit (`CASEBOOK_APPEND_GROUP`); `1` appends
    /// every unit of work alone.
    pub fn with_append_group(mut self, units: usize) -> Self {
        self.group = std::sync::Arc::new(group::GroupCommit::new(units));
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Appends queued for a statement right now: they arrived while every
    /// append slot was busy (see [`DEFAULT_GROUP`]).
    pub fn appends_waiting(&self) -> usize {
        self.group.waiting()
    }

    /// Appends whose callers wait for them right now: queued, or in a
    /// statement being written (with `CASEBOOK_APPEND_GROUP=1`, none).
    pub fn appends_pending(&self) -> usize {
        self.group.pending()
    }

    /// The aggregates this store (and its clones) keep in memory.
    pub fn aggregate_cache(&self) -> &AggregateCache {
        &self.cache
    }

    /// The aggregate's events, in order.
    pub async fn events<A: Aggregate>(&self, id: &str) -> Result<Vec<A::Event>, StoreError> {
        Ok(self
            .sequenced_events::<A>(id)
            .await?
            .into_iter()
            .map(|(_, e)| e)
            .collect())
    }

    async fn sequenced_events<A: Aggregate>(
        &self,
        id: &str,
    ) -> Result<Vec<(usize, A::Event)>, StoreError> {
        let events =
            with_transient_retry(|| async { Ok(self.repo.get_events::<A>(id).await?) }).await?;
        events
            .into_iter()
            .map(|event| {
                decode_stored::<A>(id, &event.event_type, &event.event_version, &event.payload)
                    .map(|payload| (event.sequence, payload))
            })
            .collect()
    }

    /// A stream's rows (sequence, event type, version, payload, hash), in
    /// order.
    async fn stream_rows(
        &self,
        aggregate_type: &str,
        id: &str,
    ) -> Result<Vec<StreamRow>, StoreError> {
        with_transient_retry(|| async {
            Ok(sqlx::query_as(
                "SELECT sequence, event_type, event_version, payload, hash FROM events
                  WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY sequence",
            )
            .bind(aggregate_type)
            .bind(id)
            .fetch_all(&self.pool)
            .await?)
        })
        .await
    }

    /// The aggregate's current state, folded from its events.
    pub async fn load<A: Aggregate>(&self, id: &str) -> Result<Loaded<A>, StoreError> {
        let mut aggregate = A::default();
        let mut version = 0;
        for (sequence, event) in self.sequenced_events::<A>(id).await? {
            version = sequence;
            aggregate.apply(event);
        }
        Ok(Loaded { aggregate, version })
    }

    /// Runs `command` on one aggregate and appends the events it decides
    /// on. Conflicts with concurrent writers are retried against the fresh
    /// state.
    pub async fn execute<A>(
        &self,
        id: &str,
        command: A::Command,
        meta: &EventMetadata,
    ) -> Result<Vec<A::Event>, CommandError<A::Error>>
    where
        A: Aggregate<Services = ()> + 'static,
        A::Command: Clone,
    {
        // Conflicts on a stream read from the store; a stale copy from the
        // cache is read afresh and decided again at once, uncounted (the
        // attempt after it reads: it happens at most once in a row).
        let mut conflicts = 0;
        // Whether the next attempt must read the stream, cache or not.
        let mut fresh = false;
        loop {
            let mut uow = self.unit_of_work(meta.clone());
            uow.use_cache = !fresh;
            let decided = uow.execute::<A>(id, command.clone()).await;
            // A state from memory is proven current only by the append that
            // follows it. A refusal, or a decision to append nothing, has
            // no append: it is taken again on the stream read afresh (the
            // entry left the cache with this unit).
            let from_cache = uow.streams.iter().any(|s| s.from_cache);
            let events = match decided {
                Err(CommandError::Rejected(_)) if from_cache => {
                    fresh = true;
                    continue;
                }
                Ok(events) if events.is_empty() && from_cache => {
                    fresh = true;
                    continue;
                }
                decided => decided?,
            };
            fresh = false;
            match uow.commit().await {
                Ok(_) => return Ok(events),
                Err(StoreError::Conflict) if from_cache => fresh = true,
                Err(StoreError::Conflict) => {
                    conflicts += 1;
                    if !CONFLICT_BACKOFF.should_retry(conflicts) {
                        return Err(StoreError::Conflict.into());
                    }
                    sleep_backoff(&CONFLICT_BACKOFF, conflicts).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// A unit of work spanning several streams, committed atomically.
    pub fn unit_of_work(&self, meta: EventMetadata) -> UnitOfWork<'_> {
        UnitOfWork {
            store: self,
            meta,
            streams: Vec::new(),
            prefetched: HashMap::new(),
            use_cache: false,
        }
    }
}

/// A stored payload as the aggregate's event, upcast from its stored
/// version first (`casebook_domain::upcast`), as every reader does.
fn decode_stored<A: Aggregate>(
    id: &str,
    event_type: &str,
    event_version: &str,
    payload: &serde_json::Value,
) -> Result<A::Event, StoreError> {
    let payload = casebook_domain::upcast::upcast(A::TYPE, event_type, event_version, payload)
        .map_err(|e| StoreError::Corrupt(format!("{}/{id}: {e}", A::TYPE)))?;
    A::Event::deserialize(payload.as_ref())
        .map_err(|e| StoreError::Corrupt(format!("{}/{id}: {e}", A::TYPE)))
}

/// One stored event of a stream: sequence, event type, version, payload,
/// chain hash.
type StreamRow = (i64, String, String, serde_json::Value, String);

/// Folds a stream's rows, upcast as stored; also returns the hash of its
/// last event (`""` for an empty stream), the next event's predecessor in
/// the chain.
fn fold<A: Aggregate>(id: &str, rows: Vec<StreamRow>) -> Result<(Loaded<A>, String), StoreError> {
    let mut aggregate = A::default();
    let mut version = 0;
    let mut head = String::new();
    for (sequence, event_type, event_version, payload, hash) in rows {
        let event = decode_stored::<A>(id, &event_type, &event_version, &payload)?;
        aggregate.apply(event);
        version = sequence as usize;
        head = hash;
    }
    Ok((Loaded { aggregate, version }, head))
}

async fn decide<A: Aggregate<Services = ()>>(
    aggregate: &mut A,
    command: A::Command,
) -> Result<Vec<A::Event>, A::Error> {
    let sink = EventSink::<A>::default();
    aggregate.handle(command, &(), &sink).await?;
    Ok(sink.collect().await)
}

fn serialize<A: Aggregate>(
    id: &str,
    version: usize,
    events: &[A::Event],
    meta: &EventMetadata,
) -> Result<Vec<SerializedEvent>, StoreError> {
    let metadata =
        serde_json::to_value(meta.to_map()).map_err(|e| StoreError::Other(e.to_string()))?;
    events
        .iter()
        .enumerate()
        .map(|(i, event)| {
            Ok(SerializedEvent::new(
                id.to_string(),
                version + i + 1,
                A::TYPE.to_string(),
                event.event_type(),
                event.event_version(),
                serde_json::to_value(event).map_err(|e| StoreError::Other(e.to_string()))?,
                metadata.clone(),
            ))
        })
        .collect()
}

/// Retries transient failures (connection loss, pool exhaustion) with
/// backoff; anything else, conflicts included, returns at once.
pub(crate) async fn with_transient_retry<T, F, Fut>(mut op: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        match op().await {
            Err(e) if e.is_transient() && TRANSIENT_BACKOFF.should_retry(attempt) => {
                tracing::warn!(attempt, error = %e, "transient event store failure, retrying");
                sleep_backoff(&TRANSIENT_BACKOFF, attempt).await;
            }
            other => return other,
        }
    }
}

struct PendingStream {
    aggregate_type: &'static str,
    aggregate_id: String,
    version: usize,
    /// The stored head's chain hash (`""` for a new stream).
    head: String,
    state: Box<dyn Any + Send + Sync>,
    events: Vec<SerializedEvent>,
    /// Whether `state` is exactly the stored state plus `events`: a
    /// rejected command may have changed it halfway, and such a state is
    /// never cached.
    cacheable: bool,
    /// Whether `state` came from the aggregate cache (not read).
    from_cache: bool,
}

/// Commands on several aggregates whose events are committed in one
/// transaction. Each aggregate is loaded once; later commands see the
/// effects of earlier ones. A conflict on any stream fails the whole commit
/// (callers rerun the unit from the start).
pub struct UnitOfWork<'s> {
    store: &'s EventStore,
    meta: EventMetadata,
    streams: Vec<PendingStream>,
    /// Streams read ahead in one query: (type, id) → their events.
    prefetched: HashMap<(String, String), Vec<StreamRow>>,
    /// Whether streams may come from the aggregate cache. Only
    /// [`EventStore::execute`] sets it: it runs one command, whose every
    /// decision ends in an append that checks the state against the store,
    /// or is taken again on a fresh read. A unit of work used directly may
    /// decide on what it loads without appending to it, so it always reads
    /// (and refreshes the cache with what it committed).
    use_cache: bool,
}

impl UnitOfWork<'_> {
    async fn stream<A>(&mut self, id: &str) -> Result<usize, StoreError>
    where
        A: Aggregate + 'static,
    {
        if let Some(i) = self
            .streams
            .iter()
            .position(|s| s.aggregate_type == A::TYPE && s.aggregate_id == id)
        {
            return Ok(i);
        }
        // Rows read ahead for this unit are as fresh as anything cached.
        let prefetched = self
            .prefetched
            .remove(&(A::TYPE.to_string(), id.to_string()));
        let cached = match prefetched {
            Some(_) => None,
            None if self.use_cache => self.store.cache.take::<A>(A::TYPE, id),
            None => None,
        };
        let from_cache = cached.is_some();
        let (state, version, head) = match cached {
            Some(Cached {
                state,
                version,
                head,
            }) => (state, version, head),
            None => {
                let rows = match prefetched {
                    Some(rows) => rows,
                    None => self.store.stream_rows(A::TYPE, id).await?,
                };
                let (Loaded { aggregate, version }, head) = fold::<A>(id, rows)?;
                (
                    Box::new(aggregate) as Box<dyn Any + Send + Sync>,
                    version,
                    head,
                )
            }
        };
        self.streams.push(PendingStream {
            aggregate_type: A::TYPE,
            aggregate_id: id.to_string(),
            version,
            head,
            state,
            events: Vec::new(),
            cacheable: true,
            from_cache,
        });
        Ok(self.streams.len() - 1)
    }

    /// Reads several streams in one query, so that the loads and commands
    /// that follow need no round trip of their own. With `with_identity_owners`,
    /// the customers owning any of the listed `customer_identity` streams
    /// are read in the same query.
    pub async fn prefetch(
        &mut self,
        streams: &[(&str, String)],
        with_identity_owners: bool,
    ) -> Result<(), StoreError> {
        let (types, ids): (Vec<String>, Vec<String>) = streams
            .iter()
            .map(|(t, id)| (t.to_string(), id.clone()))
            .unzip();
        let pool = self.store.pool.clone();
        let rows: Vec<(String, String, i64, String, String, serde_json::Value, String)> = with_transient_retry(|| async {
            Ok(sqlx::query_as(
                "WITH wanted AS (
                     SELECT * FROM unnest($1::text[], $2::text[]) AS s(aggregate_type, aggregate_id)
                 ), owners AS (
                     SELECT 'customer'::text AS aggregate_type, e.payload->>'customer_id' AS aggregate_id
                       FROM wanted w JOIN events e USING (aggregate_type, aggregate_id)
                      WHERE $3 AND e.aggregate_type = 'customer_identity'
                 ), streams AS (
                     SELECT * FROM wanted UNION SELECT * FROM owners
                 )
                 SELECT e.aggregate_type, e.aggregate_id, e.sequence, e.event_type, e.event_version, e.payload, e.hash
                   FROM streams s JOIN events e USING (aggregate_type, aggregate_id)
                  ORDER BY e.aggregate_type, e.aggregate_id, e.sequence",
            )
            .bind(&types)
            .bind(&ids)
            .bind(with_identity_owners)
            .fetch_all(&pool)
            .await?)
        })
        .await?;
        for key in types.into_iter().zip(ids) {
            self.prefetched.entry(key).or_default();
        }
        for (t, id, sequence, event_type, event_version, payload, hash) in rows {
            self.prefetched.entry((t, id)).or_default().push((
                sequence,
                event_type,
                event_version,
                payload,
                hash,
            ));
        }
        Ok(())
    }

    /// Starts a stream the caller has just made up an id for (a fresh
    /// UUID): nothing to load. Should it exist after all, the commit fails
    /// with a conflict.
    pub fn create<A>(&mut self, id: &str)
    where
        A: Aggregate + 'static,
    {
        if self
            .streams
            .iter()
            .any(|s| s.aggregate_type == A::TYPE && s.aggregate_id == id)
        {
            return;
        }
        self.streams.push(PendingStream {
            aggregate_type: A::TYPE,
            aggregate_id: id.to_string(),
            version: 0,
            head: String::new(),
            state: Box::new(A::default()),
            events: Vec::new(),
            cacheable: true,
            from_cache: false,
        });
    }

    /// The aggregate as this unit of work sees it (stored state plus the
    /// events recorded so far).
    pub async fn load<A>(&mut self, id: &str) -> Result<&A, StoreError>
    where
        A: Aggregate + 'static,
    {
        let i = self.stream::<A>(id).await?;
        Ok(self.streams[i]
            .state
            .downcast_ref::<A>()
            .expect("stream state has the aggregate's type"))
    }

    /// Runs a command and records its events for the commit.
    pub async fn execute<A>(
        &mut self,
        id: &str,
        command: A::Command,
    ) -> Result<Vec<A::Event>, CommandError<A::Error>>
    where
        A: Aggregate<Services = ()> + 'static,
    {
        let i = self.stream::<A>(id).await?;
        let stream = &mut self.streams[i];
        let aggregate = stream
            .state
            .downcast_mut::<A>()
            .expect("stream state has the aggregate's type");
        let events = match decide(aggregate, command).await {
            Ok(events) => events,
            Err(e) => {
                stream.cacheable = false;
                return Err(CommandError::Rejected(e));
            }
        };
        let version = stream.version + stream.events.len();
        match serialize::<A>(id, version, &events, &self.meta) {
            Ok(serialized) => stream.events.extend(serialized),
            Err(e) => {
                // The state has the events applied, the commit would not.
                stream.cacheable = false;
                return Err(e.into());
            }
        }
        Ok(events)
    }

    /// Metadata for the events of commands executed from now on.
    pub fn set_metadata(&mut self, meta: EventMetadata) {
        self.meta = meta;
    }

    /// Appends every recorded event in one transaction and one statement,
    /// in the order the commands ran. Returns how many were written.
    pub async fn commit(self) -> Result<usize, StoreError> {
        match self.commit_gated(None).await? {
            Committed::Written(n) => Ok(n),
            // Without a gate nothing is ever limited.
            Committed::Limited { .. } => Ok(0),
        }
    }

    /// Like [`commit`](Self::commit), but the events are appended only when
    /// `gate`'s rate limit has room, and its hit is counted in the same
    /// statement: one round trip and one commit, a hit only for what was
    /// stored (a duplicate, a conflict or a failure counts nothing), and
    /// nothing stored when limited.
    pub async fn commit_gated(self, gate: Option<&Gate>) -> Result<Committed, StoreError> {
        let cache = self.store.cache.clone();
        let mut streams = Vec::with_capacity(self.streams.len());
        let result = self.append(gate, &mut streams).await;
        match result {
            // Only a stored state is kept: the streams as they now stand.
            Ok(Committed::Written(_)) => {
                for s in streams {
                    if s.cacheable {
                        cache.put(
                            s.aggregate_type,
                            s.aggregate_id,
                            Cached {
                                state: s.state,
                                version: s.version,
                                head: s.head,
                            },
                        );
                    }
                }
            }
            // Nothing stored, or not known what: forget every stream the
            // unit touched (another task may have put a copy back since).
            Ok(Committed::Limited { .. }) | Err(_) => cache.evict_all(
                streams
                    .iter()
                    .map(|s| (s.aggregate_type, s.aggregate_id.as_str())),
            ),
        }
        result
    }

    /// The append itself. Leaves in `after` every stream of the unit, its
    /// version and head advanced past its recorded events.
    async fn append(
        self,
        gate: Option<&Gate>,
        after: &mut Vec<PendingStream>,
    ) -> Result<Committed, StoreError> {
        let n: usize = self.streams.iter().map(|s| s.events.len()).sum();
        if n == 0 {
            after.extend(self.streams);
            return Ok(Committed::Written(0));
        }
        // The append's span; with export on, its W3C context goes into every
        // event's metadata so that the relay, which publishes later, can
        // continue the trace across Kafka.
        let span = tracing::info_span!(
            target: casebook_telemetry::TARGET,
            "event_store.append",
            otel.kind = "internal",
            otel.status_code = tracing::field::Empty,
            db.system.name = "postgresql",
            correlation_id = %self.meta.correlation_id,
            events = n,
        );
        let trace = casebook_telemetry::headers_of(&span);
        let mut columns = Columns::with_capacity(n);
        // One time for the commit, at the precision Postgres stores.
        let now = chrono::Utc::now();
        let now = chrono::DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now);
        let mut events: Vec<SerializedEvent> = Vec::with_capacity(n);
        // Every stream the unit writes to, as the writer found it.
        let mut written = Vec::with_capacity(self.streams.len());
        // The unit's events share their metadata (unless a command changed
        // it): its text is made once.
        let mut metadata = None;
        for mut stream in self.streams {
            if !stream.events.is_empty() {
                written.push(StreamHead::of(&stream));
            }
            let mut prev = std::mem::take(&mut stream.head);
            stream.version += stream.events.len();
            for e in std::mem::take(&mut stream.events) {
                prev = columns.push(&e, trace.as_ref(), &mut metadata, &prev, now);
                events.push(e);
            }
            stream.head = prev;
            after.push(stream);
        }
        let pool = self.store.pool.clone();
        let unit = Unit {
            columns,
            streams: written,
        };
        let committed = match gate {
            // Concurrent plain appends may share a statement and a commit.
            None => self
                .store
                .group
                .append(&pool, unit)
                .instrument(span.clone())
                .await
                .map(Committed::Written),
            Some(gate) => {
                with_transient_retry(|| unit.append_gated(&pool, gate))
                    .instrument(span.clone())
                    .await
            }
        };
        if committed.is_err() {
            span.record("otel.status_code", "ERROR");
        }
        let committed = committed?;
        if gate.is_some() {
            limits::sweep_now_and_then(&pool).await;
        }
        if let Committed::Written(_) = committed {
            metrics::record_appended(&events);
        }
        Ok(committed)
    }
}

/// What a gated commit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// This many events were appended.
    Written(usize),
    /// The gate's limit had no room: nothing was appended.
    Limited { retry_after: Duration },
}

/// Appends the ten column arrays ($1–$10) as events, in array order.
const INSERT_EVENTS: &str = "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, event_id, occurred_at, hash)
     SELECT t.aggregate_type, t.aggregate_id, t.sequence, t.event_type, t.event_version, t.payload, t.metadata, t.event_id, t.occurred_at, t.hash
       FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[]::jsonb[], $7::text[]::jsonb[], $8::uuid[], $9::timestamptz[], $10::text[])
            WITH ORDINALITY AS t(aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, event_id, occurred_at, hash, n)";

/// The one head ($11–$14: type, id, sequence, hash) an append extends,
/// locked FOR KEY SHARE: a purge deleting it waits for the append, or the
/// append sees it gone. Plain parameters: planned as one index lookup.
const ONE_HEAD: &str = "heads AS (
         SELECT 1 FROM events
          WHERE aggregate_type = $11 AND aggregate_id = $12 AND sequence = $13 AND hash = $14
         FOR KEY SHARE
     )";

/// The same for several heads, as four arrays ($11–$14).
const MANY_HEADS: &str = "heads AS (
         SELECT 1 FROM events e
           JOIN unnest($11::text[], $12::text[], $13::bigint[], $14::text[]) AS h(aggregate_type, aggregate_id, sequence, hash)
             ON e.aggregate_type = h.aggregate_type AND e.aggregate_id = h.aggregate_id
            AND e.sequence = h.sequence AND e.hash = h.hash
         FOR KEY SHARE OF e
     )";

/// The events go in only when every head is still there; otherwise the
/// statement fails as a unique violation (casebook_stream_moved, migration
/// 20261129000001), which the writer takes for a conflict.
const HEADS_UNMOVED: &str =
    "CASE WHEN (SELECT count(*) FROM heads) = cardinality($13::bigint[]) THEN true
          ELSE casebook_stream_moved() END";
const HEAD_UNMOVED: &str = "CASE WHEN EXISTS (SELECT 1 FROM heads) THEN true
          ELSE casebook_stream_moved() END";

/// The append's statement for the heads it extends, with or without the
/// rate limit's upsert (from $11 without heads, else from $15) in the same
/// statement: then the events go in only when the hit was allowed.
fn insert_sql(shape: HeadsShape, gated: bool) -> &'static str {
    static SQL: [OnceLock<String>; 6] = [const { OnceLock::new() }; 6];
    let slot = shape as usize * 2 + usize::from(gated);
    SQL[slot].get_or_init(|| {
        let (heads, condition) = match shape {
            HeadsShape::None => (None, "true"),
            HeadsShape::One => (Some(ONE_HEAD), HEAD_UNMOVED),
            HeadsShape::Many => (Some(MANY_HEADS), HEADS_UNMOVED),
        };
        let mut ctes: Vec<String> = Vec::new();
        let mut condition = condition.to_string();
        if gated {
            ctes.push(format!(
                "gate AS ({})",
                limits::upsert_sql(if heads.is_some() { 15 } else { 11 })
            ));
            condition = format!("{condition} AND (SELECT allowed FROM gate)");
        }
        ctes.extend(heads.map(str::to_string));
        let insert = format!("{INSERT_EVENTS} WHERE {condition} ORDER BY t.n");
        match (gated, ctes.is_empty()) {
            (false, true) => insert,
            (false, false) => format!("WITH {} {insert}", ctes.join(", ")),
            (true, _) => format!(
                "WITH {}, appended AS ({insert} RETURNING 1)
                 SELECT gate.allowed, gate.retry_secs FROM gate",
                ctes.join(", ")
            ),
        }
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeadsShape {
    None = 0,
    One = 1,
    Many = 2,
}

/// A stream a unit writes to, as its writer found it: the stored head
/// (`version` 0 and `hash` "" for a new stream) its events extend.
struct StreamHead {
    aggregate_type: &'static str,
    aggregate_id: String,
    version: i64,
    hash: String,
}

impl StreamHead {
    fn of(stream: &PendingStream) -> Self {
        Self {
            aggregate_type: stream.aggregate_type,
            aggregate_id: stream.aggregate_id.clone(),
            version: stream.version as i64,
            hash: stream.head.clone(),
        }
    }
}

/// One unit of work's append: its events as columns, and every stream it
/// writes to with the head its events extend.
struct Unit {
    columns: Columns,
    streams: Vec<StreamHead>,
}

impl Unit {
    /// The unit's own statement, with no gate.
    async fn append_alone(&self, pool: &PgPool) -> Result<usize, StoreError> {
        let heads = Heads::of(&self.streams);
        bind_columns!(
            sqlx::query(insert_sql(heads.shape(), false)),
            self.columns,
            heads
        )
        .execute(pool)
        .await?;
        Ok(self.columns.len())
    }

    /// The unit's own statement, appended only when `gate` has room.
    async fn append_gated(&self, pool: &PgPool, gate: &Gate) -> Result<Committed, StoreError> {
        let heads = Heads::of(&self.streams);
        let (allowed, retry_secs): (bool, Option<f64>) = bind_columns!(
            sqlx::query_as(insert_sql(heads.shape(), true)),
            self.columns,
            heads
        )
        .bind(gate.scope)
        .bind(&gate.key)
        .bind(gate.window_secs())
        .bind(i64::from(gate.limit.max))
        .fetch_one(pool)
        .await?;
        Ok(match gate.decision(allowed, retry_secs) {
            Decision::Allowed => Committed::Written(self.columns.len()),
            Decision::Limited { retry_after } => Committed::Limited { retry_after },
        })
    }
}

/// The stored heads an append extends: for each stream that had events
/// before, its last sequence and hash as the writer decided on them.
#[derive(Default)]
struct Heads {
    aggregate_type: Vec<&'static str>,
    aggregate_id: Vec<String>,
    sequence: Vec<i64>,
    hash: Vec<String>,
}

impl Heads {
    fn shape(&self) -> HeadsShape {
        match self.sequence.len() {
            0 => HeadsShape::None,
            1 => HeadsShape::One,
            _ => HeadsShape::Many,
        }
    }

    /// The heads of `streams` that had events before.
    fn of(streams: &[StreamHead]) -> Self {
        let mut heads = Self::default();
        for s in streams.iter().filter(|s| s.version > 0) {
            heads.aggregate_type.push(s.aggregate_type);
            heads.aggregate_id.push(s.aggregate_id.clone());
            heads.sequence.push(s.version);
            heads.hash.push(s.hash.clone());
        }
        heads
    }
}

#[derive(Default)]
struct Columns {
    aggregate_type: Vec<String>,
    aggregate_id: Vec<String>,
    sequence: Vec<i64>,
    event_type: Vec<String>,
    event_version: Vec<String>,
    /// As `jsonb::text` prints it: the text the chain hashes is the text
    /// sent, so each event is serialised once.
    payload: Vec<String>,
    metadata: Vec<String>,
    event_id: Vec<uuid::Uuid>,
    occurred_at: Vec<chrono::DateTime<chrono::Utc>>,
    hash: Vec<String>,
}

impl Columns {
    fn len(&self) -> usize {
        self.sequence.len()
    }

    /// Bytes of payload and metadata text.
    fn bytes(&self) -> usize {
        self.payload
            .iter()
            .chain(&self.metadata)
            .map(String::len)
            .sum()
    }

    /// Adds `other`'s events after these.
    fn extend_from(&mut self, other: &Columns) {
        self.aggregate_type.extend_from_slice(&other.aggregate_type);
        self.aggregate_id.extend_from_slice(&other.aggregate_id);
        self.sequence.extend_from_slice(&other.sequence);
        self.event_type.extend_from_slice(&other.event_type);
        self.event_version.extend_from_slice(&other.event_version);
        self.payload.extend_from_slice(&other.payload);
        self.metadata.extend_from_slice(&other.metadata);
        self.event_id.extend_from_slice(&other.event_id);
        self.occurred_at.extend_from_slice(&other.occurred_at);
        self.hash.extend_from_slice(&other.hash);
    }

    fn with_capacity(n: usize) -> Self {
        Self {
            aggregate_type: Vec::with_capacity(n),
            aggregate_id: Vec::with_capacity(n),
            sequence: Vec::with_capacity(n),
            event_type: Vec::with_capacity(n),
            event_version: Vec::with_capacity(n),
            payload: Vec::with_capacity(n),
            metadata: Vec::with_capacity(n),
            event_id: Vec::with_capacity(n),
            occurred_at: Vec::with_capacity(n),
            hash: Vec::with_capacity(n),
        }
    }

    /// Adds one event, whose stream's previous hash is `prev`; returns its
    /// own hash. `last_metadata`: the metadata last seen and its text with
    /// the trace context, reused while the events' metadata is the same.
    fn push(
        &mut self,
        e: &SerializedEvent,
        trace: Option<&casebook_telemetry::TraceHeaders>,
        last_metadata: &mut Option<(serde_json::Value, String)>,
        prev: &str,
        at: chrono::DateTime<chrono::Utc>,
    ) -> String {
        self.aggregate_type.push(e.aggregate_type.clone());
        self.aggregate_id.push(e.aggregate_id.clone());
        self.sequence.push(e.sequence as i64);
        self.event_type.push(e.event_type.clone());
        self.event_version.push(e.event_version.clone());
        let payload = jsonb_text(&e.payload);
        let metadata = match last_metadata {
            Some((source, text)) if *source == e.metadata => text.clone(),
            _ => {
                let mut metadata = e.metadata.clone();
                if let (Some(trace), Some(map)) = (trace, metadata.as_object_mut()) {
                    for (key, value) in trace.pairs() {
                        map.insert(key.to_string(), value.into());
                    }
                }
                let text = jsonb_text(&metadata);
                *last_metadata = Some((e.metadata.clone(), text.clone()));
                text
            }
        };
        let event_id = uuid::Uuid::new_v4();
        let hash = chain_hash(
            prev,
            &ChainInput {
                event_id: &event_id.to_string(),
                aggregate_type: &e.aggregate_type,
                aggregate_id: &e.aggregate_id,
                sequence: e.sequence as i64,
                event_type: &e.event_type,
                event_version: &e.event_version,
                occurred_at_micros: at.timestamp_micros(),
                payload: &payload,
                metadata: &metadata,
            },
        );
        self.payload.push(payload);
        self.metadata.push(metadata);
        self.event_id.push(event_id);
        self.occurred_at.push(at);
        self.hash.push(hash.clone());
        hash
    }
}
