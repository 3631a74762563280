//! `casebook bench replay`: rebuilding every read model from a full store.
//!
//! 1. Generates tickets through the real command path (`Intake::receive`,
//!    as the channel routes call it, `--clients` at once) until the store
//!    holds `--replay-events` events (default 1,000,000).
//! 2. Rebuilds all read models (`replay projections`: shadow tables, then
//!    the swap) and reports events in the store per second of rebuild, and
//!    each projector's own rate. Target: 50,000 events/s.

use std::time::Instant;

use casebook_commands::{EventStore, Intake};
use serde::Serialize;

use super::graphql::message;
use super::{BenchArgs, Report, Scratch};

/// The rate the issue asks for.
pub const TARGET_PER_SECOND: f64 = 50_000.0;

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
    let events = events(scratch).await?;
    let generation_seconds = started.elapsed().as_secs_f64();
    sqlx::query("VACUUM ANALYZE").execute(&scratch.pool).await?;
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
    }))
}
