//! `casebook bench verify`: `audit verify` over a generated log.
//!
//! 1. Appends `--events` events (default 1,000,000) through the event store
//!    (the writer computes every chain hash), `--writers` at once, in
//!    commits of `--per-commit` on streams of `--commits-per-stream`
//!    commits: the same generator as `bench append`.
//! 2. Takes a signed checkpoint over all of it (a key made for the run).
//! 3. Times `verify_log`: every chain, the Merkle tree and the checkpoint.

use std::time::Instant;

use casebook_commands::EventStore;
use casebook_domain::{Actor, EventMetadata};
use serde::Serialize;

use super::{BenchArgs, Report, Scratch};

#[derive(Debug, Serialize)]
pub(super) struct VerifyReport {
    bench: &'static str,
    events: u64,
    streams: u64,
    generate_seconds: f64,
    checkpoint_seconds: f64,
    verify_seconds: f64,
    verify_per_second: f64,
}

impl VerifyReport {
    pub(super) fn text(&self) -> String {
        format!(
            "verify: {} events in {} streams (generated in {:.1} s, checkpoint {:.1} s)\n  audit verify: {:.1} s, {:.0} events/s\n",
            self.events,
            self.streams,
            self.generate_seconds,
            self.checkpoint_seconds,
            self.verify_seconds,
            self.verify_per_second
        )
    }
}

pub(super) async fn verify(scratch: &Scratch, args: &BenchArgs) -> anyhow::Result<Report> {
    let writers = args.writers.max(1);
    let per_commit = args.per_commit.max(1);
    let commits_per_writer = args.events / per_commit / writers;
    let meta = EventMetadata::new("bench", Actor::system("bench"));
    let store = EventStore::new(scratch.pool.clone());
    let started = Instant::now();
    super::append_streams(
        &store,
        &meta,
        "",
        writers,
        commits_per_writer,
        per_commit,
        args.commits_per_stream,
    )
    .await?;
    let generate_seconds = started.elapsed().as_secs_f64();

    let seed: [u8; 32] = rand::random();
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    let timed = checkpoint_and_verify(scratch, &key).await?;
    Ok(Report::Verify(Box::new(VerifyReport {
        bench: "verify",
        events: timed.events,
        streams: timed.streams,
        generate_seconds,
        checkpoint_seconds: timed.checkpoint_seconds,
        verify_seconds: timed.verify_seconds,
        verify_per_second: timed.events as f64 / timed.verify_seconds,
    })))
}

/// What [`checkpoint_and_verify`] took.
pub(super) struct Verified {
    pub events: u64,
    pub streams: u64,
    pub checkpoint_seconds: f64,
    pub verify_seconds: f64,
}

/// Takes a signed checkpoint over the whole log (signed with `key`), then
/// times `audit verify` over it; fails unless every event verifies.
pub(super) async fn checkpoint_and_verify(
    scratch: &Scratch,
    key: &ed25519_dalek::SigningKey,
) -> anyhow::Result<Verified> {
    let started = Instant::now();
    let total = casebook_replay::log_size(&scratch.pool).await?;
    // Other transactions in the cluster may hold the snapshot's xmin back
    // for a moment: checkpoint until everything is covered (bounded).
    let deadline = Instant::now() + std::time::Duration::from_secs(120);
    loop {
        casebook_replay::checkpoint::create(&scratch.pool, key).await?;
        let covered = casebook_replay::checkpoint::latest(&scratch.pool)
            .await?
            .map(|c| c.checkpoint.body.size)
            .unwrap_or(0);
        if covered == total {
            break;
        }
        if Instant::now() > deadline {
            anyhow::bail!("the checkpoint covers {covered} of {total} events after 120 s");
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let checkpoint_seconds = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let report =
        casebook_replay::verify_log(&scratch.pool, Some(&key.verifying_key()), |_| {}).await?;
    let verify_seconds = started.elapsed().as_secs_f64().max(0.001);
    if let Some(failure) = report.failure {
        anyhow::bail!("the log does not verify: {failure}");
    }
    if report.checkpoints == 0 || report.events != total {
        anyhow::bail!(
            "verified {} of {total} events against {} checkpoints",
            report.events,
            report.checkpoints
        );
    }
    Ok(Verified {
        events: report.events,
        streams: report.streams,
        checkpoint_seconds,
        verify_seconds,
    })
}
