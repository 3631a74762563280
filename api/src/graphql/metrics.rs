//! How support is doing: `metrics`, `metricsByConfiguration`, `dashboard`,
//! `kpis` and `ticketModelUsage`, read from the metrics projection
//! (`casebook_projections::analytics`) and, for what is open now, the CRM
//! read models. Analysts, supervisors and auditors read them; agents and
//! customers are refused.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_graphql::{Context, Enum, Object, SimpleObject, ID};
use casebook_projections::analytics::queries::{self, DashboardFigures, MAX_BUCKETS};
use casebook_projections::analytics::snapshot::budget_alert;
use casebook_projections::analytics::{Figures, Grain, ALL};
use chrono::{DateTime, TimeDelta, Utc};

use super::context::{bad_input, db, forbidden, internal, uuid_arg, viewer, Db};
use super::types::Channel;
use crate::auth::Role;
use crate::state::AppState;

/// Open tickets whose SLA falls due within this are "at risk".
pub const SLA_RISK_WINDOW_MINUTES: i64 = 15;
/// The most configurations `metricsByConfiguration` compares.
const MAX_CONFIGURATIONS: i64 = 50;
/// The longest range `kpis` and `metricsByConfiguration` merge.
const MAX_RANGE_DAYS: i64 = 3660;

/// The seed's targets.
pub const HELPFUL_RATE_TARGET: f64 = 0.85;
pub const ESCALATION_RATE_TARGET: f64 = 0.20;
pub const ERROR_RATE_TARGET: f64 = 0.01;
pub const FIRST_RESPONSE_P95_TARGET_MS: f64 = 3000.0;

fn require_reader<'a>(
    ctx: &'a Context<'_>,
    what: &str,
) -> async_graphql::Result<&'a super::context::Viewer> {
    let v = viewer(ctx)?;
    if matches!(v.role, Role::Analyst | Role::Supervisor | Role::Auditor) {
        Ok(v)
    } else {
        Err(forbidden(what))
    }
}

/// The size of a metrics bucket.
#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum BucketSize {
    Hour,
    Day,
}

impl From<BucketSize> for Grain {
    fn from(b: BucketSize) -> Grain {
        match b {
            BucketSize::Hour => Grain::Hour,
            BucketSize::Day => Grain::Day,
        }
    }
}

#[derive(SimpleObject, Clone, Debug)]
pub struct Count {
    pub key: String,
    pub count: u64,
}

fn counts(map: &std::collections::BTreeMap<String, u64>) -> Vec<Count> {
    map.iter()
        .map(|(k, v)| Count {
            key: k.clone(),
            count: *v,
        })
        .collect()
}

/// The figures of one bucket (or of a merged range).
#[derive(Clone, Debug)]
pub struct MetricsBucket {
    start: DateTime<Utc>,
    f: Figures,
}

#[Object]
impl MetricsBucket {
    /// The start of the hour or day (UTC), or of the range.
    async fn start(&self) -> DateTime<Utc> {
        self.start
    }
    async fn tickets_opened(&self) -> u64 {
        self.f.tickets_opened
    }
    async fn messages_in(&self) -> u64 {
        self.f.messages_in
    }
    /// Answers sent, AI and human (holding replies apart).
    async fn responses_sent(&self) -> u64 {
        self.f.responses_ai + self.f.responses_human
    }
    async fn responses_ai(&self) -> u64 {
        self.f.responses_ai
    }
    async fn responses_human(&self) -> u64 {
        self.f.responses_human
    }
    /// "A person will reply" holding replies.
    async fn holding_replies(&self) -> u64 {
        self.f.holding_replies
    }
    async fn escalations(&self) -> u64 {
        self.f.escalations
    }
    async fn escalations_by_reason(&self) -> Vec<Count> {
        counts(&self.f.escalations_by_reason)
    }
    /// Tickets escalated for the first time.
    async fn tickets_escalated(&self) -> u64 {
        self.f.tickets_escalated
    }
    /// Tickets escalated per ticket opened; null with none opened.
    async fn escalation_rate(&self) -> Option<f64> {
        self.f.escalation_rate()
    }
    async fn first_responses(&self) -> u64 {
        self.f.first_response_ms.count()
    }
    async fn first_response_p50_ms(&self) -> Option<u64> {
        self.f.first_response_ms.quantile(0.5)
    }
    async fn first_response_p95_ms(&self) -> Option<u64> {
        self.f.first_response_ms.quantile(0.95)
    }
    async fn resolutions(&self) -> u64 {
        self.f.resolution_ms.count()
    }
    async fn resolution_p50_ms(&self) -> Option<u64> {
        self.f.resolution_ms.quantile(0.5)
    }
    async fn resolution_p95_ms(&self) -> Option<u64> {
        self.f.resolution_ms.quantile(0.95)
    }
    async fn sla_breaches(&self) -> u64 {
        self.f.sla_breaches.values().sum()
    }
    /// By kind: `first_response`, `resolution`.
    async fn sla_breaches_by_kind(&self) -> Vec<Count> {
        counts(&self.f.sla_breaches)
    }
    /// Tickets resolved or closed with no person involved.
    async fn auto_resolved(&self) -> u64 {
        self.f.auto_resolved
    }
    async fn feedback(&self) -> u64 {
        self.f.feedback
    }
    /// Helpful answers per feedback given; null without feedback.
    async fn helpful_rate(&self) -> Option<f64> {
        self.f.helpful_rate()
    }
    async fn approvals_requested(&self) -> u64 {
        self.f.approvals_requested
    }
    async fn approvals_approved(&self) -> u64 {
        self.f.approvals_approved
    }
    /// Approved with an edit (counted in `approvalsApproved` too).
    async fn approvals_edited(&self) -> u64 {
        self.f.approvals_edited
    }
    async fn approvals_rejected(&self) -> u64 {
        self.f.approvals_rejected
    }
    async fn delivery_failures(&self) -> u64 {
        self.f.delivery_failures
    }
    /// Failed deliveries per reply sent; null with none sent.
    async fn error_rate(&self) -> Option<f64> {
        self.f.error_rate()
    }
    async fn model_calls(&self) -> u64 {
        self.f.model_calls
    }
    async fn model_tokens_in(&self) -> u64 {
        self.f.model_tokens_in
    }
    async fn model_tokens_out(&self) -> u64 {
        self.f.model_tokens_out
    }
    async fn model_cost_usd(&self) -> f64 {
        self.f.model_cost_usd()
    }
}

/// One configuration's figures over a range.
#[derive(SimpleObject, Clone, Debug)]
pub struct ConfigurationMetrics {
    /// `model/prompt version/kb version[/CASEBOOK_EXPERIMENT]`.
    pub configuration: String,
    pub totals: MetricsBucket,
}

/// A seed target and how the range did against it.
#[derive(SimpleObject, Clone, Debug)]
pub struct Kpi {
    /// `helpful_rate`, `escalation_rate`, `error_rate`,
    /// `first_response_p95_ms`, `model_spend_ytd_usd`.
    pub name: String,
    /// The figure; null when there was nothing to measure.
    pub value: Option<f64>,
    pub target: f64,
    /// `above` or `below`: where the value must be.
    pub must_be: String,
    /// Met or missed; null when there was nothing to measure.
    pub met: Option<bool>,
}

fn kpi(name: &str, value: Option<f64>, target: f64, above: bool) -> Kpi {
    Kpi {
        name: name.into(),
        value,
        target,
        must_be: if above { "above" } else { "below" }.into(),
        met: value.map(|v| if above { v > target } else { v < target }),
    }
}

/// The seed's KPIs for `f`, and the year's model spend against the budget.
fn kpis_of(f: &Figures, spend_ytd_usd: f64, budget_usd: f64) -> Vec<Kpi> {
    vec![
        kpi("helpful_rate", f.helpful_rate(), HELPFUL_RATE_TARGET, true),
        kpi(
            "escalation_rate",
            f.escalation_rate(),
            ESCALATION_RATE_TARGET,
            false,
        ),
        kpi("error_rate", f.error_rate(), ERROR_RATE_TARGET, false),
        kpi(
            "first_response_p95_ms",
            f.first_response_ms.quantile(0.95).map(|v| v as f64),
            FIRST_RESPONSE_P95_TARGET_MS,
            false,
        ),
        Kpi {
            name: "model_spend_ytd_usd".into(),
            value: Some(spend_ytd_usd),
            target: budget_usd,
            must_be: "below".into(),
            met: Some(spend_ytd_usd < budget_usd),
        },
    ]
}

/// Open tickets in one person's queue.
#[derive(SimpleObject, Clone, Debug)]
pub struct QueueSize {
    /// The assignee; null for the unassigned human queue.
    pub agent_id: Option<ID>,
    pub open_tickets: i64,
}

#[derive(SimpleObject, Clone, Debug)]
pub struct Dashboard {
    pub open_tickets: i64,
    pub pending_approvals: i64,
    pub open_escalations: i64,
    /// Open tickets whose SLA falls due within 15 minutes.
    pub sla_at_risk: i64,
    pub queues: Vec<QueueSize>,
    /// The current clock hour so far.
    pub last_hour: MetricsBucket,
    /// Today (UTC) so far.
    pub today: MetricsBucket,
    /// Today's figures against the seed's targets.
    pub kpis: Vec<Kpi>,
    pub model_spend_ytd_usd: f64,
    pub model_budget_usd_per_year: f64,
    /// Spend reached 80 % of the yearly budget.
    pub model_budget_alert: bool,
}

/// A ticket's model usage so far.
#[derive(SimpleObject, Clone, Debug)]
pub struct TicketModelUsage {
    pub cost_usd: f64,
    pub tokens_in: u64,
    pub tokens_out: u64,
}

fn range(from: DateTime<Utc>, to: DateTime<Utc>) -> async_graphql::Result<()> {
    if to <= from {
        return Err(bad_input("`to` must be after `from`"));
    }
    if to - from > TimeDelta::days(MAX_RANGE_DAYS) {
        return Err(bad_input(format!(
            "a range is at most {MAX_RANGE_DAYS} days"
        )));
    }
    Ok(())
}

fn budget(ctx: &Context<'_>) -> async_graphql::Result<f64> {
    Ok(ctx
        .data::<AppState>()
        .map_err(|_| internal("no app state"))?
        .settings
        .model_budget_usd_per_year)
}

/// How old a reading of the dashboard may be before a reader asks for a new
/// one, and how old one may be served at all. The dashboard must reflect an
/// event within 2 s of its commit: the projector applies it within a
/// fraction of that, a reading takes it in from the moment it starts, and a
/// reading is never served more than a second after it started.
pub const DASHBOARD_REFRESH: Duration = Duration::from_millis(500);
pub const DASHBOARD_MAX_AGE: Duration = Duration::from_millis(1000);

/// The dashboard as last read, shared by the process's readers. Every role
/// that may read it (analyst, supervisor, auditor) sees the same figures (no
/// row of it is per customer, and it names no customer), so one reading
/// serves all of them: a wall of screens polling it costs one reading per
/// half second, not one per screen. Past [`DASHBOARD_REFRESH`] one reader
/// starts a new reading in the background and everyone is served the
/// current one meanwhile; past [`DASHBOARD_MAX_AGE`] readers wait for the
/// new one (a single reading, however many wait).
#[derive(Default)]
pub struct DashboardCache {
    current: Arc<std::sync::Mutex<Option<Reading>>>,
    reading: Arc<tokio::sync::Mutex<()>>,
}

/// A reading of the dashboard and when it started.
type Reading = (Instant, Arc<DashboardFigures>);

impl DashboardCache {
    fn current(&self) -> Option<Reading> {
        self.current.lock().expect("never poisoned").clone()
    }

    async fn get(&self, db: &Db) -> Result<Arc<DashboardFigures>, sqlx::Error> {
        if let Some((started, d)) = self.current() {
            let age = started.elapsed();
            if age < DASHBOARD_REFRESH {
                return Ok(d);
            }
            if age < DASHBOARD_MAX_AGE {
                if let Ok(reading) = self.reading.clone().try_lock_owned() {
                    // A reading of its own, not the request's transaction,
                    // which ends with the request.
                    let db = Db::per_read(db.pool().clone(), db.viewer().clone());
                    let current = self.current.clone();
                    tokio::spawn(async move {
                        let started = Instant::now();
                        match read_dashboard(&db).await {
                            Ok(d) => *current.lock().expect("never poisoned") = Some((started, d)),
                            Err(e) => tracing::warn!(error = %e, "dashboard: reading failed"),
                        }
                        drop(reading);
                    });
                }
                return Ok(d);
            }
        }
        let _reading = self.reading.lock().await;
        if let Some((started, d)) = self.current() {
            if started.elapsed() < DASHBOARD_REFRESH {
                return Ok(d);
            }
        }
        let started = Instant::now();
        let d = read_dashboard(db).await?;
        *self.current.lock().expect("never poisoned") = Some((started, d.clone()));
        Ok(d)
    }
}

async fn read_dashboard(db: &Db) -> Result<Arc<DashboardFigures>, sqlx::Error> {
    let mut tx = db.begin().await?;
    let d = queries::dashboard(
        &mut tx,
        Utc::now(),
        TimeDelta::minutes(SLA_RISK_WINDOW_MINUTES),
    )
    .await?;
    tx.commit().await?;
    Ok(Arc::new(d))
}

#[derive(Default)]
pub struct MetricsQuery;

#[Object]
impl MetricsQuery {
    /// Buckets of `bucket` size from `from`'s bucket up to `to`, one per
    /// hour or day (empty ones with zeros), for one channel or all, and
    /// for one AI configuration or all.
    async fn metrics(
        &self,
        ctx: &Context<'_>,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        bucket: BucketSize,
        channel: Option<Channel>,
        configuration: Option<String>,
    ) -> async_graphql::Result<Vec<MetricsBucket>> {
        require_reader(ctx, "read metrics")?;
        range(from, to)?;
        let grain = Grain::from(bucket);
        if queries::bucket_count(grain, from, to) > MAX_BUCKETS {
            return Err(bad_input(format!(
                "at most {MAX_BUCKETS} buckets per query"
            )));
        }
        let configuration = configuration.unwrap_or_else(|| ALL.into());
        if configuration.chars().count() > 400 {
            return Err(bad_input("configuration is at most 400 characters"));
        }
        let mut tx = db(ctx)?.begin().await.map_err(internal)?;
        let rows = queries::series(
            &mut tx,
            grain,
            from,
            to,
            channel.map(Channel::as_db).unwrap_or(ALL),
            &configuration,
        )
        .await
        .map_err(internal)?;
        tx.commit().await.map_err(internal)?;
        Ok(rows
            .into_iter()
            .map(|(start, f)| MetricsBucket { start, f })
            .collect())
    }

    /// Each AI configuration's figures over the range, to compare them on
    /// helpful rate, escalation rate and cost. Under a configuration, a
    /// ticket counts as opened when that configuration first answers it.
    async fn metrics_by_configuration(
        &self,
        ctx: &Context<'_>,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        channel: Option<Channel>,
    ) -> async_graphql::Result<Vec<ConfigurationMetrics>> {
        require_reader(ctx, "read metrics")?;
        range(from, to)?;
        let channel = channel.map(Channel::as_db).unwrap_or(ALL);
        let mut tx = db(ctx)?.begin().await.map_err(internal)?;
        let configs = queries::configurations(&mut tx, from, to, MAX_CONFIGURATIONS)
            .await
            .map_err(internal)?;
        let mut out = Vec::with_capacity(configs.len());
        for configuration in configs {
            let f = queries::total(&mut tx, from, to, channel, &configuration)
                .await
                .map_err(internal)?;
            out.push(ConfigurationMetrics {
                configuration,
                totals: MetricsBucket { start: from, f },
            });
        }
        tx.commit().await.map_err(internal)?;
        Ok(out)
    }

    /// What is open now, the current hour and day, and the KPIs.
    async fn dashboard(&self, ctx: &Context<'_>) -> async_graphql::Result<Dashboard> {
        require_reader(ctx, "read the dashboard")?;
        let budget = budget(ctx)?;
        let d = match ctx.data::<DashboardCache>() {
            Ok(cache) => cache.get(db(ctx)?).await,
            Err(_) => read_dashboard(db(ctx)?).await,
        }
        .map_err(internal)?;
        let d = DashboardFigures::clone(&d);
        let (work, spent) = (d.work, d.model_cost_ytd_micro_usd as f64 / 1_000_000.0);
        let (hour_start, hour, day_start, day) = (d.hour_start, d.hour, d.day_start, d.day);
        Ok(Dashboard {
            open_tickets: work.open_tickets,
            pending_approvals: work.pending_approvals,
            open_escalations: work.open_escalations,
            sla_at_risk: work.sla_at_risk,
            queues: work
                .queues
                .into_iter()
                .map(|(agent, n)| QueueSize {
                    agent_id: agent.map(ID),
                    open_tickets: n,
                })
                .collect(),
            kpis: kpis_of(&day, spent, budget),
            last_hour: MetricsBucket {
                start: hour_start,
                f: hour,
            },
            today: MetricsBucket {
                start: day_start,
                f: day,
            },
            model_spend_ytd_usd: spent,
            model_budget_usd_per_year: budget,
            model_budget_alert: budget_alert(spent, budget),
        })
    }

    /// The seed's KPIs over `[from, to)`, met or missed, with the figure;
    /// model spend is the year's to date against the yearly budget.
    async fn kpis(
        &self,
        ctx: &Context<'_>,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> async_graphql::Result<Vec<Kpi>> {
        require_reader(ctx, "read KPIs")?;
        range(from, to)?;
        let budget = budget(ctx)?;
        let mut tx = db(ctx)?.begin().await.map_err(internal)?;
        let f = queries::total(&mut tx, from, to, ALL, ALL)
            .await
            .map_err(internal)?;
        let spent = queries::model_cost_since(&mut tx, queries::year_start(Utc::now()))
            .await
            .map_err(internal)? as f64
            / 1_000_000.0;
        tx.commit().await.map_err(internal)?;
        Ok(kpis_of(&f, spent, budget))
    }

    /// What the models cost on one ticket so far; null for an unknown one.
    async fn ticket_model_usage(
        &self,
        ctx: &Context<'_>,
        ticket_id: ID,
    ) -> async_graphql::Result<Option<TicketModelUsage>> {
        require_reader(ctx, "read model usage")?;
        let id = uuid_arg(&ticket_id, "ticketId")?;
        let mut tx = db(ctx)?.begin().await.map_err(internal)?;
        let usage = queries::ticket_model_usage(&mut tx, id)
            .await
            .map_err(internal)?;
        tx.commit().await.map_err(internal)?;
        Ok(
            usage.map(|(micro, tokens_in, tokens_out)| TicketModelUsage {
                cost_usd: micro as f64 / 1_000_000.0,
                tokens_in,
                tokens_out,
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use casebook_projections::analytics::figures::Observation;

    #[test]
    fn kpis_are_met_or_missed_against_the_seed_targets() {
        let mut f = Figures::default();
        let none = kpis_of(&f, 0.0, 1000.0);
        assert_eq!(none[0].met, None);
        for _ in 0..10 {
            f.observe(&Observation::Opened);
            f.observe(&Observation::Feedback { helpful: true });
            f.observe(&Observation::ResponseAi);
            f.observe(&Observation::FirstResponse(1200));
        }
        f.observe(&Observation::Escalated {
            reason: "legal".into(),
            first: true,
        });
        f.observe(&Observation::Escalated {
            reason: "legal".into(),
            first: true,
        });
        f.observe(&Observation::Feedback { helpful: false });
        let k = kpis_of(&f, 900.0, 1000.0);
        let by = |n: &str| k.iter().find(|k| k.name == n).unwrap().clone();
        // 10 of 11 helpful: 0.909 > 0.85.
        assert_eq!(by("helpful_rate").met, Some(true));
        // 2 of 10 escalated: 0.2 is not below 0.2.
        assert_eq!(by("escalation_rate").value, Some(0.2));
        assert_eq!(by("escalation_rate").met, Some(false));
        assert_eq!(by("error_rate").met, Some(true));
        assert_eq!(by("first_response_p95_ms").met, Some(true));
        assert_eq!(by("model_spend_ytd_usd").met, Some(true));
        assert_eq!(kpis_of(&f, 1000.0, 1000.0)[4].met, Some(false));
    }
}
