//! Retention's tombstone: each archive file the retention pass writes is a
//! stream (`archive_file`, id = the file name) whose one event records what
//! left the hot tables for it, so the purge itself is part of the log.

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};

/// Tickets resolved or closed longer ago than this are archived.
pub const RETENTION_DAYS: i64 = 365;

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArchiveFile {
    recorded: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ArchiveCommand {
    RecordPurge(PurgeRecord),
}

/// What one archive file holds, and the checkpoint it was cut at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeRecord {
    pub file: String,
    pub sha256: String,
    pub tickets: Vec<String>,
    pub events: u64,
    pub checkpoint_size: u64,
    pub checkpoint_root: String,
    pub purged_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ArchiveEvent {
    /// The tombstone: these tickets' events left the hot tables for `file`.
    TicketsPurged(PurgeRecord),
}

impl DomainEvent for ArchiveEvent {
    fn event_type(&self) -> String {
        "TicketsPurged".into()
    }

    fn event_version(&self) -> String {
        "1".into()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArchiveError {
    #[error("this archive file's purge is already recorded")]
    AlreadyRecorded,
    #[error("a purge record needs a file name, a SHA-256 and at least one ticket")]
    Incomplete,
}

impl ArchiveFile {
    fn decide(&self, command: ArchiveCommand) -> Result<Vec<ArchiveEvent>, ArchiveError> {
        match command {
            ArchiveCommand::RecordPurge(record) => {
                if self.recorded {
                    return Err(ArchiveError::AlreadyRecorded);
                }
                if record.file.is_empty()
                    || record.sha256.len() != 64
                    || !record.sha256.bytes().all(|b| b.is_ascii_hexdigit())
                    || record.tickets.is_empty()
                {
                    return Err(ArchiveError::Incomplete);
                }
                Ok(vec![ArchiveEvent::TicketsPurged(record)])
            }
        }
    }

    fn apply_event(&mut self, event: ArchiveEvent) {
        match event {
            ArchiveEvent::TicketsPurged(_) => self.recorded = true,
        }
    }
}

crate::impl_aggregate!(
    ArchiveFile,
    "archive_file",
    ArchiveCommand,
    ArchiveEvent,
    ArchiveError
);

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    fn record() -> PurgeRecord {
        PurgeRecord {
            file: "tickets-2025-11-24.ndjson.gz".into(),
            sha256: "ab".repeat(32),
            tickets: vec!["t-1".into()],
            events: 4,
            checkpoint_size: 10,
            checkpoint_root: "cd".repeat(32),
            purged_at: DateTime::from_timestamp(1_795_000_000, 0).unwrap(),
        }
    }

    #[test]
    fn a_purge_is_recorded_once() {
        TestFramework::<ArchiveFile>::with(())
            .given_no_previous_events()
            .when(ArchiveCommand::RecordPurge(record()))
            .then_expect_events(vec![ArchiveEvent::TicketsPurged(record())]);
        TestFramework::<ArchiveFile>::with(())
            .given(vec![ArchiveEvent::TicketsPurged(record())])
            .when(ArchiveCommand::RecordPurge(record()))
            .then_expect_error(ArchiveError::AlreadyRecorded);
    }

    #[test]
    fn an_incomplete_record_is_refused() {
        let mut r = record();
        r.sha256 = "zz".repeat(32);
        TestFramework::<ArchiveFile>::with(())
            .given_no_previous_events()
            .when(ArchiveCommand::RecordPurge(r))
            .then_expect_error(ArchiveError::Incomplete);
        let mut r = record();
        r.tickets.clear();
        TestFramework::<ArchiveFile>::with(())
            .given_no_previous_events()
            .when(ArchiveCommand::RecordPurge(r))
            .then_expect_error(ArchiveError::Incomplete);
    }
}
