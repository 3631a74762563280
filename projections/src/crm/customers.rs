use std::collections::HashMap;

use async_trait::async_trait;
use casebook_domain::{CustomerEvent, EventEnvelope};
use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::projector::{decode_or_skip, ProjectionError, Projector};

/// `crm_customers`: one row per customer.
pub struct CustomersProjector;

#[async_trait]
impl Projector for CustomersProjector {
    fn name(&self) -> &'static str {
        "crm-customers"
    }

    fn aggregate_types(&self) -> &'static [&'static str] {
        &["customer"]
    }

    fn tables(&self) -> &'static [&'static str] {
        &["crm_customers"]
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        events: &[EventEnvelope],
    ) -> Result<(), ProjectionError> {
        // The batch folded per customer, then two statements: the rows of
        // customers registered in it, and the changes to the others.
        let mut order: Vec<Uuid> = Vec::new();
        let mut rows: HashMap<Uuid, Folded> = HashMap::new();
        for e in events {
            let Some(event) = decode_or_skip::<CustomerEvent>(self.name(), e) else {
                continue;
            };
            let (customer_id, at) = match &event {
                CustomerEvent::CustomerRegistered {
                    customer_id,
                    registered_at,
                    ..
                } => (*customer_id, *registered_at),
                CustomerEvent::CustomerNameUpdated {
                    customer_id,
                    updated_at,
                    ..
                } => (*customer_id, *updated_at),
                CustomerEvent::IdentityLinked {
                    customer_id,
                    linked_at,
                    ..
                } => (*customer_id, *linked_at),
            };
            let row = rows.entry(customer_id).or_insert_with(|| {
                order.push(customer_id);
                Folded::default()
            });
            row.updated_at = Some(at);
            match event {
                CustomerEvent::CustomerRegistered { name, .. } => {
                    row.registered_at = Some(at);
                    row.name = Some(name);
                }
                CustomerEvent::CustomerNameUpdated { name, .. } => row.name = Some(Some(name)),
                CustomerEvent::IdentityLinked { .. } => {}
            }
        }
        let mut new = Columns::default();
        let mut changed = Columns::default();
        for id in order {
            let row = &rows[&id];
            let Some(updated_at) = row.updated_at else {
                continue;
            };
            match row.registered_at {
                Some(created_at) => {
                    new.push(id, row.name.clone().flatten(), true, created_at, updated_at)
                }
                None => changed.push(
                    id,
                    row.name.clone().flatten(),
                    row.name.is_some(),
                    updated_at,
                    updated_at,
                ),
            }
        }
        if !new.customer_id.is_empty() {
            sqlx::query(
                "INSERT INTO crm_customers (customer_id, name, created_at, updated_at)
                 SELECT customer_id, name, created_at, updated_at
                   FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::timestamptz[])
                        AS t(customer_id, name, created_at, updated_at)
                 ON CONFLICT (customer_id) DO NOTHING",
            )
            .bind(&new.customer_id)
            .bind(&new.name)
            .bind(&new.created_at)
            .bind(&new.updated_at)
            .execute(&mut *tx)
            .await?;
        }
        if !changed.customer_id.is_empty() {
            sqlx::query(
                "UPDATE crm_customers c
                    SET name = CASE WHEN t.set_name THEN t.name ELSE c.name END, updated_at = t.updated_at
                   FROM unnest($1::uuid[], $2::text[], $3::bool[], $4::timestamptz[])
                        AS t(customer_id, name, set_name, updated_at)
                  WHERE c.customer_id = t.customer_id",
            )
            .bind(&changed.customer_id)
            .bind(&changed.name)
            .bind(&changed.set_name)
            .bind(&changed.updated_at)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }
}

/// One customer's events of a batch, folded.
#[derive(Default)]
struct Folded {
    /// Registered in this batch, at.
    registered_at: Option<DateTime<Utc>>,
    /// The name the batch leaves, when it sets one.
    name: Option<Option<String>>,
    /// The time of its last event.
    updated_at: Option<DateTime<Utc>>,
}

#[derive(Default)]
struct Columns {
    customer_id: Vec<Uuid>,
    name: Vec<Option<String>>,
    set_name: Vec<bool>,
    created_at: Vec<DateTime<Utc>>,
    updated_at: Vec<DateTime<Utc>>,
}

impl Columns {
    fn push(
        &mut self,
        id: Uuid,
        name: Option<String>,
        set_name: bool,
        created_at: DateTime<Utc>,
        updated_at: DateTime<Utc>,
    ) {
        self.customer_id.push(id);
        self.name.push(name);
        self.set_name.push(set_name);
        self.created_at.push(created_at);
        self.updated_at.push(updated_at);
    }
}
