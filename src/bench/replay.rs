//! `casebook bench replay`: rebuilding every read model from a full store.
//!
//! 1. Generates tickets through the real command path (`Intake::receive`,
//!    as the channel routes call it, `--clients` at once) until the store
//!    holds `--replay-events` events (default 1,000,000).
//!    Then resolves `--archive-tickets` of them (default 100,000, or all
//!    there are), through the command path too.
//! 2. Rebuilds all read models (`replay projections`: shadow tables, then
//!    the swap) and reports events in the store per second of rebuild, and
//!    each projector's own rate. Target: 50,000 events/s.
//! 3. Takes a signed checkpoint and runs `audit verify` over the same log.
//!    Target: 200,000 events/s.
//! 4. Runs `archive run` a year and a day later (`--as-of`), which archives
//!    and purges every resolved ticket, and checks that it did.

use std::time::Instant;

use casebook_commands::{EventStore, Intake};
use casebook_domain::{Actor, EventMetadata, Ticket, TicketCommand};
use serde::Serialize;

use super::graphql::message;
use super::{BenchArgs, Report, Scratch};

/// The rate the issue asks for.
pub const TARGET_PER_SECOND: f64 = 50_000.0;
pub const VERIFY_TARGET_PER_SECOND: f64 = 200_000.0;

#[derive(Debug, Serialize)]
pub struct ProjectorRate {
    pub projector: &'static str,
    pub events_read: u64,
    pub events_applied: u64,
    pub seconds: f64,
    /// Of `seconds`, the swap's transaction.
    pub swap_seconds: f64,
    pub events_per_second: f64,
}

#[derive(Debug, Serialize)]
pub struct ReplayReport {
    pub bench: &'static str,
    pub tickets: usize,
    /// Events in the store the read models were rebuilt from.
    pub events: i64,
    pub generation_seconds: f64,
    pub rebuild_seconds: f64,
    /// `events` over `rebuild_seconds`: all read models, one after another.
    pub events_per_second: f64,
    pub target_per_second: f64,
    pub projectors: Vec<ProjectorRate>,
    /// A second rebuild, over read models that are already right (the
    /// usual case): its swaps compare rather than copy.
    pub rebuild_again_seconds: f64,
    /// The longest swap of each rebuild: how long a projector's live
    /// batches waited.
    pub longest_swap_seconds: f64,
    pub longest_swap_again_seconds: f64,
    /// `audit verify` over the same log, after the rebuild.
    pub verify: VerifyRate,
    /// `archive run` over the resolved tickets, a year and a day later.
    pub archive: ArchiveRate,
}

#[derive(Debug, Serialize)]
pub struct VerifyRate {
    pub events: u64,
    pub checkpoint_seconds: f64,
    pub seconds: f64,
    pub events_per_second: f64,
    pub target_per_second: f64,
}

#[derive(Debug, Serialize)]
pub struct ArchiveRate {
    pub eligible_tickets: usize,
    pub archived_tickets: usize,
    pub events_purged: u64,
    pub files: usize,
    pub archive_bytes: u64,
    pub seconds: f64,
    pub tickets_per_second: f64,
}

impl ReplayReport {
    pub fn text(&self) -> String {
        let mut out = format!(
            "replay: {} events ({} tickets) generated in {:.0} s\n  all read models rebuilt in {:.1} s: {:.0} events/s (target {:.0})\n",
            self.events,
            self.tickets,
            self.generation_seconds,
            self.rebuild_seconds,
            self.events_per_second,
            self.target_per_second
        );
        for p in &self.projectors {
            out.push_str(&format!(
                "  {:<26} {:>9} events read in {:>6.1} s (swap {:.1} s): {:.0} events/s\n",
                p.projector, p.events_read, p.seconds, p.swap_seconds, p.events_per_second
            ));
        }
        out.push_str(&format!(
            "  again, over right read models: {:.1} s; longest swap {:.1} s (first rebuild {:.1} s)\n",
            self.rebuild_again_seconds, self.longest_swap_again_seconds, self.longest_swap_seconds
        ));
        let (v, a) = (&self.verify, &self.archive);
        out.push_str(&format!(
            "  audit verify: {} events in {:.1} s: {:.0} events/s (target {:.0}; checkpoint {:.1} s)\n",
            v.events, v.seconds, v.events_per_second, v.target_per_second, v.checkpoint_seconds
        ));
        out.push_str(&format!(
            "  archive run: {} of {} eligible tickets ({} events, {} files, {} bytes) in {:.1} s: {:.0} tickets/s\n",
            a.archived_tickets,
            a.eligible_tickets,
            a.events_purged,
            a.files,
            a.archive_bytes,
            a.seconds,
            a.tickets_per_second
        ));
        out
    }
}

async fn events(scratch: &Scratch) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&scratch.pool)
        .await?)
}

/// Tickets `from..to` through intake, `clients` at once.
async fn generate(intake: &Intake, from: usize, to: usize, clients: usize) -> anyhow::Result<()> {
    let intake = intake.clone();
    super::generate("replay", from..to, clients, move |i| {
        let intake = intake.clone();
        async move { intake.receive(&message(i, None), "bench").await.map(|_| ()) }
    })
    .await
}

pub(super) async fn run(scratch: &Scratch, args: &BenchArgs) -> anyhow::Result<Report> {
    let target = args.replay_events.clamp(1_000, 50_000_000) as i64;
    let started = Instant::now();
    let intake = Intake::new(EventStore::new(scratch.pool.clone()));
    // A sample tells how many events a ticket makes; then the rest at once.
    let sample = 100;
    generate(&intake, 0, sample, args.clients).await?;
    let per_ticket = (events(scratch).await? as f64 / sample as f64).max(1.0);
    let tickets = ((target as f64 / per_ticket).ceil() as usize).max(sample);
    generate(&intake, sample, tickets, args.clients).await?;
    let resolved = resolve(scratch, args.archive_tickets.min(tickets), args.clients).await?;
    let events = events(scratch).await?;
    let generation_seconds = started.elapsed().as_secs_f64();
    sqlx::query("VACUUM ANALYZE").execute(&scratch.pool).await?;
    // A settled store, as a rebuild meets it in production: what generating
    // it and vacuuming it left dirty (gigabytes of WAL and buffers) is
    // written back now, not by a checkpoint it would trigger during the
    // rebuild. Best effort: a role without the right measures with it.
    if let Err(e) = sqlx::query("CHECKPOINT").execute(&scratch.pool).await {
        eprintln!(
            "bench replay: no CHECKPOINT before rebuilding ({e}); a checkpoint may run during it"
        );
    }
    eprintln!("bench replay: {tickets} tickets, {events} events in {generation_seconds:.0} s; rebuilding every read model");

    let started = Instant::now();
    let last = std::sync::Mutex::new(Instant::now());
    let reports = casebook_replay::rebuild_with_progress(
        &scratch.pool,
        &casebook_projections::all_projectors(),
        casebook_replay::rebuild::CHUNK,
        &|p| {
            if let Ok(mut last) = last.lock() {
                if p.swapped || last.elapsed().as_secs() >= 5 {
                    *last = Instant::now();
                    eprintln!(
                        "bench replay: {} {}/{} events{}",
                        p.projector,
                        p.done,
                        p.total,
                        if p.swapped { ", swapped in" } else { "" }
                    );
                }
            }
        },
    )
    .await?;
    let rebuild_seconds = started.elapsed().as_secs_f64();
    eprintln!("bench replay: rebuilt in {rebuild_seconds:.1} s; again over right read models");
    let longest_swap = |reports: &[casebook_replay::RebuildReport]| {
        reports.iter().map(|r| r.swap_millis).max().unwrap_or(0) as f64 / 1000.0
    };
    let longest_swap_seconds = longest_swap(&reports);
    let started = Instant::now();
    let again = casebook_replay::rebuild_with_progress(
        &scratch.pool,
        &casebook_projections::all_projectors(),
        casebook_replay::rebuild::CHUNK,
        &|_| {},
    )
    .await?;
    let rebuild_again_seconds = started.elapsed().as_secs_f64();
    let longest_swap_again_seconds = longest_swap(&again);
    eprintln!(
        "bench replay: rebuilt again in {rebuild_again_seconds:.1} s; checkpoint and audit verify"
    );
    let seed: [u8; 32] = rand::random();
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    let timed = super::audit::checkpoint_and_verify(scratch, &key).await?;
    let verify = VerifyRate {
        events: timed.events,
        checkpoint_seconds: timed.checkpoint_seconds,
        seconds: timed.verify_seconds,
        events_per_second: timed.events as f64 / timed.verify_seconds,
        target_per_second: VERIFY_TARGET_PER_SECOND,
    };
    eprintln!("bench replay: archive run over {resolved} resolved tickets");
    let archive = archive(scratch, &key, resolved).await?;
    let projectors = reports
        .into_iter()
        .map(|r| {
            let seconds = (r.millis as f64 / 1000.0).max(0.001);
            ProjectorRate {
                projector: r.projector,
                events_read: r.events_read,
                events_applied: r.events_applied,
                seconds,
                swap_seconds: r.swap_millis as f64 / 1000.0,
                events_per_second: r.events_read as f64 / seconds,
            }
        })
        .collect();
    Ok(Report::Replay(ReplayReport {
        bench: "replay",
        tickets,
        events,
        generation_seconds,
        rebuild_seconds,
        events_per_second: events as f64 / rebuild_seconds.max(0.001),
        target_per_second: TARGET_PER_SECOND,
        projectors,
        rebuild_again_seconds,
        longest_swap_seconds,
        longest_swap_again_seconds,
        verify,
        archive,
    }))
}

/// Resolves `n` of the generated tickets through the command path, `clients`
/// at once. Returns how many.
async fn resolve(scratch: &Scratch, n: usize, clients: usize) -> anyhow::Result<usize> {
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT aggregate_id FROM events WHERE aggregate_type = 'ticket' ORDER BY 1 LIMIT $1",
    )
    .bind(n as i64)
    .fetch_all(&scratch.pool)
    .await?;
    let count = ids.len();
    let ids = std::sync::Arc::new(ids);
    let store = EventStore::new(scratch.pool.clone());
    super::generate("replay (resolving)", 0..count, clients, move |i| {
        let (store, ids) = (store.clone(), ids.clone());
        async move {
            store
                .execute::<Ticket>(
                    &ids[i],
                    TicketCommand::Resolve {
                        resolved_by: "agent:bench".into(),
                        resolution: Some("answered".into()),
                        at: chrono::Utc::now(),
                    },
                    &EventMetadata::new("bench", Actor::system("bench")),
                )
                .await
                .map(|_| ())
        }
    })
    .await?;
    Ok(count)
}

/// `archive run` a year and a day from now, into a directory of its own
/// (removed afterwards); fails unless it archived every resolved ticket.
async fn archive(
    scratch: &Scratch,
    key: &ed25519_dalek::SigningKey,
    resolved: usize,
) -> anyhow::Result<ArchiveRate> {
    let dir = std::env::temp_dir().join(format!("casebook-bench-archive-{}", uuid::Uuid::new_v4()));
    let as_of = chrono::Utc::now() + chrono::Duration::days(366);
    let started = Instant::now();
    let report = crate::audit::archive_pass(&scratch.pool, &dir, as_of, key).await;
    let seconds = started.elapsed().as_secs_f64().max(0.001);
    let archive_bytes = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    let _ = std::fs::remove_dir_all(&dir);
    let report = report?;
    let archived: usize = report.purged.iter().map(|p| p.tickets.len()).sum();
    anyhow::ensure!(
        archived == resolved,
        "archive run archived {archived} of {resolved} resolved tickets"
    );
    Ok(ArchiveRate {
        eligible_tickets: report.eligible,
        archived_tickets: archived,
        events_purged: report.purged.iter().map(|p| p.events).sum(),
        files: report.purged.len(),
        archive_bytes,
        seconds,
        tickets_per_second: archived as f64 / seconds,
    })
}
