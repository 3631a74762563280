//! Waiting between attempts, per the domain's backoff policy.

use std::future::Future;

use casebook_domain::retry::Backoff;
use rand::Rng;

/// A uniform random number in `[0, 1)` for jitter.
pub fn jitter() -> f64 {
    rand::rng().random::<f64>()
}

pub async fn sleep_backoff(policy: &Backoff, attempt: u32) {
    tokio::time::sleep(policy.delay(attempt, jitter())).await;
}

/// Runs `op` until it succeeds, fails permanently (`is_transient` false) or
/// runs out of attempts; logs each retry with `what`.
pub async fn retry<T, E, F, Fut>(
    policy: &Backoff,
    what: &str,
    is_transient: impl Fn(&E) -> bool,
    mut op: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        match op().await {
            Err(e) if is_transient(&e) && policy.should_retry(attempt) => {
                tracing::warn!(attempt, error = %e, "{what} failed, retrying");
                sleep_backoff(policy, attempt).await;
            }
            other => return other,
        }
    }
}
