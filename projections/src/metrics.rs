//! Prometheus metrics of the read side.

use std::sync::LazyLock;

use prometheus::{
    register_histogram_vec, register_int_counter_vec, register_int_gauge_vec, HistogramVec,
    IntCounterVec, IntGaugeVec,
};

pub static APPLIED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "casebook_projector_events_applied_total",
        "Events applied to read models, by projector",
        &["projector"]
    )
    .expect("metric registers once")
});

pub static SKIPPED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "casebook_projector_events_skipped_total",
        "Events a projector did not apply, by reason (duplicate, unreadable, gap)",
        &["projector", "reason"]
    )
    .expect("metric registers once")
});

pub static LAG_EVENTS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "casebook_consumer_lag_events",
        "Events in the store past the furthest one a projector has applied",
        &["projector"]
    )
    .expect("metric registers once")
});

pub static BATCH_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "casebook_projector_batch_seconds",
        "Time to apply one batch of events, by projector",
        &["projector"],
        vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
    )
    .expect("metric registers once")
});

pub static ESCALATIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "casebook_escalations_total",
        "Tickets escalated to a human, by reason",
        &["reason"]
    )
    .expect("metric registers once")
});

pub static GAP_FILLED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "casebook_projector_gap_events_total",
        "Events a projector read from the event store because they had not arrived on Kafka before a later event of their stream",
        &["projector"]
    )
    .expect("metric registers once")
});
