//! Given/when/then tests of the hand-off to people: who answers, the one
//! holding reply per hand-off, claiming and giving back, resolution,
//! reopening into the same queue, closing stale tickets, WhatsApp's
//! 24-hour window, and linked tickets.

use chrono::{DateTime, TimeDelta, Utc};
use cqrs_es::test::TestFramework;
use cqrs_es::Aggregate;
use uuid::Uuid;

use super::*;
use crate::TicketStatus;

type Given = TestFramework<Ticket>;

const TICKET: u128 = 100;
const CUSTOMER: u128 = 200;
const LIMIT: AutoReplyLimit = AutoReplyLimit { per_hour: 3 };

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-24T10:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn secs(n: i64) -> DateTime<Utc> {
    t0() + TimeDelta::seconds(n)
}

fn id(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

fn opened_on(channel: Channel) -> TicketEvent {
    TicketEvent::TicketOpened {
        ticket_id: id(TICKET),
        customer_id: id(CUSTOMER),
        channel,
        subject: None,
        category: Category::General,
        priority: Priority::Medium,
        opened_at: t0(),
        first_response_due: t0() + TimeDelta::minutes(2),
        resolution_due: t0() + TimeDelta::hours(24),
        previous_ticket_id: None,
    }
}

fn opened() -> TicketEvent {
    opened_on(Channel::Whatsapp)
}

fn received_at(n: u128, at: DateTime<Utc>) -> TicketEvent {
    TicketEvent::CustomerMessageReceived {
        message_id: id(n),
        customer_id: id(CUSTOMER),
        channel: Channel::Whatsapp,
        channel_message_id: format!("SM{n}"),
        body: "Can I talk to a person?".into(),
        attachments: 0,
        thread: None,
        automated: None,
        received_at: at,
    }
}

fn received(n: u128) -> TicketEvent {
    received_at(n, t0())
}

fn receive(n: u128, at: DateTime<Utc>) -> TicketCommand {
    TicketCommand::ReceiveCustomerMessage {
        message_id: id(n),
        customer_id: id(CUSTOMER),
        channel: Channel::Whatsapp,
        channel_message_id: format!("SM{n}"),
        body: "Can I talk to a person?".into(),
        attachments: 0,
        thread: None,
        automated: None,
        at,
    }
}

fn escalated(escalation: u128, m: Option<u128>) -> TicketEvent {
    TicketEvent::TicketEscalated {
        escalation_id: id(escalation),
        in_reply_to: m.map(id),
        reason: EscalationReason::HumanRequested,
        note: None,
        escalated_at: t0(),
    }
}

fn assigned(agent: &str) -> TicketEvent {
    TicketEvent::TicketAssigned {
        agent_id: agent.into(),
        assigned_by: agent.into(),
        assigned_at: secs(10),
    }
}

fn ack() -> HoldingReply {
    HoldingReply {
        response_id: id(900),
        body: "A person will reply.".into(),
        parts: vec!["A person will reply.".into()],
    }
}

fn queue(m: u128, at: DateTime<Utc>) -> TicketCommand {
    TicketCommand::QueueForHuman {
        in_reply_to: id(m),
        acknowledgement: Some(ack()),
        limit: LIMIT,
        at,
    }
}

fn queued(m: u128, assignee: Option<&str>, at: DateTime<Utc>) -> TicketEvent {
    TicketEvent::CustomerMessageQueuedForHuman {
        in_reply_to: id(m),
        assignee: assignee.map(str::to_string),
        queued_at: at,
    }
}

fn ack_sent(m: u128, at: DateTime<Utc>) -> TicketEvent {
    TicketEvent::ResponseSent {
        response_id: id(900),
        draft_id: None,
        channel: Channel::Whatsapp,
        body: "A person will reply.".into(),
        parts: vec!["A person will reply.".into()],
        in_reply_to: Some(id(m)),
        automatic: true,
        holding: true,
        template: None,
        sent_at: at,
    }
}

fn draft(draft: u128, m: u128) -> TicketCommand {
    TicketCommand::DraftResponse {
        draft_id: id(draft),
        in_reply_to: Some(id(m)),
        body: "Go to Settings > Export.".into(),
        confidence: 0.9,
        sources: vec![],
        generated_by: "local".into(),
        at: secs(20),
    }
}

fn reply(
    response: u128,
    automatic: bool,
    template: Option<&str>,
    at: DateTime<Utc>,
) -> TicketCommand {
    TicketCommand::SendResponse {
        response_id: id(response),
        draft_id: None,
        channel: Channel::Whatsapp,
        body: "Here is what I found.".into(),
        parts: vec!["Here is what I found.".into()],
        in_reply_to: None,
        automatic: automatic.then_some(LIMIT),
        holding: false,
        template: template.map(str::to_string),
        at,
    }
}

fn replied(response: u128, m: u128, template: Option<&str>, at: DateTime<Utc>) -> TicketEvent {
    TicketEvent::ResponseSent {
        response_id: id(response),
        draft_id: None,
        channel: Channel::Whatsapp,
        body: "Here is what I found.".into(),
        parts: vec!["Here is what I found.".into()],
        in_reply_to: Some(id(m)),
        automatic: false,
        holding: false,
        template: template.map(str::to_string),
        sent_at: at,
    }
}

fn resolved_at(at: DateTime<Utc>) -> TicketEvent {
    TicketEvent::TicketResolved {
        resolved_by: "grace".into(),
        resolution: None,
        resolved_at: at,
    }
}

fn state(events: Vec<TicketEvent>) -> Ticket {
    let mut ticket = Ticket::default();
    for e in events {
        ticket.apply(e);
    }
    ticket
}

#[test]
fn once_escalated_the_ai_can_neither_draft_nor_answer() {
    let given = vec![opened(), received(1), escalated(40, Some(1)), received(2)];
    assert!(state(given.clone()).with_human());
    Given::with(())
        .given(given.clone())
        .when(draft(10, 2))
        .then_expect_error(TicketError::WithHuman);
    Given::with(())
        .given(given)
        .when(reply(20, true, None, secs(30)))
        .then_expect_error(TicketError::WithHuman);
}

#[test]
fn once_assigned_the_ai_is_silent_and_the_message_waits_in_the_assignees_queue() {
    let given = vec![opened(), received(1), assigned("grace"), received(2)];
    Given::with(())
        .given(given.clone())
        .when(draft(10, 2))
        .then_expect_error(TicketError::WithHuman);
    Given::with(())
        .given(given)
        .when(queue(2, secs(30)))
        .then_expect_events(vec![
            queued(2, Some("grace"), secs(30)),
            ack_sent(2, secs(30)),
        ]);
}

#[test]
fn a_hand_off_acknowledges_at_most_once() {
    let given = vec![
        opened(),
        received(1),
        assigned("grace"),
        received(2),
        queued(2, Some("grace"), secs(30)),
        ack_sent(2, secs(30)),
        received(3),
    ];
    Given::with(())
        .given(given)
        .when(queue(3, secs(40)))
        .then_expect_events(vec![queued(3, Some("grace"), secs(40))]);
    // The holding reply sent with the escalation counts as this hand-off's.
    let holding = ack_sent(1, secs(5));
    let given = vec![
        opened(),
        received(1),
        escalated(40, Some(1)),
        holding,
        received(2),
    ];
    Given::with(())
        .given(given.clone())
        .when(queue(2, secs(40)))
        .then_expect_events(vec![queued(2, None, secs(40))]);
    // And a second holding reply in the same hand-off is not sent.
    Given::with(())
        .given(given)
        .when(TicketCommand::SendResponse {
            response_id: id(901),
            draft_id: None,
            channel: Channel::Whatsapp,
            body: "A person will reply.".into(),
            parts: vec!["A person will reply.".into()],
            in_reply_to: Some(id(2)),
            automatic: Some(LIMIT),
            holding: true,
            template: None,
            at: secs(41),
        })
        .then_expect_events(vec![]);
}

#[test]
fn a_person_who_replied_needs_no_holding_reply_and_the_limit_can_withhold_it() {
    let given = vec![
        opened(),
        received(1),
        assigned("grace"),
        replied(20, 1, None, secs(20)),
        received(2),
    ];
    Given::with(())
        .given(given)
        .when(queue(2, secs(40)))
        .then_expect_events(vec![queued(2, Some("grace"), secs(40))]);
    // Three automatic replies this hour already: no holding reply either.
    let auto = |n: u128| TicketEvent::ResponseSent {
        response_id: id(n),
        draft_id: None,
        channel: Channel::Whatsapp,
        body: "Answer".into(),
        parts: vec!["Answer".into()],
        in_reply_to: Some(id(1)),
        automatic: true,
        holding: false,
        template: None,
        sent_at: secs(1),
    };
    let given = vec![
        opened(),
        received(1),
        auto(21),
        auto(22),
        auto(23),
        assigned("grace"),
        received(2),
    ];
    Given::with(())
        .given(given)
        .when(queue(2, secs(40)))
        .then_expect_events(vec![queued(2, Some("grace"), secs(40))]);
}

#[test]
fn while_the_ai_handles_the_ticket_nothing_is_queued_for_a_person_and_no_holding_reply_goes_out() {
    let given = vec![opened(), received(1)];
    Given::with(())
        .given(given.clone())
        .when(queue(1, secs(5)))
        .then_expect_error(TicketError::NotWithHuman);
    Given::with(())
        .given(given)
        .when(TicketCommand::SendResponse {
            response_id: id(20),
            draft_id: None,
            channel: Channel::Whatsapp,
            body: "A person will reply.".into(),
            parts: vec![],
            in_reply_to: None,
            automatic: Some(LIMIT),
            holding: true,
            template: None,
            at: secs(5),
        })
        .then_expect_error(TicketError::NotWithHuman);
}

#[test]
fn a_holding_reply_is_not_a_first_response_but_a_persons_reply_is() {
    let mut events = vec![
        opened(),
        received(1),
        escalated(40, Some(1)),
        ack_sent(1, secs(5)),
    ];
    let ticket = state(events.clone());
    assert_eq!(ticket.first_response_at, None);
    assert_eq!(ticket.status, TicketStatus::Escalated);
    // On an assigned ticket the holding reply does not make it "responded".
    let held = state(vec![
        opened(),
        received(1),
        assigned("grace"),
        received(2),
        queued(2, Some("grace"), secs(30)),
        ack_sent(2, secs(30)),
    ]);
    assert_ne!(held.status, TicketStatus::Responded);
    assert_eq!(held.first_response_at, None);
    assert_eq!(
        ticket.unrecorded_sla_due(crate::sla::SlaKind::FirstResponse),
        Some(t0() + TimeDelta::minutes(2))
    );
    events.push(replied(20, 1, None, secs(60)));
    let ticket = state(events.clone());
    assert_eq!(ticket.first_response_at, Some(secs(60)));
    assert_eq!(
        ticket.unrecorded_sla_due(crate::sla::SlaKind::FirstResponse),
        None
    );
    // Resolution stops the resolution SLA.
    events.push(resolved_at(secs(120)));
    assert_eq!(
        state(events).unrecorded_sla_due(crate::sla::SlaKind::Resolution),
        None
    );
}

#[test]
fn unassigning_needs_an_assignee_and_leaves_the_ticket_with_people() {
    Given::with(())
        .given(vec![opened(), received(1)])
        .when(TicketCommand::Unassign {
            unassigned_by: "grace".into(),
            at: secs(20),
        })
        .then_expect_error(TicketError::NotAssigned);
    let given = vec![opened(), received(1), assigned("grace")];
    Given::with(())
        .given(given.clone())
        .when(TicketCommand::Unassign {
            unassigned_by: "sam".into(),
            at: secs(20),
        })
        .then_expect_events(vec![TicketEvent::TicketUnassigned {
            previous_assignee: "grace".into(),
            unassigned_by: "sam".into(),
            unassigned_at: secs(20),
        }]);
    let mut events = given;
    events.push(TicketEvent::TicketUnassigned {
        previous_assignee: "grace".into(),
        unassigned_by: "sam".into(),
        unassigned_at: secs(20),
    });
    events.push(received(2));
    let ticket = state(events.clone());
    assert!(ticket.with_human() && ticket.assigned_to.is_none());
    // The message goes to the unassigned queue.
    Given::with(())
        .given(events)
        .when(queue(2, secs(30)))
        .then_expect_events(vec![queued(2, None, secs(30)), ack_sent(2, secs(30))]);
}

#[test]
fn handing_back_settles_the_escalations_and_the_ai_answers_again() {
    Given::with(())
        .given(vec![opened(), received(1)])
        .when(TicketCommand::HandBackToAi {
            handed_back_by: "grace".into(),
            at: secs(30),
        })
        .then_expect_error(TicketError::NotWithHuman);
    let given = vec![
        opened(),
        received(1),
        escalated(40, Some(1)),
        assigned("grace"),
    ];
    let handed_back = vec![
        TicketEvent::EscalationResolved {
            escalation_id: id(40),
            resolved_by: "grace".into(),
            note: Some("handed back to the AI".into()),
            resolved_at: secs(30),
        },
        TicketEvent::TicketHandedBackToAi {
            handed_back_by: "grace".into(),
            previous_assignee: Some("grace".into()),
            handed_back_at: secs(30),
        },
    ];
    Given::with(())
        .given(given.clone())
        .when(TicketCommand::HandBackToAi {
            handed_back_by: "grace".into(),
            at: secs(30),
        })
        .then_expect_events(handed_back.clone());
    let mut events = given;
    events.extend(handed_back);
    events.push(received(2));
    let ticket = state(events.clone());
    assert!(!ticket.with_human());
    assert_eq!(ticket.assigned_to, None);
    assert_ne!(ticket.status, TicketStatus::Escalated);
    Given::with(())
        .given(events)
        .when(draft(10, 2))
        .then_expect_events(vec![TicketEvent::ResponseDrafted {
            draft_id: id(10),
            in_reply_to: Some(id(2)),
            body: "Go to Settings > Export.".into(),
            confidence: 0.9,
            sources: vec![],
            generated_by: "local".into(),
            drafted_at: secs(20),
        }]);
}

#[test]
fn a_customer_who_writes_after_resolution_reopens_into_the_same_persons_queue() {
    let given = vec![
        opened(),
        received(1),
        escalated(40, Some(1)),
        assigned("grace"),
        replied(20, 1, None, secs(20)),
        TicketEvent::EscalationResolved {
            escalation_id: id(40),
            resolved_by: "grace".into(),
            note: None,
            resolved_at: secs(25),
        },
        resolved_at(secs(30)),
    ];
    let reopened = TicketEvent::TicketReopened {
        reopened_by: format!("customer:{}", id(CUSTOMER)),
        reason: Some("customer wrote again".into()),
        reopened_at: secs(100),
    };
    Given::with(())
        .given(given.clone())
        .when(receive(2, secs(100)))
        .then_expect_events(vec![reopened.clone(), received_at(2, secs(100))]);
    let mut events = given;
    events.push(reopened);
    events.push(received_at(2, secs(100)));
    let ticket = state(events.clone());
    assert!(ticket.with_human());
    assert_eq!(ticket.assigned_to.as_deref(), Some("grace"));
    assert_eq!(ticket.resolved_at, None);
    // A new hand-off: the customer hears once that a person will reply.
    Given::with(())
        .given(events)
        .when(queue(2, secs(101)))
        .then_expect_events(vec![
            queued(2, Some("grace"), secs(101)),
            ack_sent(2, secs(101)),
        ]);
}

#[test]
fn a_ticket_resolved_without_an_assignee_goes_back_to_the_ai_when_reopened() {
    let events = vec![
        opened(),
        received(1),
        escalated(40, Some(1)),
        TicketEvent::EscalationResolved {
            escalation_id: id(40),
            resolved_by: "grace".into(),
            note: None,
            resolved_at: secs(25),
        },
        resolved_at(secs(30)),
        TicketEvent::TicketReopened {
            reopened_by: "customer".into(),
            reason: None,
            reopened_at: secs(100),
        },
        received_at(2, secs(100)),
    ];
    assert!(!state(events.clone()).with_human());
    Given::with(())
        .given(events)
        .when(queue(2, secs(101)))
        .then_expect_error(TicketError::NotWithHuman);
}

#[test]
fn a_resolved_ticket_closes_after_seven_quiet_days_and_then_takes_nothing() {
    let given = vec![opened(), received(1), resolved_at(secs(30))];
    Given::with(())
        .given(vec![opened(), received(1)])
        .when(TicketCommand::CloseStale { at: secs(30) })
        .then_expect_error(TicketError::NotResolved);
    let almost = secs(30) + AUTO_CLOSE_AFTER - TimeDelta::seconds(1);
    Given::with(())
        .given(given.clone())
        .when(TicketCommand::CloseStale { at: almost })
        .then_expect_error(TicketError::NotStale {
            resolved_at: secs(30),
        });
    let week = secs(30) + AUTO_CLOSE_AFTER;
    let closed = TicketEvent::TicketClosed {
        closed_by: "system:auto-close".into(),
        closed_at: week,
    };
    Given::with(())
        .given(given.clone())
        .when(TicketCommand::CloseStale { at: week })
        .then_expect_events(vec![closed.clone()]);
    let mut events = given;
    events.push(closed);
    assert_eq!(state(events.clone()).closed_at, Some(week));
    for command in [
        reply(20, false, None, week),
        receive(2, week),
        TicketCommand::Assign {
            agent_id: "grace".into(),
            assigned_by: "grace".into(),
            at: week,
        },
        TicketCommand::CloseStale { at: week },
    ] {
        Given::with(())
            .given(events.clone())
            .when(command)
            .then_expect_error(TicketError::Closed);
    }
}

#[test]
fn whatsapp_free_form_replies_stop_24_hours_after_the_customers_last_message() {
    let given = vec![opened(), received_at(1, t0()), assigned("grace")];
    let late = t0() + WHATSAPP_WINDOW + TimeDelta::seconds(1);
    // A person's reply and the AI's alike.
    for automatic in [false, true] {
        let given = if automatic {
            vec![opened(), received_at(1, t0())]
        } else {
            given.clone()
        };
        Given::with(())
            .given(given)
            .when(reply(20, automatic, None, late))
            .then_expect_error(TicketError::WhatsappWindowClosed);
    }
    Given::with(())
        .given(given.clone())
        .when(reply(20, false, Some("HX123"), late))
        .then_expect_events(vec![replied(20, 1, Some("HX123"), late)]);
    Given::with(())
        .given(given.clone())
        .when(reply(20, false, Some(" "), late))
        .then_expect_error(TicketError::EmptyTemplate);
    // Within the window free-form is fine.
    let in_time = t0() + WHATSAPP_WINDOW;
    Given::with(())
        .given(given.clone())
        .when(reply(20, false, None, in_time))
        .then_expect_events(vec![replied(20, 1, None, in_time)]);
    // The customer writing again opens the window again.
    let mut events = given;
    events.push(received_at(2, late));
    Given::with(())
        .given(events)
        .when(reply(20, false, None, late + TimeDelta::hours(1)))
        .then_expect_events(vec![replied(20, 2, None, late + TimeDelta::hours(1))]);
    // Email has no such window.
    let email = vec![
        opened_on(Channel::Email),
        TicketEvent::CustomerMessageReceived {
            message_id: id(1),
            customer_id: id(CUSTOMER),
            channel: Channel::Email,
            channel_message_id: "m1".into(),
            body: "Hello".into(),
            attachments: 0,
            thread: None,
            automated: None,
            received_at: t0(),
        },
    ];
    let email_reply = TicketCommand::SendResponse {
        response_id: id(20),
        draft_id: None,
        channel: Channel::Email,
        body: "Hello".into(),
        parts: vec![],
        in_reply_to: None,
        automatic: None,
        holding: false,
        template: None,
        at: late,
    };
    assert!(Ticket::default().free_form_allowed(late));
    let mut ticket = state(email);
    assert!(ticket.free_form_allowed(late));
    assert!(ticket.decide(email_reply).is_ok());
    ticket.channel = Some(Channel::Whatsapp);
    assert!(!ticket.free_form_allowed(late));
}

#[test]
fn approving_a_decided_draft_and_rejecting_without_a_reason_are_refused() {
    let given = vec![
        opened(),
        received(1),
        TicketEvent::ResponseDrafted {
            draft_id: id(10),
            in_reply_to: Some(id(1)),
            body: "Draft".into(),
            confidence: 0.5,
            sources: vec![],
            generated_by: "local".into(),
            drafted_at: t0(),
        },
        TicketEvent::ApprovalRequested {
            approval_id: id(30),
            draft_id: id(10),
            reasons: vec![],
            requested_at: t0(),
        },
    ];
    let approved = TicketEvent::ResponseApproved {
        approval_id: id(30),
        draft_id: id(10),
        approved_by: "grace".into(),
        edited_body: Some("Edited".into()),
        approved_at: secs(5),
    };
    Given::with(())
        .given(given.clone())
        .when(TicketCommand::ApproveResponse {
            approval_id: id(30),
            approved_by: "grace".into(),
            edited_body: Some("Edited".into()),
            at: secs(5),
        })
        .then_expect_events(vec![approved.clone()]);
    let mut events = given.clone();
    events.push(approved);
    assert_eq!(state(events.clone()).approvals[&id(30)].body, "Edited");
    Given::with(())
        .given(events)
        .when(TicketCommand::RejectResponse {
            approval_id: id(30),
            rejected_by: "sam".into(),
            reason: "wrong".into(),
            at: secs(6),
        })
        .then_expect_error(TicketError::ApprovalAlreadyDecided(id(30)));
    Given::with(())
        .given(given)
        .when(TicketCommand::RejectResponse {
            approval_id: id(30),
            rejected_by: "sam".into(),
            reason: " ".into(),
            at: secs(6),
        })
        .then_expect_error(TicketError::EmptyReason);
}

#[test]
fn a_ticket_can_follow_on_from_a_closed_one() {
    let command = TicketCommand::Open {
        ticket_id: id(TICKET),
        customer_id: id(CUSTOMER),
        channel: Channel::Whatsapp,
        subject: None,
        category: Category::General,
        priority: Priority::Medium,
        previous_ticket_id: Some(id(99)),
        at: t0(),
    };
    let event = TicketEvent::TicketOpened {
        ticket_id: id(TICKET),
        customer_id: id(CUSTOMER),
        channel: Channel::Whatsapp,
        subject: None,
        category: Category::General,
        priority: Priority::Medium,
        opened_at: t0(),
        first_response_due: t0() + TimeDelta::minutes(2),
        resolution_due: t0() + TimeDelta::hours(24),
        previous_ticket_id: Some(id(99)),
    };
    Given::with(())
        .given_no_previous_events()
        .when(command)
        .then_expect_events(vec![event.clone()]);
    assert_eq!(state(vec![event]).previous_ticket_id, Some(id(99)));
}

#[test]
fn a_manual_escalation_hands_the_ticket_to_people() {
    let given = vec![opened(), received(1)];
    let manual = TicketEvent::TicketEscalated {
        escalation_id: id(41),
        in_reply_to: None,
        reason: EscalationReason::Manual,
        note: Some("VIP".into()),
        escalated_at: secs(5),
    };
    Given::with(())
        .given(given.clone())
        .when(TicketCommand::Escalate {
            escalation_id: id(41),
            in_reply_to: None,
            reason: EscalationReason::Manual,
            note: Some("VIP".into()),
            at: secs(5),
        })
        .then_expect_events(vec![manual.clone()]);
    let mut events = given;
    events.push(manual);
    let ticket = state(events);
    assert!(ticket.with_human() && !ticket.hand_off_acknowledged);
    assert_eq!(ticket.handler.as_str(), "human");
}
