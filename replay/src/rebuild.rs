//! `casebook replay projections`: rebuilds read models from the event store
//! without taking them away from readers.
//!
//! Per projector (the store is read once for all of them: each page goes
//! to every projector being rebuilt, and each applies it at its own pace):
//!
//! 1. **Shadow.** A schema of its own (`casebook_shadow_<name>`) gets empty
//!    copies of the projector's tables and of its bookkeeping
//!    (`projector_streams`, `projector_progress`, `projector_baselines`;
//!    `LIKE … INCLUDING ALL`, unlogged, but for a first build's tables: they
//!    are thrown away and rebuilt whole if anything happens), with every index
//!    but those only readers use (`Projector::reader_indexes`), whose
//!    upkeep would cost on every row and serve nobody. The projector's own
//!    code fills them (or its `shadow_filler`, which writes the same rows
//!    but keeps what it wrote in memory between pages): each page is
//!    applied in a short
//!    transaction whose `search_path` puts the shadow schema first, so its
//!    unqualified table names resolve to the copies (the event store stays
//!    `public.events`). Pages are read in `(transaction_id, position)`
//!    order behind the snapshot's xmin, as the relay reads: nothing can
//!    appear behind a page once it is read, and the filling goes on until
//!    every transaction that had begun when the rebuild did has finished,
//!    so the shadow holds at least everything committed before the
//!    rebuild started. Each event is read once, in commit order, so the
//!    fill writes no per-stream sequence: where it stopped is the shadow's
//!    baseline (`projections::set_baseline`), from which every stream's
//!    sequence follows. Readers and the live consumer carry on meanwhile;
//!    nothing holds the relay back.
//! 2. **Swap.** As soon as its own fill is done (others may still be
//!    filling), one transaction takes the projector's advisory lock
//!    exclusively (each live batch takes it shared, `projections::projector`,
//!    so in-flight batches finish first and new ones wait), applies what was
//!    stored since to the shadow, and replaces the live rows and the
//!    projector's per-stream sequences with the shadow's (its baseline, and
//!    rows for the streams the catch-up applied). Readers see the
//!    old rows until it commits and the new ones after: never an empty or
//!    half-built read model (the rows are replaced with DELETE and INSERT,
//!    not TRUNCATE, which would lock readers out). A first build (the live
//!    table empty when the rebuild began) fills a logged shadow instead and
//!    moves it in whole ([`move_in`]): the empty live table is dropped and
//!    the shadow, with every index, constraint, policy and grant the live
//!    one had, takes its name; readers that meet the swap wait for it (at
//!    most the swap's own length) and then read the moved table.
//! 3. **Resume.** The live consumer's Kafka offsets are left as they were.
//!    Whatever it receives next that the shadow already had is recognised by
//!    its stream sequence and skipped (no double); whatever the shadow did
//!    not have has a higher sequence and is applied (no gap).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use casebook_domain::EventEnvelope;
use casebook_projections::projector::REBUILD_LOCK_CLASS;
use casebook_projections::store::{stored_event, EVENT_COLUMNS};
use casebook_projections::{
    apply_batch_in, apply_rebuild_page, set_baseline, FillPart, ProjectionError, Projector,
};
use futures::TryStreamExt;
use sqlx::{PgConnection, PgPool, Row};

/// Events read from the store per page (one short transaction each).
pub const CHUNK: usize = 5000;
/// Where the reader hands a lane its pages.
type PageSender = tokio::sync::mpsc::Sender<Arc<Vec<EventEnvelope>>>;

/// Pages a projector may fall behind the reader (the rest wait for it).
pub const PAGES_AHEAD: usize = 4;
/// Parts of what a shadow filler kept back written at once, each on a
/// connection of its own.
const FILL_WRITERS: usize = 3;
/// The bookkeeping tables a projector writes besides its own.
const BOOKKEEPING: [&str; 3] = [
    "projector_streams",
    "projector_progress",
    "projector_baselines",
];
/// How soon to look again while an older transaction holds events back.
const PENDING_POLL: Duration = Duration::from_millis(10);
/// How often a swap that lost a deadlock is tried again.
const SWAP_ATTEMPTS: u32 = 5;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildReport {
    pub projector: &'static str,
    pub events_read: u64,
    pub events_applied: u64,
    /// Of them, applied in the swap's transaction (stored during the rebuild).
    pub caught_up: u64,
    /// Time spent on this read model: applying its pages (the projectors
    /// work side by side, so these overlap) and its swap.
    pub millis: u128,
    /// Of `millis`, the swap's transaction (catching up and replacing the live
    /// rows), during which the projector's live batches wait.
    pub swap_millis: u128,
}

/// Where a rebuild stands, for progress displays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub projector: &'static str,
    /// Events of the projector's aggregate types read so far.
    pub done: u64,
    /// Events of its aggregate types stored when it started (more may come).
    pub total: u64,
    pub swapped: bool,
}

pub async fn rebuild(
    pool: &PgPool,
    projectors: &[Arc<dyn Projector>],
) -> Result<Vec<RebuildReport>, ProjectionError> {
    rebuild_with_progress(pool, projectors, CHUNK, &|_| {}).await
}

/// [`rebuild`], reading `chunk` events per page.
pub async fn rebuild_paged(
    pool: &PgPool,
    projectors: &[Arc<dyn Projector>],
    chunk: usize,
) -> Result<Vec<RebuildReport>, ProjectionError> {
    rebuild_with_progress(pool, projectors, chunk, &|_| {}).await
}

/// [`rebuild`], reading `chunk` events per page and telling `progress`
/// after each.
///
/// The store is read once for all of `projectors`: one reader pages
/// through the log and hands each page to every projector, each applying
/// it to its own shadow in its own transactions, at its own pace (up to
/// [`PAGES_AHEAD`] pages behind the reader). Then each swaps its shadow in.
/// The reports come back in the order of `projectors`. The pool needs at
/// least two connections; [`connections_for`] gives the number that keeps
/// every projector busy.
pub async fn rebuild_with_progress(
    pool: &PgPool,
    projectors: &[Arc<dyn Projector>],
    chunk: usize,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<Vec<RebuildReport>, ProjectionError> {
    let chunk = chunk.clamp(1, 50_000);
    if projectors.is_empty() {
        return Ok(Vec::new());
    }
    // One rebuild of a projector at a time: a second is refused, not mixed
    // in. The locks are the guard connection's session's.
    let mut guard = pool.acquire().await?;
    let mut locked: Vec<&'static str> = Vec::with_capacity(projectors.len());
    let mut outcome = Ok(Vec::new());
    for projector in projectors {
        let name = projector.name();
        let mine: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
            .bind(REBUILD_LOCK_CLASS + 1)
            .bind(name)
            .fetch_one(&mut *guard)
            .await?;
        if !mine {
            outcome = Err(ProjectionError::Database(sqlx::Error::Protocol(format!(
                "another rebuild of {name} is running"
            ))));
            break;
        }
        locked.push(name);
    }
    if outcome.is_ok() {
        outcome = fill_and_swap(pool, projectors, chunk, progress).await;
    }
    // Released whatever happened (the connection may go back to the pool).
    for name in locked {
        let _ = sqlx::query("SELECT pg_advisory_unlock($1, hashtext($2))")
            .bind(REBUILD_LOCK_CLASS + 1)
            .bind(name)
            .execute(&mut *guard)
            .await;
    }
    outcome
}

/// Connections a pool needs for a rebuild of `projectors` read models to
/// keep each busy: one per projector, the reader's, the guard's, and those
/// writing what a shadow filler kept back.
pub fn connections_for(projectors: usize) -> u32 {
    (projectors + 2 + FILL_WRITERS).min(64) as u32
}

/// The shadow schema of a projector: its name is ASCII letters, digits and
/// dashes (checked), so the identifier needs no quoting.
fn shadow_schema(name: &str) -> Result<String, ProjectionError> {
    if name.is_empty()
        || name.len() > 40
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(ProjectionError::Database(sqlx::Error::Protocol(format!(
            "projector name {name:?} cannot name a shadow schema"
        ))));
    }
    Ok(format!("casebook_shadow_{}", name.replace('-', "_")))
}

/// A table name from a projector's static list, checked the same way.
fn table_ident(name: &str) -> Result<&str, ProjectionError> {
    if !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        Ok(name)
    } else {
        Err(ProjectionError::Database(sqlx::Error::Protocol(format!(
            "table name {name:?} is not a plain identifier"
        ))))
    }
}

/// Empty copies of the projector's tables and bookkeeping in its shadow
/// schema (a leftover of an interrupted rebuild is dropped first). Returns
/// the projector's tables whose live table is empty (its first build): their
/// copies are logged, so that the swap can move them in whole
/// ([`move_in`]); the others are unlogged, and the swap copies what differs.
async fn prepare_shadow(
    pool: &PgPool,
    schema: &str,
    projector: &dyn Projector,
) -> Result<Vec<&'static str>, ProjectionError> {
    let mut tx = pool.begin().await?;
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut *tx)
        .await?;
    let mut movable = Vec::new();
    for table in projector.tables().iter().chain(BOOKKEEPING.iter()) {
        let table = table_ident(table)?;
        let empty = projector.tables().contains(&table)
            && sqlx::query_scalar::<_, bool>(&format!(
                "SELECT NOT EXISTS (SELECT 1 FROM public.{table})"
            ))
            .fetch_one(&mut *tx)
            .await?;
        if empty {
            movable.push(table);
        }
        sqlx::query(&format!(
            "CREATE {}TABLE {schema}.{table} (LIKE public.{table} INCLUDING ALL EXCLUDING INDEXES)",
            if empty { "" } else { "UNLOGGED " }
        ))
        .execute(&mut *tx)
        .await?;
        // The live table's indexes, but for those only readers use
        // (`Projector::reader_indexes`): the shadow is written by the
        // projector and compared by primary key, never queried by readers.
        for definition in shadow_indexes(&mut tx, projector, table, schema, false).await? {
            sqlx::query(&definition).execute(&mut *tx).await?;
        }
    }
    tx.commit().await?;
    Ok(movable)
}

/// A live index's definition (`pg_get_indexdef`) moved onto the shadow's
/// copy of its table; `None` if it is not on `public.<table>`.
fn shadow_index(definition: &str, table: &str, schema: &str) -> Option<String> {
    let on = format!(" ON public.{table} USING ");
    let (head, tail) = definition.split_once(&on)?;
    Some(format!("{head} ON {schema}.{table} USING {tail}"))
}

/// Points the transaction's unqualified table names at the shadow schema.
/// Shadow pages need not wait for their commit to reach the disk: the
/// shadow is thrown away and rebuilt whole if anything is lost.
async fn use_shadow(tx: &mut PgConnection, schema: &str) -> Result<(), ProjectionError> {
    sqlx::query(
        "SELECT set_config('search_path', $1, true), set_config('synchronous_commit', 'off', true)",
    )
    .bind(format!("{schema}, public"))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Where the paging reached: the last (transaction id, position) read.
#[derive(Clone)]
struct Cursor {
    last_tx: String,
    last_position: i64,
}

/// Reads the next page of events of `types` behind the xmin barrier,
/// moving `cursor` past it. An empty page means caught up with the barrier.
async fn read_page(
    conn: &mut PgConnection,
    types: &[String],
    cursor: &mut Cursor,
    chunk_size: usize,
) -> Result<Vec<EventEnvelope>, ProjectionError> {
    let sql = format!(
        "SELECT transaction_id::text AS tx, {EVENT_COLUMNS} FROM public.events
          WHERE (transaction_id, position) > ($1::text::xid8, $2)
            AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())
            AND aggregate_type = ANY($3)
          ORDER BY transaction_id, position LIMIT $4"
    );
    let mut rows = sqlx::query(&sql)
        .bind(&cursor.last_tx)
        .bind(cursor.last_position)
        .bind(types)
        .bind(chunk_size as i64)
        .fetch(&mut *conn);
    // Sized once: a page grown by doubling reallocates megabytes several
    // times over, each time in memory fresh from the OS.
    let mut page: Vec<EventEnvelope> = Vec::with_capacity(chunk_size);
    let mut last = None;
    while let Some(row) = rows.try_next().await? {
        last = Some((
            row.try_get::<String, _>("tx")?,
            row.try_get::<i64, _>("position")?,
        ));
        page.push(stored_event(&row)?.into());
    }
    drop(rows);
    if let Some((txid, position)) = last {
        cursor.last_tx = txid;
        cursor.last_position = position;
    }
    Ok(page)
}

/// Reads the next page behind the xmin barrier and applies it in `tx`.
/// Returns (read, applied); zero read means caught up with the barrier.
async fn apply_page(
    tx: &mut PgConnection,
    projector: &dyn Projector,
    types: &[String],
    cursor: &mut Cursor,
    chunk_size: usize,
) -> Result<(u64, u64), ProjectionError> {
    let page = read_page(&mut *tx, types, cursor, chunk_size).await?;
    if page.is_empty() {
        return Ok((0, 0));
    }
    let applied = apply_batch_in(&mut *tx, projector, &page, &[]).await?;
    Ok((page.len() as u64, applied.len() as u64))
}

/// A rebuild task's outcome, a panic in it as an error.
fn joined<T>(
    r: Result<Result<T, ProjectionError>, tokio::task::JoinError>,
) -> Result<T, ProjectionError> {
    r.unwrap_or_else(|e| {
        Err(ProjectionError::Database(sqlx::Error::Protocol(format!(
            "a rebuild task failed: {e}"
        ))))
    })
}

/// Where lanes report their progress; the rebuild's caller hears it.
type ProgressSender = tokio::sync::mpsc::UnboundedSender<Progress>;

/// One projector's rebuild in progress.
struct Lane {
    projector: Arc<dyn Projector>,
    schema: String,
    /// Its tables whose shadow may be moved in whole (`prepare_shadow`).
    movable: Vec<&'static str>,
    types: Vec<String>,
    total: u64,
    read: u64,
    applied: u64,
    caught_up: u64,
    /// Time spent applying its pages and swapping.
    busy: Duration,
    swap: Duration,
}

impl Lane {
    fn progress(&self, swapped: bool) -> Progress {
        Progress {
            projector: self.projector.name(),
            done: self.read,
            total: self.total.max(self.read),
            swapped,
        }
    }
}

async fn fill_and_swap(
    pool: &PgPool,
    projectors: &[Arc<dyn Projector>],
    chunk_size: usize,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<Vec<RebuildReport>, ProjectionError> {
    let mut all_types: Vec<String> = projectors
        .iter()
        .flat_map(|p| p.aggregate_types().iter().map(|t| t.to_string()))
        .collect();
    all_types.sort();
    all_types.dedup();
    let counts: Vec<(String, i64)> = sqlx::query_as(
        "SELECT aggregate_type, count(*) FROM events WHERE aggregate_type = ANY($1) GROUP BY aggregate_type",
    )
    .bind(&all_types)
    .fetch_all(pool)
    .await?;
    let mut lanes = Vec::with_capacity(projectors.len());
    for projector in projectors {
        let types: Vec<String> = projector
            .aggregate_types()
            .iter()
            .map(|t| t.to_string())
            .collect();
        let total = counts
            .iter()
            .filter(|(t, _)| types.contains(t))
            .map(|(_, n)| *n as u64)
            .sum();
        let schema = shadow_schema(projector.name())?;
        let movable = prepare_shadow(pool, &schema, projector.as_ref()).await?;
        lanes.push(Lane {
            projector: projector.clone(),
            schema,
            movable,
            types,
            total,
            read: 0,
            applied: 0,
            caught_up: 0,
            busy: Duration::ZERO,
            swap: Duration::ZERO,
        });
    }
    for lane in &lanes {
        progress(lane.progress(false));
    }
    // Every transaction that had started when the rebuild did: the shadows
    // take all of their events, so a rebuild holds at least everything
    // committed before it began (later ones come live, by sequence).
    let started_xmax: String =
        sqlx::query_scalar("SELECT pg_snapshot_xmax(pg_current_snapshot())::text")
            .fetch_one(pool)
            .await?;

    // 1. Fill the shadows: one reader, a lane per projector, each a task
    //    of its own (they decode, fold and encode side by side, on every
    //    core the runtime has).
    let mut senders = Vec::with_capacity(lanes.len());
    let mut receivers = Vec::with_capacity(lanes.len());
    for lane in &lanes {
        let (tx, rx) = tokio::sync::mpsc::channel::<Arc<Vec<EventEnvelope>>>(PAGES_AHEAD);
        senders.push((lane.types.clone(), tx));
        receivers.push(rx);
    }
    // 2. Each lane catches up and swaps as soon as its fill is done (the
    //    others may still be filling), holding its live batches off. Its
    //    fill ends when the reader has handed out its last page, so where
    //    the reader stopped is known by then.
    let (stopped_at, reader_stopped) = tokio::sync::watch::channel::<Option<Cursor>>(None);
    let reader = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let cursor = read_pages(&pool, &all_types, &started_xmax, chunk_size, senders).await?;
            stopped_at.send_replace(Some(cursor));
            Ok::<(), ProjectionError>(())
        })
    };
    let (progress_tx, mut progress_rx) = tokio::sync::mpsc::unbounded_channel();
    let tasks: Vec<_> = lanes
        .into_iter()
        .zip(receivers)
        .map(|(mut lane, rx)| {
            let (pool, progress, mut reader_stopped) =
                (pool.clone(), progress_tx.clone(), reader_stopped.clone());
            tokio::spawn(async move {
                fill_lane(&pool, &mut lane, rx, &progress).await?;
                let cursor = reader_stopped
                    .wait_for(Option::is_some)
                    .await
                    .map_err(|_| {
                        ProjectionError::Database(sqlx::Error::Protocol(
                            "the rebuild's reader stopped without saying where".into(),
                        ))
                    })?
                    .clone()
                    .expect("waited for a cursor");
                swap_lane(&pool, &mut lane, cursor, chunk_size, &progress).await?;
                Ok::<Lane, ProjectionError>(lane)
            })
        })
        .collect();
    drop(progress_tx);
    // Progress until every lane has finished (or failed): a lane that fails
    // leaves the others to finish, so that nothing of this rebuild still
    // runs once the caller hears of it.
    while let Some(p) = progress_rx.recv().await {
        progress(p);
    }
    let mut lanes = Vec::with_capacity(tasks.len());
    let mut failed = joined(reader.await).err();
    for task in tasks {
        match joined(task.await) {
            Ok(lane) => lanes.push(lane),
            Err(e) => failed = failed.or(Some(e)),
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    Ok(lanes
        .into_iter()
        .map(|lane| RebuildReport {
            projector: lane.projector.name(),
            events_read: lane.read,
            events_applied: lane.applied,
            caught_up: lane.caught_up,
            millis: lane.busy.as_millis(),
            swap_millis: lane.swap.as_millis(),
        })
        .collect())
}

/// Pages through the store behind the xmin barrier until every transaction
/// older than the rebuild has finished, handing each page to every lane.
/// Returns where it stopped. A lane that stopped (it failed) is left out;
/// its error is the rebuild's.
async fn read_pages(
    pool: &PgPool,
    types: &[String],
    started_xmax: &str,
    chunk_size: usize,
    senders: Vec<(Vec<String>, PageSender)>,
) -> Result<Cursor, ProjectionError> {
    let mut cursor = Cursor {
        last_tx: "0".into(),
        last_position: 0,
    };
    let mut waited = Duration::ZERO;
    let mut next_report = Duration::from_secs(1);
    let mut senders = senders;
    loop {
        // A connection per page, so that lanes always find one.
        let mut conn = pool.acquire().await?;
        let settled: bool =
            sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot()) >= $1::text::xid8")
                .bind(started_xmax)
                .fetch_one(&mut *conn)
                .await?;
        let page = read_page(&mut conn, types, &mut cursor, chunk_size).await?;
        drop(conn);
        if page.is_empty() {
            if settled {
                return Ok(cursor);
            }
            // An older transaction still runs: an empty page means "not
            // yet", not "done".
            if waited >= next_report {
                tracing::info!(
                    waited_secs = waited.as_secs(),
                    "rebuild waits for older transactions to finish"
                );
                next_report += Duration::from_secs(10);
            }
            tokio::time::sleep(PENDING_POLL).await;
            waited += PENDING_POLL;
            continue;
        }
        // Each lane gets the page's events of its aggregate types, in
        // order; lanes of one type share one copy.
        let mut by_type: HashMap<String, (Vec<usize>, Vec<EventEnvelope>)> = HashMap::new();
        for (i, e) in page.into_iter().enumerate() {
            let (order, events) = by_type.entry(e.aggregate_type.clone()).or_default();
            order.push(i);
            events.push(e);
        }
        let by_type: HashMap<String, (Vec<usize>, Arc<Vec<EventEnvelope>>)> = by_type
            .into_iter()
            .map(|(t, (order, events))| (t, (order, Arc::new(events))))
            .collect();
        let mut open = Vec::with_capacity(senders.len());
        for (lane_types, sender) in senders {
            let part = match lane_types.as_slice() {
                [one] => by_type.get(one).map(|(_, events)| events.clone()),
                several => {
                    // In the page's order (commit order, not position).
                    let mut merged: Vec<(usize, EventEnvelope)> = several
                        .iter()
                        .filter_map(|t| by_type.get(t))
                        .flat_map(|(order, events)| {
                            order.iter().copied().zip(events.iter().cloned())
                        })
                        .collect();
                    merged.sort_by_key(|(i, _)| *i);
                    (!merged.is_empty())
                        .then(|| Arc::new(merged.into_iter().map(|(_, e)| e).collect()))
                }
            };
            let sent = match part {
                Some(part) => sender.send(part).await.is_ok(),
                None => !sender.is_closed(),
            };
            if sent {
                open.push((lane_types, sender));
            }
        }
        senders = open;
        if senders.is_empty() {
            return Ok(cursor);
        }
    }
}

/// Applies the pages a lane receives to its shadow, one short transaction
/// each.
async fn fill_lane(
    pool: &PgPool,
    lane: &mut Lane,
    mut pages: tokio::sync::mpsc::Receiver<Arc<Vec<EventEnvelope>>>,
    progress: &ProgressSender,
) -> Result<(), ProjectionError> {
    // A projector may fill its shadow with a stand-in that keeps what it
    // wrote in memory (`Projector::shadow_filler`); it is dropped with the
    // fill, and the swap's catch-up goes through the projector itself.
    let filler = lane.projector.shadow_filler();
    let projector: &dyn Projector = filler.as_deref().unwrap_or(lane.projector.as_ref());
    if projector.name() != lane.projector.name()
        || projector.tables() != lane.projector.tables()
        || projector.aggregate_types() != lane.projector.aggregate_types()
    {
        return Err(ProjectionError::Database(sqlx::Error::Protocol(format!(
            "the shadow filler of {} is not the same read model",
            lane.projector.name()
        ))));
    }
    while let Some(page) = pages.recv().await {
        let read = page.len() as u64;
        let started = Instant::now();
        let mut tx = pool.begin().await?;
        use_shadow(&mut tx, &lane.schema).await?;
        let applied = apply_rebuild_page(&mut tx, projector, &page).await?;
        tx.commit().await?;
        lane.busy += started.elapsed();
        lane.read += read;
        lane.applied += applied as u64;
        let _ = progress.send(lane.progress(false));
    }
    let started = Instant::now();
    write_fill_parts(pool, &lane.schema, projector.finish_fill()).await?;
    lane.busy += started.elapsed();
    Ok(())
}

/// Writes what a shadow filler kept back (`Projector::finish_fill`), up to
/// [`FILL_WRITERS`] parts at once, each in a transaction of its own on the
/// shadow and a task of its own (the rows' encoding runs on every core too).
/// Every part has finished, written or failed, when this returns.
async fn write_fill_parts(
    pool: &PgPool,
    schema: &str,
    parts: Vec<Box<dyn FillPart>>,
) -> Result<(), ProjectionError> {
    let mut parts = parts.into_iter();
    let mut writers = tokio::task::JoinSet::new();
    let mut outcome = Ok(());
    loop {
        while outcome.is_ok() && writers.len() < FILL_WRITERS {
            let Some(part) = parts.next() else {
                break;
            };
            let (pool, schema) = (pool.clone(), schema.to_string());
            writers.spawn(async move {
                let mut tx = pool.begin().await?;
                use_shadow(&mut tx, &schema).await?;
                part.write(&mut tx).await?;
                tx.commit().await?;
                Ok(())
            });
        }
        let Some(done) = writers.join_next().await else {
            return outcome;
        };
        if let Err(e) = joined(done) {
            // The first failure is the answer; the parts already under way
            // finish, and no new one starts.
            if outcome.is_ok() {
                outcome = Err(e);
            }
        }
    }
}

/// Catches a lane up and swaps its shadow in (a swap that loses a deadlock
/// is tried again), then drops the shadow.
async fn swap_lane(
    pool: &PgPool,
    lane: &mut Lane,
    cursor: Cursor,
    chunk_size: usize,
    progress: &ProgressSender,
) -> Result<(), ProjectionError> {
    let started = Instant::now();
    let name = lane.projector.name();
    // A shadow that may be moved in gets the readers' indexes now, built
    // whole from its rows, outside the swap (nobody reads it yet).
    if !lane.movable.is_empty() {
        let mut conn = pool.acquire().await?;
        let projector = lane.projector.as_ref();
        for table in &lane.movable {
            let readers = shadow_indexes(&mut conn, projector, table, &lane.schema, true).await?;
            for definition in readers {
                sqlx::query(&definition).execute(&mut *conn).await?;
            }
        }
    }
    // The swap compares the shadow with the live rows: the planner needs
    // both tables' sizes as they are now (the shadow was never analysed,
    // and the live tables may have changed a lot since autovacuum last
    // looked), or it joins them row by row.
    // Only the key's columns: the row counts and the key's statistics are
    // what the joins are planned by, and sampling every column (the
    // tickets' `jsonb` state among them) costs seconds.
    for table in lane.projector.tables() {
        let table = table_ident(table)?;
        let mut conn = pool.acquire().await?;
        let key = primary_key(&mut conn, table).await?.join(", ");
        let columns = if key.is_empty() {
            String::new()
        } else {
            format!(" ({key})")
        };
        sqlx::query(&format!(
            "ANALYZE {}.{table}{columns}, public.{table}{columns}",
            lane.schema
        ))
        .execute(&mut *conn)
        .await?;
    }
    let mut attempt = 0;
    let caught_up = loop {
        attempt += 1;
        let mut page_cursor = Cursor {
            last_tx: cursor.last_tx.clone(),
            last_position: cursor.last_position,
        };
        match swap(
            pool,
            lane.projector.as_ref(),
            &lane.schema,
            &lane.movable,
            &lane.types,
            &mut page_cursor,
            chunk_size,
        )
        .await
        {
            Ok((r, a)) => {
                lane.read += r;
                lane.applied += a;
                break a;
            }
            Err(ProjectionError::Database(sqlx::Error::Database(e)))
                if e.code().as_deref() == Some("40P01") && attempt < SWAP_ATTEMPTS =>
            {
                tracing::warn!(
                    projector = name,
                    attempt,
                    "swap lost a deadlock; trying again"
                );
                tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
            }
            Err(e) => return Err(e),
        }
    };
    lane.caught_up = caught_up;
    lane.swap = started.elapsed();
    lane.busy += lane.swap;
    let _ = progress.send(lane.progress(true));
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {} CASCADE", lane.schema))
        .execute(pool)
        .await?;
    tracing::info!(
        projector = name,
        events = lane.applied,
        caught_up,
        "read model rebuilt and swapped in"
    );
    Ok(())
}

/// The definitions, moved onto the shadow's copy of `table`, of the live
/// table's indexes that only readers use (`Projector::reader_indexes`), or
/// of all the others.
async fn shadow_indexes(
    conn: &mut PgConnection,
    projector: &dyn Projector,
    table: &str,
    schema: &str,
    readers_only: bool,
) -> Result<Vec<String>, ProjectionError> {
    let indexes: Vec<(String, String)> = sqlx::query_as(
        "SELECT i.relname::text, pg_get_indexdef(x.indexrelid)
           FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
          WHERE x.indrelid = format('public.%I', $1::text)::regclass
          ORDER BY i.relname",
    )
    .bind(table)
    .fetch_all(&mut *conn)
    .await?;
    indexes
        .into_iter()
        .filter(|(name, _)| projector.reader_indexes().contains(&name.as_str()) == readers_only)
        .map(|(name, definition)| {
            shadow_index(&definition, table, schema).ok_or_else(|| {
                ProjectionError::Database(sqlx::Error::Protocol(format!(
                    "index {name} is not defined on public.{table} as expected: {definition}"
                )))
            })
        })
        .collect()
}

/// How long the swap waits for readers to let go of an empty live table
/// it would move its shadow in for; past it, it copies the rows instead.
const MOVE_LOCK_TIMEOUT: &str = "500ms";

/// Everything about `public.<table>` that its readers, writers and access
/// rules depend on, as text independent of the table's identity: columns
/// (in order, with type, nullability, default, generation, identity,
/// collation), constraints, indexes, row-level security and its policies,
/// grants, owner, storage options, persistence, triggers, rules, comments,
/// extended statistics, inheritance and publications.
const TABLE_DEFINITION: &str = "
WITH t AS (SELECT format('public.%I', $1::text)::regclass::oid AS oid)
SELECT concat_ws(E'\n',
  (SELECT string_agg(format('column %s %s %s %s %s %s %s', a.attname, format_type(a.atttypid, a.atttypmod),
          a.attnotnull, a.attgenerated, a.attidentity, a.attcollation::regcollation,
          pg_get_expr(d.adbin, d.adrelid)), E'\n' ORDER BY a.attnum)
     FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE a.attrelid = t.oid AND a.attnum > 0 AND NOT a.attisdropped),
  (SELECT string_agg(format('constraint %s %s %s', c.conname, c.contype, pg_get_constraintdef(c.oid)), E'\n' ORDER BY c.conname)
     FROM pg_constraint c WHERE c.conrelid = t.oid),
  (SELECT string_agg(format('index %s', pg_get_indexdef(x.indexrelid)), E'\n' ORDER BY x.indexrelid::regclass::text)
     FROM pg_index x WHERE x.indrelid = t.oid),
  (SELECT string_agg(format('policy %s %s %s %s %s %s', p.polname, p.polcmd, p.polpermissive,
          (SELECT string_agg(CASE WHEN r = 0 THEN 'public' ELSE r::regrole::text END, ',' ORDER BY 1)
             FROM unnest(p.polroles) r),
          pg_get_expr(p.polqual, p.polrelid), pg_get_expr(p.polwithcheck, p.polrelid)), E'\n' ORDER BY p.polname)
     FROM pg_policy p WHERE p.polrelid = t.oid),
  (SELECT string_agg(format('trigger %s', pg_get_triggerdef(g.oid)), E'\n' ORDER BY g.tgname)
     FROM pg_trigger g WHERE g.tgrelid = t.oid AND NOT g.tgisinternal),
  (SELECT string_agg(format('rule %s', r.rulename), E'\n' ORDER BY r.rulename)
     FROM pg_rewrite r WHERE r.ev_class = t.oid),
  (SELECT string_agg(format('statistics %s', s.stxname), E'\n' ORDER BY s.stxname)
     FROM pg_statistic_ext s WHERE s.stxrelid = t.oid),
  (SELECT string_agg(format('inherits %s', i.inhparent::regclass), E'\n') FROM pg_inherits i
    WHERE i.inhrelid = t.oid OR i.inhparent = t.oid),
  (SELECT string_agg(format('publication %s', r.prpubid), E'\n') FROM pg_publication_rel r WHERE r.prrelid = t.oid),
  (SELECT format('table %s %s %s %s %s %s %s %s %s', c.relkind, c.relpersistence, c.relowner::regrole,
          c.relrowsecurity, c.relforcerowsecurity, c.relreplident, c.reloptions,
          (SELECT array_agg(a ORDER BY a::text) FROM unnest(c.relacl) a),
          obj_description(c.oid, 'pg_class'))
     FROM pg_class c WHERE c.oid = t.oid))
FROM t";

/// The first build's swap of `table`: when the live table is (still)
/// empty, its shadow, complete with every index, becomes the live table
/// instead of being copied into it. The shadow first takes on what the
/// live table has and `LIKE` does not copy (its primary key as a
/// constraint, row-level security and its policies, grants, comment); then
/// the live table is dropped and the shadow moved into its place, and the
/// moved table must describe exactly as the live one did
/// ([`TABLE_DEFINITION`]). Anything else (rows meanwhile, a reader holding
/// the table past [`MOVE_LOCK_TIMEOUT`], an object depending on the live
/// table, a difference in the description) undoes all of it and returns
/// false: the caller copies the rows. Readers waiting for the table meanwhile
/// find the moved one by its name when the swap commits.
async fn move_in(
    tx: &mut PgConnection,
    schema: &str,
    table: &str,
) -> Result<bool, ProjectionError> {
    sqlx::query("SAVEPOINT move_in").execute(&mut *tx).await?;
    match try_move_in(&mut *tx, schema, table).await {
        Ok(true) => {
            sqlx::query("RELEASE SAVEPOINT move_in")
                .execute(&mut *tx)
                .await?;
            Ok(true)
        }
        outcome => {
            if let Err(e) = &outcome {
                // A reader holding the table past the bound, or an object
                // depending on it, is what a move expects to meet; anything
                // else is a fault in the move, which the copy hides.
                let expected = matches!(
                    e,
                    ProjectionError::Database(sqlx::Error::Database(db))
                        if matches!(db.code().as_deref(), Some("55P03" | "2BP01"))
                );
                if expected {
                    tracing::info!(table, error = %e, "shadow not moved in; copying its rows");
                } else {
                    tracing::warn!(table, error = %e, "shadow not moved in; copying its rows");
                }
            }
            sqlx::query("ROLLBACK TO SAVEPOINT move_in")
                .execute(&mut *tx)
                .await?;
            sqlx::query("RELEASE SAVEPOINT move_in")
                .execute(&mut *tx)
                .await?;
            Ok(false)
        }
    }
}

async fn try_move_in(
    tx: &mut PgConnection,
    schema: &str,
    table: &str,
) -> Result<bool, ProjectionError> {
    let lock_timeout: String = sqlx::query_scalar("SELECT current_setting('lock_timeout')")
        .fetch_one(&mut *tx)
        .await?;
    sqlx::query("SELECT set_config('lock_timeout', $1, true)")
        .bind(MOVE_LOCK_TIMEOUT)
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!(
        "LOCK TABLE public.{table} IN ACCESS EXCLUSIVE MODE"
    ))
    .execute(&mut *tx)
    .await?;
    sqlx::query("SELECT set_config('lock_timeout', $1, true)")
        .bind(&lock_timeout)
        .execute(&mut *tx)
        .await?;
    let empty: bool =
        sqlx::query_scalar(&format!("SELECT NOT EXISTS (SELECT 1 FROM public.{table})"))
            .fetch_one(&mut *tx)
            .await?;
    if !empty {
        return Ok(false);
    }
    let live: String = sqlx::query_scalar(TABLE_DEFINITION)
        .bind(table)
        .fetch_one(&mut *tx)
        .await?;
    // What `LIKE` leaves out, generated from the catalog (a role's
    // `regrole` text is already a quoted identifier where one is needed).
    let statements: Vec<String> = sqlx::query_scalar(
        "WITH t AS (SELECT format('public.%I', $1::text)::regclass::oid AS oid)
         SELECT format('ALTER TABLE %I.%I ADD CONSTRAINT %I %s USING INDEX %I', $2::text, $1::text,
                       c.conname, CASE c.contype WHEN 'p' THEN 'PRIMARY KEY' ELSE 'UNIQUE' END,
                       i.relname)
           FROM t, pg_constraint c JOIN pg_class i ON i.oid = c.conindid
          WHERE c.conrelid = t.oid AND c.contype IN ('p', 'u')
         UNION ALL
         SELECT format('ALTER TABLE %I.%I %s ROW LEVEL SECURITY', $2::text, $1::text, a)
           FROM t, pg_class c, LATERAL (VALUES ('ENABLE', c.relrowsecurity), ('FORCE', c.relforcerowsecurity)) v(a, on_)
          WHERE c.oid = t.oid AND v.on_
         UNION ALL
         SELECT format('CREATE POLICY %I ON %I.%I AS %s FOR %s TO %s%s%s', p.polname, $2::text, $1::text,
                       CASE WHEN p.polpermissive THEN 'PERMISSIVE' ELSE 'RESTRICTIVE' END,
                       CASE p.polcmd WHEN 'r' THEN 'SELECT' WHEN 'a' THEN 'INSERT' WHEN 'w' THEN 'UPDATE'
                                     WHEN 'd' THEN 'DELETE' ELSE 'ALL' END,
                       (SELECT string_agg(CASE WHEN r = 0 THEN 'PUBLIC' ELSE r::regrole::text END, ', ')
                          FROM unnest(p.polroles) r),
                       ' USING (' || pg_get_expr(p.polqual, p.polrelid) || ')',
                       ' WITH CHECK (' || pg_get_expr(p.polwithcheck, p.polrelid) || ')')
           FROM t, pg_policy p WHERE p.polrelid = t.oid
         UNION ALL
         SELECT format('GRANT %s ON %I.%I TO %s%s', g.privilege_type, $2::text, $1::text,
                       CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE g.grantee::regrole::text END,
                       CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END)
           FROM t, pg_class c, aclexplode(c.relacl) g
          WHERE c.oid = t.oid AND g.grantee <> c.relowner
         UNION ALL
         SELECT format('COMMENT ON TABLE %I.%I IS %L', $2::text, $1::text, obj_description(t.oid, 'pg_class'))
           FROM t WHERE obj_description(t.oid, 'pg_class') IS NOT NULL",
    )
    .bind(table)
    .bind(schema)
    .fetch_all(&mut *tx)
    .await?;
    for statement in statements {
        sqlx::query(&statement).execute(&mut *tx).await?;
    }
    // Refused, not cascaded, if anything depends on the live table.
    sqlx::query(&format!("DROP TABLE public.{table}"))
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!("ALTER TABLE {schema}.{table} SET SCHEMA public"))
        .execute(&mut *tx)
        .await?;
    let moved: String = sqlx::query_scalar(TABLE_DEFINITION)
        .bind(table)
        .fetch_one(&mut *tx)
        .await?;
    if moved != live {
        // The first line that differs, for whoever looks into it (catalog
        // text: names, types, expressions; never a row).
        let (mut old, mut new) = (live.lines(), moved.lines());
        let (was, is) = loop {
            match (old.next(), new.next()) {
                (None, None) => break ("", ""),
                (a, b) if a != b => break (a.unwrap_or(""), b.unwrap_or("")),
                _ => {}
            }
        };
        tracing::warn!(
            table,
            was,
            is,
            "the shadow does not describe as the live table did; copying its rows instead"
        );
        return Ok(false);
    }
    Ok(true)
}

/// Makes the live `table` hold the shadow's rows, writing only what
/// differs: rows the shadow lacks are deleted, a row whose columns changed
/// is updated, and new rows are inserted. A rebuild of a read model that was
/// right (the usual case) then writes almost nothing, and the projector's
/// live batches, which wait for the swap, wait for a comparison rather than
/// a copy. Columns whose default is the clock (`projected_at`) are not
/// compared, so an unchanged row keeps its own. A table without a primary
/// key is replaced whole.
async fn replace_rows(
    tx: &mut PgConnection,
    schema: &str,
    table: &str,
) -> Result<(), ProjectionError> {
    // Generated columns are computed again, not copied.
    let columns: Vec<(String, bool)> = sqlx::query_as(
        "SELECT quote_ident(column_name),
                coalesce(column_default ~* '(clock_timestamp|now)\\(\\)', false)
           FROM information_schema.columns
          WHERE table_schema = 'public' AND table_name = $1 AND is_generated = 'NEVER'
          ORDER BY ordinal_position",
    )
    .bind(table)
    .fetch_all(&mut *tx)
    .await?;
    let key = primary_key(&mut *tx, table).await?;
    let all = columns
        .iter()
        .map(|(c, _)| c.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    // Into an empty read model (its first build): every shadow row is new,
    // and a plain insert spares the comparisons and the conflict checks.
    // (The projector's live batches wait for this transaction, so nothing
    // else adds rows meanwhile; if something did, the insert fails.)
    let empty: bool =
        sqlx::query_scalar(&format!("SELECT NOT EXISTS (SELECT 1 FROM public.{table})"))
            .fetch_one(&mut *tx)
            .await?;
    if empty {
        sqlx::query(&format!(
            "INSERT INTO public.{table} ({all}) SELECT {all} FROM {schema}.{table}"
        ))
        .execute(&mut *tx)
        .await?;
        return Ok(());
    }
    if key.is_empty() {
        sqlx::query(&format!("DELETE FROM public.{table}"))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!(
            "INSERT INTO public.{table} ({all}) SELECT {all} FROM {schema}.{table}"
        ))
        .execute(&mut *tx)
        .await?;
        return Ok(());
    }
    let same_key = key
        .iter()
        .map(|k| format!("s.{k} = l.{k}"))
        .collect::<Vec<_>>()
        .join(" AND ");
    // Three statements, each touching only the rows it changes (an upsert
    // that updates would lock every conflicting row, changed or not).
    sqlx::query(&format!(
        "DELETE FROM public.{table} l WHERE NOT EXISTS (SELECT 1 FROM {schema}.{table} s WHERE {same_key})"
    ))
    .execute(&mut *tx)
    .await?;
    let rest: Vec<&str> = columns
        .iter()
        .filter(|(c, _)| !key.contains(c))
        .map(|(c, _)| c.as_str())
        .collect();
    let compared: Vec<&str> = columns
        .iter()
        .filter(|(c, clock)| !clock && !key.contains(c))
        .map(|(c, _)| c.as_str())
        .collect();
    if !rest.is_empty() && !compared.is_empty() {
        let list = |prefix: &str, columns: &[&str]| {
            columns
                .iter()
                .map(|c| format!("{prefix}{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        sqlx::query(&format!(
            "UPDATE public.{table} l SET {} FROM {schema}.{table} s
              WHERE {same_key} AND ({}) IS DISTINCT FROM ({})",
            rest.iter()
                .map(|c| format!("{c} = s.{c}"))
                .collect::<Vec<_>>()
                .join(", "),
            list("l.", &compared),
            list("s.", &compared),
        ))
        .execute(&mut *tx)
        .await?;
    }
    // New rows: the others are there now, equal to the shadow's. (An
    // anti-join here may scan the table it inserts into once per row.)
    sqlx::query(&format!(
        "INSERT INTO public.{table} ({all}) SELECT {all} FROM {schema}.{table}
         ON CONFLICT ({}) DO NOTHING",
        key.join(", ")
    ))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// The primary key's columns of `public.<table>`, quoted, in key order.
async fn primary_key(conn: &mut PgConnection, table: &str) -> Result<Vec<String>, ProjectionError> {
    Ok(sqlx::query_scalar(
        "SELECT quote_ident(a.attname)
           FROM pg_index i
           JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
          WHERE i.indrelid = format('public.%I', $1::text)::regclass AND i.indisprimary
          ORDER BY array_position(i.indkey::int2[], a.attnum)",
    )
    .bind(table)
    .fetch_all(&mut *conn)
    .await?)
}

/// The swap's transaction; returns what it caught up (read, applied).
async fn swap(
    pool: &PgPool,
    projector: &dyn Projector,
    schema: &str,
    movable: &[&str],
    types: &[String],
    cursor: &mut Cursor,
    chunk_size: usize,
) -> Result<(u64, u64), ProjectionError> {
    let name = projector.name();
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
        .bind(REBUILD_LOCK_CLASS)
        .bind(name)
        .execute(&mut *tx)
        .await?;
    use_shadow(&mut tx, schema).await?;
    // The swap changes the live read model: its commit is durable.
    sqlx::query("SET LOCAL synchronous_commit = on")
        .execute(&mut *tx)
        .await?;
    // The fill applied every event of the projector's types up to the
    // cursor: the shadow's baseline. What the catch-up applies after it is
    // recorded as rows, as a live batch does.
    let (fill_tx, fill_position) = (cursor.last_tx.clone(), cursor.last_position);
    set_baseline(&mut tx, projector, &fill_tx, fill_position).await?;
    let (mut read, mut applied) = (0u64, 0u64);
    loop {
        let (r, a) = apply_page(&mut tx, projector, types, cursor, chunk_size).await?;
        if r == 0 {
            break;
        }
        read += r;
        applied += a;
    }
    // From here on every name is qualified or public's.
    sqlx::query("SELECT set_config('search_path', 'public', true)")
        .execute(&mut *tx)
        .await?;
    for table in projector.tables() {
        let table = table_ident(table)?;
        if movable.contains(&table) && move_in(&mut tx, schema, table).await? {
            continue;
        }
        replace_rows(&mut tx, schema, table).await?;
    }
    // The per-stream sequences the live consumer goes on from: the
    // shadow's baseline and its rows (the catch-up's streams) replace the
    // projector's.
    sqlx::query("DELETE FROM public.projector_streams WHERE projector = $1")
        .bind(name)
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!(
        "INSERT INTO public.projector_streams (projector, aggregate_type, aggregate_id, last_sequence)
         SELECT projector, aggregate_type, aggregate_id, last_sequence FROM {schema}.projector_streams
          WHERE projector = $1"
    ))
    .bind(name)
    .execute(&mut *tx)
    .await?;
    // The same baseline, now the live one's.
    set_baseline(&mut tx, projector, &fill_tx, fill_position).await?;
    tx.commit().await?;
    Ok((read, applied))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_index_moves_onto_the_shadow_table_and_a_stranger_is_refused() {
        assert_eq!(
            shadow_index(
                "CREATE UNIQUE INDEX crm_tickets_pkey ON public.crm_tickets USING btree (ticket_id)",
                "crm_tickets",
                "casebook_shadow_crm_tickets"
            )
            .as_deref(),
            Some("CREATE UNIQUE INDEX crm_tickets_pkey ON casebook_shadow_crm_tickets.crm_tickets USING btree (ticket_id)")
        );
        assert_eq!(
            shadow_index(
                "CREATE INDEX m ON public.crm_messages USING btree (ticket_id) WHERE (direction = 'inbound'::text)",
                "crm_messages",
                "s"
            )
            .as_deref(),
            Some("CREATE INDEX m ON s.crm_messages USING btree (ticket_id) WHERE (direction = 'inbound'::text)")
        );
        // Not on the table it claims: refused, not rewritten.
        assert_eq!(
            shadow_index(
                "CREATE INDEX x ON public.crm_tickets_archive USING btree (ticket_id)",
                "crm_tickets",
                "s"
            ),
            None
        );
    }
}
