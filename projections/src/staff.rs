//! Reads of the read models for the staff API: ticket pages with filters,
//! customers and their identifiers, messages, and the escalation and
//! approval queues. Every function takes the connection of a transaction
//! that the caller scoped to its viewer (see `access`), so row-level
//! security applies to each of them; the API adds its own role checks on
//! top.
//!
//! The batch functions (`…_by_ids`, `…_for_tickets`) serve the API's data
//! loaders: one statement for a whole page, never one per row.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Postgres, QueryBuilder};
use uuid::Uuid;

/// The largest page any list returns.
pub const MAX_PAGE: i64 = 100;

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct TicketRow {
    pub ticket_id: Uuid,
    pub customer_id: Uuid,
    pub channel: String,
    pub subject: Option<String>,
    pub category: String,
    pub priority: String,
    pub status: String,
    pub assigned_to: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub first_response_at: Option<DateTime<Utc>>,
    pub sla_due_at: DateTime<Utc>,
    pub sla_breached: bool,
    pub messages_count: i32,
}

const TICKET_COLUMNS: &str = "t.ticket_id, t.customer_id, t.channel, t.subject, t.category, t.priority, t.status,
     t.assigned_to, t.created_at, t.updated_at, t.first_response_at, t.sla_due_at, t.sla_breached, t.messages_count";

/// What a ticket list may be narrowed by. Every field is optional; all
/// given ones must hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TicketFilter {
    pub statuses: Vec<String>,
    pub channels: Vec<String>,
    pub priorities: Vec<String>,
    pub assigned_to: Option<String>,
    /// Only tickets nobody is assigned to.
    pub unassigned: bool,
    pub customer_id: Option<Uuid>,
    pub created_from: Option<DateTime<Utc>>,
    pub created_to: Option<DateTime<Utc>>,
    pub sla_breached: Option<bool>,
    /// Words that must appear in the subject or a message (case-insensitive).
    pub text: Option<String>,
}

/// Where a page starts: after this (created_at, ticket_id), newest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TicketCursor {
    pub created_at: DateTime<Utc>,
    pub ticket_id: Uuid,
}

fn push_filter(q: &mut QueryBuilder<'_, Postgres>, f: &TicketFilter) {
    q.push(" WHERE true");
    if !f.statuses.is_empty() {
        q.push(" AND t.status = ANY(")
            .push_bind(f.statuses.clone())
            .push(")");
    }
    if !f.channels.is_empty() {
        q.push(" AND t.channel = ANY(")
            .push_bind(f.channels.clone())
            .push(")");
    }
    if !f.priorities.is_empty() {
        q.push(" AND t.priority = ANY(")
            .push_bind(f.priorities.clone())
            .push(")");
    }
    if let Some(a) = &f.assigned_to {
        q.push(" AND t.assigned_to = ").push_bind(a.clone());
    }
    if f.unassigned {
        q.push(" AND t.assigned_to IS NULL");
    }
    if let Some(c) = f.customer_id {
        q.push(" AND t.customer_id = ").push_bind(c);
    }
    if let Some(from) = f.created_from {
        q.push(" AND t.created_at >= ").push_bind(from);
    }
    if let Some(to) = f.created_to {
        q.push(" AND t.created_at < ").push_bind(to);
    }
    if let Some(b) = f.sla_breached {
        q.push(" AND t.sla_breached = ").push_bind(b);
    }
    if let Some(text) = f.text.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
        let pattern = format!("%{}%", escape_like(text));
        q.push(" AND (t.subject ILIKE ")
            .push_bind(pattern.clone())
            .push(" OR EXISTS (SELECT 1 FROM crm_messages m WHERE m.ticket_id = t.ticket_id AND m.body ILIKE ")
            .push_bind(pattern)
            .push("))");
    }
}

/// `text` with LIKE's wildcards taken literally.
fn escape_like(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A page of tickets, newest first, after `after`; `limit` is clamped to
/// 1..=[`MAX_PAGE`]. Returns one row more than asked when there is a next
/// page, so the caller can tell.
pub async fn tickets_page(
    conn: &mut PgConnection,
    filter: &TicketFilter,
    after: Option<TicketCursor>,
    limit: i64,
) -> Result<Vec<TicketRow>, sqlx::Error> {
    let mut q = QueryBuilder::new("");
    push_page(&mut q, filter, after, limit);
    q.build_query_as().fetch_all(conn).await
}

/// The page's statement: [`TICKET_COLUMNS`] of at most `limit + 1`
/// tickets, newest first.
fn push_page(
    q: &mut QueryBuilder<'_, Postgres>,
    filter: &TicketFilter,
    after: Option<TicketCursor>,
    limit: i64,
) {
    let limit = limit.clamp(1, MAX_PAGE);
    q.push(format!("SELECT {TICKET_COLUMNS} FROM crm_tickets t"));
    push_filter(q, filter);
    if let Some(c) = after {
        q.push(" AND (t.created_at, t.ticket_id) < (")
            .push_bind(c.created_at)
            .push(", ")
            .push_bind(c.ticket_id)
            .push(")");
    }
    q.push(" ORDER BY t.created_at DESC, t.ticket_id DESC LIMIT ")
        .push_bind(limit + 1);
}

/// A page of tickets with their customers, and with the customers'
/// identifiers when `identifiers` is set: what a ticket list showing who
/// wrote costs in one read instead of two or three.
#[derive(Debug, Default)]
pub struct PageWithCustomers {
    pub tickets: Vec<TicketRow>,
    /// Each customer once; one that the reader may not see (or that is not
    /// projected yet) is absent.
    pub customers: Vec<CustomerRow>,
    /// When asked for: the identifiers of every customer in `customers`, in
    /// the order [`identifiers_of_customers`] gives them.
    pub identifiers: Option<Vec<IdentifierRow>>,
}

#[derive(sqlx::FromRow)]
struct PageRow {
    #[sqlx(flatten)]
    ticket: TicketRow,
    c_name: Option<String>,
    c_created_at: Option<DateTime<Utc>>,
    c_updated_at: Option<DateTime<Utc>>,
    c_kinds: Option<Vec<String>>,
    c_values: Option<Vec<String>>,
}

/// [`tickets_page`], with each ticket's customer (and their identifiers)
/// joined in the same statement. Row-level security applies to every
/// table it reads, as it does to the separate reads.
pub async fn tickets_page_with_customers(
    conn: &mut PgConnection,
    filter: &TicketFilter,
    after: Option<TicketCursor>,
    limit: i64,
    identifiers: bool,
) -> Result<PageWithCustomers, sqlx::Error> {
    let mut q = QueryBuilder::new("WITH page AS (");
    push_page(&mut q, filter, after, limit);
    q.push(
        ") SELECT page.*, c.name AS c_name,
                  c.created_at AS c_created_at, c.updated_at AS c_updated_at,",
    );
    if identifiers {
        q.push(
            " i.kinds AS c_kinds, i.vals AS c_values
               FROM page LEFT JOIN crm_customers c ON c.customer_id = page.customer_id
               LEFT JOIN LATERAL (
                    SELECT coalesce(array_agg(kind ORDER BY linked_at, value), '{}') AS kinds,
                           coalesce(array_agg(value ORDER BY linked_at, value), '{}') AS vals
                      FROM crm_customer_identifiers WHERE customer_id = c.customer_id) i
                 ON c.customer_id IS NOT NULL",
        );
    } else {
        q.push(
            " NULL::text[] AS c_kinds, NULL::text[] AS c_values
               FROM page LEFT JOIN crm_customers c ON c.customer_id = page.customer_id",
        );
    }
    q.push(" ORDER BY page.created_at DESC, page.ticket_id DESC");
    let rows: Vec<PageRow> = q.build_query_as().fetch_all(conn).await?;
    let mut page = PageWithCustomers {
        tickets: Vec::with_capacity(rows.len()),
        customers: Vec::new(),
        identifiers: identifiers.then(Vec::new),
    };
    let mut seen = std::collections::HashSet::new();
    for row in rows {
        let customer_id = row.ticket.customer_id;
        page.tickets.push(row.ticket);
        // No customer row joined (not projected yet, or not the reader's
        // to see): its timestamps, never null in the table, are null.
        let (Some(created_at), Some(updated_at)) = (row.c_created_at, row.c_updated_at) else {
            continue;
        };
        if !seen.insert(customer_id) {
            continue;
        }
        page.customers.push(CustomerRow {
            customer_id,
            name: row.c_name,
            created_at,
            updated_at,
        });
        if let Some(out) = page.identifiers.as_mut() {
            let kinds = row.c_kinds.unwrap_or_default();
            let values = row.c_values.unwrap_or_default();
            out.extend(identifier_rows(customer_id, kinds, values));
        }
    }
    Ok(page)
}

/// How many tickets the filter matches.
pub async fn tickets_count(
    conn: &mut PgConnection,
    filter: &TicketFilter,
) -> Result<i64, sqlx::Error> {
    let mut q = QueryBuilder::new("SELECT count(*) FROM crm_tickets t");
    push_filter(&mut q, filter);
    q.build_query_scalar().fetch_one(conn).await
}

pub async fn tickets_by_ids(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> Result<Vec<TicketRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {TICKET_COLUMNS} FROM crm_tickets t WHERE t.ticket_id = ANY($1)"
    ))
    .bind(ids)
    .fetch_all(conn)
    .await
}

/// Tickets of these customers, newest first (at most [`MAX_PAGE`] each).
pub async fn tickets_of_customers(
    conn: &mut PgConnection,
    customer_ids: &[Uuid],
) -> Result<Vec<TicketRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {TICKET_COLUMNS} FROM unnest($1::uuid[]) AS c(id)
           CROSS JOIN LATERAL (SELECT * FROM crm_tickets t WHERE t.customer_id = c.id
                                ORDER BY t.created_at DESC, t.ticket_id DESC LIMIT {MAX_PAGE}) t"
    ))
    .bind(customer_ids)
    .fetch_all(conn)
    .await
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct CustomerRow {
    pub customer_id: Uuid,
    pub name: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

pub async fn customers_by_ids(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> Result<Vec<CustomerRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT customer_id, name, created_at, updated_at FROM crm_customers WHERE customer_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(conn)
    .await
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct IdentifierRow {
    pub customer_id: Uuid,
    /// `email`, `phone` or `whatsapp` (a WhatsApp number is a phone).
    pub kind: String,
    pub value: String,
}

pub async fn identifiers_of_customers(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> Result<Vec<IdentifierRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT customer_id, kind, value FROM crm_customer_identifiers
          WHERE customer_id = ANY($1) ORDER BY linked_at, value",
    )
    .bind(ids)
    .fetch_all(conn)
    .await
}

/// A customer's identifiers from the two arrays a one-statement read
/// aggregates them into.
fn identifier_rows(
    customer_id: Uuid,
    kinds: Vec<String>,
    values: Vec<String>,
) -> impl Iterator<Item = IdentifierRow> {
    kinds
        .into_iter()
        .zip(values)
        .map(move |(kind, value)| IdentifierRow {
            customer_id,
            kind,
            value,
        })
}

/// Customers and their identifiers in one read (what a page of tickets
/// showing its customers' emails and phones needs): the identifiers in the
/// order [`identifiers_of_customers`] gives them.
pub async fn customers_with_identifiers(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> Result<(Vec<CustomerRow>, Vec<IdentifierRow>), sqlx::Error> {
    type Row = (
        Uuid,
        Option<String>,
        DateTime<Utc>,
        DateTime<Utc>,
        Vec<String>,
        Vec<String>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT c.customer_id, c.name, c.created_at, c.updated_at,
                coalesce(i.kinds, '{}'), coalesce(i.vals, '{}')
           FROM crm_customers c
           LEFT JOIN LATERAL (
                SELECT array_agg(kind ORDER BY linked_at, value) AS kinds,
                       array_agg(value ORDER BY linked_at, value) AS vals
                  FROM crm_customer_identifiers WHERE customer_id = c.customer_id) i ON true
          WHERE c.customer_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(conn)
    .await?;
    let mut customers = Vec::with_capacity(rows.len());
    let mut identifiers = Vec::new();
    for (customer_id, name, created_at, updated_at, kinds, values) in rows {
        customers.push(CustomerRow {
            customer_id,
            name,
            created_at,
            updated_at,
        });
        identifiers.extend(identifier_rows(customer_id, kinds, values));
    }
    Ok((customers, identifiers))
}

/// The customer who owns an identifier (`kinds`: the stored kinds that
/// match, e.g. `phone` and `whatsapp` for a phone number).
pub async fn customer_by_identifier(
    conn: &mut PgConnection,
    kinds: &[&str],
    value: &str,
) -> Result<Option<Uuid>, sqlx::Error> {
    let kinds: Vec<String> = kinds.iter().map(|k| k.to_string()).collect();
    sqlx::query_scalar(
        "SELECT customer_id FROM crm_customer_identifiers WHERE kind = ANY($1) AND value = $2
          ORDER BY linked_at LIMIT 1",
    )
    .bind(kinds)
    .bind(value)
    .fetch_optional(conn)
    .await
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct MessageRow {
    pub message_id: Uuid,
    pub ticket_id: Uuid,
    pub direction: String,
    pub channel: String,
    pub body: String,
    pub at: DateTime<Utc>,
    pub delivery_status: Option<String>,
    pub position: i64,
}

/// The messages of these tickets, oldest first within each.
pub async fn messages_for_tickets(
    conn: &mut PgConnection,
    ticket_ids: &[Uuid],
) -> Result<Vec<MessageRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT message_id, ticket_id, direction, channel, body, at, delivery_status, position
           FROM crm_messages WHERE ticket_id = ANY($1) ORDER BY ticket_id, at, position",
    )
    .bind(ticket_ids)
    .fetch_all(conn)
    .await
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct EscalationRow {
    pub escalation_id: Uuid,
    pub ticket_id: Uuid,
    pub customer_id: Uuid,
    pub reason: String,
    pub note: Option<String>,
    pub status: String,
    pub assigned_to: Option<String>,
    pub created_at: DateTime<Utc>,
    pub resolved_at: Option<DateTime<Utc>>,
}

const ESCALATION_COLUMNS: &str =
    "e.escalation_id, e.ticket_id, e.customer_id, e.reason, e.note, e.status,
     e.assigned_to, e.created_at, e.resolved_at";

/// The escalation queue: oldest first, so the longest-waiting comes first.
pub async fn escalations(
    conn: &mut PgConnection,
    status: Option<&str>,
    assigned_to: Option<&str>,
    limit: i64,
) -> Result<Vec<EscalationRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {ESCALATION_COLUMNS} FROM crm_escalations e
          WHERE ($1::text IS NULL OR e.status = $1) AND ($2::text IS NULL OR e.assigned_to = $2)
          ORDER BY e.created_at, e.escalation_id LIMIT $3"
    ))
    .bind(status)
    .bind(assigned_to)
    .bind(limit.clamp(1, MAX_PAGE * 5))
    .fetch_all(conn)
    .await
}

pub async fn escalations_for_tickets(
    conn: &mut PgConnection,
    ticket_ids: &[Uuid],
) -> Result<Vec<EscalationRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {ESCALATION_COLUMNS} FROM crm_escalations e WHERE e.ticket_id = ANY($1)
          ORDER BY e.created_at, e.escalation_id"
    ))
    .bind(ticket_ids)
    .fetch_all(conn)
    .await
}

pub async fn escalation(
    conn: &mut PgConnection,
    escalation_id: Uuid,
) -> Result<Option<EscalationRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {ESCALATION_COLUMNS} FROM crm_escalations e WHERE e.escalation_id = $1"
    ))
    .bind(escalation_id)
    .fetch_optional(conn)
    .await
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ApprovalRow {
    pub approval_id: Uuid,
    pub ticket_id: Uuid,
    pub customer_id: Uuid,
    pub status: String,
    pub draft_body: String,
    pub edited_body: Option<String>,
    pub confidence: f64,
    pub created_at: DateTime<Utc>,
    pub decided_at: Option<DateTime<Utc>>,
    pub decided_by: Option<String>,
    pub reason: Option<String>,
}

const APPROVAL_COLUMNS: &str =
    "a.approval_id, a.ticket_id, a.customer_id, a.status, a.draft_body, a.edited_body,
     a.confidence, a.created_at, a.decided_at, a.decided_by, a.reason";

/// The approval queue: oldest first.
pub async fn approvals(
    conn: &mut PgConnection,
    status: Option<&str>,
    limit: i64,
) -> Result<Vec<ApprovalRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {APPROVAL_COLUMNS} FROM crm_approvals a WHERE ($1::text IS NULL OR a.status = $1)
          ORDER BY a.created_at, a.approval_id LIMIT $2"
    ))
    .bind(status)
    .bind(limit.clamp(1, MAX_PAGE * 5))
    .fetch_all(conn)
    .await
}

pub async fn approvals_for_tickets(
    conn: &mut PgConnection,
    ticket_ids: &[Uuid],
) -> Result<Vec<ApprovalRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {APPROVAL_COLUMNS} FROM crm_approvals a WHERE a.ticket_id = ANY($1)
          ORDER BY a.created_at, a.approval_id"
    ))
    .bind(ticket_ids)
    .fetch_all(conn)
    .await
}

pub async fn approval(
    conn: &mut PgConnection,
    approval_id: Uuid,
) -> Result<Option<ApprovalRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {APPROVAL_COLUMNS} FROM crm_approvals a WHERE a.approval_id = $1"
    ))
    .bind(approval_id)
    .fetch_optional(conn)
    .await
}

/// The caller's own queue: open tickets assigned to `sub`, most urgent
/// (earliest SLA) first.
pub async fn queue_of(
    conn: &mut PgConnection,
    sub: &str,
    limit: i64,
) -> Result<Vec<TicketRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {TICKET_COLUMNS} FROM crm_tickets t
          WHERE t.assigned_to = $1 AND t.status NOT IN ('resolved', 'closed')
          ORDER BY t.sla_due_at, t.ticket_id LIMIT $2"
    ))
    .bind(sub)
    .bind(limit.clamp(1, MAX_PAGE * 5))
    .fetch_all(conn)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_wildcards_are_taken_literally() {
        assert_eq!(escape_like("50%_off\\"), "50\\%\\_off\\\\");
        assert_eq!(escape_like("refund"), "refund");
    }

    #[test]
    fn a_filter_binds_every_value_and_formats_none() {
        let f = TicketFilter {
            statuses: vec!["escalated".into()],
            text: Some("x'); DROP TABLE crm_tickets; --".into()),
            customer_id: Some(Uuid::nil()),
            ..Default::default()
        };
        let mut q = QueryBuilder::new("SELECT 1 FROM crm_tickets t");
        push_filter(&mut q, &f);
        let sql = q.sql();
        assert!(!sql.contains("DROP"), "{sql}");
        assert!(sql.contains("t.status = ANY($1)"), "{sql}");
        assert!(sql.contains("t.customer_id = $2"), "{sql}");
    }
}
