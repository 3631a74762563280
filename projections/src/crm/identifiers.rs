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

/// The identifiers of a batch, first link first: one statement for all.
#[derive(Default)]
struct Links {
    kind: Vec<&'static str>,
    value: Vec<String>,
    customer_id: Vec<Uuid>,
    linked_at: Vec<DateTime<Utc>>,
}

impl Links {
    fn push(&mut self, customer_id: Uuid, identity: &IdentityKey, at: DateTime<Utc>) {
        self.kind.push(identity.kind.as_str());
        self.value.push(identity.value.clone());
        self.customer_id.push(customer_id);
        self.linked_at.push(at);
    }

    /// An identifier belongs to the customer it was first linked to: a
    /// later link (in this batch or stored) changes nothing.
    async fn insert(self, tx: &mut PgConnection) -> Result<(), ProjectionError> {
        if self.kind.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO crm_customer_identifiers (kind, value, customer_id, linked_at)
             SELECT kind, value, customer_id, linked_at
               FROM unnest($1::text[], $2::text[], $3::uuid[], $4::timestamptz[])
                    WITH ORDINALITY AS t(kind, value, customer_id, linked_at, n)
              ORDER BY n
             ON CONFLICT (kind, value) DO NOTHING",
        )
        .bind(self.kind)
        .bind(self.value)
        .bind(self.customer_id)
        .bind(self.linked_at)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
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

    /// Identifiers are written by (kind, value).
    fn reader_indexes(&self) -> &'static [&'static str] {
        &["crm_customer_identifiers_customer_idx"]
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        events: &[EventEnvelope],
    ) -> Result<(), ProjectionError> {
        let mut links = Links::default();
        for e in events {
            match decode_or_skip::<CustomerEvent>(self.name(), e) {
                Some(CustomerEvent::CustomerRegistered {
                    customer_id,
                    identities,
                    registered_at,
                    ..
                }) => {
                    for identity in &identities {
                        links.push(customer_id, identity, registered_at);
                    }
                }
                Some(CustomerEvent::IdentityLinked {
                    customer_id,
                    identity,
                    linked_at,
                }) => links.push(customer_id, &identity, linked_at),
                Some(CustomerEvent::CustomerNameUpdated { .. }) | None => {}
            }
        }
        links.insert(tx).await
    }
}
