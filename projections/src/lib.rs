//! Casebook's read models and the consumers that build them from
//! `<prefix>.events`.
//!
//! Each projector is its own consumer group. A batch of events, the rows it
//! changes, the Kafka offsets it consumed and the per-stream sequence it
//! reached are committed in one Postgres transaction, so a crash neither
//! skips nor repeats an event; copies the relay publishes again after a crash
//! are recognised by their stream sequence. The same `apply_batch` serves
//! rebuilding a read model straight from the event store.

pub mod access;
pub mod analytics;
pub mod consumer;
pub mod crm;
pub mod live;
pub mod metrics;
pub mod projector;
pub mod queries;
pub mod staff;
pub mod store;

pub use access::{begin_scoped, ReadScope};
pub use consumer::{ConsumerSettings, ProjectorRunner};
pub use projector::{
    apply_batch, apply_batch_in, apply_rebuild_page, finish_fill_in, set_baseline, ConsumedOffset,
    FillPart, ProjectionError, Projector,
};

/// Every projector this crate provides, by name.
pub fn all_projectors() -> Vec<std::sync::Arc<dyn Projector>> {
    let mut all = crm::projectors();
    all.push(std::sync::Arc::new(analytics::MetricsProjector));
    all
}
