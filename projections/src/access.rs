//! Interim (replaced by the sessions branch at merge): a read transaction
//! carrying the viewer's role and customer id as settings.

use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadScope {
    pub role: String,
    pub customer_id: Option<Uuid>,
}

pub async fn begin_scoped(
    pool: &PgPool,
    scope: &ReadScope,
) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT set_config('casebook.role', $1, true), set_config('casebook.customer_id', $2, true)")
        .bind(&scope.role)
        .bind(scope.customer_id.map(|c| c.to_string()).unwrap_or_default())
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}
