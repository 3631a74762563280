//! Data loaders: every nested field of a page is fetched in one query per
//! kind (customers, their identifiers, messages, escalations, approvals),
//! never one per row. Built per request, scoped to its viewer.

use std::collections::HashMap;
use std::sync::Arc;

use async_graphql::dataloader::{DataLoader, HashMapCache, Loader};
use async_graphql::Context;
use casebook_projections::staff::{
    self, ApprovalRow, CustomerRow, EscalationRow, IdentifierRow, MessageRow, TicketRow,
};
use uuid::Uuid;

use super::context::Db;

pub type LoadError = Arc<sqlx::Error>;

/// A loader that keeps what it loaded for the request.
pub type Cached<L> = DataLoader<L, HashMapCache>;

/// The loaders of one request. They cache what they loaded for the
/// request's lifetime, so a page can load its nested rows ahead in one read
/// per kind (see `tickets`) and its resolvers find them there.
pub struct Loaders {
    pub tickets: Cached<TicketsById>,
    pub customers: Cached<CustomersById>,
    pub identifiers: Cached<IdentifiersOfCustomer>,
    pub customer_tickets: Cached<TicketsOfCustomer>,
    pub messages: Cached<MessagesOfTicket>,
    pub escalations: Cached<EscalationsOfTicket>,
    pub approvals: Cached<ApprovalsOfTicket>,
}

/// The request's loaders; a subscription (which outlives any request, so
/// must not read through a cache) gets fresh ones for each event.
pub enum LoadersRef<'a> {
    Shared(&'a Loaders),
    Fresh(Box<Loaders>),
}

impl std::ops::Deref for LoadersRef<'_> {
    type Target = Loaders;

    fn deref(&self) -> &Loaders {
        match self {
            LoadersRef::Shared(l) => l,
            LoadersRef::Fresh(l) => l,
        }
    }
}

pub fn loaders<'a>(ctx: &'a Context<'_>) -> async_graphql::Result<LoadersRef<'a>> {
    if let Ok(l) = ctx.data::<Loaders>() {
        return Ok(LoadersRef::Shared(l));
    }
    Ok(LoadersRef::Fresh(Box::new(Loaders::new(ctx.data::<Db>()?))))
}

impl Loaders {
    pub fn new(db: &Db) -> Self {
        // A batch waits a little for the rest of its page's keys (a page
        // resolves its rows concurrently, but not all in one instant).
        fn loader<L: Loader<Uuid>>(l: L) -> Cached<L> {
            DataLoader::with_cache(l, tokio::spawn, HashMapCache::default())
                .delay(std::time::Duration::from_millis(2))
                .max_batch_size(500)
        }
        Self {
            tickets: loader(TicketsById(db.clone())),
            customers: loader(CustomersById(db.clone())),
            identifiers: loader(IdentifiersOfCustomer(db.clone())),
            customer_tickets: loader(TicketsOfCustomer(db.clone())),
            messages: loader(MessagesOfTicket(db.clone())),
            escalations: loader(EscalationsOfTicket(db.clone())),
            approvals: loader(ApprovalsOfTicket(db.clone())),
        }
    }
}

/// Runs one batched read in a scoped transaction.
macro_rules! batched {
    ($db:expr, $keys:expr, $read:path) => {{
        let mut tx = $db.begin().await.map_err(Arc::new)?;
        let rows = $read(&mut tx, $keys).await.map_err(Arc::new)?;
        tx.commit().await.map_err(Arc::new)?;
        rows
    }};
}

/// Groups rows by a key, keeping their order; every asked key gets an
/// entry (an empty list is an answer, and is cached as one).
fn grouped<R>(keys: &[Uuid], rows: Vec<R>, key: impl Fn(&R) -> Uuid) -> HashMap<Uuid, Vec<R>> {
    let mut out: HashMap<Uuid, Vec<R>> = keys.iter().map(|k| (*k, Vec::new())).collect();
    for r in rows {
        out.entry(key(&r)).or_default().push(r);
    }
    out
}

pub struct TicketsById(Db);

impl Loader<Uuid> for TicketsById {
    type Value = TicketRow;
    type Error = LoadError;

    async fn load(&self, keys: &[Uuid]) -> Result<HashMap<Uuid, TicketRow>, LoadError> {
        let rows = batched!(self.0, keys, staff::tickets_by_ids);
        Ok(rows.into_iter().map(|r| (r.ticket_id, r)).collect())
    }
}

pub struct CustomersById(Db);

impl Loader<Uuid> for CustomersById {
    type Value = CustomerRow;
    type Error = LoadError;

    async fn load(&self, keys: &[Uuid]) -> Result<HashMap<Uuid, CustomerRow>, LoadError> {
        let rows = batched!(self.0, keys, staff::customers_by_ids);
        Ok(rows.into_iter().map(|r| (r.customer_id, r)).collect())
    }
}

/// Customers and their identifiers in one read, for the loaders' caches:
/// every asked key gets an identifiers entry (an empty list is an answer).
pub async fn customers_with_identifiers(
    db: &Db,
    keys: &[Uuid],
) -> Result<
    (
        HashMap<Uuid, CustomerRow>,
        HashMap<Uuid, Vec<IdentifierRow>>,
    ),
    LoadError,
> {
    let (customers, identifiers) = batched!(db, keys, staff::customers_with_identifiers);
    Ok((
        customers.into_iter().map(|r| (r.customer_id, r)).collect(),
        grouped(keys, identifiers, |r| r.customer_id),
    ))
}

pub struct IdentifiersOfCustomer(Db);

impl Loader<Uuid> for IdentifiersOfCustomer {
    type Value = Vec<IdentifierRow>;
    type Error = LoadError;

    async fn load(&self, keys: &[Uuid]) -> Result<HashMap<Uuid, Vec<IdentifierRow>>, LoadError> {
        let rows = batched!(self.0, keys, staff::identifiers_of_customers);
        Ok(grouped(keys, rows, |r| r.customer_id))
    }
}

pub struct TicketsOfCustomer(Db);

impl Loader<Uuid> for TicketsOfCustomer {
    type Value = Vec<TicketRow>;
    type Error = LoadError;

    async fn load(&self, keys: &[Uuid]) -> Result<HashMap<Uuid, Vec<TicketRow>>, LoadError> {
        let rows = batched!(self.0, keys, staff::tickets_of_customers);
        Ok(grouped(keys, rows, |r| r.customer_id))
    }
}

pub struct MessagesOfTicket(Db);

impl Loader<Uuid> for MessagesOfTicket {
    type Value = Vec<MessageRow>;
    type Error = LoadError;

    async fn load(&self, keys: &[Uuid]) -> Result<HashMap<Uuid, Vec<MessageRow>>, LoadError> {
        let rows = batched!(self.0, keys, staff::messages_for_tickets);
        Ok(grouped(keys, rows, |r| r.ticket_id))
    }
}

pub struct EscalationsOfTicket(Db);

impl Loader<Uuid> for EscalationsOfTicket {
    type Value = Vec<EscalationRow>;
    type Error = LoadError;

    async fn load(&self, keys: &[Uuid]) -> Result<HashMap<Uuid, Vec<EscalationRow>>, LoadError> {
        let rows = batched!(self.0, keys, staff::escalations_for_tickets);
        Ok(grouped(keys, rows, |r| r.ticket_id))
    }
}

pub struct ApprovalsOfTicket(Db);

impl Loader<Uuid> for ApprovalsOfTicket {
    type Value = Vec<ApprovalRow>;
    type Error = LoadError;

    async fn load(&self, keys: &[Uuid]) -> Result<HashMap<Uuid, Vec<ApprovalRow>>, LoadError> {
        let rows = batched!(self.0, keys, staff::approvals_for_tickets);
        Ok(grouped(keys, rows, |r| r.ticket_id))
    }
}
