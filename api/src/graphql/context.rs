//! Who is asking, how their reads reach Postgres, and the errors every
//! resolver shares.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_graphql::{Context, Error, ErrorExtensions};
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use tokio::sync::{Mutex, OwnedMutexGuard};
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

/// Reads for one viewer, scoped to the viewer's role and customer
/// (row-level security) and counted, so a response can say what it cost.
///
/// A request's reads share one read-only transaction, opened by the first
/// read and committed when the request is done ([`Db::finish`]): a page and
/// its nested rows cost one `BEGIN` and one `COMMIT`, not one of each per
/// kind. A read-only transaction takes no transaction id, so it does not
/// hold the relay back. A subscription connection lives for hours and must
/// not hold a transaction: its `Db` opens one per read.
#[derive(Clone)]
pub struct Db {
    pool: PgPool,
    viewer: Viewer,
    reads: Arc<AtomicUsize>,
    shared: Option<Arc<Mutex<Option<Transaction<'static, Postgres>>>>>,
}

/// One read's connection: the request's shared transaction (held for the
/// read), or a transaction of its own.
pub enum Scoped {
    Shared(OwnedMutexGuard<Option<Transaction<'static, Postgres>>>),
    Own(Transaction<'static, Postgres>),
}

impl Scoped {
    /// Ends the read: commits a transaction of its own; the shared one
    /// stays open for the request's next read.
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Scoped::Shared(_) => Ok(()),
            Scoped::Own(tx) => tx.commit().await,
        }
    }
}

impl std::ops::Deref for Scoped {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        match self {
            Scoped::Shared(guard) => guard.as_ref().expect("opened before it is handed out"),
            Scoped::Own(tx) => tx,
        }
    }
}

impl std::ops::DerefMut for Scoped {
    fn deref_mut(&mut self) -> &mut PgConnection {
        match self {
            Scoped::Shared(guard) => guard.as_mut().expect("opened before it is handed out"),
            Scoped::Own(tx) => tx,
        }
    }
}

impl Db {
    /// Reads for one request, sharing one transaction.
    pub fn for_request(pool: PgPool, viewer: Viewer) -> Self {
        Self::for_request_in(pool, viewer, None)
    }

    /// Reads for one request, in a transaction already open and scoped to
    /// `viewer` (the session check's, see `Sessions::authenticate_scoped`),
    /// or, without one, in one the first read opens.
    pub fn for_request_in(
        pool: PgPool,
        viewer: Viewer,
        open: Option<Transaction<'static, Postgres>>,
    ) -> Self {
        Self {
            pool,
            viewer,
            reads: Arc::new(AtomicUsize::new(0)),
            shared: Some(Arc::new(Mutex::new(open))),
        }
    }

    /// Reads for a long-lived connection: a transaction per read.
    pub fn per_read(pool: PgPool, viewer: Viewer) -> Self {
        Self {
            pool,
            viewer,
            reads: Arc::new(AtomicUsize::new(0)),
            shared: None,
        }
    }

    pub fn viewer(&self) -> &Viewer {
        &self.viewer
    }

    /// A connection scoped to the viewer for one read query; end it with
    /// [`Scoped::commit`].
    pub async fn begin(&self) -> Result<Scoped, sqlx::Error> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        let scope = self.viewer.scope();
        match &self.shared {
            None => Ok(Scoped::Own(
                casebook_projections::access::begin_scoped(&self.pool, &scope).await?,
            )),
            Some(shared) => {
                let mut guard = shared.clone().lock_owned().await;
                if guard.is_none() {
                    *guard =
                        Some(casebook_projections::access::begin_scoped(&self.pool, &scope).await?);
                }
                Ok(Scoped::Shared(guard))
            }
        }
    }

    /// Ends the request's shared transaction, if a read opened one. (A
    /// transaction that is dropped instead is rolled back; it only read.)
    pub async fn finish(&self) {
        let Some(shared) = &self.shared else { return };
        if let Some(tx) = shared.lock().await.take() {
            if let Err(e) = tx.commit().await {
                tracing::warn!(error = %e, "graphql: ending the request's read transaction failed");
            }
        }
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
