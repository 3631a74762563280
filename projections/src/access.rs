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
/// or drop it when done (it never writes: it is `READ ONLY`, `casebook_api`
/// has no write grant and the policies refuse its writes).
///
/// The `BEGIN` and the scope go in one round trip (one simple-protocol
/// message), so a scoped read costs what an unscoped one does. A simple
/// query takes no bound parameters, so the statement is built only from
/// values that cannot carry SQL: the role must be one of the known role
/// names (anything else becomes `none`, which the policies let read
/// nothing) and the customer is a parsed UUID.
pub async fn begin_scoped(
    pool: &PgPool,
    scope: &ReadScope,
) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    pool.begin_with(scope_statement(scope)).await
}

/// The roles whose names the policies know.
const KNOWN_ROLES: [&str; 5] = ["customer", "agent", "supervisor", "analyst", "auditor"];

fn scope_statement(scope: &ReadScope) -> String {
    let role = KNOWN_ROLES
        .iter()
        .find(|r| **r == scope.role)
        .copied()
        .unwrap_or("none");
    // `set_config('role', …, true)` is `SET LOCAL ROLE` (same membership
    // check).
    let customer = scope
        .customer_id
        .map(|c| c.hyphenated().to_string())
        .unwrap_or_default();
    format!(
        "BEGIN READ ONLY; SELECT set_config('role', 'casebook_api', true), \
         set_config('casebook.role', '{role}', true), \
         set_config('casebook.customer_id', '{customer}', true)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scope_statement_carries_only_known_roles_and_uuids() {
        let id = Uuid::parse_str("6f1c2a9e-0d4b-4c41-9d7e-2b8f3a1c5e70").unwrap();
        let s = scope_statement(&ReadScope::customer(id));
        assert!(s.contains("'casebook.role', 'customer'"));
        assert!(s.contains("'casebook.customer_id', '6f1c2a9e-0d4b-4c41-9d7e-2b8f3a1c5e70'"));
        let hostile = scope_statement(&ReadScope::staff("agent', true); DROP TABLE events; --"));
        assert!(hostile.contains("'casebook.role', 'none'"));
        assert!(!hostile.contains("DROP"));
        assert!(
            scope_statement(&ReadScope::staff("auditor")).contains("'casebook.customer_id', ''")
        );
    }
}
