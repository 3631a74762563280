//! The metrics projection: how support is doing, per hour and per day, per
//! channel and overall, per AI configuration and overall.
//!
//! `MetricsProjector` (`metrics`) consumes ticket events like every other
//! projector (its own consumer group, offsets in the same transaction as
//! its rows, rebuilt by `casebook replay projections --only metrics`).
//! Each event counts in the buckets of the moment it records (the domain
//! time of the event): an answer's first-response time in the hour the
//! answer went out, a resolution's time in the hour of the resolution.
//! Buckets merge by addition (`Figures::merge`), percentiles included
//! (`histogram`), so a day is the sum of its hours and "all" the sum of
//! the channels.
//!
//! [`queries`] reads the buckets for GraphQL; [`snapshot`] publishes a
//! snapshot to `<prefix>.metrics` once a minute and keeps the model budget
//! gauges.

pub mod figures;
pub mod histogram;
pub mod queries;
pub mod snapshot;

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use casebook_domain::EventEnvelope;
use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

pub use figures::{BucketKey, Figures, Grain, TicketFacts, ALL};
pub use histogram::Histogram;

use crate::projector::{ticket_events, PageMemory, ProjectionError, Projector};

pub const NAME: &str = "metrics";
/// Serialises metrics batches of projector replicas: every batch adds to
/// the same "all" buckets.
const LOCK_KEY: i64 = 0x006d_6574_7269_6373; // "metrics"

pub struct MetricsProjector;

#[async_trait]
impl Projector for MetricsProjector {
    fn name(&self) -> &'static str {
        NAME
    }

    fn aggregate_types(&self) -> &'static [&'static str] {
        &["ticket"]
    }

    fn tables(&self) -> &'static [&'static str] {
        &["metrics_buckets", "metrics_tickets"]
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        events: &[EventEnvelope],
    ) -> Result<(), ProjectionError> {
        apply_metrics(tx, events, None).await
    }

    fn shadow_filler(&self) -> Option<Box<dyn Projector>> {
        Some(Box::new(ShadowMetrics {
            facts: PageMemory::new(),
        }))
    }
}

/// Tickets whose facts a [`ShadowMetrics`] keeps in memory; past them it
/// forgets them all and reads facts back from its shadow again.
const FACTS_IN_MEMORY: usize = 500_000;

/// Fills a rebuild's shadow as [`MetricsProjector`] does, keeping each
/// ticket's facts in memory between pages instead of reading them back
/// from `metrics_tickets` (the shadow has no other writer).
pub struct ShadowMetrics {
    facts: PageMemory<HashMap<Uuid, TicketFacts>>,
}

#[async_trait]
impl Projector for ShadowMetrics {
    fn name(&self) -> &'static str {
        NAME
    }

    fn aggregate_types(&self) -> &'static [&'static str] {
        MetricsProjector.aggregate_types()
    }

    fn tables(&self) -> &'static [&'static str] {
        MetricsProjector.tables()
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        events: &[EventEnvelope],
    ) -> Result<(), ProjectionError> {
        let mut facts = self.facts.take();
        apply_metrics(tx, events, Some(&mut facts)).await?;
        if facts.len() > FACTS_IN_MEMORY {
            facts.clear();
        }
        self.facts.put_back(facts);
        Ok(())
    }
}

/// Applies a batch: each ticket's facts (from `known`, when given and it
/// holds the ticket, else from `metrics_tickets`) observe its events, the
/// facts are written back and the buckets get what was counted. The facts
/// written are left in `known`.
async fn apply_metrics(
    tx: &mut PgConnection,
    events: &[EventEnvelope],
    mut known: Option<&mut HashMap<Uuid, TicketFacts>>,
) -> Result<(), ProjectionError> {
    let decoded: Vec<_> = ticket_events(NAME, events).collect();
    if decoded.is_empty() {
        return Ok(());
    }
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(LOCK_KEY)
        .execute(&mut *tx)
        .await?;

    let mut ids: Vec<Uuid> = decoded.iter().map(|(id, _, _)| *id).collect();
    ids.sort();
    ids.dedup();
    let mut facts: HashMap<Uuid, Option<TicketFacts>> = HashMap::with_capacity(ids.len());
    if let Some(known) = known.as_deref_mut() {
        ids.retain(|id| match known.remove(id) {
            Some(f) => {
                facts.insert(*id, Some(f));
                false
            }
            None => true,
        });
    }
    if !ids.is_empty() {
        let rows: Vec<(Uuid, sqlx::types::Json<TicketFacts>)> = sqlx::query_as(
            "SELECT ticket_id, facts FROM metrics_tickets WHERE ticket_id = ANY($1)",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        facts.extend(rows.into_iter().map(|(id, f)| (id, Some(f.0))));
    }

    let mut deltas: BTreeMap<BucketKey, Figures> = BTreeMap::new();
    let mut changed: Vec<Uuid> = Vec::new();
    for (id, event, envelope) in &decoded {
        let ticket = facts.entry(*id).or_insert(None);
        let counted = figures::observe(ticket, event, envelope.actor.kind);
        let channel = ticket.as_ref().and_then(|t| t.channel);
        if ticket.is_some() {
            changed.push(*id);
        }
        for c in counted {
            for key in figures::keys_for(event.at(), channel, c.config.as_deref(), c.config_only) {
                deltas.entry(key).or_default().observe(&c.observation);
            }
        }
    }

    changed.sort();
    changed.dedup();
    let mut ticket_ids = Vec::with_capacity(changed.len());
    let mut ticket_facts = Vec::with_capacity(changed.len());
    for id in changed {
        if let Some(Some(f)) = facts.remove(&id) {
            ticket_ids.push(id);
            ticket_facts.push(serde_json::to_value(&f).expect("facts serialise"));
            if let Some(known) = known.as_deref_mut() {
                known.insert(id, f);
            }
        }
    }
    sqlx::query(
        "INSERT INTO metrics_tickets (ticket_id, facts)
         SELECT * FROM unnest($1::uuid[], $2::jsonb[])
         ON CONFLICT (ticket_id) DO UPDATE SET facts = EXCLUDED.facts",
    )
    .bind(&ticket_ids)
    .bind(&ticket_facts)
    .execute(&mut *tx)
    .await?;

    add_to_buckets(tx, deltas).await
}

/// Adds `deltas` to the stored buckets (creating those that do not exist).
async fn add_to_buckets(
    tx: &mut PgConnection,
    deltas: BTreeMap<BucketKey, Figures>,
) -> Result<(), ProjectionError> {
    if deltas.is_empty() {
        return Ok(());
    }
    let mut grains = Vec::with_capacity(deltas.len());
    let mut channels = Vec::with_capacity(deltas.len());
    let mut configs = Vec::with_capacity(deltas.len());
    let mut starts: Vec<DateTime<Utc>> = Vec::with_capacity(deltas.len());
    for key in deltas.keys() {
        grains.push(key.grain.as_str());
        channels.push(key.channel.clone());
        configs.push(key.config.clone());
        starts.push(key.start);
    }
    type Stored = (
        String,
        String,
        String,
        DateTime<Utc>,
        sqlx::types::Json<Figures>,
    );
    let stored: Vec<Stored> =
        sqlx::query_as(
            "SELECT b.grain, b.channel, b.config, b.start, b.figures
               FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[]) AS k(grain, channel, config, start)
               JOIN metrics_buckets b USING (grain, channel, config, start)",
        )
        .bind(&grains)
        .bind(&channels)
        .bind(&configs)
        .bind(&starts)
        .fetch_all(&mut *tx)
        .await?;
    let mut merged = deltas;
    for (grain, channel, config, start, figures) in stored {
        let grain = if grain == "hour" {
            Grain::Hour
        } else {
            Grain::Day
        };
        if let Some(delta) = merged.get_mut(&BucketKey {
            grain,
            start,
            channel,
            config,
        }) {
            delta.merge(&figures.0);
        }
    }
    let documents: Vec<serde_json::Value> = merged
        .values()
        .map(|f| serde_json::to_value(f).expect("figures serialise"))
        .collect();
    sqlx::query(
        "INSERT INTO metrics_buckets (grain, channel, config, start, figures)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::jsonb[])
         ON CONFLICT (grain, channel, config, start)
         DO UPDATE SET figures = EXCLUDED.figures, updated_at = now()",
    )
    .bind(&grains)
    .bind(&channels)
    .bind(&configs)
    .bind(&starts)
    .bind(&documents)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use casebook_domain::sla::SlaKind;
    use casebook_domain::ticket::{AiConfiguration, EscalationReason, ModelUsage};
    use casebook_domain::{ActorKind, Category, Channel, Priority, TicketEvent};
    use chrono::TimeZone;

    use super::figures::{keys_for, observe, Observation};
    use super::*;

    fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 24, h, m, s).unwrap()
    }

    fn opened(channel: Channel, when: DateTime<Utc>) -> TicketEvent {
        TicketEvent::TicketOpened {
            ticket_id: Uuid::nil(),
            customer_id: Uuid::nil(),
            channel,
            subject: None,
            category: Category::General,
            priority: Priority::Medium,
            opened_at: when,
            first_response_due: when,
            resolution_due: when,
            previous_ticket_id: None,
        }
    }

    fn sent(when: DateTime<Utc>, holding: bool) -> TicketEvent {
        TicketEvent::ResponseSent {
            response_id: Uuid::now_v7(),
            draft_id: None,
            channel: Channel::Webform,
            body: "b".into(),
            parts: vec![],
            in_reply_to: None,
            automatic: true,
            holding,
            template: None,
            sent_at: when,
        }
    }

    /// Folds `events` of several tickets, as the projector does, into
    /// buckets.
    fn fold(tickets: &[Vec<(TicketEvent, ActorKind)>]) -> BTreeMap<BucketKey, Figures> {
        let mut buckets: BTreeMap<BucketKey, Figures> = BTreeMap::new();
        for events in tickets {
            let mut facts = None;
            for (event, actor) in events {
                for c in observe(&mut facts, event, *actor) {
                    let channel = facts.as_ref().and_then(|t: &TicketFacts| t.channel);
                    for key in keys_for(event.at(), channel, c.config.as_deref(), c.config_only) {
                        buckets.entry(key).or_default().observe(&c.observation);
                    }
                }
            }
        }
        buckets
    }

    fn key(grain: Grain, start: DateTime<Utc>, channel: &str, config: &str) -> BucketKey {
        BucketKey {
            grain,
            start,
            channel: channel.into(),
            config: config.into(),
        }
    }

    #[test]
    fn hours_and_channels_merge_into_the_day_and_all() {
        use ActorKind::*;
        let config = AiConfiguration {
            model: "gpt".into(),
            prompt_version: "p1".into(),
            kb_version: "kb1".into(),
            experiment: Some("b".into()),
        };
        let usage = |cost| TicketEvent::ModelUsageRecorded {
            in_reply_to: Uuid::nil(),
            usage: vec![ModelUsage {
                provider: "openai".into(),
                model: "gpt".into(),
                calls: 2,
                tokens_in: 1000,
                tokens_out: 100,
                cost_micro_usd: cost,
            }],
            configuration: config.clone(),
            recorded_at: at(9, 0, 1),
        };
        let tickets = vec![
            // Web form at 9:00, answered by the AI after 1.5 s, resolved at 11:00.
            vec![
                (opened(Channel::Webform, at(9, 0, 0)), Customer),
                (usage(1200), Ai),
                (
                    sent(at(9, 0, 1) + chrono::TimeDelta::milliseconds(500), false),
                    Ai,
                ),
                (
                    TicketEvent::TicketResolved {
                        resolved_by: "system".into(),
                        resolution: None,
                        resolved_at: at(11, 0, 0),
                    },
                    System,
                ),
                (
                    TicketEvent::FeedbackReceived {
                        helpful: true,
                        comment: None,
                        received_at: at(11, 5, 0),
                    },
                    Customer,
                ),
            ],
            // WhatsApp at 10:30: holding reply, escalated, a person answers after 40 s.
            vec![
                (opened(Channel::Whatsapp, at(10, 30, 0)), Customer),
                (
                    TicketEvent::TicketEscalated {
                        escalation_id: Uuid::nil(),
                        in_reply_to: None,
                        reason: EscalationReason::RefundRequest,
                        note: None,
                        escalated_at: at(10, 30, 2),
                    },
                    Ai,
                ),
                (sent(at(10, 30, 2), true), Ai),
                (sent(at(10, 30, 40), false), Agent),
                (
                    TicketEvent::SlaBreached {
                        kind: SlaKind::Resolution,
                        due_at: at(10, 0, 0),
                        breached_at: at(11, 10, 0),
                    },
                    System,
                ),
            ],
        ];
        let buckets = fold(&tickets);
        let day = &buckets[&key(Grain::Day, at(0, 0, 0), ALL, ALL)];
        assert_eq!(day.tickets_opened, 2);
        assert_eq!(day.responses_ai, 1);
        assert_eq!(day.responses_human, 1);
        assert_eq!(day.holding_replies, 1);
        assert_eq!(day.tickets_escalated, 1);
        assert_eq!(day.escalations_by_reason["refund_request"], 1);
        assert_eq!(day.auto_resolved, 1);
        assert_eq!(day.helpful_rate(), Some(1.0));
        assert_eq!(day.escalation_rate(), Some(0.5));
        assert_eq!(day.sla_breaches["resolution"], 1);
        assert_eq!(day.model_calls, 2);
        assert_eq!(day.model_cost_micro_usd, 1200);
        assert_eq!(day.first_response_ms.count(), 2);
        assert_eq!(
            day.first_response_ms.quantile(0.5),
            Some(histogram::bin_value(histogram::bin_of(1_500)))
        );
        assert_eq!(
            day.first_response_ms.quantile(0.95),
            Some(histogram::bin_value(histogram::bin_of(40_000)))
        );
        assert_eq!(
            day.resolution_ms.quantile(0.5),
            Some(histogram::bin_value(histogram::bin_of(7_200_000)))
        );

        // The day is exactly the sum of its hours, and "all" the sum of the
        // channels, at both grains.
        let mut hours = Figures::default();
        let mut channels = Figures::default();
        for (k, f) in &buckets {
            if k.config != ALL {
                continue;
            }
            if k.grain == Grain::Hour && k.channel == ALL {
                hours.merge(f);
            }
            if k.grain == Grain::Day && k.channel != ALL {
                channels.merge(f);
            }
        }
        assert_eq!(&hours, day);
        assert_eq!(&channels, day);
        // The first-response times of two different hours.
        let nine = &buckets[&key(Grain::Hour, at(9, 0, 0), ALL, ALL)];
        let ten = &buckets[&key(Grain::Hour, at(10, 0, 0), ALL, ALL)];
        assert_eq!(nine.first_response_ms.count(), 1);
        assert_eq!(ten.first_response_ms.count(), 1);

        // Under the configuration: the ticket it answered, its cost.
        let tagged = &buckets[&key(Grain::Day, at(0, 0, 0), ALL, &config.tag())];
        assert_eq!(tagged.tickets_opened, 1);
        assert_eq!(tagged.model_cost_micro_usd, 1200);
        assert_eq!(tagged.feedback, 1);
        assert_eq!(tagged.tickets_escalated, 0);
    }

    #[test]
    fn events_before_the_opening_count_nowhere_and_a_second_opening_is_ignored() {
        let mut facts = None;
        assert!(observe(&mut facts, &sent(at(9, 0, 0), false), ActorKind::Ai).is_empty());
        let first = observe(
            &mut facts,
            &opened(Channel::Email, at(9, 0, 0)),
            ActorKind::Customer,
        );
        assert_eq!(first[0].observation, Observation::Opened);
        assert!(observe(
            &mut facts,
            &opened(Channel::Email, at(9, 0, 0)),
            ActorKind::Customer
        )
        .is_empty());
    }
}
