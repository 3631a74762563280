//! Connections and migrations.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// The versions of every migration this build carries.
pub fn migration_versions() -> Vec<i64> {
    MIGRATOR.iter().map(|m| m.version).collect()
}

/// What a pool is for: serving (statements bounded) or long maintenance
/// work such as an audit or a rebuild (unbounded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Serve,
    Maintenance,
    /// Bookkeeping whose loss in a crash costs nothing that matters (rate
    /// limit hits): commits do not wait for the WAL to reach the disk.
    Bookkeeping,
}

pub async fn connect(url: &str, max_connections: u32, purpose: Purpose) -> anyhow::Result<PgPool> {
    let mut options = PgConnectOptions::from_str(url)
        .context("DATABASE_URL: not a valid connection string")?
        .application_name("casebook");
    match purpose {
        // No statement may run away with a connection, and no transaction
        // may sit idle: an open transaction holds the relay back.
        Purpose::Serve => {
            options = options.options([
                ("statement_timeout", "30s"),
                ("idle_in_transaction_session_timeout", "60s"),
            ])
        }
        Purpose::Bookkeeping => {
            options = options.options([
                ("statement_timeout", "5s"),
                ("idle_in_transaction_session_timeout", "60s"),
                ("synchronous_commit", "off"),
            ])
        }
        Purpose::Maintenance => {}
    }
    PgPoolOptions::new()
        .max_connections(max_connections)
        .min_connections(1.min(max_connections))
        // A served request does not pay a ping's round trip on every
        // acquire: a connection that died while idle fails its first
        // statement instead, is closed, and the pool opens another. The
        // event store retries transient failures; a read fails once.
        .test_before_acquire(purpose != Purpose::Serve)
        .acquire_timeout(Duration::from_secs(5))
        .idle_timeout(Duration::from_secs(300))
        .connect_with(options)
        .await
        .with_context(|| format!("DATABASE_URL: cannot connect to {}", redact(url)))
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await.context("applying migrations")?;
    Ok(())
}
