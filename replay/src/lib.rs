//! Replay and audit: rebuild read models from the event store, show a ticket
//! as it stood at any moment, and verify that no stored event was altered.

pub mod archive;
pub mod audit;
pub mod checkpoint;
pub mod history;
pub mod rebuild;

pub use audit::{log_size, verify_chains, verify_log, Failure, VerifyError, VerifyReport};
pub use history::{mask_identifiers, ticket_as_of, ticket_at, AsOf, TicketHistory, TicketView};
pub use rebuild::{rebuild, rebuild_paged, rebuild_with_progress, Progress, RebuildReport};
