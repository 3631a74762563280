//! Projectors against the event store: a gap in a stream is filled from the
//! store, and a rebuild pages behind the snapshot-xmin barrier.

use std::sync::Arc;

use async_trait::async_trait;
use casebook::app::Role;
use casebook_commands::EventStore;
use casebook_domain::{
    Actor, Category, Channel, EventEnvelope, EventMetadata, Priority, Ticket, TicketCommand,
};
use casebook_projections::store::{stored_event, EVENT_COLUMNS};
use casebook_projections::{apply_batch, ProjectionError, Projector};
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::common::TestApp;

fn meta() -> EventMetadata {
    EventMetadata::new("projector-test", Actor::system("test"))
}

async fn ticket_with_two_messages(store: &EventStore) -> Uuid {
    let id = Uuid::new_v4();
    let customer_id = Uuid::new_v4();
    let key = id.to_string();
    let at = chrono::Utc::now();
    store
        .execute::<Ticket>(
            &key,
            TicketCommand::Open {
                ticket_id: id,
                customer_id,
                channel: Channel::Webform,
                subject: Some("Export".into()),
                category: Category::General,
                priority: Priority::Low,
                at,
                previous_ticket_id: None,
            },
            &meta(),
        )
        .await
        .unwrap();
    for (n, body) in ["first question", "second question"].iter().enumerate() {
        store
            .execute::<Ticket>(
                &key,
                TicketCommand::ReceiveCustomerMessage {
                    message_id: Uuid::new_v4(),
                    customer_id,
                    channel: Channel::Webform,
                    channel_message_id: format!("{id}-{n}"),
                    body: body.to_string(),
                    attachments: 0,
                    thread: None,
                    automated: None,
                    at,
                },
                &meta(),
            )
            .await
            .unwrap();
    }
    id
}

async fn stream(pool: &PgPool, id: Uuid) -> Vec<EventEnvelope> {
    let rows = sqlx::query(&format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE aggregate_id = $1 ORDER BY sequence"
    ))
    .bind(id.to_string())
    .fetch_all(pool)
    .await
    .unwrap();
    rows.iter()
        .map(|r| stored_event(r).unwrap().into())
        .collect()
}

fn messages_projector() -> Arc<dyn Projector> {
    casebook_projections::all_projectors()
        .into_iter()
        .find(|p| p.name() == "crm-messages")
        .expect("the messages projector exists")
}

async fn messages_of(pool: &PgPool, id: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM crm_messages WHERE ticket_id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_in_a_stream_is_filled_from_the_store_not_made_permanent() {
    // No projector runs: the test hands batches to one itself.
    let app = TestApp::spawn_with(&[Role::Api], &[]).await;
    let store = EventStore::new(app.pool().clone());
    let id = ticket_with_two_messages(&store).await;
    let events = stream(app.pool(), id).await;
    assert_eq!(events.len(), 3);
    let projector = messages_projector();

    // Sequence 2 has not arrived when 3 does.
    let applied = apply_batch(
        app.pool(),
        projector.as_ref(),
        &[events[0].clone(), events[2].clone()],
        &[],
    )
    .await
    .unwrap();
    assert_eq!(applied, 3, "the missing event was read from the store");
    assert_eq!(
        messages_of(app.pool(), id).await,
        2,
        "both messages are in the read model"
    );

    // When 2 arrives late, it is recognised as applied.
    let applied = apply_batch(app.pool(), projector.as_ref(), &[events[1].clone()], &[])
        .await
        .unwrap();
    assert_eq!(applied, 0);
    assert_eq!(messages_of(app.pool(), id).await, 2);
    app.stop().await;
}

/// A projector that records what a rebuild applied, and on its first batch
/// commits a transaction the test held open (a writer that took its
/// position early and commits late).
struct Probe {
    late: Mutex<Option<Transaction<'static, Postgres>>>,
}

#[async_trait]
impl Projector for Probe {
    fn name(&self) -> &'static str {
        "rebuild-probe"
    }

    fn aggregate_types(&self) -> &'static [&'static str] {
        &["probe"]
    }

    fn tables(&self) -> &'static [&'static str] {
        &["rebuild_probe"]
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        events: &[EventEnvelope],
    ) -> Result<(), ProjectionError> {
        if let Some(late) = self.late.lock().await.take() {
            late.commit().await?;
        }
        for e in events {
            sqlx::query("INSERT INTO rebuild_probe (aggregate_id) VALUES ($1)")
                .bind(&e.aggregate_id)
                .execute(&mut *tx)
                .await?;
        }
        Ok(())
    }
}

async fn insert_probe(conn: &mut PgConnection, id: &str) {
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ('probe', $1, 1, 'Probe', '1', '{}', '{}')",
    )
    .bind(id)
    .execute(conn)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_does_not_skip_a_transaction_that_commits_late() {
    let app = TestApp::spawn_with(&[Role::Api], &[]).await;
    let pool = app.pool().clone();
    sqlx::query("CREATE TABLE rebuild_probe (aggregate_id text NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    insert_probe(&mut conn, "before").await;
    // Takes its position now, commits during the rebuild.
    let mut late = pool.begin().await.unwrap();
    insert_probe(&mut late, "late").await;
    insert_probe(&mut conn, "after-1").await;
    insert_probe(&mut conn, "after-2").await;
    drop(conn);

    let probe: Arc<dyn Projector> = Arc::new(Probe {
        late: Mutex::new(Some(late)),
    });
    // Two events a page: position order alone would read "before" and
    // "after-1" first, then continue past "late" once it is visible.
    casebook_replay::rebuild_paged(&pool, &[probe], 2)
        .await
        .unwrap();
    let mut rebuilt: Vec<String> = sqlx::query_scalar("SELECT aggregate_id FROM rebuild_probe")
        .fetch_all(&pool)
        .await
        .unwrap();
    rebuilt.sort();
    assert_eq!(rebuilt, vec!["after-1", "after-2", "before", "late"]);
    app.stop().await;
}
