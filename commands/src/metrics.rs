//! Prometheus metrics of the write side, registered in the default registry
//! that `/metrics` exposes.

use std::sync::LazyLock;

use cqrs_es::persist::SerializedEvent;
use prometheus::{
    register_histogram_vec, register_int_counter, register_int_counter_vec, register_int_gauge,
    HistogramVec, IntCounter, IntCounterVec, IntGauge,
};

pub static EVENTS_APPENDED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "casebook_events_appended_total",
        "Events appended to the event store",
        &["aggregate_type", "event_type"]
    )
    .expect("metric registers once")
});

pub static AGGREGATE_CACHE: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "casebook_aggregate_cache_total",
        "Commands whose aggregate came from the event store's memory (hit) or was read (miss)",
        &["outcome"]
    )
    .expect("metric registers once")
});

pub static APPEND_GROUPS: LazyLock<prometheus::Histogram> = LazyLock::new(|| {
    prometheus::register_histogram!(
        "casebook_append_group_units",
        "Units of work written by one append statement (group commit)",
        vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]
    )
    .expect("metric registers once")
});

pub static INTAKE_MESSAGES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "casebook_intake_messages_total",
        "Inbound customer messages by channel and outcome (accepted, duplicate)",
        &["channel", "outcome"]
    )
    .expect("metric registers once")
});

pub static RELAY_PUBLISHED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "casebook_relay_published_total",
        "Events the relay published to Kafka"
    )
    .expect("metric registers once")
});

pub static RELAY_ERRORS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "casebook_relay_publish_errors_total",
        "Relay batches that failed to publish and were retried"
    )
    .expect("metric registers once")
});

pub static RELAY_LAG_EVENTS: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "casebook_relay_lag_events",
        "Committed events not yet published to Kafka"
    )
    .expect("metric registers once")
});

pub static RELAY_LAG_SECONDS: LazyLock<prometheus::Gauge> = LazyLock::new(|| {
    prometheus::register_gauge!(
        "casebook_relay_lag_seconds",
        "Age of the oldest committed event not yet published to Kafka"
    )
    .expect("metric registers once")
});

pub static EXTERNAL_CALLS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "casebook_external_call_seconds",
        "Latency of calls to external APIs (Gmail, Twilio, LLM) by service, operation and outcome",
        &["service", "operation", "outcome"],
        vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
    )
    .expect("metric registers once")
});

pub fn record_appended(events: &[SerializedEvent]) {
    for e in events {
        EVENTS_APPENDED
            .with_label_values(&[e.aggregate_type.as_str(), e.event_type.as_str()])
            .inc();
    }
}

pub static KB_SEARCH: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "casebook_kb_search_seconds",
        "Knowledge base search latency (embedding the query included), by outcome",
        &["outcome"],
        vec![0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
    )
    .expect("metric registers once")
});

pub static LLM_CALLS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "casebook_llm_request_seconds",
        "Language model request latency by provider and outcome (ok, error, circuit_open)",
        &["provider", "outcome"],
        vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
    )
    .expect("metric registers once")
});

pub static GMAIL_MESSAGES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "casebook_gmail_messages_total",
        "Gmail messages the mail sync settled, by outcome (accepted, duplicate, skipped, refused, gone)",
        &["outcome"]
    )
    .expect("metric registers once")
});

pub static GMAIL_SYNC_ERRORS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "casebook_gmail_sync_errors_total",
        "Mail sync passes that failed (Gmail or the event store unavailable); retried with backoff"
    )
    .expect("metric registers once")
});

pub static RELAY_SET_ASIDE: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "casebook_relay_set_aside_total",
        "Stored events the relay could never publish (recorded in relay_set_aside); alert on any"
    )
    .expect("metric registers once")
});

pub static WORKER_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "casebook_worker_errors_total",
        "Failures in Kafka workers by consumer group and kind (retry: a handler asked to retry; poison: a handler refused a message; exhausted: retries ran out; dlq_write: a dead-letter write failed; commit: an offset commit failed; consume: the consumer reported an error)",
        &["group", "kind"]
    )
    .expect("metric registers once")
});

pub static DLQ_MESSAGES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "casebook_dlq_messages_total",
        "Messages a worker wrote to the dead-letter topic, by consumer group",
        &["group"]
    )
    .expect("metric registers once")
});

pub static DELIVERY_RECONCILED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "casebook_delivery_reconciled_total",
        "Reply parts whose fate was unknown (a timeout, a crash mid-send) and were looked up at the provider, by service and outcome (found, absent, unknown)",
        &["service", "outcome"]
    )
    .expect("metric registers once")
});

pub static AGENT_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "casebook_agent_seconds",
        "Time the agent took over one customer message, from reading it to its last event (history, knowledge search, model, guardrails), by outcome (ok, skipped, error)",
        &["outcome"],
        vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
    )
    .expect("metric registers once")
});
