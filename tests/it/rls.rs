//! Row-level security on the read models, in Postgres: what `casebook_api`
//! sees in a caller's scope, that it never writes, that a forgotten scope
//! shows nothing, and that with FORCE the policies hold for the table owner
//! too while unscoped writers (projectors) keep full access.

use casebook_api::graphql::context::Db;
use casebook_api::{Caller, Role};
use casebook_projections::{begin_scoped, ReadScope};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::common::TestDb;

/// Every read model with a customer_id column, protected per customer.
const CUSTOMER_TABLES: &[&str] = &[
    "crm_customers",
    "crm_customer_identifiers",
    "crm_tickets",
    "crm_conversations",
    "crm_messages",
];
/// Staff-only tables (knowledgeSearch).
const STAFF_TABLES: &[&str] = &["kb_documents", "kb_chunks"];

/// Two customers with a ticket, a conversation, an identifier and two
/// messages each, and one knowledge base document; written as the owner
/// with no scope, as projectors write.
async fn seed(db: impl sqlx::PgExecutor<'_> + Copy) -> (Uuid, Uuid) {
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    for (customer, email) in [(a, "a@example.com"), (b, "b@example.com")] {
        let ticket = Uuid::new_v4();
        for sql in [
            "INSERT INTO crm_customers (customer_id, name, created_at, updated_at)
             VALUES ($1, 'someone', now(), now())",
            "INSERT INTO crm_customer_identifiers (kind, value, customer_id, linked_at)
             VALUES ('email', $3, $1, now())",
            "INSERT INTO crm_tickets (ticket_id, customer_id, channel, category, priority, status,
                                      created_at, updated_at, first_response_due, resolution_due,
                                      sla_due_at, state)
             VALUES ($2, $1, 'webform', 'general', 'medium', 'open', now(), now(), now(), now(),
                     now(), '{}')",
            "INSERT INTO crm_conversations (ticket_id, customer_id, channels, started_at, last_message_at)
             VALUES ($2, $1, ARRAY['webform'], now(), now())",
            "INSERT INTO crm_messages (message_id, ticket_id, customer_id, direction, channel, body, at, position)
             VALUES (gen_random_uuid(), $2, $1, 'inbound', 'webform', 'hello', now(), 1),
                    (gen_random_uuid(), $2, $1, 'outbound', 'webform', 'hi', now(), 2)",
        ] {
            sqlx::query(sql)
                .bind(customer)
                .bind(ticket)
                .bind(email)
                .execute(db)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
    }
    sqlx::query(
        "INSERT INTO kb_documents (document_id, title, source, content_hash, body, model)
         VALUES ('refunds', 'Refunds', 'test', 'h', 'body', 'm')",
    )
    .execute(db)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO kb_chunks (chunk_id, document_id, ordinal, title, body, embedding)
         VALUES ('refunds#0', 'refunds', 0, 'Refunds', 'body', array_fill(0.1::real, ARRAY[384])::vector)",
    )
    .execute(db)
    .await
    .unwrap();
    (a, b)
}

/// The SQLSTATE a statement failed with (None when it succeeded).
fn sql_state<T>(result: Result<T, sqlx::Error>) -> Option<String> {
    match result {
        Ok(_) => None,
        Err(e) => e
            .as_database_error()
            .and_then(|d| d.code())
            .map(|c| c.into_owned()),
    }
}

async fn count(conn: &mut PgConnection, table: &str, filter: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table} {filter}"))
        .fetch_one(conn)
        .await
        .unwrap_or_else(|e| panic!("{table}: {e}"))
}

/// Rows of every protected table visible in `scope`, as casebook_api.
async fn visible(pool: &PgPool, scope: &ReadScope, filter: &str) -> Vec<(String, i64)> {
    let mut tx = begin_scoped(pool, scope).await.unwrap();
    let mut out = Vec::new();
    for t in CUSTOMER_TABLES {
        out.push((t.to_string(), count(&mut tx, t, filter).await));
    }
    tx.commit().await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_sees_only_their_own_rows_in_every_protected_table() {
    let db = TestDb::create().await;
    let (a, b) = seed(&db.pool).await;

    let own = format!("WHERE customer_id = '{a}'");
    let others = format!("WHERE customer_id <> '{a}'");
    let expected = [1, 1, 1, 1, 2];
    for ((table, n), want) in visible(&db.pool, &ReadScope::customer(a), "")
        .await
        .into_iter()
        .zip(expected)
    {
        assert_eq!(n, want, "{table}: customer a sees their rows only");
    }
    for (table, n) in visible(&db.pool, &ReadScope::customer(a), &own).await {
        assert!(n > 0, "{table}");
    }
    for (table, n) in visible(&db.pool, &ReadScope::customer(a), &others).await {
        assert_eq!(n, 0, "{table}: nothing of customer b");
    }
    // The other way round.
    for (table, n) in visible(&db.pool, &ReadScope::customer(b), &own).await {
        assert_eq!(n, 0, "{table}: nothing of customer a");
    }
    // A customer scope without a customer, or an unknown role: nothing.
    for scope in [
        ReadScope {
            role: "customer".into(),
            customer_id: None,
        },
        ReadScope::staff("root"),
        ReadScope::staff(""),
    ] {
        for (table, n) in visible(&db.pool, &scope, "").await {
            assert_eq!(n, 0, "{table} in {scope:?}");
        }
    }
    // Staff read everything; customers no knowledge base.
    for role in ["agent", "supervisor", "analyst", "auditor"] {
        let scope = ReadScope::staff(role);
        for ((table, n), want) in visible(&db.pool, &scope, "")
            .await
            .into_iter()
            .zip([2, 2, 2, 2, 4])
        {
            assert_eq!(n, want, "{table} as {role}");
        }
        let mut tx = begin_scoped(&db.pool, &scope).await.unwrap();
        for t in STAFF_TABLES {
            assert_eq!(count(&mut tx, t, "").await, 1, "{t} as {role}");
        }
    }
    let mut tx = begin_scoped(&db.pool, &ReadScope::customer(a))
        .await
        .unwrap();
    for t in STAFF_TABLES {
        assert_eq!(count(&mut tx, t, "").await, 0, "{t} as a customer");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn casebook_api_without_a_scope_sees_nothing_and_never_writes() {
    let db = TestDb::create().await;
    let (a, _) = seed(&db.pool).await;

    // A forgotten SET LOCAL of the scope: nothing leaks.
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL ROLE casebook_api")
        .execute(&mut *tx)
        .await
        .unwrap();
    for t in CUSTOMER_TABLES.iter().chain(STAFF_TABLES) {
        assert_eq!(count(&mut tx, t, "").await, 0, "{t} with no scope");
    }
    // Nor anything outside the read models.
    let denied = sqlx::query("SELECT 1 FROM events LIMIT 1")
        .execute(&mut *tx)
        .await;
    assert_eq!(sql_state(denied).as_deref(), Some("42501"), "events");
    drop(tx);
    for t in [
        "events",
        "users",
        "sessions",
        "projector_offsets",
        "gmail_messages",
    ] {
        let mut tx = begin_scoped(&db.pool, &ReadScope::staff("auditor"))
            .await
            .unwrap();
        let denied = sqlx::query(&format!("SELECT 1 FROM {t} LIMIT 1"))
            .execute(&mut *tx)
            .await;
        assert_eq!(
            sql_state(denied).as_deref(),
            Some("42501"),
            "{t} is not granted"
        );
    }

    // No write, in any scope.
    for scope in [ReadScope::customer(a), ReadScope::staff("supervisor")] {
        for sql in [
            format!(
                "INSERT INTO crm_customers (customer_id, name, created_at, updated_at) VALUES ('{a}', 'x', now(), now())"
            ),
            "UPDATE crm_tickets SET status = 'resolved'".to_string(),
            "DELETE FROM crm_messages".to_string(),
            "DELETE FROM kb_documents".to_string(),
        ] {
            // A scoped transaction is READ ONLY (25006)…
            let mut tx = begin_scoped(&db.pool, &scope).await.unwrap();
            let refused = sqlx::query(&sql).execute(&mut *tx).await;
            assert_eq!(
                sql_state(refused).as_deref(),
                Some("25006"),
                "{sql} in {scope:?}"
            );
            drop(tx);
            // …and without that, the role has no write grant (42501).
            let mut tx = db.pool.begin().await.unwrap();
            sqlx::query("SET LOCAL ROLE casebook_api")
                .execute(&mut *tx)
                .await
                .unwrap();
            let refused = sqlx::query(&sql).execute(&mut *tx).await;
            assert_eq!(
                sql_state(refused).as_deref(),
                Some("42501"),
                "{sql} as casebook_api"
            );
        }
    }
    let mut conn = db.pool.acquire().await.unwrap();
    assert_eq!(count(&mut conn, "crm_messages", "").await, 4);
    assert_eq!(
        count(&mut conn, "crm_tickets", "WHERE status = 'open'").await,
        2
    );
}

/// With FORCE ROW LEVEL SECURITY the policies bind the table owner too
/// (the local stack's user is a superuser, which bypasses RLS, so the test
/// makes a plain role the owner, inside a transaction that is rolled back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policies_hold_for_the_table_owner_with_force() {
    let db = TestDb::create().await;
    let (a, b) = seed(&db.pool).await;
    let owner = format!("casebook_rls_owner_{}", Uuid::new_v4().simple());

    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query(&format!("CREATE ROLE {owner} NOLOGIN"))
        .execute(&mut *tx)
        .await
        .unwrap();
    for t in CUSTOMER_TABLES.iter().chain(STAFF_TABLES) {
        sqlx::query(&format!("ALTER TABLE {t} OWNER TO {owner}"))
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    sqlx::query(&format!("SET LOCAL ROLE {owner}"))
        .execute(&mut *tx)
        .await
        .unwrap();

    // Unscoped, as projectors run: everything, and writes go through.
    assert_eq!(count(&mut tx, "crm_tickets", "").await, 2);
    sqlx::query(
        "INSERT INTO crm_customers (customer_id, name, created_at, updated_at)
         VALUES (gen_random_uuid(), 'c', now(), now())",
    )
    .execute(&mut *tx)
    .await
    .expect("an unscoped owner writes");
    sqlx::query("UPDATE crm_tickets SET priority = 'high'")
        .execute(&mut *tx)
        .await
        .expect("an unscoped owner updates");
    assert_eq!(count(&mut tx, "crm_customers", "").await, 3);

    // The same query, as the owner with a customer's scope: the policy holds.
    sqlx::query(
        "SELECT set_config('casebook.role', 'customer', true), set_config('casebook.customer_id', $1, true)",
    )
    .bind(a.to_string())
    .execute(&mut *tx)
    .await
    .unwrap();
    for t in CUSTOMER_TABLES {
        let all = count(&mut tx, t, "").await;
        let own = count(&mut tx, t, &format!("WHERE customer_id = '{a}'")).await;
        assert!(all > 0, "{t}");
        assert_eq!(all, own, "{t}: the owner in a's scope sees only a's rows");
        assert_eq!(
            count(&mut tx, t, &format!("WHERE customer_id = '{b}'")).await,
            0
        );
    }
    // Without FORCE the owner would see it all: FORCE is what holds.
    sqlx::query("SET LOCAL ROLE NONE")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("ALTER TABLE crm_tickets NO FORCE ROW LEVEL SECURITY")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(&format!("SET LOCAL ROLE {owner}"))
        .execute(&mut *tx)
        .await
        .unwrap();
    assert_eq!(count(&mut tx, "crm_tickets", "").await, 2);
    // A scoped owner cannot write (only unscoped commands and projectors do).
    let refused = sqlx::query(
        "INSERT INTO crm_messages (message_id, ticket_id, customer_id, direction, channel, body, at, position)
         VALUES (gen_random_uuid(), gen_random_uuid(), $1, 'inbound', 'webform', 'x', now(), 9)",
    )
    .bind(a)
    .execute(&mut *tx)
    .await;
    assert_eq!(sql_state(refused).as_deref(), Some("42501"));
    tx.rollback().await.unwrap();

    // Nothing of it stayed: the role and ownership went with the rollback.
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
            .bind(&owner)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(!exists);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_returns_unscoped_as_the_owner() {
    let db = TestDb::create().await;
    let pool = casebook::db::connect(&db.url, 1, casebook::db::Purpose::Serve)
        .await
        .unwrap();
    seed(&pool).await;
    let (who_before, _): (String, Option<String>) =
        sqlx::query_as("SELECT current_user::text, casebook_scope_role()")
            .fetch_one(&pool)
            .await
            .unwrap();
    let mut tx = begin_scoped(&pool, &ReadScope::customer(Uuid::new_v4()))
        .await
        .unwrap();
    let (who, scope): (String, Option<String>) =
        sqlx::query_as("SELECT current_user::text, casebook_scope_role()")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    assert_eq!(
        (who.as_str(), scope.as_deref()),
        ("casebook_api", Some("customer"))
    );
    // Dropped without a commit, as on an error path.
    drop(tx);
    // The one connection again: the owner, no scope, every row (a projector
    // reading or writing after an API read on the same connection).
    let (who, scope): (String, Option<String>) =
        sqlx::query_as("SELECT current_user::text, casebook_scope_role()")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(who, who_before);
    assert_eq!(scope, None);
    let mut conn = pool.acquire().await.unwrap();
    assert_eq!(count(&mut conn, "crm_messages", "").await, 4);
    sqlx::query("UPDATE crm_tickets SET status = 'pending'")
        .execute(&mut *conn)
        .await
        .unwrap();
    drop(conn);
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protecting_a_table_is_idempotent_and_needs_a_customer_id() {
    let db = TestDb::create().await;
    // Applied again (as the lead's merge migration will for new tables).
    sqlx::query("SELECT casebook_protect_read_model('crm_tickets')")
        .execute(&db.pool)
        .await
        .unwrap();
    let policies: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_policies WHERE tablename = 'crm_tickets'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(policies, 4);
    let refused = sqlx::query("SELECT casebook_protect_read_model('kb_documents')")
        .execute(&db.pool)
        .await;
    assert!(refused
        .unwrap_err()
        .to_string()
        .contains("has no customer_id column"));
    // The role exists once in the cluster, whatever the number of
    // databases migrated.
    let roles: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_roles WHERE rolname = 'casebook_api'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(roles, 1);
}

/// Which transaction a read ran in (its backend and start time) and the
/// scope it saw.
async fn transaction_of(db: &Db) -> (i32, String, String, i64) {
    let mut conn = db.begin().await.unwrap();
    let (pid, started, role): (i32, String, String) =
        sqlx::query_as("SELECT pg_backend_pid(), now()::text, current_setting('casebook.role')")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    let tickets = count(&mut conn, "crm_tickets", "").await;
    conn.commit().await.unwrap();
    (pid, started, role, tickets)
}

/// A GraphQL request's reads share one scoped transaction (one `BEGIN` and
/// one `COMMIT` a request, however much it nests); a subscription
/// connection's reads each take their own, so it never holds one open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requests_reads_share_one_scoped_transaction_and_a_connections_reads_do_not() {
    let db = TestDb::create().await;
    let (a, _) = seed(&db.pool).await;
    let caller = |role, customer_id| Caller {
        sub: "reader".into(),
        role,
        customer_id,
        session_id: Uuid::new_v4(),
        name: None,
        permissions: Vec::new(),
    };

    let request = Db::for_request(db.pool.clone(), caller(Role::Customer, Some(a)));
    let first = transaction_of(&request).await;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let second = transaction_of(&request).await;
    assert_eq!(first, second, "one transaction for the whole request");
    assert_eq!(
        (first.2.as_str(), first.3),
        ("customer", 1),
        "in the customer's scope"
    );
    assert_eq!(request.reads(), 2, "each read is still counted");
    request.finish().await;
    let after = transaction_of(&request).await;
    assert_ne!(
        after.1, first.1,
        "a finished request's next read begins anew"
    );
    request.finish().await;

    let connection = Db::per_read(db.pool.clone(), caller(Role::Agent, None));
    let first = transaction_of(&connection).await;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let second = transaction_of(&connection).await;
    assert_ne!(first.1, second.1, "a transaction per read");
    assert_eq!(
        (second.2.as_str(), second.3),
        ("agent", 2),
        "staff read everything"
    );
    // Nothing is left open: every connection of the pool is idle.
    let open: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
          WHERE datname = current_database() AND state LIKE 'idle in transaction%'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(open, 0);
}
