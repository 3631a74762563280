//! The SLA monitor never goes blind (issue 6, item 13): however many
//! tickets already have their breaches recorded, a new breach is found.

use std::time::Duration;

use casebook_commands::sla::{check_once, BATCH};
use casebook_commands::EventStore;
use casebook_domain::sla::SlaKind;
use casebook_domain::{Actor, Category, Channel, EventMetadata, Priority, Ticket, TicketCommand};
use chrono::{TimeDelta, Utc};
use futures::StreamExt;
use uuid::Uuid;

use crate::common::{eventually, TestApp};

const WAIT: Duration = Duration::from_secs(120);

async fn open(store: &EventStore, ticket: Uuid, opened_ago: TimeDelta) {
    store
        .execute::<Ticket>(
            &ticket.to_string(),
            TicketCommand::Open {
                ticket_id: ticket,
                customer_id: Uuid::new_v4(),
                channel: Channel::Whatsapp,
                subject: None,
                category: Category::General,
                priority: Priority::Medium,
                at: Utc::now() - opened_ago,
                previous_ticket_id: None,
            },
            &EventMetadata::new("sla-test", Actor::system("test")),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_breach_is_found_behind_more_than_a_batch_of_recorded_ones() {
    let app = TestApp::spawn().await;
    let store = EventStore::new(app.pool().clone());
    let meta = EventMetadata::new("sla-test", Actor::system("sla-monitor"));
    // More than a pass's batch of open tickets, long overdue, each with its
    // first-response breach already recorded.
    let old = BATCH as usize + 20;
    futures::stream::iter(0..old)
        .for_each_concurrent(8, |_| {
            let (store, meta) = (store.clone(), meta.clone());
            async move {
                let ticket = Uuid::now_v7();
                open(&store, ticket, TimeDelta::hours(3)).await;
                store
                    .execute::<Ticket>(
                        &ticket.to_string(),
                        TicketCommand::RecordSlaBreach {
                            kind: SlaKind::FirstResponse,
                            at: Utc::now(),
                        },
                        &meta,
                    )
                    .await
                    .unwrap();
            }
        })
        .await;
    // Then one ticket whose first response is overdue, due later than all
    // of those.
    let new = Uuid::now_v7();
    open(&store, new, TimeDelta::minutes(10)).await;
    let pool = app.pool().clone();
    eventually("every ticket and breach projected", WAIT, || {
        let pool = pool.clone();
        async move {
            let (tickets, breached): (i64, i64) = sqlx::query_as(
                "SELECT count(*), count(*) FILTER (WHERE state->'sla_breaches' ? 'first_response') FROM crm_tickets",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            (tickets == old as i64 + 1 && breached == old as i64).then_some(())
        }
    })
    .await;

    assert_eq!(check_once(&store, app.pool()).await.unwrap(), 1);
    let breaches: Vec<(String, String)> = sqlx::query_as(
        "SELECT aggregate_id, payload->>'kind' FROM events WHERE event_type = 'SlaBreached' AND aggregate_id = $1",
    )
    .bind(new.to_string())
    .fetch_all(app.pool())
    .await
    .unwrap();
    assert_eq!(breaches, vec![(new.to_string(), "first_response".into())]);
    // Once projected, the recorded breach leaves the monitor's index.
    eventually("the new breach projected", WAIT, || {
        let pool = pool.clone();
        async move {
            let left: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM crm_tickets WHERE sla_breach_due_at IS NOT NULL AND sla_breach_due_at < now()",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            (left == 0).then_some(())
        }
    })
    .await;
    assert_eq!(check_once(&store, app.pool()).await.unwrap(), 0);
    app.stop().await;
}
