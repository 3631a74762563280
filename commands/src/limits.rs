//! Rate limits kept in Postgres, so that they hold across replicas: at most
//! `limit` acts per key in any sliding `window` (web-form submissions per
//! email address, automatic emails per recipient).
//!
//! One short transaction per check: an advisory lock on the key serialises
//! concurrent checks of the same key (on any replica), the key's rows older
//! than the window go, the rest are counted, and a row is added only when
//! the act is allowed. Keys are SHA-256 hashes of what they limit, so the
//! table holds no address.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::PgPool;

use crate::store::StoreError;

/// Web-form submissions naming one email address.
pub const WEBFORM_EMAIL: &str = "webform-email";
/// Automatic emails (acknowledgements, AI replies) to one recipient.
pub const AUTOMATIC_EMAIL: &str = "automatic-email";

/// How often (in checks) rows of idle keys are swept.
const SWEEP_EVERY: u64 = 256;
/// Rows older than this are swept whatever their scope.
const SWEEP_AFTER: &str = "1 day";

static CHECKS: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub max: u32,
    pub window: Duration,
}

impl Limit {
    pub const fn per_hour(max: u32) -> Self {
        Self {
            max,
            window: Duration::from_secs(3600),
        }
    }
}

/// The answer to one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// Over the limit; the next act is allowed after this long.
    Limited {
        retry_after: Duration,
    },
}

/// The key of `value` in `scope`: a hash, never the value.
pub fn key(value: &str) -> String {
    hex::encode(Sha256::digest(value.trim().to_lowercase().as_bytes()))
}

/// Counts one act of `value` in `scope` if the limit allows it. A limit of
/// 0 turns the check off.
pub async fn take(
    pool: &PgPool,
    scope: &str,
    value: &str,
    limit: Limit,
) -> Result<Decision, StoreError> {
    if limit.max == 0 {
        return Ok(Decision::Allowed);
    }
    let key = key(value);
    let window_secs = limit.window.as_secs_f64();
    let mut tx = pool.begin().await?;
    // A hit lost in a crash only lets one more request through: the commit
    // need not wait for the WAL to reach the disk.
    sqlx::query("SET LOCAL synchronous_commit TO off")
        .execute(&mut *tx)
        .await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1 || ':' || $2, 7))")
        .bind(scope)
        .bind(&key)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "DELETE FROM rate_limit_hits WHERE scope = $1 AND key = $2
            AND at <= clock_timestamp() - make_interval(secs => $3)",
    )
    .bind(scope)
    .bind(&key)
    .bind(window_secs)
    .execute(&mut *tx)
    .await?;
    let (count, wait): (i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*),
                extract(epoch FROM min(at) + make_interval(secs => $3) - clock_timestamp())::float8
           FROM rate_limit_hits WHERE scope = $1 AND key = $2",
    )
    .bind(scope)
    .bind(&key)
    .bind(window_secs)
    .fetch_one(&mut *tx)
    .await?;
    let decision = if count >= i64::from(limit.max) {
        Decision::Limited {
            retry_after: Duration::from_secs_f64(wait.unwrap_or(window_secs).max(1.0)),
        }
    } else {
        sqlx::query("INSERT INTO rate_limit_hits (scope, key) VALUES ($1, $2)")
            .bind(scope)
            .bind(&key)
            .execute(&mut *tx)
            .await?;
        Decision::Allowed
    };
    tx.commit().await?;
    if CHECKS.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
        let swept = sqlx::query(&format!(
            "DELETE FROM rate_limit_hits WHERE at < clock_timestamp() - interval '{SWEEP_AFTER}'"
        ))
        .execute(pool)
        .await;
        if let Err(e) = swept {
            tracing::warn!(error = %e, "rate limit sweep failed");
        }
    }
    Ok(decision)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_hashes_of_the_normalised_value() {
        assert_eq!(key("Ada@Example.com "), key("ada@example.com"));
        assert_ne!(key("ada@example.com"), key("bob@example.com"));
        assert!(!key("ada@example.com").contains("ada"));
        assert_eq!(key("x").len(), 64);
    }
}
