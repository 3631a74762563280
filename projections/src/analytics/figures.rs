//! What one metrics bucket holds, how buckets merge, and how ticket events
//! turn into observations. Pure: no I/O, so the whole fold is unit-tested.

use std::collections::BTreeMap;

use casebook_domain::ticket::DeliveryStatus;
use casebook_domain::{ActorKind, Channel, TicketEvent};
use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use super::histogram::Histogram;

/// The figures of one bucket (an hour or a day; a channel or all; a
/// configuration or all). Every field adds up when buckets merge.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Figures {
    pub tickets_opened: u64,
    pub messages_in: u64,
    /// Answers the AI sent (holding replies apart).
    pub responses_ai: u64,
    /// Replies a person sent or approved.
    pub responses_human: u64,
    /// "A person will reply" holding replies.
    pub holding_replies: u64,
    pub escalations: u64,
    pub escalations_by_reason: BTreeMap<String, u64>,
    /// Tickets escalated for the first time.
    pub tickets_escalated: u64,
    pub first_response_ms: Histogram,
    pub resolution_ms: Histogram,
    pub sla_breaches: BTreeMap<String, u64>,
    /// Tickets resolved or closed with no person involved.
    pub auto_resolved: u64,
    pub feedback: u64,
    pub helpful: u64,
    pub approvals_requested: u64,
    pub approvals_approved: u64,
    /// Approved with an edit (also counted in `approvals_approved`).
    pub approvals_edited: u64,
    pub approvals_rejected: u64,
    pub delivery_failures: u64,
    pub model_calls: u64,
    pub model_tokens_in: u64,
    pub model_tokens_out: u64,
    pub model_cost_micro_usd: u64,
}

fn add_map(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_insert(0) += v;
    }
}

impl Figures {
    /// Adds `other` to these figures.
    pub fn merge(&mut self, other: &Figures) {
        self.tickets_opened += other.tickets_opened;
        self.messages_in += other.messages_in;
        self.responses_ai += other.responses_ai;
        self.responses_human += other.responses_human;
        self.holding_replies += other.holding_replies;
        self.escalations += other.escalations;
        add_map(
            &mut self.escalations_by_reason,
            &other.escalations_by_reason,
        );
        self.tickets_escalated += other.tickets_escalated;
        self.first_response_ms.merge(&other.first_response_ms);
        self.resolution_ms.merge(&other.resolution_ms);
        add_map(&mut self.sla_breaches, &other.sla_breaches);
        self.auto_resolved += other.auto_resolved;
        self.feedback += other.feedback;
        self.helpful += other.helpful;
        self.approvals_requested += other.approvals_requested;
        self.approvals_approved += other.approvals_approved;
        self.approvals_edited += other.approvals_edited;
        self.approvals_rejected += other.approvals_rejected;
        self.delivery_failures += other.delivery_failures;
        self.model_calls += other.model_calls;
        self.model_tokens_in += other.model_tokens_in;
        self.model_tokens_out += other.model_tokens_out;
        self.model_cost_micro_usd += other.model_cost_micro_usd;
    }

    /// Records one observation.
    pub fn observe(&mut self, o: &Observation) {
        match o {
            Observation::Opened => self.tickets_opened += 1,
            Observation::MessageIn => self.messages_in += 1,
            Observation::ResponseAi => self.responses_ai += 1,
            Observation::ResponseHuman => self.responses_human += 1,
            Observation::Holding => self.holding_replies += 1,
            Observation::Escalated { reason, first } => {
                self.escalations += 1;
                *self
                    .escalations_by_reason
                    .entry(reason.clone())
                    .or_insert(0) += 1;
                if *first {
                    self.tickets_escalated += 1;
                }
            }
            Observation::FirstResponse(ms) => self.first_response_ms.record(*ms),
            Observation::Resolved(ms) => self.resolution_ms.record(*ms),
            Observation::AutoResolved => self.auto_resolved += 1,
            Observation::SlaBreach(kind) => {
                *self.sla_breaches.entry(kind.clone()).or_insert(0) += 1
            }
            Observation::Feedback { helpful } => {
                self.feedback += 1;
                if *helpful {
                    self.helpful += 1;
                }
            }
            Observation::ApprovalRequested => self.approvals_requested += 1,
            Observation::Approved { edited } => {
                self.approvals_approved += 1;
                if *edited {
                    self.approvals_edited += 1;
                }
            }
            Observation::Rejected => self.approvals_rejected += 1,
            Observation::DeliveryFailed => self.delivery_failures += 1,
            Observation::Model {
                calls,
                tokens_in,
                tokens_out,
                cost_micro_usd,
            } => {
                self.model_calls += calls;
                self.model_tokens_in += tokens_in;
                self.model_tokens_out += tokens_out;
                self.model_cost_micro_usd += cost_micro_usd;
            }
        }
    }

    /// Replies of every kind sent (AI, human, holding).
    pub fn replies(&self) -> u64 {
        self.responses_ai + self.responses_human + self.holding_replies
    }

    /// Tickets escalated per ticket opened; `None` with no ticket opened.
    pub fn escalation_rate(&self) -> Option<f64> {
        ratio(self.tickets_escalated, self.tickets_opened)
    }

    /// Helpful answers per feedback given.
    pub fn helpful_rate(&self) -> Option<f64> {
        ratio(self.helpful, self.feedback)
    }

    /// Failed deliveries per reply sent.
    pub fn error_rate(&self) -> Option<f64> {
        ratio(self.delivery_failures, self.replies())
    }

    pub fn model_cost_usd(&self) -> f64 {
        self.model_cost_micro_usd as f64 / 1_000_000.0
    }
}

fn ratio(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

/// One fact an event contributes to the buckets of its moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    Opened,
    MessageIn,
    ResponseAi,
    ResponseHuman,
    Holding,
    Escalated {
        reason: String,
        first: bool,
    },
    FirstResponse(u64),
    Resolved(u64),
    AutoResolved,
    SlaBreach(String),
    Feedback {
        helpful: bool,
    },
    ApprovalRequested,
    Approved {
        edited: bool,
    },
    Rejected,
    DeliveryFailed,
    Model {
        calls: u64,
        tokens_in: u64,
        tokens_out: u64,
        cost_micro_usd: u64,
    },
}

/// What the metrics projection remembers of a ticket between events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketFacts {
    pub channel: Option<Channel>,
    pub opened_at: DateTime<Utc>,
    pub first_response_at: Option<DateTime<Utc>>,
    /// Whether the ticket was ever escalated.
    pub escalated: bool,
    /// Whether a person ever acted on it (assigned, replied, approved,
    /// rejected, resolved, escalated by hand).
    pub human: bool,
    /// Whether its resolution without a person was counted already.
    pub auto_counted: bool,
    /// The configuration tag of the AI's latest response, if any.
    pub config: Option<String>,
    pub model_cost_micro_usd: u64,
    pub model_tokens_in: u64,
    pub model_tokens_out: u64,
}

/// The granularity of a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Grain {
    Hour,
    Day,
}

impl Grain {
    pub fn as_str(self) -> &'static str {
        match self {
            Grain::Hour => "hour",
            Grain::Day => "day",
        }
    }

    pub fn delta(self) -> TimeDelta {
        match self {
            Grain::Hour => TimeDelta::hours(1),
            Grain::Day => TimeDelta::days(1),
        }
    }

    /// The start of the bucket holding `at` (UTC hours and days).
    pub fn start(self, at: DateTime<Utc>) -> DateTime<Utc> {
        at.duration_trunc(self.delta())
            .expect("hours and days divide UTC time")
    }
}

/// The key for "every channel" and "every configuration".
pub const ALL: &str = "all";

/// A bucket's identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BucketKey {
    pub grain: Grain,
    pub start: DateTime<Utc>,
    pub channel: String,
    pub config: String,
}

/// An observation with the configuration it counts under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counted {
    pub observation: Observation,
    /// The ticket's configuration when the observation was made.
    pub config: Option<String>,
    /// Counted under its configuration only, not under "all".
    pub config_only: bool,
}

/// The buckets an observation at `at` on a ticket counts in: the hour and
/// the day; all channels and the ticket's; all configurations (unless
/// `config_only`) and, when the ticket has one, its configuration.
pub fn keys_for(
    at: DateTime<Utc>,
    channel: Option<Channel>,
    config: Option<&str>,
    config_only: bool,
) -> Vec<BucketKey> {
    let mut channels = vec![ALL.to_string()];
    channels.extend(channel.map(|c| c.as_str().to_string()));
    let mut configs = Vec::with_capacity(2);
    if !config_only {
        configs.push(ALL.to_string());
    }
    configs.extend(config.map(str::to_string));
    let mut keys = Vec::with_capacity(8);
    for grain in [Grain::Hour, Grain::Day] {
        let start = grain.start(at);
        for channel in &channels {
            for config in &configs {
                keys.push(BucketKey {
                    grain,
                    start,
                    channel: channel.clone(),
                    config: config.clone(),
                });
            }
        }
    }
    keys
}

fn millis_between(from: DateTime<Utc>, to: DateTime<Utc>) -> u64 {
    (to - from).num_milliseconds().max(0) as u64
}

/// Folds one event of a ticket: updates what is known of it (`facts`,
/// `None` until the ticket is opened) and returns the observations, with
/// the configuration they count under. `actor` is who the event says acted.
pub fn observe(
    facts: &mut Option<TicketFacts>,
    event: &TicketEvent,
    actor: ActorKind,
) -> Vec<Counted> {
    let person = actor == ActorKind::Agent;
    if let TicketEvent::TicketOpened {
        channel, opened_at, ..
    } = event
    {
        if facts.is_some() {
            return Vec::new();
        }
        *facts = Some(TicketFacts {
            channel: Some(*channel),
            opened_at: *opened_at,
            first_response_at: None,
            escalated: false,
            human: false,
            auto_counted: false,
            config: None,
            model_cost_micro_usd: 0,
            model_tokens_in: 0,
            model_tokens_out: 0,
        });
        return vec![Counted {
            observation: Observation::Opened,
            config: None,
            config_only: false,
        }];
    }
    let Some(t) = facts.as_mut() else {
        // An event of a ticket whose opening this projection never saw
        // (the stream is whole in the store, so this is a ticket from a
        // foreign aggregate id): nothing to attribute it to.
        return Vec::new();
    };
    if person {
        t.human = true;
    }
    let mut out = Vec::new();
    match event {
        TicketEvent::TicketOpened { .. } => {}
        TicketEvent::CustomerMessageReceived { .. } => out.push(Observation::MessageIn),
        TicketEvent::ResponseSent {
            holding, sent_at, ..
        } => {
            if *holding {
                out.push(Observation::Holding);
            } else {
                out.push(if person {
                    Observation::ResponseHuman
                } else {
                    Observation::ResponseAi
                });
                if t.first_response_at.is_none() {
                    t.first_response_at = Some(*sent_at);
                    out.push(Observation::FirstResponse(millis_between(
                        t.opened_at,
                        *sent_at,
                    )));
                }
            }
        }
        TicketEvent::TicketEscalated { reason, .. } => {
            let first = !t.escalated;
            t.escalated = true;
            out.push(Observation::Escalated {
                reason: reason.as_str().to_string(),
                first,
            });
        }
        TicketEvent::TicketAssigned { .. } => t.human = true,
        TicketEvent::TicketResolved { resolved_at, .. } => {
            out.push(Observation::Resolved(millis_between(
                t.opened_at,
                *resolved_at,
            )));
            out.extend(auto_resolution(t));
        }
        TicketEvent::TicketClosed { .. } => out.extend(auto_resolution(t)),
        TicketEvent::SlaBreached { kind, .. } => {
            out.push(Observation::SlaBreach(kind.as_str().to_string()))
        }
        TicketEvent::FeedbackReceived { helpful, .. } => {
            out.push(Observation::Feedback { helpful: *helpful })
        }
        TicketEvent::ApprovalRequested { .. } => out.push(Observation::ApprovalRequested),
        TicketEvent::ResponseApproved { edited_body, .. } => {
            t.human = true;
            out.push(Observation::Approved {
                edited: edited_body.is_some(),
            })
        }
        TicketEvent::ResponseRejected { .. } => {
            t.human = true;
            out.push(Observation::Rejected)
        }
        TicketEvent::DeliveryStatusChanged { status, .. } if *status == DeliveryStatus::Failed => {
            out.push(Observation::DeliveryFailed)
        }
        TicketEvent::ModelUsageRecorded {
            usage,
            configuration,
            ..
        } => {
            let first_config = t.config.is_none();
            t.config = Some(configuration.tag());
            let (mut calls, mut tokens_in, mut tokens_out, mut cost) = (0u64, 0u64, 0u64, 0u64);
            for u in usage {
                calls += u64::from(u.calls);
                tokens_in = tokens_in.saturating_add(u.tokens_in);
                tokens_out = tokens_out.saturating_add(u.tokens_out);
                cost = cost.saturating_add(u.cost_micro_usd);
            }
            t.model_cost_micro_usd = t.model_cost_micro_usd.saturating_add(cost);
            t.model_tokens_in = t.model_tokens_in.saturating_add(tokens_in);
            t.model_tokens_out = t.model_tokens_out.saturating_add(tokens_out);
            out.push(Observation::Model {
                calls,
                tokens_in,
                tokens_out,
                cost_micro_usd: cost,
            });
            if first_config {
                // Under its configuration, a ticket counts as opened when
                // the configuration first answers it, so that the rates of
                // two configurations compare; "all" counted it at opening.
                let mut counted = counted(out, &t.config);
                counted.push(Counted {
                    observation: Observation::Opened,
                    config: t.config.clone(),
                    config_only: true,
                });
                return counted;
            }
        }
        _ => {}
    }
    counted(out, &t.config)
}

fn counted(observations: Vec<Observation>, config: &Option<String>) -> Vec<Counted> {
    observations
        .into_iter()
        .map(|observation| Counted {
            observation,
            config: config.clone(),
            config_only: false,
        })
        .collect()
}

/// The first resolution or closing of a ticket no person touched.
fn auto_resolution(t: &mut TicketFacts) -> Option<Observation> {
    if t.auto_counted || t.human || t.escalated {
        return None;
    }
    t.auto_counted = true;
    Some(Observation::AutoResolved)
}
