//! Who is asking, how their reads reach Postgres, and the errors every
//! resolver shares.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_graphql::{Context, Error, ErrorExtensions};
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::auth::Role;

/// The caller of one request (or one subscription connection): the session
/// check's answer, with the user's current role.
pub use crate::session::Caller as Viewer;

/// What the GraphQL layer asks of a caller.
impl Viewer {
    /// Agents and supervisors act on tickets; analysts and auditors only
    /// read.
    pub fn may_act(&self) -> bool {
        matches!(self.role, Role::Agent | Role::Supervisor)
    }

    /// Analysts see emails and phone numbers masked.
    pub fn masks_pii(&self) -> bool {
        self.role == Role::Analyst
    }

    /// Whether this caller may see a row of `customer_id`.
    pub fn may_see_customer(&self, customer_id: Uuid) -> bool {
        self.is_staff() || self.customer_id == Some(customer_id)
    }
}

/// Reads for one viewer: each runs in its own transaction scoped to the
/// viewer's role and customer (row-level security), and is counted, so a
/// response can say what it cost.
#[derive(Clone)]
pub struct Db {
    pool: PgPool,
    viewer: Viewer,
    reads: Arc<AtomicUsize>,
}

impl Db {
    pub fn new(pool: PgPool, viewer: Viewer) -> Self {
        Self {
            pool,
            viewer,
            reads: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub fn viewer(&self) -> &Viewer {
        &self.viewer
    }

    /// A read transaction scoped to the viewer. Each use is one read query.
    pub async fn begin(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        casebook_projections::access::begin_scoped(&self.pool, &self.viewer.scope()).await
    }

    /// Read queries run so far.
    pub fn reads(&self) -> usize {
        self.reads.load(Ordering::Relaxed)
    }

    /// The unscoped pool: only for the event store (audited, not a read
    /// model) and for commands.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

pub fn viewer<'a>(ctx: &'a Context<'_>) -> async_graphql::Result<&'a Viewer> {
    ctx.data::<Viewer>()
        .map_err(|_| coded("not signed in", "unauthorized"))
}

pub fn db<'a>(ctx: &'a Context<'_>) -> async_graphql::Result<&'a Db> {
    ctx.data::<Db>()
        .map_err(|_| coded("not signed in", "unauthorized"))
}

/// An error with `extensions.code`.
pub fn coded(message: impl Into<String>, code: &'static str) -> Error {
    Error::new(message).extend_with(|_, e| e.set("code", code))
}

pub fn forbidden(what: &str) -> Error {
    coded(format!("your role may not {what}"), "FORBIDDEN")
}

pub fn bad_input(message: impl Into<String>) -> Error {
    coded(message, "BAD_USER_INPUT")
}

pub fn not_found(message: impl Into<String>) -> Error {
    coded(message, "NOT_FOUND")
}

/// A failure of ours: logged in full, answered without details.
pub fn internal(e: impl std::fmt::Display) -> Error {
    tracing::error!(error = %e, "graphql resolver failed");
    coded("internal error", "INTERNAL")
}

/// Requires a staff role (any but customer).
pub fn require_staff<'a>(ctx: &'a Context<'_>, what: &str) -> async_graphql::Result<&'a Viewer> {
    let v = viewer(ctx)?;
    if v.is_staff() {
        Ok(v)
    } else {
        Err(forbidden(what))
    }
}

/// Requires a role that acts on tickets (agent or supervisor).
pub fn require_actor<'a>(ctx: &'a Context<'_>, what: &str) -> async_graphql::Result<&'a Viewer> {
    let v = viewer(ctx)?;
    if v.may_act() {
        Ok(v)
    } else {
        Err(forbidden(what))
    }
}

/// A UUID argument, or a clear input error naming it.
pub fn uuid_arg(value: &async_graphql::ID, name: &str) -> async_graphql::Result<Uuid> {
    value
        .parse()
        .map_err(|_| bad_input(format!("{name} must be a UUID")))
}
