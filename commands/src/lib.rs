//! Casebook's write side: the event store (cqrs-es on postgres-es), intake of
//! customer messages, the outbox relay to Kafka, and the channel API clients.
//! Only this crate appends events.

pub mod approvals;
pub mod cache;
pub mod claims;
pub mod delivery;
pub mod feedback;
pub mod gmail;
pub mod intake;
pub mod kafka;
pub mod limits;
pub mod metrics;
pub mod relay;
pub mod retry;
pub mod sla;
pub mod staff;
pub mod store;
pub mod trail;
pub mod worker;

pub use cache::AggregateCache;
pub use intake::{InboundMessage, Intake, IntakeError, IntakeOutcome, KeyOrigin, Sender};
pub use store::{CommandError, EventStore, StoreError};
