//! Given/when/then tests of the ticket's rules, rejections included.

use chrono::{DateTime, TimeDelta, Utc};
use cqrs_es::test::TestFramework;
use cqrs_es::Aggregate;
use uuid::Uuid;

use super::*;
use crate::sla::SlaKind;
use crate::TicketStatus;

type Given = TestFramework<Ticket>;

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-24T10:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn id(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

const TICKET: u128 = 100;
const CUSTOMER: u128 = 200;

fn opened() -> TicketEvent {
    TicketEvent::TicketOpened {
        ticket_id: id(TICKET),
        customer_id: id(CUSTOMER),
        channel: Channel::Whatsapp,
        subject: None,
        category: Category::General,
        priority: Priority::Medium,
        opened_at: t0(),
        first_response_due: t0() + TimeDelta::minutes(2),
        resolution_due: t0() + TimeDelta::hours(24),
        previous_ticket_id: None,
    }
}

fn received(n: u128, sid: &str) -> TicketEvent {
    TicketEvent::CustomerMessageReceived {
        message_id: id(n),
        customer_id: id(CUSTOMER),
        channel: Channel::Whatsapp,
        channel_message_id: sid.into(),
        body: "How do I export my data?".into(),
        attachments: 0,
        thread: None,
        automated: None,
        received_at: t0(),
    }
}

fn receive(n: u128, sid: &str) -> TicketCommand {
    TicketCommand::ReceiveCustomerMessage {
        message_id: id(n),
        customer_id: id(CUSTOMER),
        channel: Channel::Whatsapp,
        channel_message_id: sid.into(),
        body: "How do I export my data?".into(),
        attachments: 0,
        thread: None,
        automated: None,
        at: t0(),
    }
}

fn drafted(draft: u128, confidence: f64) -> TicketEvent {
    TicketEvent::ResponseDrafted {
        draft_id: id(draft),
        in_reply_to: None,
        body: "Go to Settings > Export.".into(),
        confidence,
        sources: vec!["kb:export".into()],
        generated_by: "local".into(),
        drafted_at: t0(),
    }
}

fn approval_requested(approval: u128, draft: u128) -> TicketEvent {
    TicketEvent::ApprovalRequested {
        approval_id: id(approval),
        draft_id: id(draft),
        reasons: vec!["confidence 0.55 below 0.8".into()],
        requested_at: t0(),
    }
}

fn send(response: u128, draft: Option<u128>) -> TicketCommand {
    TicketCommand::SendResponse {
        response_id: id(response),
        draft_id: draft.map(id),
        channel: Channel::Whatsapp,
        body: "Go to Settings > Export.".into(),
        parts: vec!["Go to Settings > Export.".into()],
        in_reply_to: None,
        automatic: None,
        at: t0() + TimeDelta::seconds(30),
        holding: false,
        template: None,
    }
}

fn sent(response: u128, draft: Option<u128>) -> TicketEvent {
    TicketEvent::ResponseSent {
        response_id: id(response),
        draft_id: draft.map(id),
        channel: Channel::Whatsapp,
        body: "Go to Settings > Export.".into(),
        parts: vec!["Go to Settings > Export.".into()],
        in_reply_to: Some(id(1)),
        automatic: false,
        sent_at: t0() + TimeDelta::seconds(30),
        holding: false,
        template: None,
    }
}

fn resolved() -> TicketEvent {
    TicketEvent::TicketResolved {
        resolved_by: "agent:grace".into(),
        resolution: None,
        resolved_at: t0(),
    }
}

fn closed() -> TicketEvent {
    TicketEvent::TicketClosed {
        closed_by: "agent:grace".into(),
        closed_at: t0(),
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
fn a_ticket_opens_with_sla_deadlines_from_its_channel() {
    Given::with(())
        .given_no_previous_events()
        .when(TicketCommand::Open {
            ticket_id: id(TICKET),
            customer_id: id(CUSTOMER),
            channel: Channel::Whatsapp,
            subject: None,
            category: Category::General,
            priority: Priority::Medium,
            at: t0(),
            previous_ticket_id: None,
        })
        .then_expect_events(vec![opened()]);
}

#[test]
fn a_ticket_opens_once() {
    Given::with(())
        .given(vec![opened()])
        .when(TicketCommand::Open {
            ticket_id: id(TICKET),
            customer_id: id(CUSTOMER),
            channel: Channel::Email,
            subject: None,
            category: Category::General,
            priority: Priority::Low,
            at: t0(),
            previous_ticket_id: None,
        })
        .then_expect_error(TicketError::AlreadyOpened);
}

#[test]
fn nothing_happens_to_a_ticket_that_does_not_exist() {
    for command in [
        receive(1, "SM1"),
        send(5, None),
        TicketCommand::Close {
            closed_by: "x".into(),
            at: t0(),
        },
    ] {
        Given::with(())
            .given_no_previous_events()
            .when(command)
            .then_expect_error(TicketError::NotFound);
    }
}

#[test]
fn a_customer_message_is_received() {
    Given::with(())
        .given(vec![opened()])
        .when(receive(1, "SM1"))
        .then_expect_events(vec![received(1, "SM1")]);
}

#[test]
fn the_same_channel_message_is_not_received_twice() {
    Given::with(())
        .given(vec![opened(), received(1, "SM1")])
        .when(receive(2, "SM1"))
        .then_expect_error(TicketError::DuplicateMessage {
            channel_message_id: "SM1".into(),
        });
}

#[test]
fn an_empty_message_is_refused() {
    Given::with(())
        .given(vec![opened()])
        .when(TicketCommand::ReceiveCustomerMessage {
            message_id: id(1),
            customer_id: id(CUSTOMER),
            channel: Channel::Whatsapp,
            channel_message_id: "SM1".into(),
            body: "   ".into(),
            attachments: 0,
            thread: None,
            automated: None,
            at: t0(),
        })
        .then_expect_error(TicketError::EmptyMessage);
}

#[test]
fn a_message_on_a_resolved_ticket_reopens_it() {
    let events = Given::with(())
        .given(vec![opened(), received(1, "SM1"), resolved()])
        .when(receive(2, "SM2"))
        .inspect_result()
        .unwrap();
    assert_eq!(events.len(), 2);
    assert!(matches!(events[0], TicketEvent::TicketReopened { .. }));
    assert_eq!(events[1], received(2, "SM2"));
}

#[test]
fn nothing_is_received_or_sent_on_a_closed_ticket() {
    Given::with(())
        .given(vec![opened(), received(1, "SM1"), closed()])
        .when(receive(2, "SM2"))
        .then_expect_error(TicketError::Closed);
    Given::with(())
        .given(vec![opened(), received(1, "SM1"), closed()])
        .when(send(5, None))
        .then_expect_error(TicketError::Closed);
}

#[test]
fn the_knowledge_base_is_searched_at_most_twice_per_message() {
    // Events recorded before searches named their message: the latest.
    let searched = |attempt| TicketEvent::KnowledgeSearched {
        in_reply_to: None,
        query: "export".into(),
        attempt,
        hits: vec![],
        searched_at: t0(),
    };
    let search = || TicketCommand::RecordKnowledgeSearch {
        in_reply_to: None,
        query: "export".into(),
        hits: vec![],
        at: t0(),
    };
    let searched_for = |m, attempt| TicketEvent::KnowledgeSearched {
        in_reply_to: Some(id(m)),
        query: "export".into(),
        attempt,
        hits: vec![],
        searched_at: t0(),
    };
    Given::with(())
        .given(vec![opened(), received(1, "SM1"), searched(1)])
        .when(search())
        .then_expect_events(vec![searched_for(1, 2)]);
    Given::with(())
        .given(vec![opened(), received(1, "SM1"), searched(1), searched(2)])
        .when(search())
        .then_expect_error(TicketError::TooManySearches { attempts: 2 });
    // A new customer message starts a fresh budget.
    Given::with(())
        .given(vec![
            opened(),
            received(1, "SM1"),
            searched(1),
            searched(2),
            received(2, "SM2"),
        ])
        .when(search())
        .then_expect_events(vec![searched_for(2, 1)]);
}

#[test]
fn a_draft_needs_a_confidence_between_zero_and_one() {
    for confidence in [-0.1, 1.5, f64::NAN] {
        Given::with(())
            .given(vec![opened(), received(1, "SM1")])
            .when(TicketCommand::DraftResponse {
                draft_id: id(10),
                in_reply_to: None,
                body: "Hi".into(),
                confidence,
                sources: vec![],
                generated_by: "local".into(),
                at: t0(),
            })
            .then_expect_error(TicketError::InvalidConfidence);
    }
}

#[test]
fn a_response_is_sent_and_marks_the_first_response() {
    let ticket_events = vec![opened(), received(1, "SM1"), drafted(10, 0.93)];
    Given::with(())
        .given(ticket_events.clone())
        .when(send(20, Some(10)))
        .then_expect_events(vec![sent(20, Some(10))]);
    let mut all = ticket_events;
    all.push(sent(20, Some(10)));
    let ticket = state(all);
    assert_eq!(ticket.status, TicketStatus::Responded);
    assert_eq!(
        ticket.first_response_at,
        Some(t0() + TimeDelta::seconds(30))
    );
    assert_eq!(ticket.messages_count, 2);
    assert_eq!(ticket.sla_due_at(), Some(t0() + TimeDelta::hours(24)));
}

#[test]
fn a_draft_awaiting_approval_is_not_sent() {
    Given::with(())
        .given(vec![
            opened(),
            received(1, "SM1"),
            drafted(10, 0.55),
            approval_requested(30, 10),
        ])
        .when(send(20, Some(10)))
        .then_expect_error(TicketError::ApprovalRequired(id(10)));
}

#[test]
fn an_approved_draft_is_sent_and_a_rejected_one_never() {
    let approved = TicketEvent::ResponseApproved {
        approval_id: id(30),
        draft_id: id(10),
        approved_by: "agent:grace".into(),
        edited_body: None,
        approved_at: t0(),
    };
    let rejected = TicketEvent::ResponseRejected {
        approval_id: id(30),
        draft_id: id(10),
        rejected_by: "agent:grace".into(),
        reason: "wrong article".into(),
        rejected_at: t0(),
    };
    let base = vec![
        opened(),
        received(1, "SM1"),
        drafted(10, 0.55),
        approval_requested(30, 10),
    ];
    Given::with(())
        .given(base.clone())
        .and(vec![approved])
        .when(send(20, Some(10)))
        .then_expect_events(vec![sent(20, Some(10))]);
    Given::with(())
        .given(base)
        .and(vec![rejected])
        .when(send(20, Some(10)))
        .then_expect_error(TicketError::DraftRejected(id(10)));
}

#[test]
fn an_approval_is_decided_once() {
    let approved = TicketEvent::ResponseApproved {
        approval_id: id(30),
        draft_id: id(10),
        approved_by: "agent:grace".into(),
        edited_body: Some("Edited".into()),
        approved_at: t0(),
    };
    Given::with(())
        .given(vec![
            opened(),
            received(1, "SM1"),
            drafted(10, 0.55),
            approval_requested(30, 10),
            approved,
        ])
        .when(TicketCommand::RejectResponse {
            approval_id: id(30),
            rejected_by: "agent:alan".into(),
            reason: "late".into(),
            at: t0(),
        })
        .then_expect_error(TicketError::ApprovalAlreadyDecided(id(30)));
    Given::with(())
        .given(vec![opened(), received(1, "SM1")])
        .when(TicketCommand::ApproveResponse {
            approval_id: id(31),
            approved_by: "agent:grace".into(),
            edited_body: None,
            at: t0(),
        })
        .then_expect_error(TicketError::UnknownApproval(id(31)));
}

#[test]
fn a_rejection_needs_a_reason() {
    Given::with(())
        .given(vec![
            opened(),
            received(1, "SM1"),
            drafted(10, 0.55),
            approval_requested(30, 10),
        ])
        .when(TicketCommand::RejectResponse {
            approval_id: id(30),
            rejected_by: "agent:grace".into(),
            reason: " ".into(),
            at: t0(),
        })
        .then_expect_error(TicketError::EmptyReason);
}

#[test]
fn approval_status_follows_the_decision() {
    let mut ticket = state(vec![
        opened(),
        received(1, "SM1"),
        drafted(10, 0.55),
        approval_requested(30, 10),
    ]);
    assert_eq!(ticket.status, TicketStatus::AwaitingApproval);
    ticket.apply(TicketEvent::ResponseApproved {
        approval_id: id(30),
        draft_id: id(10),
        approved_by: "agent:grace".into(),
        edited_body: Some("Edited reply".into()),
        approved_at: t0(),
    });
    assert_eq!(ticket.status, TicketStatus::InProgress);
    assert_eq!(ticket.approvals[&id(30)].body, "Edited reply");
}

#[test]
fn delivery_status_only_moves_forward() {
    let base = vec![opened(), received(1, "SM1"), sent(20, None)];
    let changed = |status| TicketEvent::DeliveryStatusChanged {
        response_id: id(20),
        status,
        provider_message_id: Some("SMout".into()),
        error: None,
        changed_at: t0(),
    };
    let record = |status| TicketCommand::RecordDeliveryStatus {
        response_id: id(20),
        status,
        provider_message_id: Some("SMout".into()),
        error: None,
        at: t0(),
    };
    Given::with(())
        .given(base.clone())
        .when(record(DeliveryStatus::Delivered))
        .then_expect_events(vec![changed(DeliveryStatus::Delivered)]);
    Given::with(())
        .given(base.clone())
        .and(vec![changed(DeliveryStatus::Delivered)])
        .when(record(DeliveryStatus::Sent))
        .then_expect_events(vec![]);
    Given::with(())
        .given(base.clone())
        .and(vec![changed(DeliveryStatus::Delivered)])
        .when(record(DeliveryStatus::Read))
        .then_expect_events(vec![changed(DeliveryStatus::Read)]);
    Given::with(())
        .given(base)
        .when(TicketCommand::RecordDeliveryStatus {
            response_id: id(21),
            status: DeliveryStatus::Sent,
            provider_message_id: None,
            error: None,
            at: t0(),
        })
        .then_expect_error(TicketError::UnknownResponse(id(21)));
}

#[test]
fn delivery_callbacks_still_count_after_closing() {
    Given::with(())
        .given(vec![opened(), received(1, "SM1"), sent(20, None), closed()])
        .when(TicketCommand::RecordDeliveryStatus {
            response_id: id(20),
            status: DeliveryStatus::Read,
            provider_message_id: None,
            error: None,
            at: t0(),
        })
        .then_expect_events(vec![TicketEvent::DeliveryStatusChanged {
            response_id: id(20),
            status: DeliveryStatus::Read,
            provider_message_id: None,
            error: None,
            changed_at: t0(),
        }]);
}

#[test]
fn an_escalation_for_an_open_reason_is_not_repeated() {
    let escalated = TicketEvent::TicketEscalated {
        escalation_id: id(40),
        in_reply_to: None,
        reason: EscalationReason::RefundRequest,
        note: None,
        escalated_at: t0(),
    };
    Given::with(())
        .given(vec![opened(), received(1, "SM1")])
        .when(TicketCommand::Escalate {
            escalation_id: id(40),
            in_reply_to: None,
            reason: EscalationReason::RefundRequest,
            note: None,
            at: t0(),
        })
        .then_expect_events(vec![escalated.clone()]);
    Given::with(())
        .given(vec![opened(), received(1, "SM1"), escalated])
        .when(TicketCommand::Escalate {
            escalation_id: id(41),
            in_reply_to: None,
            reason: EscalationReason::RefundRequest,
            note: None,
            at: t0(),
        })
        .then_expect_events(vec![]);
}

#[test]
fn resolving_settles_open_escalations_and_reopen_needs_resolved() {
    let escalated = TicketEvent::TicketEscalated {
        escalation_id: id(40),
        in_reply_to: None,
        reason: EscalationReason::Legal,
        note: None,
        escalated_at: t0(),
    };
    Given::with(())
        .given(vec![opened(), received(1, "SM1"), escalated])
        .when(TicketCommand::Resolve {
            resolved_by: "agent:grace".into(),
            resolution: None,
            at: t0(),
        })
        .then_expect_events(vec![
            TicketEvent::EscalationResolved {
                escalation_id: id(40),
                resolved_by: "agent:grace".into(),
                note: Some("ticket resolved".into()),
                resolved_at: t0(),
            },
            resolved(),
        ]);
    Given::with(())
        .given(vec![opened(), received(1, "SM1"), resolved()])
        .when(TicketCommand::Resolve {
            resolved_by: "agent:grace".into(),
            resolution: None,
            at: t0(),
        })
        .then_expect_error(TicketError::AlreadyResolved);
    Given::with(())
        .given(vec![opened(), received(1, "SM1")])
        .when(TicketCommand::Reopen {
            reopened_by: "agent:grace".into(),
            reason: None,
            at: t0(),
        })
        .then_expect_error(TicketError::NotResolved);
}

#[test]
fn a_ticket_closes_once() {
    Given::with(())
        .given(vec![opened(), closed()])
        .when(TicketCommand::Close {
            closed_by: "agent:grace".into(),
            at: t0(),
        })
        .then_expect_error(TicketError::Closed);
}

#[test]
fn feedback_needs_a_response_and_is_recorded_once() {
    let feedback = TicketCommand::RecordFeedback {
        helpful: true,
        comment: None,
        at: t0(),
    };
    Given::with(())
        .given(vec![opened(), received(1, "SM1")])
        .when(feedback.clone())
        .then_expect_error(TicketError::NoResponseYet);
    Given::with(())
        .given(vec![
            opened(),
            received(1, "SM1"),
            sent(20, None),
            TicketEvent::FeedbackReceived {
                helpful: false,
                comment: None,
                received_at: t0(),
            },
        ])
        .when(feedback)
        .then_expect_error(TicketError::FeedbackAlreadyRecorded);
}

#[test]
fn an_sla_breach_is_recorded_exactly_once_and_only_when_due() {
    let late = t0() + TimeDelta::minutes(3);
    let breached = TicketEvent::SlaBreached {
        kind: SlaKind::FirstResponse,
        due_at: t0() + TimeDelta::minutes(2),
        breached_at: late,
    };
    let record = |at| TicketCommand::RecordSlaBreach {
        kind: SlaKind::FirstResponse,
        at,
    };
    Given::with(())
        .given(vec![opened(), received(1, "SM1")])
        .when(record(late))
        .then_expect_events(vec![breached.clone()]);
    Given::with(())
        .given(vec![opened(), received(1, "SM1"), breached])
        .when(record(late))
        .then_expect_error(TicketError::SlaAlreadyBreached("first_response"));
    Given::with(())
        .given(vec![opened(), received(1, "SM1")])
        .when(record(t0() + TimeDelta::minutes(1)))
        .then_expect_error(TicketError::SlaNotBreached("first_response"));
    Given::with(())
        .given(vec![opened(), received(1, "SM1"), sent(20, None)])
        .when(record(late))
        .then_expect_error(TicketError::SlaNotBreached("first_response"));
}

#[test]
fn status_follows_the_lifecycle() {
    let mut ticket = state(vec![opened(), received(1, "SM1")]);
    assert_eq!(ticket.status, TicketStatus::Received);
    ticket.apply(drafted(10, 0.9));
    assert_eq!(ticket.status, TicketStatus::InProgress);
    ticket.apply(sent(20, Some(10)));
    assert_eq!(ticket.status, TicketStatus::Responded);
    ticket.apply(received(2, "SM2"));
    assert_eq!(ticket.status, TicketStatus::Received);
    ticket.apply(TicketEvent::TicketEscalated {
        escalation_id: id(40),
        in_reply_to: None,
        reason: EscalationReason::HumanRequested,
        note: None,
        escalated_at: t0(),
    });
    assert_eq!(ticket.status, TicketStatus::Escalated);
    // A holding reply does not take the ticket away from the human.
    ticket.apply(sent(21, None));
    assert_eq!(ticket.status, TicketStatus::Escalated);
    ticket.apply(TicketEvent::EscalationResolved {
        escalation_id: id(40),
        resolved_by: "agent:grace".into(),
        note: None,
        resolved_at: t0(),
    });
    assert_eq!(ticket.status, TicketStatus::InProgress);
    ticket.apply(resolved());
    assert_eq!(ticket.status, TicketStatus::Resolved);
    ticket.apply(closed());
    assert_eq!(ticket.status, TicketStatus::Closed);
}

#[test]
fn events_serialise_with_their_type_name() {
    let json = serde_json::to_value(opened()).unwrap();
    assert_eq!(json["type"], "TicketOpened");
    assert_eq!(json["channel"], "whatsapp");
    let back: TicketEvent = serde_json::from_value(json).unwrap();
    assert_eq!(back, opened());
}

#[test]
fn twilio_statuses_fold_into_delivery_states() {
    assert_eq!(
        "undelivered".parse::<DeliveryStatus>().unwrap(),
        DeliveryStatus::Failed
    );
    assert_eq!(
        "sending".parse::<DeliveryStatus>().unwrap(),
        DeliveryStatus::Sent
    );
    assert!("exploded".parse::<DeliveryStatus>().is_err());
}

#[test]
fn the_transcript_lists_messages_both_ways() {
    let entries = super::transcript(&[
        opened(),
        received(1, "SM1"),
        drafted(10, 0.9),
        sent(20, Some(10)),
    ]);
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0].direction, crate::Direction::Inbound);
    assert_eq!(entries[1].direction, crate::Direction::Outbound);
    assert_eq!(entries[1].body, "Go to Settings > Export.");
}

#[test]
fn a_customer_message_is_answered_or_escalated_once() {
    let drafted_for = |m: u128| TicketEvent::ResponseDrafted {
        draft_id: id(10),
        in_reply_to: Some(id(m)),
        body: "Go to Settings > Export.".into(),
        confidence: 0.9,
        sources: vec![],
        generated_by: "local".into(),
        drafted_at: t0(),
    };
    let given = vec![opened(), received(1, "SM1"), drafted_for(1)];
    assert!(state(given.clone()).is_handled(id(1)));
    Given::with(())
        .given(given.clone())
        .when(TicketCommand::DraftResponse {
            draft_id: id(11),
            in_reply_to: Some(id(1)),
            body: "again".into(),
            confidence: 0.9,
            sources: vec![],
            generated_by: "local".into(),
            at: t0(),
        })
        .then_expect_error(TicketError::AlreadyHandled(id(1)));
    Given::with(())
        .given(given)
        .when(TicketCommand::Escalate {
            escalation_id: id(40),
            in_reply_to: Some(id(1)),
            reason: EscalationReason::KnowledgeGap,
            note: None,
            at: t0(),
        })
        .then_expect_error(TicketError::AlreadyHandled(id(1)));
}

#[test]
fn the_email_thread_is_remembered_for_replies() {
    let ticket = state(vec![
        opened(),
        TicketEvent::CustomerMessageReceived {
            message_id: id(1),
            customer_id: id(CUSTOMER),
            channel: Channel::Email,
            channel_message_id: "m1".into(),
            body: "hi".into(),
            attachments: 0,
            thread: Some(EmailThread {
                thread_id: "t1".into(),
                message_id_header: Some("<m1@example.com>".into()),
                subject: Some("Invoices".into()),
            }),
            automated: None,
            received_at: t0(),
        },
    ]);
    assert_eq!(ticket.email_thread.unwrap().thread_id, "t1");
}

// Each customer message has its own workflow (issue 6, items 2, 5, 6, 13).

fn searched_for(m: u128, attempt: u32) -> TicketEvent {
    TicketEvent::KnowledgeSearched {
        in_reply_to: Some(id(m)),
        query: "export".into(),
        attempt,
        hits: vec![],
        searched_at: t0(),
    }
}

fn search_for(m: u128) -> TicketCommand {
    TicketCommand::RecordKnowledgeSearch {
        in_reply_to: Some(id(m)),
        query: "export".into(),
        hits: vec![],
        at: t0(),
    }
}

fn drafted_for(draft: u128, m: u128) -> TicketEvent {
    TicketEvent::ResponseDrafted {
        draft_id: id(draft),
        in_reply_to: Some(id(m)),
        body: "Go to Settings > Export.".into(),
        confidence: 0.9,
        sources: vec![],
        generated_by: "local".into(),
        drafted_at: t0(),
    }
}

fn escalated_for(escalation: u128, m: u128, reason: EscalationReason) -> TicketEvent {
    TicketEvent::TicketEscalated {
        escalation_id: id(escalation),
        in_reply_to: Some(id(m)),
        reason,
        note: None,
        escalated_at: t0(),
    }
}

const LIMIT: AutoReplyLimit = AutoReplyLimit { per_hour: 3 };

fn auto_send(response: u128, m: u128, at: DateTime<Utc>) -> TicketCommand {
    TicketCommand::SendResponse {
        response_id: id(response),
        draft_id: None,
        channel: Channel::Whatsapp,
        body: "A member of our team will look into it.".into(),
        parts: vec!["A member of our team will look into it.".into()],
        in_reply_to: Some(id(m)),
        automatic: Some(LIMIT),
        at,
        holding: false,
        template: None,
    }
}

fn auto_sent(response: u128, m: u128, at: DateTime<Utc>) -> TicketEvent {
    TicketEvent::ResponseSent {
        response_id: id(response),
        draft_id: None,
        channel: Channel::Whatsapp,
        body: "A member of our team will look into it.".into(),
        parts: vec!["A member of our team will look into it.".into()],
        in_reply_to: Some(id(m)),
        automatic: true,
        sent_at: at,
        holding: false,
        template: None,
    }
}

fn automated_received(n: u128, sid: &str, why: &str) -> TicketEvent {
    TicketEvent::CustomerMessageReceived {
        message_id: id(n),
        customer_id: id(CUSTOMER),
        channel: Channel::Email,
        channel_message_id: sid.into(),
        body: "I am out of the office until Monday.".into(),
        attachments: 0,
        thread: None,
        automated: Some(why.into()),
        received_at: t0(),
    }
}

#[test]
fn a_second_message_before_the_first_is_answered_has_its_own_search_budget() {
    let two_waiting = vec![
        opened(),
        received(1, "SM1"),
        received(2, "SM2"),
        searched_for(1, 1),
        searched_for(1, 2),
    ];
    // The first message's two searches leave the second's budget whole.
    Given::with(())
        .given(two_waiting.clone())
        .when(search_for(2))
        .then_expect_events(vec![searched_for(2, 1)]);
    Given::with(())
        .given(two_waiting.clone())
        .when(search_for(1))
        .then_expect_error(TicketError::TooManySearches { attempts: 2 });
    let ticket = state(two_waiting);
    assert_eq!(ticket.messages[&id(1)].searches, 2);
    assert_eq!(ticket.messages[&id(2)].searches, 0);
    // Searching for a message that is not on the ticket, or already
    // answered, is refused.
    Given::with(())
        .given(vec![opened(), received(1, "SM1")])
        .when(search_for(9))
        .then_expect_error(TicketError::UnknownMessage(id(9)));
    Given::with(())
        .given(vec![opened(), received(1, "SM1"), drafted_for(10, 1)])
        .when(search_for(1))
        .then_expect_error(TicketError::AlreadyHandled(id(1)));
}

#[test]
fn a_reply_answers_the_message_its_draft_answers_not_the_latest() {
    Given::with(())
        .given(vec![
            opened(),
            received(1, "SM1"),
            received(2, "SM2"),
            drafted_for(10, 1),
        ])
        .when(send(20, Some(10)))
        .then_expect_events(vec![sent(20, Some(10))]);
    let ticket = state(vec![
        opened(),
        received(1, "SM1"),
        received(2, "SM2"),
        drafted_for(10, 1),
        sent(20, Some(10)),
    ]);
    assert!(ticket.is_handled(id(1)));
    assert!(
        !ticket.is_handled(id(2)),
        "the second message still waits for its answer"
    );
    assert_eq!(ticket.messages[&id(1)].draft, Some(id(10)));
    assert_eq!(ticket.messages[&id(1)].replies, 1);
}

#[test]
fn an_escalation_marks_the_message_it_answers_as_handled() {
    let given = vec![
        opened(),
        received(1, "SM1"),
        escalated_for(40, 1, EscalationReason::RefundRequest),
    ];
    let ticket = state(given.clone());
    assert!(ticket.is_handled(id(1)));
    assert_eq!(ticket.messages[&id(1)].escalation, Some(id(40)));
    for command in [
        TicketCommand::Escalate {
            escalation_id: id(41),
            in_reply_to: Some(id(1)),
            reason: EscalationReason::RefundRequest,
            note: None,
            at: t0(),
        },
        TicketCommand::DraftResponse {
            draft_id: id(10),
            in_reply_to: Some(id(1)),
            body: "again".into(),
            confidence: 0.9,
            sources: vec![],
            generated_by: "local".into(),
            at: t0(),
        },
        TicketCommand::WithholdReply {
            in_reply_to: id(1),
            reason: WithholdReason::AutoReplyLimit,
            escalation_id: id(41),
            at: t0(),
        },
        search_for(1),
    ] {
        Given::with(())
            .given(given.clone())
            .when(command)
            .then_expect_error(TicketError::AlreadyHandled(id(1)));
    }
}

#[test]
fn a_second_message_on_an_escalated_ticket_goes_to_the_person_not_the_ai() {
    let given = vec![
        opened(),
        received(1, "SM1"),
        escalated_for(40, 1, EscalationReason::RefundRequest),
        received(2, "SM2"),
    ];
    // Staff already have the refund: no second escalation...
    Given::with(())
        .given(given.clone())
        .when(TicketCommand::Escalate {
            escalation_id: id(41),
            in_reply_to: Some(id(2)),
            reason: EscalationReason::RefundRequest,
            note: None,
            at: t0(),
        })
        .then_expect_events(vec![]);
    // ...and the AI may not answer the second message: a person holds it.
    let at = t0() + TimeDelta::seconds(5);
    Given::with(())
        .given(given.clone())
        .when(auto_send(20, 2, at))
        .then_expect_error(TicketError::WithHuman);
    Given::with(())
        .given(given)
        .when(TicketCommand::QueueForHuman {
            in_reply_to: id(2),
            acknowledgement: None,
            limit: LIMIT,
            at,
        })
        .then_expect_events(vec![TicketEvent::CustomerMessageQueuedForHuman {
            in_reply_to: id(2),
            assignee: None,
            queued_at: at,
        }]);
}

#[test]
fn an_automated_message_is_taken_in_with_its_reason_and_a_bad_reason_is_refused() {
    let receive_automated = |why: &str| TicketCommand::ReceiveCustomerMessage {
        message_id: id(1),
        customer_id: id(CUSTOMER),
        channel: Channel::Email,
        channel_message_id: "ooo-1".into(),
        body: "I am out of the office until Monday.".into(),
        attachments: 0,
        thread: None,
        automated: Some(why.into()),
        at: t0(),
    };
    Given::with(())
        .given(vec![opened()])
        .when(receive_automated("auto_submitted"))
        .then_expect_events(vec![automated_received(1, "ooo-1", "auto_submitted")]);
    for bad in ["", "Auto-Submitted: auto-replied", &"x".repeat(65)] {
        Given::with(())
            .given(vec![opened()])
            .when(receive_automated(bad))
            .then_expect_error(TicketError::InvalidAutomatedReason { max: 64 });
    }
    let ticket = state(vec![opened(), automated_received(1, "ooo-1", "bounce")]);
    assert_eq!(ticket.messages[&id(1)].automated.as_deref(), Some("bounce"));
}

#[test]
fn a_withheld_reply_escalates_silently_and_only_while_no_human_holds_the_ticket() {
    let withhold = |m: u128, escalation: u128| TicketCommand::WithholdReply {
        in_reply_to: id(m),
        reason: WithholdReason::AutomatedMessage,
        escalation_id: id(escalation),
        at: t0(),
    };
    let withheld = |m: u128| TicketEvent::AutoReplyWithheld {
        in_reply_to: id(m),
        reason: WithholdReason::AutomatedMessage,
        withheld_at: t0(),
    };
    let given = vec![opened(), automated_received(1, "ooo-1", "auto_submitted")];
    let escalation = TicketEvent::TicketEscalated {
        escalation_id: id(40),
        in_reply_to: Some(id(1)),
        reason: EscalationReason::AutomatedMessage,
        note: Some("automated message (auto_submitted); nothing was sent back".into()),
        escalated_at: t0(),
    };
    Given::with(())
        .given(given.clone())
        .when(withhold(1, 40))
        .then_expect_events(vec![withheld(1), escalation.clone()]);
    // A second automated message while staff have the first: recorded, no
    // second escalation.
    let mut after = given.clone();
    after.extend([
        withheld(1),
        escalation,
        automated_received(2, "ooo-2", "auto_submitted"),
    ]);
    Given::with(())
        .given(after.clone())
        .when(withhold(2, 41))
        .then_expect_events(vec![withheld(2)]);
    after.push(withheld(2));
    let ticket = state(after);
    assert!(ticket.is_handled(id(1)) && ticket.is_handled(id(2)));
    assert_eq!(
        ticket.messages[&id(2)].withheld,
        Some(WithholdReason::AutomatedMessage)
    );
    assert!(ticket.responses.is_empty(), "nothing went to the sender");
    Given::with(())
        .given(given)
        .when(withhold(7, 40))
        .then_expect_error(TicketError::UnknownMessage(id(7)));
}

#[test]
fn automatic_replies_are_capped_per_rolling_hour_from_the_tickets_own_events() {
    let minutes = |m| t0() + TimeDelta::minutes(m);
    let mut given = vec![opened()];
    for (i, m) in [(1u128, 0), (2, 10), (3, 20)] {
        given.push(received(i, &format!("SM{i}")));
        given.push(auto_sent(20 + i, i, minutes(m)));
    }
    given.push(received(4, "SM4"));
    let ticket = state(given.clone());
    assert_eq!(ticket.automatic_replies_within_hour(minutes(30)), 3);
    assert!(!ticket.may_reply_automatically(minutes(30), LIMIT));
    // The fourth automatic reply inside the hour is refused.
    Given::with(())
        .given(given.clone())
        .when(auto_send(30, 4, minutes(30)))
        .then_expect_error(TicketError::AutoReplyLimitReached { sent: 3, limit: 3 });
    // An hour after the first, one slot is free again.
    assert!(ticket.may_reply_automatically(minutes(61), LIMIT));
    Given::with(())
        .given(given.clone())
        .when(auto_send(30, 4, minutes(61)))
        .then_expect_events(vec![auto_sent(30, 4, minutes(61))]);
    // Replies staff wrote or approved are not automatic and not capped.
    Given::with(())
        .given(given.clone())
        .when(TicketCommand::SendResponse {
            response_id: id(31),
            draft_id: None,
            channel: Channel::Whatsapp,
            body: "Hi, Grace here.".into(),
            parts: vec!["Hi, Grace here.".into()],
            in_reply_to: Some(id(4)),
            automatic: None,
            at: minutes(30),
            holding: false,
            template: None,
        })
        .then_expect_events(vec![TicketEvent::ResponseSent {
            response_id: id(31),
            draft_id: None,
            channel: Channel::Whatsapp,
            body: "Hi, Grace here.".into(),
            parts: vec!["Hi, Grace here.".into()],
            in_reply_to: Some(id(4)),
            automatic: false,
            sent_at: minutes(30),
            holding: false,
            template: None,
        }]);
    // Past the cap the agent withholds and staff hear of it once.
    Given::with(())
        .given(given.clone())
        .when(TicketCommand::WithholdReply {
            in_reply_to: id(4),
            reason: WithholdReason::AutoReplyLimit,
            escalation_id: id(40),
            at: minutes(30),
        })
        .then_expect_events(vec![
            TicketEvent::AutoReplyWithheld {
                in_reply_to: id(4),
                reason: WithholdReason::AutoReplyLimit,
                withheld_at: minutes(30),
            },
            TicketEvent::TicketEscalated {
                escalation_id: id(40),
                in_reply_to: Some(id(4)),
                reason: EscalationReason::AutoReplyLimit,
                note: Some("3 automatic replies in the last hour; the agent stays silent".into()),
                escalated_at: minutes(30),
            },
        ]);
    // The ticket remembers a bounded number of automatic replies.
    let mut many = vec![opened(), received(1, "SM1")];
    for i in 0..(MAX_AUTO_REPLIES_PER_HOUR as u128 + 20) {
        many.push(auto_sent(1000 + i, 1, t0()));
    }
    assert_eq!(
        state(many).automatic_replies.len(),
        MAX_AUTO_REPLIES_PER_HOUR as usize
    );
}

#[test]
fn the_sla_breach_still_to_record_is_known_per_kind() {
    let late = t0() + TimeDelta::minutes(3);
    let breached = |kind| TicketEvent::SlaBreached {
        kind,
        due_at: t0(),
        breached_at: late,
    };
    let ticket = state(vec![opened(), received(1, "SM1")]);
    assert_eq!(
        ticket.unrecorded_sla_due(SlaKind::FirstResponse),
        Some(t0() + TimeDelta::minutes(2))
    );
    assert_eq!(
        ticket.unrecorded_sla_due(SlaKind::Resolution),
        Some(t0() + TimeDelta::hours(24))
    );
    let ticket = state(vec![
        opened(),
        received(1, "SM1"),
        breached(SlaKind::FirstResponse),
    ]);
    assert_eq!(ticket.unrecorded_sla_due(SlaKind::FirstResponse), None);
    assert!(ticket.unrecorded_sla_due(SlaKind::Resolution).is_some());
    let ticket = state(vec![opened(), received(1, "SM1"), sent(20, None)]);
    assert_eq!(ticket.unrecorded_sla_due(SlaKind::FirstResponse), None);
    let ticket = state(vec![opened(), received(1, "SM1"), resolved()]);
    assert_eq!(ticket.unrecorded_sla_due(SlaKind::Resolution), None);
    assert_eq!(ticket.unrecorded_sla_due(SlaKind::FirstResponse), None);
}

#[test]
fn events_and_state_stored_before_these_fields_still_read() {
    let old: Vec<serde_json::Value> = vec![
        serde_json::json!({"type": "CustomerMessageReceived", "message_id": id(1), "customer_id": id(CUSTOMER),
            "channel": "whatsapp", "channel_message_id": "SM1", "body": "hi", "attachments": 0,
            "received_at": "2026-11-24T10:00:00Z"}),
        serde_json::json!({"type": "KnowledgeSearched", "query": "export", "attempt": 1, "hits": [],
            "searched_at": "2026-11-24T10:00:00Z"}),
        serde_json::json!({"type": "ResponseSent", "response_id": id(20), "draft_id": null, "channel": "whatsapp",
            "body": "b", "parts": ["b"], "in_reply_to": id(1), "sent_at": "2026-11-24T10:00:30Z"}),
    ];
    let events: Vec<TicketEvent> = old
        .into_iter()
        .map(|v| serde_json::from_value(v).expect("an old event reads"))
        .collect();
    assert!(matches!(
        &events[0],
        TicketEvent::CustomerMessageReceived {
            automated: None,
            ..
        }
    ));
    let mut all = vec![opened()];
    all.extend(events);
    let ticket = state(all);
    assert_eq!(ticket.messages[&id(1)].searches, 1);
    assert!(ticket.automatic_replies.is_empty());
    // New fields are left out of a person's message, so its payload is
    // what it always was.
    let json = serde_json::to_value(received(1, "SM1")).unwrap();
    assert!(json.get("automated").is_none());
    // A read model's stored state from before still folds.
    let mut stored = serde_json::to_value(state(vec![opened()])).unwrap();
    let object = stored.as_object_mut().unwrap();
    object.remove("messages");
    object.remove("automatic_replies");
    object.insert("searches_for_last_message".into(), 1.into());
    let back: Ticket = serde_json::from_value(stored).expect("old state reads");
    assert!(back.messages.is_empty());
}

#[test]
fn feedback_on_an_answered_ticket_is_received_even_once_closed() {
    let feedback = TicketCommand::RecordFeedback {
        helpful: true,
        comment: Some("Clear, thanks".into()),
        at: t0(),
    };
    let expected = vec![TicketEvent::FeedbackReceived {
        helpful: true,
        comment: Some("Clear, thanks".into()),
        received_at: t0(),
    }];
    Given::with(())
        .given(vec![opened(), received(1, "SM1"), sent(20, None)])
        .when(feedback.clone())
        .then_expect_events(expected.clone());
    Given::with(())
        .given(vec![opened(), received(1, "SM1"), sent(20, None), closed()])
        .when(feedback)
        .then_expect_events(expected);
}

#[test]
fn feedback_stored_under_its_old_name_still_reads() {
    let old = serde_json::json!({
        "type": "FeedbackRecorded", "helpful": false, "comment": null,
        "recorded_at": "2026-11-24T10:00:00Z"
    });
    let event: TicketEvent = serde_json::from_value(old).expect("the old name reads");
    assert_eq!(event.name(), "FeedbackReceived");
    assert_eq!(
        state(vec![opened(), sent(20, None), event]).feedback,
        Some(false)
    );
}
