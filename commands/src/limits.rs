//! Rate limits kept in Postgres, so that they hold across replicas: at most
//! `limit` acts per key in any sliding `window` (web-form submissions per
//! email address, automatic emails per recipient).
//!
//! One statement per check: the key's row holds the times of its acts
//! inside the window; an upsert drops those that left the window and adds
//! this one only when there is room, and the row lock orders concurrent
//! checks of one key (on any replica). Keys are SHA-256 hashes of what they
//! limit, so the table holds no address.

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
/// Keys idle this long are swept whatever their scope.
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
    // One statement: the hits still inside the window, plus this one when
    // there is room. The row lock of ON CONFLICT orders concurrent takes of
    // one key; `allowed` says whether this one was counted.
    let (allowed, oldest): (bool, Option<f64>) = sqlx::query_as(
        "INSERT INTO rate_limit_windows AS w (scope, key, hits, allowed, updated_at)
         VALUES ($1, $2, ARRAY[clock_timestamp()], $4 > 0, now())
         ON CONFLICT (scope, key) DO UPDATE SET
             hits = CASE
                 WHEN cardinality(ARRAY(SELECT h FROM unnest(w.hits) h
                                         WHERE h > clock_timestamp() - make_interval(secs => $3))) < $4
                 THEN ARRAY(SELECT h FROM unnest(w.hits) h
                             WHERE h > clock_timestamp() - make_interval(secs => $3) ORDER BY h)
                      || clock_timestamp()
                 ELSE ARRAY(SELECT h FROM unnest(w.hits) h
                             WHERE h > clock_timestamp() - make_interval(secs => $3) ORDER BY h)
             END,
             allowed = cardinality(ARRAY(SELECT h FROM unnest(w.hits) h
                                          WHERE h > clock_timestamp() - make_interval(secs => $3))) < $4,
             updated_at = now()
         RETURNING allowed,
                   extract(epoch FROM hits[1] + make_interval(secs => $3) - clock_timestamp())::float8",
    )
    .bind(scope)
    .bind(&key)
    .bind(window_secs)
    .bind(i64::from(limit.max))
    .fetch_one(pool)
    .await?;
    let decision = if allowed {
        Decision::Allowed
    } else {
        Decision::Limited {
            retry_after: Duration::from_secs_f64(oldest.unwrap_or(window_secs).max(1.0)),
        }
    };
    if CHECKS.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
        let swept = sqlx::query(&format!(
            "DELETE FROM rate_limit_windows WHERE updated_at < now() - interval '{SWEEP_AFTER}'"
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
