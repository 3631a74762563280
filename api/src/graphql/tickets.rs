//! Tickets: one by id, filtered pages (Relay connections), the caller's
//! queue, and each ticket's nested customer, messages, escalations and
//! approvals (through the request's data loaders).

use async_graphql::{ComplexObject, Context, InputObject, Object, SimpleObject, ID};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use casebook_domain::masking::mask_pii;
use casebook_projections::staff::{self, MessageRow, TicketCursor, TicketRow};
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use uuid::Uuid;

use super::context::{bad_input, db, internal, require_staff, uuid_arg, viewer};
use super::customers::Customer;
use async_graphql::dataloader::Loader;

use super::loaders::{loaders, Cached, LoadError, Loaders};
use super::queues::{Approval, Escalation};
use super::types::{Category, Channel, Direction, PageInfo, Priority, TicketStatus};

/// The default and largest page of `tickets`.
pub const DEFAULT_PAGE: i32 = 20;

/// A ticket; with its customer already when the read that found it brought
/// the customer too (a page of tickets with its customers): `Some(None)`
/// is a customer looked for and not there (or not the reader's to see).
#[derive(Clone, Debug)]
pub struct Ticket(pub TicketRow, pub(crate) Option<Option<Customer>>);

impl From<TicketRow> for Ticket {
    fn from(row: TicketRow) -> Self {
        Ticket(row, None)
    }
}

/// The staff member a ticket is assigned to.
#[derive(SimpleObject, Clone, Debug)]
pub struct Assignee {
    /// The staff user's `sub`.
    pub id: ID,
}

#[Object]
impl Ticket {
    async fn id(&self) -> ID {
        ID(self.0.ticket_id.to_string())
    }

    async fn status(&self) -> async_graphql::Result<TicketStatus> {
        TicketStatus::from_db(&self.0.status)
            .ok_or_else(|| internal(format!("unknown status {}", self.0.status)))
    }

    async fn channel(&self) -> async_graphql::Result<Channel> {
        Channel::from_db(&self.0.channel)
            .ok_or_else(|| internal(format!("unknown channel {}", self.0.channel)))
    }

    async fn subject(&self) -> Option<&str> {
        self.0.subject.as_deref()
    }

    async fn category(&self) -> async_graphql::Result<Category> {
        Category::from_db(&self.0.category)
            .ok_or_else(|| internal(format!("unknown category {}", self.0.category)))
    }

    async fn priority(&self) -> async_graphql::Result<Priority> {
        Priority::from_db(&self.0.priority)
            .ok_or_else(|| internal(format!("unknown priority {}", self.0.priority)))
    }

    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }

    async fn updated_at(&self) -> DateTime<Utc> {
        self.0.updated_at
    }

    async fn first_response_at(&self) -> Option<DateTime<Utc>> {
        self.0.first_response_at
    }

    async fn sla_due_at(&self) -> DateTime<Utc> {
        self.0.sla_due_at
    }

    async fn sla_breached(&self) -> bool {
        self.0.sla_breached
    }

    async fn messages_count(&self) -> i32 {
        self.0.messages_count
    }

    /// Who works the ticket; null while the AI (or nobody) does.
    async fn assignee(&self) -> Option<Assignee> {
        self.0
            .assigned_to
            .as_ref()
            .map(|a| Assignee { id: ID(a.clone()) })
    }

    async fn customer(&self, ctx: &Context<'_>) -> async_graphql::Result<Option<Customer>> {
        if let Some(known) = &self.1 {
            return Ok(known.clone());
        }
        let loaders = loaders(ctx)?;
        Ok(loaders
            .customers
            .load_one(self.0.customer_id)
            .await
            .map_err(internal)?
            .map(Customer::from))
    }

    /// The conversation, oldest first.
    #[graphql(complexity = "5 * child_complexity")]
    async fn messages(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<Message>> {
        let masked = viewer(ctx)?.masks_pii();
        let loaders = loaders(ctx)?;
        Ok(loaders
            .messages
            .load_one(self.0.ticket_id)
            .await
            .map_err(internal)?
            .unwrap_or_default()
            .into_iter()
            .map(|m| Message { row: m, masked })
            .collect())
    }

    async fn escalations(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<Escalation>> {
        let loaders = loaders(ctx)?;
        Ok(loaders
            .escalations
            .load_one(self.0.ticket_id)
            .await
            .map_err(internal)?
            .unwrap_or_default()
            .into_iter()
            .map(Escalation)
            .collect())
    }

    async fn approvals(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<Approval>> {
        // Drafts are the desk's working papers, not the customer's.
        if !viewer(ctx)?.is_staff() {
            return Ok(Vec::new());
        }
        let loaders = loaders(ctx)?;
        Ok(loaders
            .approvals
            .load_one(self.0.ticket_id)
            .await
            .map_err(internal)?
            .unwrap_or_default()
            .into_iter()
            .map(Approval)
            .collect())
    }
}

/// One message of a conversation.
#[derive(Clone, Debug)]
pub struct Message {
    row: MessageRow,
    masked: bool,
}

#[Object]
impl Message {
    async fn id(&self) -> ID {
        ID(self.row.message_id.to_string())
    }

    async fn direction(&self) -> Direction {
        if self.row.direction == "inbound" {
            Direction::Inbound
        } else {
            Direction::Outbound
        }
    }

    async fn channel(&self) -> Option<Channel> {
        Channel::from_db(&self.row.channel)
    }

    /// The text; analysts see emails and phone numbers in it masked.
    async fn body(&self) -> String {
        if self.masked {
            mask_pii(&self.row.body)
        } else {
            self.row.body.clone()
        }
    }

    async fn at(&self) -> DateTime<Utc> {
        self.row.at
    }

    async fn delivery_status(&self) -> Option<&str> {
        self.row.delivery_status.as_deref()
    }
}

/// What `tickets` may be narrowed by; all given fields must hold. A list
/// field also takes a single value.
#[derive(InputObject, Default, Debug)]
pub struct TicketFilter {
    pub status: Option<Vec<TicketStatus>>,
    pub channel: Option<Vec<Channel>>,
    pub priority: Option<Vec<Priority>>,
    /// The assignee's id (a staff `sub`).
    pub assignee: Option<ID>,
    /// Only tickets nobody is assigned to.
    pub unassigned: Option<bool>,
    pub customer_id: Option<ID>,
    /// Created at or after.
    pub created_from: Option<DateTime<Utc>>,
    /// Created before.
    pub created_to: Option<DateTime<Utc>>,
    pub sla_breached: Option<bool>,
    /// Words in the subject or any message (case-insensitive).
    pub text: Option<String>,
}

/// The longest `text` filter.
const TEXT_FILTER_MAX: usize = 200;

impl TicketFilter {
    fn to_query(&self) -> async_graphql::Result<staff::TicketFilter> {
        let text = self
            .text
            .as_ref()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        if text
            .as_ref()
            .is_some_and(|t| t.chars().count() > TEXT_FILTER_MAX)
        {
            return Err(bad_input(format!(
                "text is longer than {TEXT_FILTER_MAX} characters"
            )));
        }
        if let (Some(from), Some(to)) = (self.created_from, self.created_to) {
            if from > to {
                return Err(bad_input("createdFrom is after createdTo"));
            }
        }
        Ok(staff::TicketFilter {
            statuses: self
                .status
                .iter()
                .flatten()
                .map(|s| s.as_db().to_string())
                .collect(),
            channels: self
                .channel
                .iter()
                .flatten()
                .map(|c| c.as_db().to_string())
                .collect(),
            priorities: self
                .priority
                .iter()
                .flatten()
                .map(|p| p.as_db().to_string())
                .collect(),
            assigned_to: self.assignee.as_ref().map(|a| a.0.clone()),
            unassigned: self.unassigned.unwrap_or(false),
            customer_id: self
                .customer_id
                .as_ref()
                .map(|c| uuid_arg(c, "customerId"))
                .transpose()?,
            created_from: self.created_from,
            created_to: self.created_to,
            sla_breached: self.sla_breached,
            text,
        })
    }
}

#[derive(SimpleObject, Clone, Debug)]
pub struct TicketEdge {
    pub cursor: String,
    pub node: Ticket,
}

/// A page of tickets.
#[derive(SimpleObject)]
#[graphql(complex)]
pub struct TicketConnection {
    pub edges: Vec<TicketEdge>,
    pub page_info: PageInfo,
    #[graphql(skip)]
    filter: staff::TicketFilter,
}

#[ComplexObject]
impl TicketConnection {
    /// How many tickets match the filter (all pages). Counted only when
    /// asked for.
    async fn total_count(&self, ctx: &Context<'_>) -> async_graphql::Result<i64> {
        let db = db(ctx)?;
        let mut tx = db.begin().await.map_err(internal)?;
        let n = staff::tickets_count(&mut tx, &self.filter)
            .await
            .map_err(internal)?;
        tx.commit().await.map_err(internal)?;
        Ok(n)
    }

    /// The tickets of this page, without their edges.
    async fn nodes(&self) -> Vec<Ticket> {
        self.edges.iter().map(|e| e.node.clone()).collect()
    }
}

impl Asks {
    /// Looked ahead from the connection's field.
    fn of(ctx: &Context<'_>) -> Asks {
        let ahead = ctx.look_ahead();
        let node = ahead.field("edges").field("node");
        let nodes = ahead.field("nodes");
        let asks = |f: &str| node.field(f).exists() || nodes.field(f).exists();
        let asks_customer = |f: &str| {
            node.field("customer").field(f).exists() || nodes.field("customer").field(f).exists()
        };
        Asks {
            customer: asks("customer"),
            identifiers: asks_customer("emails") || asks_customer("phones"),
            customer_tickets: asks_customer("tickets"),
            messages: asks("messages"),
            escalations: asks("escalations"),
            approvals: asks("approvals"),
        }
    }
}

/// What a query asks of a page's tickets.
struct Asks {
    customer: bool,
    /// The customers' emails or phones.
    identifiers: bool,
    customer_tickets: bool,
    messages: bool,
    escalations: bool,
    approvals: bool,
}

/// The customers a page read with its tickets found, each with their
/// identifiers when the read brought them.
fn page_customers(page: &staff::PageWithCustomers) -> HashMap<Uuid, Customer> {
    let mut identifiers: HashMap<Uuid, Vec<staff::IdentifierRow>> = HashMap::new();
    for i in page.identifiers.iter().flatten() {
        identifiers
            .entry(i.customer_id)
            .or_default()
            .push(i.clone());
    }
    page.customers
        .iter()
        .map(|c| {
            let own = page.identifiers.as_ref().map(|_| {
                identifiers
                    .remove(&c.customer_id)
                    .unwrap_or_default()
                    .into()
            });
            (c.customer_id, Customer(c.clone(), own))
        })
        .collect()
}

/// Feeds the loaders a page's customers (and their identifiers, when
/// read; an empty list being an answer), for resolvers that reach them
/// another way in the same request.
async fn feed_customers(loaders: &Loaders, customers: &HashMap<Uuid, Customer>) {
    loaders
        .customers
        .feed_many(customers.iter().map(|(id, c)| (*id, c.0.clone())))
        .await;
    let identifiers: HashMap<Uuid, Vec<staff::IdentifierRow>> = customers
        .iter()
        .filter_map(|(id, c)| Some((*id, c.1.as_deref()?.to_vec())))
        .collect();
    if !identifiers.is_empty() {
        loaders.identifiers.feed_many(identifiers).await;
    }
}

/// Loads what the query asks of a page's tickets, one read per kind for the
/// whole page, into the request's loaders: the nested resolvers then find
/// it there, however their execution interleaves. `customers_fed`: the
/// page's own read brought its customers (and identifiers, if asked).
async fn prefetch(
    ctx: &Context<'_>,
    rows: &[TicketRow],
    asks: &Asks,
    customers_fed: bool,
) -> async_graphql::Result<()> {
    let Ok(loaders) = ctx.data::<Loaders>() else {
        return Ok(());
    };
    if rows.is_empty() {
        return Ok(());
    }
    let tickets: Vec<Uuid> = rows.iter().map(|r| r.ticket_id).collect();
    let mut customers: Vec<Uuid> = rows.iter().map(|r| r.customer_id).collect();
    customers.sort();
    customers.dedup();
    let db = db(ctx)?;
    let (a, c, d, e, f) = futures::join!(
        async {
            if customers_fed {
                Ok(())
            } else if asks.customer && asks.identifiers {
                // Both in one read.
                let (found, identifiers) =
                    super::loaders::customers_with_identifiers(db, &customers).await?;
                loaders.customers.feed_many(found).await;
                loaders.identifiers.feed_many(identifiers).await;
                Ok(())
            } else {
                ahead(asks.customer, &loaders.customers, &customers).await?;
                ahead(asks.identifiers, &loaders.identifiers, &customers).await
            }
        },
        ahead(asks.customer_tickets, &loaders.customer_tickets, &customers),
        ahead(asks.messages, &loaders.messages, &tickets),
        ahead(asks.escalations, &loaders.escalations, &tickets),
        ahead(asks.approvals, &loaders.approvals, &tickets),
    );
    for r in [a, c, d, e, f] {
        r.map_err(internal)?;
    }
    Ok(())
}

/// Loads `keys` into `loader`'s cache in one batch, when the query asks:
/// straight through its loader, since the keys are all known (a data
/// loader's batch would wait its delay for keys that are not coming).
async fn ahead<L>(wanted: bool, loader: &Cached<L>, keys: &[Uuid]) -> Result<(), LoadError>
where
    L: Loader<Uuid, Error = LoadError>,
{
    if wanted {
        let found = loader.loader().load(keys).await?;
        loader.feed_many(found).await;
    }
    Ok(())
}

pub fn encode_cursor(row: &TicketRow) -> String {
    URL_SAFE_NO_PAD.encode(format!(
        "{}|{}",
        row.created_at.timestamp_micros(),
        row.ticket_id
    ))
}

pub fn decode_cursor(cursor: &str) -> Option<TicketCursor> {
    let bytes = URL_SAFE_NO_PAD.decode(cursor.as_bytes()).ok()?;
    let text = std::str::from_utf8(&bytes).ok()?;
    let (micros, id) = text.split_once('|')?;
    Some(TicketCursor {
        created_at: DateTime::from_timestamp_micros(micros.parse().ok()?)?,
        ticket_id: id.parse().ok()?,
    })
}

#[derive(Default)]
pub struct TicketQuery;

#[Object]
impl TicketQuery {
    /// One ticket; null when it does not exist or is not the caller's to
    /// see.
    async fn ticket(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Option<Ticket>> {
        let Ok(id) = id.parse::<Uuid>() else {
            return Ok(None);
        };
        let v = viewer(ctx)?;
        let loaders = loaders(ctx)?;
        let row = loaders.tickets.load_one(id).await.map_err(internal)?;
        Ok(row
            .filter(|r| v.may_see_customer(r.customer_id))
            .map(Ticket::from))
    }

    /// Tickets, newest first, as a Relay connection. A customer sees only
    /// their own.
    #[graphql(
        complexity = "first.unwrap_or(DEFAULT_PAGE).clamp(1, 100) as usize * child_complexity"
    )]
    async fn tickets(
        &self,
        ctx: &Context<'_>,
        filter: Option<TicketFilter>,
        first: Option<i32>,
        after: Option<String>,
    ) -> async_graphql::Result<TicketConnection> {
        let v = viewer(ctx)?;
        let first = first.unwrap_or(DEFAULT_PAGE);
        if !(0..=staff::MAX_PAGE as i32).contains(&first) {
            return Err(bad_input(format!(
                "first must be between 0 and {}",
                staff::MAX_PAGE
            )));
        }
        let after = match after {
            Some(a) => Some(
                decode_cursor(&a)
                    .ok_or_else(|| bad_input("after is not a cursor of this connection"))?,
            ),
            None => None,
        };
        let mut query = filter.unwrap_or_default().to_query()?;
        if !v.is_staff() {
            // Row-level security holds this too; the resolver does not
            // rely on it.
            match (v.customer_id, query.customer_id) {
                (Some(own), None) => query.customer_id = Some(own),
                (Some(own), Some(asked)) if own == asked => {}
                _ => {
                    return Ok(TicketConnection {
                        edges: Vec::new(),
                        page_info: PageInfo::default(),
                        filter: staff::TicketFilter {
                            customer_id: Some(Uuid::nil()),
                            ..Default::default()
                        },
                    })
                }
            }
        }
        let asks = Asks::of(ctx);
        let loaders = ctx.data::<Loaders>().ok();
        // With loaders to feed, a page that shows its customers reads them
        // in the page's own statement.
        let with_customers = asks.customer && loaders.is_some();
        // The page's customers, when its read brought them.
        let mut known: Option<HashMap<Uuid, Customer>> = None;
        let mut rows = if first == 0 {
            Vec::new()
        } else {
            let db = db(ctx)?;
            let mut tx = db.begin().await.map_err(internal)?;
            let rows = if with_customers {
                let page = staff::tickets_page_with_customers(
                    &mut tx,
                    &query,
                    after,
                    i64::from(first),
                    asks.identifiers,
                )
                .await
                .map_err(internal)?;
                let customers = page_customers(&page);
                if let Some(loaders) = loaders {
                    feed_customers(loaders, &customers).await;
                }
                known = Some(customers);
                page.tickets
            } else {
                staff::tickets_page(&mut tx, &query, after, i64::from(first))
                    .await
                    .map_err(internal)?
            };
            tx.commit().await.map_err(internal)?;
            rows
        };
        let has_next_page = rows.len() > first as usize;
        rows.truncate(first as usize);
        prefetch(ctx, &rows, &asks, with_customers).await?;
        let edges: Vec<TicketEdge> = rows
            .into_iter()
            .map(|r| TicketEdge {
                cursor: encode_cursor(&r),
                node: {
                    let customer = known.as_ref().map(|k| k.get(&r.customer_id).cloned());
                    Ticket(r, customer)
                },
            })
            .collect();
        Ok(TicketConnection {
            page_info: PageInfo {
                has_next_page,
                has_previous_page: after.is_some(),
                start_cursor: edges.first().map(|e| e.cursor.clone()),
                end_cursor: edges.last().map(|e| e.cursor.clone()),
            },
            edges,
            filter: query,
        })
    }

    /// The caller's own open tickets, earliest SLA first.
    async fn my_queue(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<Ticket>> {
        let v = require_staff(ctx, "have a queue")?;
        let db = db(ctx)?;
        let mut tx = db.begin().await.map_err(internal)?;
        let rows = staff::queue_of(&mut tx, &v.sub, staff::MAX_PAGE * 5)
            .await
            .map_err(internal)?;
        tx.commit().await.map_err(internal)?;
        Ok(rows.into_iter().map(Ticket::from).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_junk_is_refused() {
        let row = TicketRow {
            ticket_id: Uuid::now_v7(),
            customer_id: Uuid::now_v7(),
            channel: "email".into(),
            subject: None,
            category: "general".into(),
            priority: "low".into(),
            status: "received".into(),
            assigned_to: None,
            created_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            updated_at: Utc::now(),
            first_response_at: None,
            sla_due_at: Utc::now(),
            sla_breached: false,
            messages_count: 1,
        };
        let c = decode_cursor(&encode_cursor(&row)).unwrap();
        assert_eq!(c.ticket_id, row.ticket_id);
        assert_eq!(c.created_at, row.created_at);
        assert!(decode_cursor("not a cursor").is_none());
        assert!(decode_cursor(&URL_SAFE_NO_PAD.encode("12|x")).is_none());
    }
}
