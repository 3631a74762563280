//! `<prefix>.metrics`: a snapshot every interval (a minute by default),
//! one message per metric keyed by its name, with the figures since the
//! previous snapshot (`last_interval`, the last minute) and of the current
//! hour; and the model budget gauges for Prometheus.

use std::sync::LazyLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus::{register_gauge, register_int_gauge, Gauge, IntGauge};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::figures::{Figures, Grain, ALL};
use super::queries;

/// Spend at which the budget alert fires, as a share of the yearly budget.
pub const BUDGET_ALERT_SHARE: f64 = 0.8;

pub static MODEL_SPEND_YTD: LazyLock<Gauge> = LazyLock::new(|| {
    register_gauge!(
        "casebook_model_spend_ytd_usd",
        "Model spend since January 1st (UTC), in US dollars"
    )
    .expect("metric registers once")
});

pub static MODEL_BUDGET: LazyLock<Gauge> = LazyLock::new(|| {
    register_gauge!(
        "casebook_model_budget_usd_per_year",
        "The yearly model budget (CASEBOOK_MODEL_BUDGET_USD_PER_YEAR)"
    )
    .expect("metric registers once")
});

pub static MODEL_BUDGET_ALERT: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "casebook_model_budget_alert",
        "1 when the year's model spend reached 80 % of the yearly budget"
    )
    .expect("metric registers once")
});

/// Whether `spent_usd` reached the alert share of `budget_usd`.
pub fn budget_alert(spent_usd: f64, budget_usd: f64) -> bool {
    spent_usd >= BUDGET_ALERT_SHARE * budget_usd
}

#[derive(Debug, Clone)]
pub struct SnapshotSettings {
    pub brokers: String,
    pub topic: String,
    pub every: Duration,
    pub budget_usd_per_year: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("metrics database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

/// Figures that only grow within a day, minus an earlier reading of the
/// same day (what happened between the two readings).
fn since(now: &Figures, earlier: &Figures) -> Figures {
    // Every counter of `now` is at least `earlier`'s: the difference is
    // the merge of `now` with nothing taken away, computed field by field
    // through the JSON shape (one place that knows every field).
    let now_v = serde_json::to_value(now).expect("figures serialise");
    let earlier_v = serde_json::to_value(earlier).expect("figures serialise");
    fn minus(a: &Value, b: &Value) -> Value {
        match (a, b) {
            (Value::Number(x), Value::Number(y)) => {
                json!(x
                    .as_u64()
                    .unwrap_or(0)
                    .saturating_sub(y.as_u64().unwrap_or(0)))
            }
            (Value::Object(x), Value::Object(y)) => Value::Object(
                x.iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            y.get(k).map(|w| minus(v, w)).unwrap_or_else(|| v.clone()),
                        )
                    })
                    .collect(),
            ),
            (a, _) => a.clone(),
        }
    }
    let mut diff = minus(&now_v, &earlier_v);
    // Histogram bins that emptied out are dropped.
    for h in ["first_response_ms", "resolution_ms"] {
        if let Some(Value::Object(bins)) = diff.get_mut(h) {
            bins.retain(|_, n| n.as_u64() != Some(0));
        }
    }
    serde_json::from_value(diff).unwrap_or_default()
}

/// The snapshot's messages: (metric name, JSON document).
pub fn messages(
    at: DateTime<Utc>,
    interval: &Figures,
    hour_start: DateTime<Utc>,
    hour: &Figures,
    ytd_usd: f64,
    budget_usd: f64,
) -> Vec<(String, Value)> {
    fn pick(f: &Figures) -> Vec<(&'static str, Value)> {
        vec![
            ("tickets_opened", json!(f.tickets_opened)),
            ("messages_in", json!(f.messages_in)),
            ("responses_ai", json!(f.responses_ai)),
            ("responses_human", json!(f.responses_human)),
            ("escalations", json!(f.escalations)),
            ("escalation_rate", json!(f.escalation_rate())),
            (
                "first_response_p50_ms",
                json!(f.first_response_ms.quantile(0.5)),
            ),
            (
                "first_response_p95_ms",
                json!(f.first_response_ms.quantile(0.95)),
            ),
            ("resolution_p50_ms", json!(f.resolution_ms.quantile(0.5))),
            ("resolution_p95_ms", json!(f.resolution_ms.quantile(0.95))),
            ("sla_breaches", json!(f.sla_breaches.values().sum::<u64>())),
            ("auto_resolved", json!(f.auto_resolved)),
            ("helpful_rate", json!(f.helpful_rate())),
            ("delivery_failures", json!(f.delivery_failures)),
            ("model_calls", json!(f.model_calls)),
            ("model_tokens_in", json!(f.model_tokens_in)),
            ("model_tokens_out", json!(f.model_tokens_out)),
            ("model_cost_usd", json!(f.model_cost_usd())),
        ]
    }
    let mut out: Vec<(String, Value)> = pick(interval)
        .into_iter()
        .zip(pick(hour))
        .map(|((name, last), (_, current))| {
            (
                name.to_string(),
                json!({"metric": name, "at": at, "last_interval": last,
                       "current_hour": current, "hour_start": hour_start}),
            )
        })
        .collect();
    out.push((
        "model_cost_ytd_usd".into(),
        json!({"metric": "model_cost_ytd_usd", "at": at, "value": ytd_usd,
               "budget_usd_per_year": budget_usd,
               "alert": budget_alert(ytd_usd, budget_usd)}),
    ));
    out
}

/// Publishes a snapshot every `settings.every` until `shutdown`.
pub async fn run(pool: PgPool, settings: SnapshotSettings, shutdown: CancellationToken) {
    let producer: FutureProducer = match ClientConfig::new()
        .set("bootstrap.servers", &settings.brokers)
        .set("message.timeout.ms", "10000")
        .create()
    {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "metrics snapshots: no Kafka producer");
            return;
        }
    };
    MODEL_BUDGET.set(settings.budget_usd_per_year);
    let mut previous: Option<(DateTime<Utc>, Figures)> = None;
    let mut tick = tokio::time::interval(settings.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match publish(&pool, &producer, &settings, previous.take()).await {
            Ok(day) => previous = Some(day),
            Err(e) => tracing::warn!(error = %e, "metrics snapshot failed; next interval retries"),
        }
    }
}

/// One snapshot; returns the day's figures it read, for the next one.
async fn publish(
    pool: &PgPool,
    producer: &FutureProducer,
    settings: &SnapshotSettings,
    previous: Option<(DateTime<Utc>, Figures)>,
) -> Result<(DateTime<Utc>, Figures), SnapshotError> {
    let now = Utc::now();
    let mut conn = pool.acquire().await?;
    let (day_start, day) = queries::bucket(&mut conn, Grain::Day, now, ALL, ALL).await?;
    let (hour_start, hour) = queries::bucket(&mut conn, Grain::Hour, now, ALL, ALL).await?;
    let ytd_micro = queries::model_cost_since(&mut conn, queries::year_start(now)).await?;
    drop(conn);
    let interval = match &previous {
        Some((start, earlier)) if *start == day_start => since(&day, earlier),
        // A new day (or the first snapshot): the day so far.
        _ => day.clone(),
    };
    let ytd_usd = ytd_micro as f64 / 1_000_000.0;
    MODEL_SPEND_YTD.set(ytd_usd);
    MODEL_BUDGET_ALERT.set(i64::from(budget_alert(
        ytd_usd,
        settings.budget_usd_per_year,
    )));
    for (name, doc) in messages(
        now,
        &interval,
        hour_start,
        &hour,
        ytd_usd,
        settings.budget_usd_per_year,
    ) {
        let payload = doc.to_string();
        producer
            .send(
                FutureRecord::to(&settings.topic)
                    .key(&name)
                    .payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    Ok((day_start, day))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analytics::figures::Observation;

    #[test]
    fn the_interval_is_what_happened_between_two_readings() {
        let mut earlier = Figures::default();
        earlier.observe(&Observation::Opened);
        earlier.observe(&Observation::FirstResponse(900));
        let mut now = earlier.clone();
        now.observe(&Observation::Opened);
        now.observe(&Observation::FirstResponse(2_500));
        now.observe(&Observation::SlaBreach("first_response".into()));
        let diff = since(&now, &earlier);
        assert_eq!(diff.tickets_opened, 1);
        assert_eq!(diff.first_response_ms.count(), 1);
        assert_eq!(
            diff.first_response_ms.quantile(0.5),
            Some(crate::analytics::histogram::bin_value(
                crate::analytics::histogram::bin_of(2_500)
            ))
        );
        assert_eq!(diff.sla_breaches["first_response"], 1);
        let mut back = earlier.clone();
        back.merge(&diff);
        assert_eq!(back, now);
    }

    #[test]
    fn the_alert_fires_at_eighty_percent() {
        assert!(!budget_alert(799.99, 1000.0));
        assert!(budget_alert(800.0, 1000.0));
        let msgs = messages(
            Utc::now(),
            &Figures::default(),
            Utc::now(),
            &Figures::default(),
            850.0,
            1000.0,
        );
        let ytd = &msgs
            .iter()
            .find(|(k, _)| k == "model_cost_ytd_usd")
            .unwrap()
            .1;
        assert_eq!(ytd["alert"], true);
        assert!(msgs
            .iter()
            .any(|(k, v)| k == "tickets_opened" && v["last_interval"] == 0));
    }
}
