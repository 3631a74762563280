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
    scope: &'static str,
    value: &str,
    limit: Limit,
) -> Result<Decision, StoreError> {
    if limit.max == 0 {
        return Ok(Decision::Allowed);
    }
    let gate = Gate::new(scope, value, limit);
    let (allowed, oldest): (bool, Option<f64>) = sqlx::query_as(&upsert_sql(1))
        .bind(gate.scope)
        .bind(&gate.key)
        .bind(gate.window_secs())
        .bind(i64::from(limit.max))
        .fetch_one(pool)
        .await?;
    sweep_now_and_then(pool).await;
    Ok(gate.decision(allowed, oldest))
}

/// A limit to take inside another statement: the event store's gated commit
/// appends a submission's events only when its hit fits, in one statement
/// and one commit (see `UnitOfWork::commit_gated`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gate {
    pub(crate) scope: &'static str,
    pub(crate) key: String,
    pub(crate) limit: Limit,
}

impl Gate {
    /// The gate of `value` in `scope`; `None` when the limit is off (0).
    pub fn for_value(scope: &'static str, value: &str, limit: Limit) -> Option<Self> {
        (limit.max > 0).then(|| Self::new(scope, value, limit))
    }

    fn new(scope: &'static str, value: &str, limit: Limit) -> Self {
        Self {
            scope,
            key: key(value),
            limit,
        }
    }

    pub(crate) fn window_secs(&self) -> f64 {
        self.limit.window.as_secs_f64()
    }

    /// What the upsert's `allowed` and seconds-until-room mean.
    pub(crate) fn decision(&self, allowed: bool, oldest: Option<f64>) -> Decision {
        if allowed {
            Decision::Allowed
        } else {
            let window = self.window_secs();
            Decision::Limited {
                retry_after: Duration::from_secs_f64(
                    oldest.unwrap_or(window).clamp(1.0, window.max(1.0)),
                ),
            }
        }
    }
}

/// The one statement that counts a hit when there is room, with its
/// parameters numbered from `first`: scope, key, window (seconds), max. It
/// returns `allowed` and the seconds until the oldest hit leaves the window.
/// The row lock of ON CONFLICT orders concurrent takes of one key.
pub(crate) fn upsert_sql(first: usize) -> String {
    let (scope, key, window, max) = (first, first + 1, first + 2, first + 3);
    let inside = format!(
        "ARRAY(SELECT h FROM unnest(w.hits) h WHERE h > clock_timestamp() - make_interval(secs => ${window}) ORDER BY h)"
    );
    format!(
        "INSERT INTO rate_limit_windows AS w (scope, key, hits, allowed, updated_at)
         VALUES (${scope}, ${key}, ARRAY[clock_timestamp()], ${max} > 0, now())
         ON CONFLICT (scope, key) DO UPDATE SET
             hits = CASE WHEN cardinality({inside}) < ${max} THEN {inside} || clock_timestamp() ELSE {inside} END,
             allowed = cardinality({inside}) < ${max},
             updated_at = now()
         RETURNING allowed,
                   extract(epoch FROM hits[1] + make_interval(secs => ${window}) - clock_timestamp())::float8 AS retry_secs"
    )
}

/// Now and then, drops the rows of keys idle for a day.
pub(crate) async fn sweep_now_and_then(pool: &PgPool) {
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
