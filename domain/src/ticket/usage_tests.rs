//! Given/when/then tests of recording model usage and its price.

use chrono::{DateTime, TimeDelta, Utc};
use cqrs_es::test::TestFramework;
use uuid::Uuid;

use super::*;

type Given = TestFramework<Ticket>;

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-24T10:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn id(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

fn opened() -> TicketEvent {
    TicketEvent::TicketOpened {
        ticket_id: id(1),
        customer_id: id(2),
        channel: Channel::Webform,
        subject: None,
        category: Category::General,
        priority: Priority::Medium,
        opened_at: t0(),
        first_response_due: t0() + TimeDelta::minutes(2),
        resolution_due: t0() + TimeDelta::hours(24),
        previous_ticket_id: None,
    }
}

fn received() -> TicketEvent {
    TicketEvent::CustomerMessageReceived {
        message_id: id(3),
        customer_id: id(2),
        channel: Channel::Webform,
        channel_message_id: "form-1".into(),
        body: "How do I export my data?".into(),
        attachments: 0,
        thread: None,
        automated: None,
        received_at: t0(),
    }
}

fn usage(model: &str) -> Vec<ModelUsage> {
    vec![ModelUsage {
        provider: "openai".into(),
        model: model.into(),
        calls: 2,
        tokens_in: 1200,
        tokens_out: 80,
        cost_micro_usd: 3800,
    }]
}

fn configuration(experiment: Option<&str>) -> AiConfiguration {
    AiConfiguration {
        model: "gpt".into(),
        prompt_version: "p-1".into(),
        kb_version: "kb-1".into(),
        experiment: experiment.map(str::to_string),
    }
}

#[test]
fn usage_on_a_message_of_the_ticket_is_recorded_with_its_configuration() {
    Given::with(())
        .given(vec![opened(), received()])
        .when(TicketCommand::RecordModelUsage {
            in_reply_to: id(3),
            usage: usage("gpt"),
            configuration: configuration(Some("exp-b")),
            at: t0(),
        })
        .then_expect_events(vec![TicketEvent::ModelUsageRecorded {
            in_reply_to: id(3),
            usage: usage("gpt"),
            configuration: configuration(Some("exp-b")),
            recorded_at: t0(),
        }]);
}

#[test]
fn usage_for_an_unknown_message_or_with_bad_labels_is_refused() {
    Given::with(())
        .given(vec![opened(), received()])
        .when(TicketCommand::RecordModelUsage {
            in_reply_to: id(99),
            usage: usage("gpt"),
            configuration: configuration(None),
            at: t0(),
        })
        .then_expect_error(TicketError::UnknownMessage(id(99)));
    for bad in [" ".to_string(), "m".repeat(MAX_USAGE_LABEL_CHARS + 1)] {
        Given::with(())
            .given(vec![opened(), received()])
            .when(TicketCommand::RecordModelUsage {
                in_reply_to: id(3),
                usage: usage(&bad),
                configuration: configuration(None),
                at: t0(),
            })
            .then_expect_error(TicketError::InvalidModelUsage {
                max_entries: MAX_USAGE_ENTRIES,
                max_chars: MAX_USAGE_LABEL_CHARS,
            });
    }
    Given::with(())
        .given(vec![opened(), received()])
        .when(TicketCommand::RecordModelUsage {
            in_reply_to: id(3),
            usage: (0..=MAX_USAGE_ENTRIES).flat_map(|_| usage("gpt")).collect(),
            configuration: configuration(None),
            at: t0(),
        })
        .then_expect_error(TicketError::InvalidModelUsage {
            max_entries: MAX_USAGE_ENTRIES,
            max_chars: MAX_USAGE_LABEL_CHARS,
        });
}

#[test]
fn a_price_per_million_tokens_is_a_micro_dollar_per_token() {
    let price = ModelPrice {
        usd_per_mtok_in: 2.5,
        usd_per_mtok_out: 10.0,
    };
    assert_eq!(price.cost_micro_usd(1000, 50), 3000);
    assert_eq!(price.cost_micro_usd(0, 0), 0);
    // Fractions round to the nearest micro-dollar.
    let cheap = ModelPrice {
        usd_per_mtok_in: 0.15,
        usd_per_mtok_out: 0.6,
    };
    assert_eq!(cheap.cost_micro_usd(10, 1), 2);
    assert_eq!(
        ModelPrice::default().cost_micro_usd(1_000_000, 1_000_000),
        0
    );
    assert_eq!(configuration(Some("exp-b")).tag(), "gpt/p-1/kb-1/exp-b");
    assert_eq!(configuration(None).tag(), "gpt/p-1/kb-1");
}
