//! Data loaders: every nested field of a page is fetched in one query per
//! kind (customers, their identifiers, messages, escalations, approvals),
//! never one per row. Built per request, scoped to its viewer.

use std::collections::HashMap;
use std::sync::Arc;

use async_graphql::dataloader::{DataLoader, Loader};
use casebook_projections::staff::{
    self, ApprovalRow, CustomerRow, EscalationRow, IdentifierRow, MessageRow, TicketRow,
};
use uuid::Uuid;

use super::context::Db;

pub type LoadError = Arc<sqlx::Error>;

/// The loaders of one request.
pub struct Loaders {
    pub tickets: DataLoader<TicketsById>,
    pub customers: DataLoader<CustomersById>,
    pub identifiers: DataLoader<IdentifiersOfCustomer>,
    pub customer_tickets: DataLoader<TicketsOfCustomer>,
    pub messages: DataLoader<MessagesOfTicket>,
    pub escalations: DataLoader<EscalationsOfTicket>,
    pub approvals: DataLoader<ApprovalsOfTicket>,
}

impl Loaders {
    pub fn new(db: &Db) -> Self {
        // A batch waits a little for the rest of its page's keys (a page
        // resolves its rows concurrently, but not all in one instant).
        fn loader<L: Loader<Uuid>>(l: L) -> DataLoader<L> {
            DataLoader::new(l, tokio::spawn)
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

/// Groups rows by a key, keeping their order.
fn grouped<R>(rows: Vec<R>, key: impl Fn(&R) -> Uuid) -> HashMap<Uuid, Vec<R>> {
    let mut out: HashMap<Uuid, Vec<R>> = HashMap::new();
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

pub struct IdentifiersOfCustomer(Db);

impl Loader<Uuid> for IdentifiersOfCustomer {
    type Value = Vec<IdentifierRow>;
    type Error = LoadError;

    async fn load(&self, keys: &[Uuid]) -> Result<HashMap<Uuid, Vec<IdentifierRow>>, LoadError> {
        let rows = batched!(self.0, keys, staff::identifiers_of_customers);
        Ok(grouped(rows, |r| r.customer_id))
    }
}

pub struct TicketsOfCustomer(Db);

impl Loader<Uuid> for TicketsOfCustomer {
    type Value = Vec<TicketRow>;
    type Error = LoadError;

    async fn load(&self, keys: &[Uuid]) -> Result<HashMap<Uuid, Vec<TicketRow>>, LoadError> {
        let rows = batched!(self.0, keys, staff::tickets_of_customers);
        Ok(grouped(rows, |r| r.customer_id))
    }
}

pub struct MessagesOfTicket(Db);

impl Loader<Uuid> for MessagesOfTicket {
    type Value = Vec<MessageRow>;
    type Error = LoadError;

    async fn load(&self, keys: &[Uuid]) -> Result<HashMap<Uuid, Vec<MessageRow>>, LoadError> {
        let rows = batched!(self.0, keys, staff::messages_for_tickets);
        Ok(grouped(rows, |r| r.ticket_id))
    }
}

pub struct EscalationsOfTicket(Db);

impl Loader<Uuid> for EscalationsOfTicket {
    type Value = Vec<EscalationRow>;
    type Error = LoadError;

    async fn load(&self, keys: &[Uuid]) -> Result<HashMap<Uuid, Vec<EscalationRow>>, LoadError> {
        let rows = batched!(self.0, keys, staff::escalations_for_tickets);
        Ok(grouped(rows, |r| r.ticket_id))
    }
}

pub struct ApprovalsOfTicket(Db);

impl Loader<Uuid> for ApprovalsOfTicket {
    type Value = Vec<ApprovalRow>;
    type Error = LoadError;

    async fn load(&self, keys: &[Uuid]) -> Result<HashMap<Uuid, Vec<ApprovalRow>>, LoadError> {
        let rows = batched!(self.0, keys, staff::approvals_for_tickets);
        Ok(grouped(rows, |r| r.ticket_id))
    }
}
