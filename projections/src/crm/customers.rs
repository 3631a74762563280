use async_trait::async_trait;
use casebook_domain::{CustomerEvent, EventEnvelope};
use sqlx::PgConnection;

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
        for e in events {
            let Some(event) = decode_or_skip::<CustomerEvent>(self.name(), e) else {
                continue;
            };
            match event {
                CustomerEvent::CustomerRegistered {
                    customer_id,
                    name,
                    registered_at,
                    ..
                } => {
                    sqlx::query(
                        "INSERT INTO crm_customers (customer_id, name, created_at, updated_at) VALUES ($1, $2, $3, $3)
                         ON CONFLICT (customer_id) DO NOTHING",
                    )
                    .bind(customer_id)
                    .bind(name)
                    .bind(registered_at)
                    .execute(&mut *tx)
                    .await?;
                }
                CustomerEvent::CustomerNameUpdated {
                    customer_id,
                    name,
                    updated_at,
                } => {
                    sqlx::query("UPDATE crm_customers SET name = $2, updated_at = $3 WHERE customer_id = $1")
                        .bind(customer_id)
                        .bind(name)
                        .bind(updated_at)
                        .execute(&mut *tx)
                        .await?;
                }
                CustomerEvent::IdentityLinked {
                    customer_id,
                    linked_at,
                    ..
                } => {
                    sqlx::query("UPDATE crm_customers SET updated_at = $2 WHERE customer_id = $1")
                        .bind(customer_id)
                        .bind(linked_at)
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
        Ok(())
    }
}
