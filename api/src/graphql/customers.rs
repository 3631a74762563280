//! Customers: by id or by an email address or phone number, with their
//! identifiers and their tickets on every channel.

use async_graphql::{Context, Object, ID};
use casebook_domain::identity::IdentityKey;
use casebook_projections::staff::{self, CustomerRow, IdentifierRow};
use chrono::{DateTime, Utc};
use std::sync::Arc;
use uuid::Uuid;

use super::context::{bad_input, db, internal, viewer};
use super::loaders::loaders;
use super::tickets::Ticket;
use super::types::{shown_identifier, IdentifierKind};

/// A customer, with their identifiers when the read that found them brought
/// those too (a page of tickets with its customers): then `emails` and
/// `phones` need no loader.
#[derive(Clone, Debug)]
pub struct Customer(pub CustomerRow, pub(crate) Option<Arc<[IdentifierRow]>>);

impl From<CustomerRow> for Customer {
    fn from(row: CustomerRow) -> Self {
        Customer(row, None)
    }
}

impl Customer {
    async fn identifiers(
        &self,
        ctx: &Context<'_>,
        email: bool,
    ) -> async_graphql::Result<Vec<String>> {
        let masked = viewer(ctx)?.masks_pii();
        let shown = |all: &[IdentifierRow]| {
            all.iter()
                .filter(|i| (i.kind == "email") == email)
                .map(|i| shown_identifier(&i.kind, &i.value, masked))
                .collect()
        };
        if let Some(known) = &self.1 {
            return Ok(shown(known));
        }
        let loaders = loaders(ctx)?;
        Ok(shown(
            &loaders
                .identifiers
                .load_one(self.0.customer_id)
                .await
                .map_err(internal)?
                .unwrap_or_default(),
        ))
    }
}

#[Object]
impl Customer {
    async fn id(&self) -> ID {
        ID(self.0.customer_id.to_string())
    }

    async fn name(&self) -> Option<&str> {
        self.0.name.as_deref()
    }

    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }

    /// Proven email addresses (masked for analysts).
    async fn emails(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<String>> {
        self.identifiers(ctx, true).await
    }

    /// Proven phone numbers, WhatsApp included (masked for analysts).
    async fn phones(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<String>> {
        self.identifiers(ctx, false).await
    }

    /// Every ticket of this customer on any channel, newest first (the
    /// latest 100).
    #[graphql(complexity = "10 * child_complexity")]
    async fn tickets(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<Ticket>> {
        let loaders = loaders(ctx)?;
        Ok(loaders
            .customer_tickets
            .load_one(self.0.customer_id)
            .await
            .map_err(internal)?
            .unwrap_or_default()
            .into_iter()
            .map(Ticket::from)
            .collect())
    }
}

#[derive(Default)]
pub struct CustomerQuery;

#[Object]
impl CustomerQuery {
    /// A customer; null when unknown or not the caller's to see.
    async fn customer(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Option<Customer>> {
        let Ok(id) = id.parse::<Uuid>() else {
            return Ok(None);
        };
        if !viewer(ctx)?.may_see_customer(id) {
            return Ok(None);
        }
        let loaders = loaders(ctx)?;
        Ok(loaders
            .customers
            .load_one(id)
            .await
            .map_err(internal)?
            .map(Customer::from))
    }

    /// The customer who proved this email address or phone number.
    async fn customer_by_identifier(
        &self,
        ctx: &Context<'_>,
        kind: IdentifierKind,
        value: String,
    ) -> async_graphql::Result<Option<Customer>> {
        let v = viewer(ctx)?;
        // Stored identifiers are normalised: look up the same form.
        let key = match kind {
            IdentifierKind::Email => IdentityKey::email(&value),
            IdentifierKind::Phone if value.trim().starts_with("whatsapp:") => {
                IdentityKey::whatsapp(&value)
            }
            IdentifierKind::Phone => IdentityKey::phone(&value),
        }
        .map_err(|_| {
            bad_input(format!(
                "not a valid {}",
                if kind == IdentifierKind::Email {
                    "email address"
                } else {
                    "phone number"
                }
            ))
        })?;
        let db = db(ctx)?;
        let mut tx = db.begin().await.map_err(internal)?;
        let found = staff::customer_by_identifier(&mut tx, kind.db_kinds(), &key.value)
            .await
            .map_err(internal)?;
        tx.commit().await.map_err(internal)?;
        let Some(id) = found.filter(|id| v.may_see_customer(*id)) else {
            return Ok(None);
        };
        let loaders = loaders(ctx)?;
        Ok(loaders
            .customers
            .load_one(id)
            .await
            .map_err(internal)?
            .map(Customer::from))
    }
}
