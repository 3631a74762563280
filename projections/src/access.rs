//! Reading read models on a caller's behalf, under row-level security.
//!
//! `begin_scoped` opens a transaction that runs (`SET LOCAL ROLE`) as the
//! non-owner role `casebook_api` (SELECT on the read models, nothing else)
//! with the caller's role and customer id as transaction-local settings
//! (`casebook.role`, `casebook.customer_id`); the policies of
//! `migrations/20261126000003_row_level_security.sql` then decide, in
//! Postgres, which rows the caller sees. A customer sees their own rows;
//! staff roles read everything; a scope naming no known role sees nothing.
//! Everything is reset when the transaction ends, so a pooled connection
//! goes back to the pool as the owner with no scope (what projectors need).

use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

/// Who a read is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadScope {
    /// `customer`, `agent`, `supervisor`, `analyst` or `auditor` (any other
    /// value reads nothing).
    pub role: String,
    /// The customer whose rows a `customer` sees; without one, a customer
    /// sees nothing. Ignored by the policies for staff roles.
    pub customer_id: Option<Uuid>,
}

impl ReadScope {
    /// The owner of `customer_id`'s tickets (a customer bearer token, or a
    /// ticket's status token once the ticket's customer is known).
    pub fn customer(customer_id: Uuid) -> Self {
        Self {
            role: "customer".into(),
            customer_id: Some(customer_id),
        }
    }

    /// A staff role (`agent`, `supervisor`, `analyst`, `auditor`).
    pub fn staff(role: &str) -> Self {
        Self {
            role: role.to_string(),
            customer_id: None,
        }
    }
}

/// Begins a transaction that reads as `casebook_api` within `scope`. Commit
/// or drop it when done (it never writes: `casebook_api` has no write grant
/// and the policies refuse its writes).
pub async fn begin_scoped(
    pool: &PgPool,
    scope: &ReadScope,
) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    // `set_config('role', …, true)` is `SET LOCAL ROLE` (same membership
    // check), in the same round trip as the scope. The role is a fixed
    // identifier; the caller's values are bound parameters, never part of
    // the statement text.
    let customer = scope.customer_id.map(|c| c.to_string()).unwrap_or_default();
    sqlx::query(
        "SELECT set_config('role', 'casebook_api', true),
                set_config('casebook.role', $1, true),
                set_config('casebook.customer_id', $2, true)",
    )
    .bind(&scope.role)
    .bind(customer)
    .execute(&mut *tx)
    .await?;
    Ok(tx)
}
