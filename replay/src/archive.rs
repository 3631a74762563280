//! Retention: tickets resolved or closed more than a year ago leave the hot
//! tables for gzip NDJSON files in `CASEBOOK_ARCHIVE_DIR`.
//!
//! One pass ([`run_pass`]):
//! 1. takes a signed checkpoint (the archive is cut at it);
//! 2. finds the eligible tickets (the ticket's last resolution or closing,
//!    not reopened since, more than 365 days before `as_of`; not on legal
//!    hold; not archived already);
//! 3. per day of resolution, writes `tickets-YYYY-MM-DD.ndjson.gz` (one line
//!    per ticket: its events exactly as stored, and its transcript; a day of
//!    more than 10,000 tickets continues in `tickets-YYYY-MM-DD.2.ndjson.gz`
//!    and so on), and
//!    records its SHA-256 and the checkpoint in `manifest.json` and in
//!    `archive_files`;
//! 4. purges, in one transaction per file: each event's leaf goes to
//!    `events_purged` (which is what lets the DELETE through), the events
//!    and the ticket's read-model rows go.
//!
//! The caller then appends the tombstone event (only `commands` appends).
//! [`verify_purged`] proves the purged leaves against the files, and
//! [`restore`] brings one ticket back, checked against the manifest.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use casebook_domain::audit::{ChainInput, StreamVerifier};
use casebook_domain::retention::{PurgeRecord, RETENTION_DAYS};
use casebook_domain::ticket::transcript;
use casebook_domain::TicketEvent;
use chrono::{DateTime, NaiveDate, Utc};
use ed25519_dalek::SigningKey;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};

use crate::checkpoint::{self, CheckpointStoreError, Created};

/// Holds and purges take it, so a hold set during a pass is honoured.
const RETENTION_LOCK: i64 = 0x6361_7365_7265_746e; // "caseretn"
/// The longest NDJSON line read back (one ticket).
const MAX_LINE: u64 = 64 * 1024 * 1024;
/// The largest manifest read back.
const MAX_MANIFEST: u64 = 64 * 1024 * 1024;
/// Tickets per archive pass (a bound on one pass's memory and time).
const MAX_TICKETS_PER_PASS: i64 = 1_000_000;
/// Most tickets in one archive file (and one purge transaction).
const MAX_TICKETS_PER_FILE: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("archive directory {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("archive file {file}: {problem}")]
    Corrupt { file: String, problem: String },
    #[error("ticket {0} is not archived")]
    NotArchived(String),
    #[error(
        "archive file {0}: a ticket in it was written to during its purge; nothing was purged"
    )]
    WrittenDuringPurge(String),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointStoreError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn corrupt(file: &str, problem: impl Into<String>) -> ArchiveError {
    ArchiveError::Corrupt {
        file: file.to_string(),
        problem: problem.into(),
    }
}

/// One stored event, as archived: every column the chain and the tree need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchivedEvent {
    pub position: i64,
    pub transaction_id: String,
    pub event_id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub occurred_at_micros: i64,
    /// `jsonb` text, as hashed.
    pub payload: String,
    pub metadata: String,
    pub hash: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TranscriptLine {
    direction: String,
    channel: String,
    body: String,
    at: DateTime<Utc>,
}

/// One NDJSON line: a ticket.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ArchivedTicket {
    ticket_id: String,
    events: Vec<ArchivedEvent>,
    transcript: Vec<TranscriptLine>,
}

/// `manifest.json`: every file with its checksum and checkpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Manifest {
    pub files: BTreeMap<String, ManifestEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestEntry {
    pub sha256: String,
    pub tickets: usize,
    pub events: u64,
    pub checkpoint: casebook_domain::checkpoint::Checkpoint,
}

/// What one pass did.
#[derive(Debug, Clone, Default)]
pub struct PassReport {
    pub eligible: usize,
    pub held: usize,
    /// One record per file written, for the caller's tombstones.
    pub purged: Vec<PurgeRecord>,
}

/// Tickets whose last resolution or closing, not reopened since, is before
/// `cutoff`, and which are neither held nor archived. With their end time.
async fn eligible(
    pool: &PgPool,
    cutoff: DateTime<Utc>,
) -> Result<(Vec<(String, DateTime<Utc>)>, usize), sqlx::Error> {
    let rows: Vec<(String, DateTime<Utc>, bool)> = sqlx::query_as(
        "WITH ends AS (
             SELECT aggregate_id,
                    max(sequence) FILTER (WHERE event_type IN ('TicketResolved', 'TicketClosed')) AS end_seq,
                    max(sequence) FILTER (WHERE event_type = 'TicketReopened') AS reopen_seq
               FROM events WHERE aggregate_type = 'ticket'
              GROUP BY aggregate_id
         )
         SELECT e.aggregate_id,
                coalesce((e.payload->>'closed_at')::timestamptz, (e.payload->>'resolved_at')::timestamptz) AS ended_at,
                EXISTS (SELECT 1 FROM legal_holds h WHERE h.ticket_id = e.aggregate_id) AS held
           FROM ends
           JOIN events e ON e.aggregate_type = 'ticket' AND e.aggregate_id = ends.aggregate_id AND e.sequence = ends.end_seq
          WHERE ends.end_seq > coalesce(ends.reopen_seq, 0)
            AND coalesce((e.payload->>'closed_at')::timestamptz, (e.payload->>'resolved_at')::timestamptz) < $1
            AND NOT EXISTS (SELECT 1 FROM archived_tickets a WHERE a.ticket_id = e.aggregate_id AND a.restored_at IS NULL)
          ORDER BY ended_at, e.aggregate_id
          LIMIT $2",
    )
    .bind(cutoff)
    .bind(MAX_TICKETS_PER_PASS)
    .fetch_all(pool)
    .await?;
    let held = rows.iter().filter(|r| r.2).count();
    Ok((
        rows.into_iter()
            .filter(|r| !r.2)
            .map(|(id, at, _)| (id, at))
            .collect(),
        held,
    ))
}

const ARCHIVED_EVENT_COLUMNS: &str =
    "position, transaction_id::text AS transaction_id, event_id::text AS event_id,
     aggregate_type, aggregate_id, sequence, event_type, event_version,
     (extract(epoch FROM occurred_at) * 1000000)::bigint AS micros,
     payload::text AS payload, metadata::text AS metadata, hash";

fn archived_event(row: &sqlx::postgres::PgRow) -> Result<ArchivedEvent, sqlx::Error> {
    Ok(ArchivedEvent {
        position: row.try_get("position")?,
        transaction_id: row.try_get("transaction_id")?,
        event_id: row.try_get("event_id")?,
        aggregate_type: row.try_get("aggregate_type")?,
        aggregate_id: row.try_get("aggregate_id")?,
        sequence: row.try_get("sequence")?,
        event_type: row.try_get("event_type")?,
        event_version: row.try_get("event_version")?,
        occurred_at_micros: row.try_get("micros")?,
        payload: row.try_get("payload")?,
        metadata: row.try_get("metadata")?,
        hash: row.try_get("hash")?,
    })
}

fn manifest_path(dir: &Path) -> PathBuf {
    dir.join("manifest.json")
}

pub fn read_manifest(dir: &Path) -> Result<Manifest, ArchiveError> {
    let path = manifest_path(dir);
    match fs::File::open(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Manifest::default()),
        Err(e) => Err(io(&path)(e)),
        Ok(f) => {
            let mut text = String::new();
            f.take(MAX_MANIFEST)
                .read_to_string(&mut text)
                .map_err(io(&path))?;
            serde_json::from_str(&text).map_err(|e| corrupt("manifest.json", e.to_string()))
        }
    }
}

/// Writes `bytes` to `path` through a temporary file, synced, then renamed.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ArchiveError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))?;
    Ok(())
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A file name for `day` not used yet.
fn file_name(dir: &Path, day: NaiveDate, manifest: &Manifest) -> String {
    let base = format!("tickets-{day}");
    let mut name = format!("{base}.ndjson.gz");
    let mut n = 2;
    while manifest.files.contains_key(&name) || dir.join(&name).exists() {
        name = format!("{base}.{n}.ndjson.gz");
        n += 1;
    }
    name
}

/// One retention pass as of `as_of`. See the module's documentation.
pub async fn run_pass(
    pool: &PgPool,
    dir: &Path,
    as_of: DateTime<Utc>,
    key: &SigningKey,
) -> Result<PassReport, ArchiveError> {
    let cutoff = as_of - chrono::Duration::days(RETENTION_DAYS);
    let (tickets, held) = eligible(pool, cutoff).await?;
    let mut report = PassReport {
        eligible: tickets.len(),
        held,
        purged: Vec::new(),
    };
    if tickets.is_empty() {
        return Ok(report);
    }
    fs::create_dir_all(dir).map_err(io(dir))?;
    let cut = match checkpoint::create(pool, key).await? {
        Created::New { checkpoint, .. } | Created::Unchanged(checkpoint) => checkpoint,
        // Nothing committed below the snapshot's xmin yet (a long
        // transaction elsewhere): nothing can be cut now; the next pass will.
        Created::Empty => return Ok(report),
    };
    let mut by_day: BTreeMap<NaiveDate, Vec<String>> = BTreeMap::new();
    for (id, ended) in tickets {
        by_day.entry(ended.date_naive()).or_default().push(id);
    }
    // A day's file holds at most MAX_TICKETS_PER_FILE tickets (a busier day
    // gets `.2`, `.3`, … parts): what a file's tickets take in memory, and
    // how long its purge transaction holds its locks, stay bounded.
    let parts = by_day.into_iter().flat_map(|(day, ids)| {
        ids.chunks(MAX_TICKETS_PER_FILE)
            .map(|part| (day, part.to_vec()))
            .collect::<Vec<_>>()
    });
    for (day, ids) in parts {
        // A ticket is archived only with every event inside the checkpoint.
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM unnest($1::text[]) AS id
              WHERE NOT EXISTS (SELECT 1 FROM events e
                                 WHERE e.aggregate_type = 'ticket' AND e.aggregate_id = id
                                   AND (e.transaction_id, e.position) > ($2::text::xid8, $3))",
        )
        .bind(&ids)
        .bind(cut.checkpoint.body.last_transaction_id.to_string())
        .bind(cut.checkpoint.body.last_position)
        .fetch_all(pool)
        .await?;
        if ids.is_empty() {
            continue;
        }
        let rows = sqlx::query(&format!(
            "SELECT {ARCHIVED_EVENT_COLUMNS} FROM events
              WHERE aggregate_type = 'ticket' AND aggregate_id = ANY($1)
              ORDER BY aggregate_id, sequence"
        ))
        .bind(&ids)
        .fetch_all(pool)
        .await?;
        let mut lines: BTreeMap<String, Vec<ArchivedEvent>> = BTreeMap::new();
        for row in &rows {
            let e = archived_event(row)?;
            lines.entry(e.aggregate_id.clone()).or_default().push(e);
        }
        let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::default());
        let mut events = 0u64;
        for (ticket_id, evs) in &lines {
            let decoded: Vec<TicketEvent> = evs
                .iter()
                .filter_map(|e| serde_json::from_str(&e.payload).ok())
                .collect();
            let line = ArchivedTicket {
                ticket_id: ticket_id.clone(),
                transcript: transcript(&decoded)
                    .into_iter()
                    .map(|m| TranscriptLine {
                        direction: m.direction.as_str().to_string(),
                        channel: m.channel.as_str().to_string(),
                        body: m.body,
                        at: m.at,
                    })
                    .collect(),
                events: evs.clone(),
            };
            events += evs.len() as u64;
            let mut text =
                serde_json::to_vec(&line).map_err(|e| corrupt(ticket_id, e.to_string()))?;
            text.push(b'\n');
            gz.write_all(&text).map_err(io(dir))?;
        }
        let bytes = gz.finish().map_err(io(dir))?;
        let sha256 = sha256_hex(&bytes);
        let mut manifest = read_manifest(dir)?;
        let name = file_name(dir, day, &manifest);
        write_atomically(&dir.join(&name), &bytes)?;
        manifest.files.insert(
            name.clone(),
            ManifestEntry {
                sha256: sha256.clone(),
                tickets: lines.len(),
                events,
                checkpoint: cut.checkpoint.clone(),
            },
        );
        let manifest_bytes = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| corrupt("manifest.json", e.to_string()))?;
        write_atomically(&manifest_path(dir), &manifest_bytes)?;

        let archived: BTreeMap<String, usize> = lines
            .iter()
            .map(|(id, evs)| (id.clone(), evs.len()))
            .collect();
        let purged = match purge(pool, &name, &sha256, &archived, events, cut.id).await {
            Err(ArchiveError::WrittenDuringPurge(file)) => {
                // Nothing of it was purged; its tickets are archived again,
                // whole, by a later pass. The other files go on.
                tracing::warn!(file = %file, "a ticket was written to during its purge; purge left to a later pass");
                continue;
            }
            purged => purged?,
        };
        if purged.is_empty() {
            continue;
        }
        report.purged.push(PurgeRecord {
            file: name,
            sha256,
            events: rows
                .iter()
                .filter(|r| {
                    r.try_get::<String, _>("aggregate_id")
                        .is_ok_and(|id| purged.contains(&id))
                })
                .count() as u64,
            tickets: purged,
            checkpoint_size: cut.checkpoint.body.size,
            checkpoint_root: cut.checkpoint.body.root.clone(),
            purged_at: Utc::now(),
        });
    }
    Ok(report)
}

/// Moves the tickets' events out of the hot tables, in one transaction:
/// their leaves into `events_purged`, then the events and every read-model
/// row naming the ticket. Tickets put on hold since they were chosen stay.
/// Returns the tickets purged.
async fn purge(
    pool: &PgPool,
    file: &str,
    sha256: &str,
    archived: &BTreeMap<String, usize>,
    events: u64,
    checkpoint_id: i64,
) -> Result<Vec<String>, ArchiveError> {
    let tickets: Vec<String> = archived.keys().cloned().collect();
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(RETENTION_LOCK)
        .execute(&mut *tx)
        .await?;
    let tickets: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM unnest($1::text[]) AS id
          WHERE NOT EXISTS (SELECT 1 FROM legal_holds h WHERE h.ticket_id = id)
          ORDER BY id",
    )
    .bind(&tickets)
    .fetch_all(&mut *tx)
    .await?;
    if tickets.is_empty() {
        return Ok(tickets);
    }
    // The streams are locked against appends (an append locks the head it
    // extends, FOR KEY SHARE), and must hold exactly what the file holds:
    // an append that committed since the file was read, or while this
    // lock was taken, would be purged without being archived.
    let held: Vec<(String, i64)> = sqlx::query_as(
        "WITH locked AS (SELECT aggregate_id FROM events
                          WHERE aggregate_type = 'ticket' AND aggregate_id = ANY($1)
                          FOR UPDATE)
         SELECT aggregate_id, count(*) FROM locked GROUP BY aggregate_id ORDER BY aggregate_id",
    )
    .bind(&tickets)
    .fetch_all(&mut *tx)
    .await?;
    let now: Vec<(String, i64)> = sqlx::query_as(
        "SELECT aggregate_id, count(*) FROM events
          WHERE aggregate_type = 'ticket' AND aggregate_id = ANY($1)
          GROUP BY aggregate_id ORDER BY aggregate_id",
    )
    .bind(&tickets)
    .fetch_all(&mut *tx)
    .await?;
    let archived_count = |id: &String| archived.get(id).copied().unwrap_or(0) as i64;
    if held.len() != tickets.len()
        || now != held
        || held.iter().any(|(id, n)| *n != archived_count(id))
    {
        return Err(ArchiveError::WrittenDuringPurge(file.to_string()));
    }
    sqlx::query(
        "INSERT INTO archive_files (file, sha256, tickets, events, checkpoint_id) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(file)
    .bind(sha256)
    .bind(tickets.len() as i32)
    .bind(events as i64)
    .bind(checkpoint_id)
    .execute(&mut *tx)
    .await?;
    // A restored ticket's leaves are there already, with its first archive.
    sqlx::query(
        "INSERT INTO events_purged (position, transaction_id, aggregate_type, aggregate_id, sequence, hash, archive_file, archive_sha256)
         SELECT position, transaction_id, aggregate_type, aggregate_id, sequence, hash, $2, $3
           FROM events WHERE aggregate_type = 'ticket' AND aggregate_id = ANY($1)
         ON CONFLICT (position) DO NOTHING",
    )
    .bind(&tickets)
    .bind(file)
    .bind(sha256)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM events WHERE aggregate_type = 'ticket' AND aggregate_id = ANY($1)")
        .bind(&tickets)
        .execute(&mut *tx)
        .await?;
    // Every read model keyed by ticket: the tables with a `ticket_id`
    // column (our own retention tables aside).
    let tables: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.table_name::text, c.data_type::text FROM information_schema.columns c
           JOIN information_schema.tables t USING (table_schema, table_name)
          WHERE c.table_schema = current_schema() AND c.column_name = 'ticket_id'
            AND t.table_type = 'BASE TABLE'
            AND c.table_name NOT IN ('legal_holds', 'archived_tickets')
          ORDER BY 1",
    )
    .fetch_all(&mut *tx)
    .await?;
    for (table, data_type) in tables {
        let column = if data_type == "uuid" {
            "ticket_id = ANY($1::text[]::uuid[])"
        } else {
            "ticket_id::text = ANY($1::text[])"
        };
        sqlx::query(&format!(
            "DELETE FROM \"{}\" WHERE {column}",
            table.replace('"', "\"\"")
        ))
        .bind(&tickets)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query(
        "DELETE FROM projector_streams WHERE aggregate_type = 'ticket' AND aggregate_id = ANY($1)",
    )
    .bind(&tickets)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO archived_tickets (ticket_id, archive_file) SELECT unnest($1::text[]), $2
         ON CONFLICT (ticket_id) DO UPDATE SET archive_file = EXCLUDED.archive_file, archived_at = now(), restored_at = NULL",
    )
    .bind(&tickets)
    .bind(file)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(file, tickets = tickets.len(), "tickets archived and purged");
    Ok(tickets)
}

/// Sets or releases a legal hold. Returns whether anything changed.
pub async fn hold(pool: &PgPool, ticket_id: &str, release: bool) -> Result<bool, ArchiveError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(RETENTION_LOCK)
        .execute(&mut *tx)
        .await?;
    let changed = if release {
        sqlx::query("DELETE FROM legal_holds WHERE ticket_id = $1")
            .bind(ticket_id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
    } else {
        sqlx::query("INSERT INTO legal_holds (ticket_id) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(ticket_id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
    };
    tx.commit().await?;
    Ok(changed > 0)
}

/// Whether the ticket is archived (and not restored): the status page's 410.
pub async fn is_archived(pool: &PgPool, ticket_id: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM archived_tickets WHERE ticket_id = $1 AND restored_at IS NULL)",
    )
    .bind(ticket_id)
    .fetch_one(pool)
    .await
}

/// Reads an archive file whose SHA-256 must be `sha256`, and returns its
/// tickets' lines.
fn read_file(dir: &Path, file: &str, sha256: &str) -> Result<Vec<ArchivedTicket>, ArchiveError> {
    if file.contains('/') || file.contains("..") {
        return Err(corrupt(file, "not a file name"));
    }
    let path = dir.join(file);
    let bytes = fs::read(&path).map_err(io(&path))?;
    let actual = sha256_hex(&bytes);
    if actual != sha256 {
        return Err(corrupt(
            file,
            format!("SHA-256 {actual}, the record says {sha256}"),
        ));
    }
    let mut reader = BufReader::new(GzDecoder::new(bytes.as_slice()));
    let mut tickets = Vec::new();
    loop {
        let mut line = String::new();
        let n = reader
            .by_ref()
            .take(MAX_LINE)
            .read_line(&mut line)
            .map_err(|e| corrupt(file, e.to_string()))?;
        if n == 0 {
            break;
        }
        if !line.ends_with('\n') {
            return Err(corrupt(file, "a line is cut off or too long"));
        }
        tickets.push(serde_json::from_str(&line).map_err(|e| corrupt(file, e.to_string()))?);
    }
    Ok(tickets)
}

/// Checks one ticket's archived events: sequences 1, 2, 3… and every hash
/// recomputed from the content.
fn check_chain(file: &str, t: &ArchivedTicket) -> Result<(), ArchiveError> {
    let mut verifier = StreamVerifier::default();
    for e in &t.events {
        if e.aggregate_id != t.ticket_id {
            return Err(corrupt(
                file,
                format!("ticket {} holds another stream's event", t.ticket_id),
            ));
        }
        verifier
            .check(
                &ChainInput {
                    event_id: &e.event_id,
                    aggregate_type: &e.aggregate_type,
                    aggregate_id: &e.aggregate_id,
                    sequence: e.sequence,
                    event_type: &e.event_type,
                    event_version: &e.event_version,
                    occurred_at_micros: e.occurred_at_micros,
                    payload: &e.payload,
                    metadata: &e.metadata,
                },
                &e.hash,
            )
            .map_err(|b| {
                corrupt(
                    file,
                    format!(
                        "ticket {} breaks its chain at sequence {}",
                        t.ticket_id, b.sequence
                    ),
                )
            })?;
    }
    Ok(())
}

/// What [`verify_purged`] checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PurgedReport {
    pub files: usize,
    pub events: u64,
}

/// Proves every purged leaf against its archive: each file's SHA-256 as
/// recorded (database and manifest), each archived event's hash recomputed
/// from its content, each purged (position, hash) found in its file, and a
/// tombstone event for each file.
pub async fn verify_purged(pool: &PgPool, dir: &Path) -> Result<PurgedReport, ArchiveError> {
    let files: Vec<(String, String, bool)> = sqlx::query_as(
        "SELECT f.file, f.sha256,
                EXISTS (SELECT 1 FROM events e WHERE e.aggregate_type = 'archive_file' AND e.aggregate_id = f.file)
           FROM archive_files f
          WHERE EXISTS (SELECT 1 FROM events_purged p WHERE p.archive_file = f.file)
          ORDER BY f.file",
    )
    .fetch_all(pool)
    .await?;
    let manifest = if files.is_empty() {
        Manifest::default()
    } else {
        read_manifest(dir)?
    };
    let mut report = PurgedReport::default();
    for (file, sha256, tombstoned) in files {
        if !tombstoned {
            return Err(corrupt(&file, "no tombstone event records its purge"));
        }
        match manifest.files.get(&file) {
            Some(entry) if entry.sha256 == sha256 => {}
            _ => {
                return Err(corrupt(
                    &file,
                    "the manifest does not list it with this SHA-256",
                ))
            }
        }
        let tickets = read_file(dir, &file, &sha256)?;
        let mut archived: BTreeMap<i64, String> = BTreeMap::new();
        for t in &tickets {
            check_chain(&file, t)?;
            for e in &t.events {
                archived.insert(e.position, e.hash.clone());
            }
        }
        let purged: Vec<(i64, String)> =
            sqlx::query_as("SELECT position, hash FROM events_purged WHERE archive_file = $1")
                .bind(&file)
                .fetch_all(pool)
                .await?;
        for (position, hash) in purged {
            if archived.get(&position) != Some(&hash) {
                return Err(corrupt(
                    &file,
                    format!("the purged event at position {position} is not in it as recorded"),
                ));
            }
            report.events += 1;
        }
        report.files += 1;
    }
    Ok(report)
}

/// Brings one archived ticket back into `events` for an investigation,
/// after checking its file against the manifest and the database, its
/// chain, and each event against its purged leaf. The rows go back exactly
/// as they were (position, transaction id, hash), so the log's tree is
/// unchanged. Returns how many events came back.
pub async fn restore(pool: &PgPool, dir: &Path, ticket_id: &str) -> Result<usize, ArchiveError> {
    let (file, sha256): (String, String) = sqlx::query_as(
        "SELECT a.archive_file, f.sha256 FROM archived_tickets a JOIN archive_files f ON f.file = a.archive_file
          WHERE a.ticket_id = $1 AND a.restored_at IS NULL",
    )
    .bind(ticket_id)
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| ArchiveError::NotArchived(ticket_id.to_string()))?;
    let manifest = read_manifest(dir)?;
    match manifest.files.get(&file) {
        Some(entry) if entry.sha256 == sha256 => {}
        _ => {
            return Err(corrupt(
                &file,
                "the manifest does not list it with this SHA-256",
            ))
        }
    }
    let tickets = read_file(dir, &file, &sha256)?;
    let ticket = tickets
        .into_iter()
        .find(|t| t.ticket_id == ticket_id)
        .ok_or_else(|| corrupt(&file, format!("ticket {ticket_id} is not in it")))?;
    check_chain(&file, &ticket)?;
    let purged: BTreeMap<i64, String> = sqlx::query_as::<_, (i64, String)>(
        "SELECT position, hash FROM events_purged WHERE aggregate_type = 'ticket' AND aggregate_id = $1",
    )
    .bind(ticket_id)
    .fetch_all(pool)
    .await?
    .into_iter()
    .collect();
    if purged.len() != ticket.events.len()
        || ticket
            .events
            .iter()
            .any(|e| purged.get(&e.position) != Some(&e.hash))
    {
        return Err(corrupt(
            &file,
            format!("ticket {ticket_id}'s events differ from their purged leaves"),
        ));
    }
    let mut tx = pool.begin().await?;
    for e in &ticket.events {
        sqlx::query(
            "INSERT INTO events (position, transaction_id, event_id, aggregate_type, aggregate_id, sequence,
                                 event_type, event_version, payload, metadata, occurred_at, hash)
             OVERRIDING SYSTEM VALUE
             VALUES ($1, $2::text::xid8, $3::uuid, $4, $5, $6, $7, $8, $9::jsonb, $10::jsonb,
                     timestamptz 'epoch' + $11 * interval '1 microsecond', $12)",
        )
        .bind(e.position)
        .bind(&e.transaction_id)
        .bind(&e.event_id)
        .bind(&e.aggregate_type)
        .bind(&e.aggregate_id)
        .bind(e.sequence)
        .bind(&e.event_type)
        .bind(&e.event_version)
        .bind(&e.payload)
        .bind(&e.metadata)
        .bind(e.occurred_at_micros)
        .bind(&e.hash)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("UPDATE archived_tickets SET restored_at = now() WHERE ticket_id = $1")
        .bind(ticket_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(ticket.events.len())
}
