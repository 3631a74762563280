use async_trait::async_trait;
use casebook_domain::identity::IdentityKey;
use casebook_domain::{CustomerEvent, EventEnvelope};
use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::projector::{decode_or_skip, ProjectionError, Projector};

/// `crm_customer_identifiers`: which customer an email address, phone
/// number or WhatsApp id belongs to.
pub struct IdentifiersProjector;

async fn link(
    tx: &mut PgConnection,
    customer_id: Uuid,
    identity: &IdentityKey,
    at: DateTime<Utc>,
) -> Result<(), ProjectionError> {
    sqlx::query(
        "INSERT INTO crm_customer_identifiers (kind, value, customer_id, linked_at) VALUES ($1, $2, $3, $4)
         ON CONFLICT (kind, value) DO NOTHING",
    )
    .bind(identity.kind.as_str())
    .bind(&identity.value)
    .bind(customer_id)
    .bind(at)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

#[async_trait]
impl Projector for IdentifiersProjector {
    fn name(&self) -> &'static str {
        "crm-customer-identifiers"
    }

    fn aggregate_types(&self) -> &'static [&'static str] {
        &["customer"]
    }

    fn tables(&self) -> &'static [&'static str] {
        &["crm_customer_identifiers"]
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        events: &[EventEnvelope],
    ) -> Result<(), ProjectionError> {
        for e in events {
            match decode_or_skip::<CustomerEvent>(self.name(), e) {
                Some(CustomerEvent::CustomerRegistered {
                    customer_id,
                    identities,
                    registered_at,
                    ..
                }) => {
                    for identity in &identities {
                        link(tx, customer_id, identity, registered_at).await?;
                    }
                }
                Some(CustomerEvent::IdentityLinked {
                    customer_id,
                    identity,
                    linked_at,
                }) => link(tx, customer_id, &identity, linked_at).await?,
                Some(CustomerEvent::CustomerNameUpdated { .. }) | None => {}
            }
        }
        Ok(())
    }
}
