//! Rebuilding read models without downtime: queries running throughout a
//! rebuild all succeed and never see an empty or partial read model, the
//! rebuilt rows are the live ones, and the live consumer, which kept
//! working meanwhile, carries on after the swap with no gap and no double.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use casebook::app::Role;
use casebook_api::auth::Role as TokenRole;
use serde_json::json;

use crate::audit::{assert_succeeded, casebook};
use crate::common::{eventually, form, TestApp};
use crate::trail::{gql, token};

const SNAPSHOT: &str = "SELECT coalesce((SELECT jsonb_agg(t ORDER BY ticket_id) FROM (SELECT ticket_id, customer_id, status, messages_count, sla_due_at, assigned_to, state FROM crm_tickets) t)::text, '')
     || coalesce((SELECT jsonb_agg(c ORDER BY customer_id) FROM crm_customers c)::text, '')
     || coalesce((SELECT jsonb_agg(m ORDER BY message_id) FROM crm_messages m)::text, '')
     || coalesce((SELECT jsonb_agg(v ORDER BY ticket_id) FROM crm_conversations v)::text, '')
     || coalesce((SELECT jsonb_agg(i ORDER BY i) FROM crm_customer_identifiers i)::text, '')
     || coalesce((SELECT jsonb_agg(s ORDER BY projector, aggregate_type, aggregate_id) FROM projector_stream_sequences s)::text, '')";

/// The rows of these tickets, but for when they were projected.
const FIRST_TICKETS: &str =
    "SELECT jsonb_agg(to_jsonb(t) - 'projected_at' ORDER BY ticket_id)::text
       FROM crm_tickets t WHERE ticket_id = ANY($1)";

/// Waits until every projector has every message of `n` tickets.
async fn projected(app: &TestApp, n: i64) {
    let pool = app.pool().clone();
    eventually("every ticket projected", Duration::from_secs(90), || {
        let pool = pool.clone();
        async move {
            let (m, t, c, v): (i64, i64, i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM crm_messages), (SELECT count(*) FROM crm_tickets),
                        (SELECT count(*) FROM crm_customers), (SELECT count(*) FROM crm_conversations)",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            (m == n && t == n && c == n && v == n).then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_while_queries_and_the_live_consumer_run_loses_nothing_and_doubles_nothing() {
    let app = Arc::new(TestApp::spawn_with(&[Role::Api, Role::Relay, Role::Projector], &[]).await);
    const BEFORE: i64 = 12;
    const DURING: i64 = 8;
    for i in 0..BEFORE {
        app.submit_form(form(&format!("before{i}@example.com"), "rebuild me"))
            .await;
    }
    projected(&app, BEFORE).await;
    let first_ids: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT ticket_id FROM crm_tickets")
        .fetch_all(app.pool())
        .await
        .unwrap();
    let first_before: String = sqlx::query_scalar(FIRST_TICKETS)
        .bind(&first_ids)
        .fetch_one(app.pool())
        .await
        .unwrap();

    // Readers: GraphQL as a supervisor and plain SQL, throughout.
    let supervisor = token(&app, TokenRole::Supervisor, "sam").await;
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let mut readers = Vec::new();
    for _ in 0..2 {
        let (app, stop, reads, supervisor) =
            (app.clone(), stop.clone(), reads.clone(), supervisor.clone());
        readers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let body = gql(
                    &app,
                    &supervisor,
                    "{ tickets(first: 50) { totalCount edges { node { id status messages { body } } } } }",
                    json!({}),
                )
                .await;
                let total = body["data"]["tickets"]["totalCount"].as_i64().unwrap_or(-1);
                if body.get("errors").is_some() || total < BEFORE {
                    failures.push(body.to_string());
                }
                // A read model locked away for the rebuild would fail this.
                let messages: Result<i64, sqlx::Error> = async {
                    let mut tx = app.pool().begin().await?;
                    sqlx::query("SET LOCAL lock_timeout = '100ms'")
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query_scalar("SELECT count(*) FROM crm_messages")
                        .fetch_one(&mut *tx)
                        .await
                }
                .await;
                match messages {
                    Ok(n) if n >= BEFORE => {}
                    other => failures.push(format!("crm_messages: {other:?}")),
                }
                reads.fetch_add(1, Ordering::Relaxed);
            }
            failures
        }));
    }
    // The live consumer keeps working: more tickets arrive during the rebuild.
    let writer = {
        let app = app.clone();
        tokio::spawn(async move {
            for i in 0..DURING {
                app.submit_form(form(
                    &format!("during{i}@example.com"),
                    "arriving mid-rebuild",
                ))
                .await;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
    };
    let out = {
        let app = app.clone();
        tokio::task::spawn_blocking(move || casebook(&app, &["replay", "projections"]))
            .await
            .unwrap()
    };
    assert_succeeded(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    for name in ["crm-customers", "crm-tickets", "crm-messages"] {
        assert!(stdout.contains(name), "{stdout}");
    }
    // Not a terminal: progress as plain lines.
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("swapped in"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    writer.await.unwrap();
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        let failures = reader.await.unwrap();
        assert!(failures.is_empty(), "{failures:?}");
    }
    assert!(reads.load(Ordering::Relaxed) > 0);
    // The shadow schemas are gone.
    assert_eq!(
        app.count("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'casebook_shadow_%'")
            .await,
        0
    );

    // No gap, no double: every message once, in every read model.
    projected(&app, BEFORE + DURING).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        app.count("SELECT count(*) FROM crm_messages").await,
        app.count("SELECT count(*) FROM events WHERE event_type = 'CustomerMessageReceived'")
            .await
    );
    let after_live: String = sqlx::query_scalar(SNAPSHOT)
        .fetch_one(app.pool())
        .await
        .unwrap();
    // What the consumer built on the swapped-in rows is what a quiet
    // rebuild builds from the store.
    let again = casebook(&app, &["replay", "projections"]);
    assert_eq!(again.status.code(), Some(0));
    let rebuilt: String = sqlx::query_scalar(SNAPSHOT)
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert!(
        after_live == rebuilt,
        "live after the swap differs from a quiet rebuild"
    );
    // And the first tickets' rows were the same all along.
    let first: String = sqlx::query_scalar(FIRST_TICKETS)
        .bind(&first_ids)
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert!(first == first_before, "the first tickets' rows changed");
    match Arc::try_unwrap(app) {
        Ok(app) => app.stop().await,
        Err(_) => panic!("the app is still shared"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_repairs_a_wrong_read_model_and_leaves_right_rows_untouched() {
    let app = TestApp::spawn_with(&[Role::Api, Role::Relay, Role::Projector], &[]).await;
    for i in 0..3 {
        app.submit_form(form(&format!("swap{i}@example.com"), "repair me"))
            .await;
    }
    projected(&app, 3).await;
    // Every projector has them (identifiers and metrics too).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let right: String = sqlx::query_scalar(SNAPSHOT)
        .fetch_one(app.pool())
        .await
        .unwrap();
    let stamps = |app: &TestApp| {
        let pool = app.pool().clone();
        async move {
            sqlx::query_as::<_, (uuid::Uuid, chrono::DateTime<chrono::Utc>)>(
                "SELECT ticket_id, projected_at FROM crm_tickets ORDER BY ticket_id",
            )
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    let before = stamps(&app).await;
    let ids: Vec<uuid::Uuid> = before.iter().map(|(id, _)| *id).collect();

    // The live read model goes wrong: a changed row, missing rows, a row
    // the store never had.
    for sql in [
        "UPDATE crm_tickets SET status = 'closed', messages_count = 7 WHERE ticket_id = $1",
        "DELETE FROM crm_messages WHERE ticket_id = $2",
        "INSERT INTO crm_customers (customer_id, name, created_at, updated_at)
         VALUES ('00000000-0000-7000-8000-000000000001', 'nobody', now(), now())",
    ] {
        sqlx::query(sql)
            .bind(ids[0])
            .bind(ids[1])
            .execute(app.pool())
            .await
            .unwrap();
    }
    let out = casebook(&app, &["replay", "projections"]);
    assert_succeeded(&out);
    let repaired: String = sqlx::query_scalar(SNAPSHOT)
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert!(
        repaired == right,
        "the rebuild did not repair the read model"
    );
    // Only the wrong ticket row was written again; the right ones kept
    // the time they were projected.
    let after = stamps(&app).await;
    assert_ne!(after[0], before[0]);
    assert_eq!(after[1..], before[1..]);
    app.stop().await;
}

/// The indexes each projector says only readers use exist, on its own
/// tables, and are not what its writes need (a primary key or a unique
/// index): a renamed or dropped index would otherwise leave a stale name
/// behind, and a unique one left out of a shadow would break its upserts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reader_only_index_is_a_non_unique_index_of_its_projectors_tables() {
    let db = crate::common::TestDb::create().await;
    for projector in casebook_projections::all_projectors() {
        for index in projector.reader_indexes() {
            let found: Option<(String, bool)> = sqlx::query_as(
                "SELECT t.relname::text, x.indisunique
                   FROM pg_index x
                   JOIN pg_class i ON i.oid = x.indexrelid
                   JOIN pg_class t ON t.oid = x.indrelid
                   JOIN pg_namespace n ON n.oid = i.relnamespace
                  WHERE n.nspname = 'public' AND i.relname = $1",
            )
            .bind(index)
            .fetch_optional(&db.pool)
            .await
            .unwrap();
            let (table, unique) =
                found.unwrap_or_else(|| panic!("{}: no index {index}", projector.name()));
            assert!(
                projector.tables().contains(&table.as_str()),
                "{}: {index} is on {table}, not one of its tables",
                projector.name()
            );
            assert!(!unique, "{}: {index} is unique", projector.name());
        }
    }
}

/// Every row the projectors own, but for the clock's `projected_at` and
/// `updated_at` of a bucket, and their per-stream sequences.
const ALL_ROWS: &str = "SELECT coalesce((SELECT jsonb_agg(to_jsonb(t) - 'projected_at' ORDER BY ticket_id) FROM crm_tickets t)::text, '-')
     || '|' || coalesce((SELECT jsonb_agg(e ORDER BY escalation_id) FROM crm_escalations e)::text, '-')
     || '|' || coalesce((SELECT jsonb_agg(a ORDER BY approval_id) FROM crm_approvals a)::text, '-')
     || '|' || coalesce((SELECT jsonb_agg(c ORDER BY customer_id) FROM crm_customers c)::text, '-')
     || '|' || coalesce((SELECT jsonb_agg(m ORDER BY message_id) FROM crm_messages m)::text, '-')
     || '|' || coalesce((SELECT jsonb_agg(v ORDER BY ticket_id) FROM crm_conversations v)::text, '-')
     || '|' || coalesce((SELECT jsonb_agg(i ORDER BY kind, value) FROM crm_customer_identifiers i)::text, '-')
     || '|' || coalesce((SELECT jsonb_agg(m ORDER BY ticket_id) FROM metrics_tickets m)::text, '-')
     || '|' || coalesce((SELECT jsonb_agg(to_jsonb(b) - 'updated_at' ORDER BY grain, channel, config, start) FROM metrics_buckets b)::text, '-')
     || '|' || coalesce((SELECT jsonb_agg(s ORDER BY projector, aggregate_type, aggregate_id) FROM projector_stream_sequences s)::text, '-')";

/// Every projected row ([`ALL_ROWS`]).
async fn all_rows(app: &TestApp) -> String {
    sqlx::query_scalar(ALL_ROWS)
        .fetch_one(app.pool())
        .await
        .unwrap()
}

/// `n` web-form tickets from `who0@example.com`, `who1@…`; their ids.
async fn submitted(app: &TestApp, who: &str, body: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let created: serde_json::Value = app
            .submit_form(form(&format!("{who}{i}@example.com"), body))
            .await
            .json()
            .await
            .unwrap();
        ids.push(created["ticket_id"].as_str().unwrap().to_string());
    }
    ids
}

/// Tickets through intake, two of them resolved later (a third event of
/// their stream, pages after the first two), built by the live projectors;
/// then the projectors stop. Returns every projected row.
async fn live_rows(app: &mut TestApp) -> String {
    let ids = submitted(app, "empty", "build me again", 5).await;
    for id in &ids[..2] {
        casebook_commands::EventStore::new(app.pool().clone())
            .execute::<casebook_domain::Ticket>(
                id,
                casebook_domain::TicketCommand::Resolve {
                    resolved_by: "agent:grace".into(),
                    resolution: Some("answered".into()),
                    at: chrono::Utc::now(),
                },
                &casebook_domain::EventMetadata::new(
                    "rebuild-test",
                    casebook_domain::Actor::system("test"),
                ),
            )
            .await
            .unwrap();
    }
    projected(app, 5).await;
    let pool = app.pool().clone();
    eventually("the resolutions projected", Duration::from_secs(60), || {
        let pool = pool.clone();
        async move {
            let (resolved, streams, buckets): (i64, i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM crm_tickets WHERE resolved_at IS NOT NULL),
                        (SELECT count(*) FROM projector_streams),
                        (SELECT count(*) FROM metrics_tickets)",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            // Six projectors: four follow five tickets, two five customers.
            (resolved == 2 && streams == 30 && buckets == 5).then_some(())
        }
    })
    .await;
    // Every projector has reached every stream's end.
    eventually("every stream projected", Duration::from_secs(60), || {
        let pool = pool.clone();
        async move {
            let behind: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM projector_streams s
                  WHERE s.last_sequence < (SELECT max(sequence) FROM events e
                                            WHERE e.aggregate_type = s.aggregate_type
                                              AND e.aggregate_id = s.aggregate_id)",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            (behind == 0).then_some(())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    app.halt().await;
    all_rows(app).await
}

/// Empties every projector's tables and its per-stream sequences.
async fn empty_read_models(pool: &sqlx::PgPool) {
    for projector in casebook_projections::all_projectors() {
        for table in projector.tables() {
            sqlx::query(&format!("DELETE FROM {table}"))
                .execute(pool)
                .await
                .unwrap();
        }
    }
    sqlx::query("DELETE FROM projector_streams")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM projector_baselines")
        .execute(pool)
        .await
        .unwrap();
}

/// Every projector table's identity and what readers and access rules
/// depend on: its oid, then its columns, constraints, indexes, row-level
/// security, policies, grants and owner.
const TABLES: &str = "
SELECT jsonb_object_agg(c.relname, jsonb_build_object(
         'oid', c.oid,
         'columns', (SELECT jsonb_agg(jsonb_build_array(a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                                                        a.attgenerated, pg_get_expr(d.adbin, d.adrelid)) ORDER BY a.attnum)
                       FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                      WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
         'constraints', (SELECT jsonb_agg(jsonb_build_array(k.conname, k.contype, pg_get_constraintdef(k.oid)) ORDER BY k.conname)
                           FROM pg_constraint k WHERE k.conrelid = c.oid),
         'indexes', (SELECT jsonb_agg(pg_get_indexdef(x.indexrelid) ORDER BY pg_get_indexdef(x.indexrelid)) FROM pg_index x WHERE x.indrelid = c.oid),
         'security', jsonb_build_array(c.relrowsecurity, c.relforcerowsecurity, c.relacl::text[], c.relowner::regrole::text,
                                       c.relpersistence),
         'policies', (SELECT jsonb_agg(jsonb_build_array(p.polname, p.polcmd, p.polpermissive, p.polroles::regrole[]::text[],
                                                         pg_get_expr(p.polqual, p.polrelid),
                                                         pg_get_expr(p.polwithcheck, p.polrelid)) ORDER BY p.polname)
                        FROM pg_policy p WHERE p.polrelid = c.oid)))::text
  FROM pg_class c
 WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r' AND c.relname = ANY($1)";

/// [`TABLES`] of every projector's tables: (oids, the rest).
async fn tables(app: &TestApp) -> (serde_json::Value, serde_json::Value) {
    let names: Vec<&str> = casebook_projections::all_projectors()
        .iter()
        .flat_map(|p| p.tables().iter().copied())
        .collect();
    let text: String = sqlx::query_scalar(TABLES)
        .bind(&names)
        .fetch_one(app.pool())
        .await
        .unwrap();
    let mut all: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut oids = serde_json::Map::new();
    for (name, table) in all.as_object_mut().unwrap() {
        oids.insert(name.clone(), table["oid"].take());
    }
    assert_eq!(oids.len(), names.len());
    (serde_json::Value::Object(oids), all)
}

/// The first build of a read model (its live tables empty, as when it is
/// new or after a restore) moves its shadow in whole rather than copying
/// rows: the rows must be the ones the live projectors built; the tables
/// are new ones, with every column, constraint, index, policy and grant
/// the old ones had (an operator's own among them), and row-level security
/// still applies (a role reading
/// without a scope sees nothing). A second rebuild over the right rows
/// keeps the tables that hold rows and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_build_into_empty_read_models_gives_the_rows_the_live_projectors_built() {
    let mut app = TestApp::spawn_with(&[Role::Api, Role::Relay, Role::Projector], &[]).await;
    let live = live_rows(&mut app).await;
    empty_read_models(app.pool()).await;
    assert_eq!(app.count("SELECT count(*) FROM crm_tickets").await, 0);
    // An operator's own grant and policy, to a role whose name needs quoting.
    let reader = format!("Casebook Reader {}", uuid::Uuid::new_v4().simple());
    for statement in [
        format!("CREATE ROLE \"{reader}\" NOLOGIN"),
        format!("GRANT SELECT ON crm_messages TO \"{reader}\""),
        format!("CREATE POLICY \"reader's own\" ON crm_messages FOR SELECT TO \"{reader}\" USING (direction = 'inbound')"),
    ] {
        sqlx::query(&statement).execute(app.pool()).await.unwrap();
    }
    let (empty_oids, described) = tables(&app).await;
    let mut built_oids = None;
    for page in [2, casebook_replay::rebuild::CHUNK] {
        casebook_replay::rebuild_paged(app.pool(), &casebook_projections::all_projectors(), page)
            .await
            .unwrap();
        let rebuilt: String = all_rows(&app).await;
        assert!(
            rebuilt == live,
            "rebuilt in pages of {page}:\n{rebuilt}\nlive:\n{live}"
        );
        let (oids, now) = tables(&app).await;
        assert_eq!(now, described, "the tables describe as before");
        match &built_oids {
            None => {
                for (name, oid) in oids.as_object().unwrap() {
                    assert_ne!(oid, &empty_oids[name], "{name} was moved in");
                }
                built_oids = Some(oids);
            }
            Some(built) => {
                // (An empty one, with nothing to compare, is moved in again.)
                for (name, oid) in oids.as_object().unwrap() {
                    let rows = app.count(&format!("SELECT count(*) FROM {name}")).await;
                    if rows > 0 {
                        assert_eq!(oid, &built[name], "a second rebuild keeps {name}");
                    }
                }
            }
        }
        let mut tx = app.pool().begin().await.unwrap();
        sqlx::query("SET LOCAL ROLE casebook_api")
            .execute(&mut *tx)
            .await
            .unwrap();
        let unscoped: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_tickets")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(unscoped, 0, "row-level security applies to the moved table");
        sqlx::query("SELECT set_config('casebook.role', 'supervisor', true)")
            .execute(&mut *tx)
            .await
            .unwrap();
        let staff: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_tickets")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(staff, 5, "and its grants and staff policy too");
    }
    for statement in [
        "DROP POLICY \"reader's own\" ON crm_messages".to_string(),
        format!("REVOKE ALL ON crm_messages FROM \"{reader}\""),
        format!("DROP ROLE \"{reader}\""),
    ] {
        sqlx::query(&statement).execute(app.pool()).await.unwrap();
    }
    app.stop().await;
}

/// A first build while readers query the empty read models: every query
/// succeeds (a reader that meets the swap waits for it and then reads the
/// moved table by its name, prepared statements included), and each sees
/// a table either still empty or whole, never part of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_first_build_while_readers_query_fails_no_query_and_shows_no_partial_table() {
    let mut app = TestApp::spawn_with(&[Role::Api, Role::Relay, Role::Projector], &[]).await;
    let live = live_rows(&mut app).await;
    app.resume(&[Role::Api]).await;
    empty_read_models(app.pool()).await;
    let app = Arc::new(app);
    let supervisor = token(&app, TokenRole::Supervisor, "sam").await;
    let stop = Arc::new(AtomicBool::new(false));
    // Rounds of the SQL readers, each over every table.
    let rounds = Arc::new(AtomicUsize::new(0));
    let mut readers = Vec::new();
    for reader in 0..3 {
        let (app, stop, supervisor, rounds) = (
            app.clone(),
            stop.clone(),
            supervisor.clone(),
            rounds.clone(),
        );
        readers.push(tokio::spawn(async move {
            let (mut failures, mut seen) = (Vec::new(), std::collections::BTreeSet::new());
            while !stop.load(Ordering::Relaxed) {
                if reader == 0 {
                    let body = gql(
                        &app,
                        &supervisor,
                        "{ tickets(first: 50) { totalCount edges { node { id status } } } }",
                        json!({}),
                    )
                    .await;
                    match body["data"]["tickets"]["totalCount"].as_i64() {
                        Some(n) if body.get("errors").is_none() => {
                            seen.insert(format!("graphql tickets {n}"));
                        }
                        _ => failures.push(body.to_string()),
                    }
                    continue;
                }
                // Prepared and cached on the pool's connections.
                for table in [
                    "crm_tickets",
                    "crm_messages",
                    "crm_customers",
                    "metrics_tickets",
                ] {
                    match sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {table}"))
                        .fetch_one(app.pool())
                        .await
                    {
                        Ok(n) => {
                            seen.insert(format!("{table} {n}"));
                        }
                        Err(e) => failures.push(format!("{table}: {e}")),
                    }
                }
                rounds.fetch_add(1, Ordering::Relaxed);
            }
            (failures, seen)
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    casebook_replay::rebuild_paged(app.pool(), &casebook_projections::all_projectors(), 2)
        .await
        .unwrap();
    // Both SQL readers go round at least twice more, after the swaps.
    let after = rounds.load(Ordering::Relaxed);
    eventually("readers after the rebuild", Duration::from_secs(60), || {
        let done = rounds.load(Ordering::Relaxed);
        async move { (done >= after + 4).then_some(()) }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut seen = std::collections::BTreeSet::new();
    for reader in readers {
        let (failures, saw) = reader.await.unwrap();
        assert!(failures.is_empty(), "{failures:?}");
        seen.extend(saw);
    }
    let allowed = [
        "graphql tickets 0",
        "graphql tickets 5",
        "crm_tickets 0",
        "crm_tickets 5",
        "crm_messages 0",
        "crm_messages 5",
        "crm_customers 0",
        "crm_customers 5",
        "metrics_tickets 0",
        "metrics_tickets 5",
    ];
    for s in &seen {
        assert!(allowed.contains(&s.as_str()), "a reader saw {s}: {seen:?}");
    }
    assert!(seen.contains("crm_tickets 5"), "{seen:?}");
    assert!(all_rows(&app).await == live);
    match Arc::try_unwrap(app) {
        Ok(app) => app.stop().await,
        Err(_) => panic!("the app is still shared"),
    }
}

/// A first build whose empty live table a reader holds (an open
/// transaction that read it) does not wait for the reader: after half a
/// second the swap gives up moving the shadow in, copies the rows into the
/// table the reader holds, and the reader's transaction carries on and
/// sees them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_build_copies_rows_into_a_table_a_reader_holds() {
    let mut app = TestApp::spawn_with(&[Role::Api, Role::Relay, Role::Projector], &[]).await;
    let live = live_rows(&mut app).await;
    empty_read_models(app.pool()).await;
    let (before, _) = tables(&app).await;
    let mut reader = app.pool().begin().await.unwrap();
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_messages")
        .fetch_one(&mut *reader)
        .await
        .unwrap();
    assert_eq!(seen, 0);
    // Without the swap's bound it would wait for the reader for ever.
    tokio::time::timeout(
        Duration::from_secs(60),
        casebook_replay::rebuild(app.pool(), &casebook_projections::all_projectors()),
    )
    .await
    .expect("the swap does not wait for an idle reader")
    .unwrap();
    assert!(all_rows(&app).await == live);
    let (after, _) = tables(&app).await;
    assert_eq!(
        after["crm_messages"], before["crm_messages"],
        "the table the reader holds was kept"
    );
    assert_ne!(
        after["crm_tickets"], before["crm_tickets"],
        "the others moved in"
    );
    // The reader's transaction carries on, and its next statement sees
    // the rows whole.
    let again: i64 = sqlx::query_scalar("SELECT count(*) FROM crm_messages")
        .fetch_one(&mut *reader)
        .await
        .unwrap();
    assert_eq!(again, 5);
    reader.commit().await.unwrap();
    app.stop().await;
}

/// A first build whose live table something depends on (here a view an
/// operator made over it) is not moved in: dropping the table would take
/// the view with it. Nor is one whose shadow would not describe as the live
/// table does (here an operator's extended statistics, which `LIKE` copies
/// under another name). The rows are copied instead, the view keeps working
/// and shows them, and the statistics stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_build_copies_rows_into_a_table_a_view_depends_on_or_its_shadow_cannot_copy() {
    let mut app = TestApp::spawn_with(&[Role::Api, Role::Relay, Role::Projector], &[]).await;
    let live = live_rows(&mut app).await;
    empty_read_models(app.pool()).await;
    for statement in [
        "CREATE VIEW customer_names AS SELECT customer_id, name FROM crm_customers",
        "CREATE STATISTICS conversation_counts (dependencies) ON inbound_count, outbound_count FROM crm_conversations",
    ] {
        sqlx::query(statement).execute(app.pool()).await.unwrap();
    }
    let (before, _) = tables(&app).await;
    casebook_replay::rebuild(app.pool(), &casebook_projections::all_projectors())
        .await
        .unwrap();
    assert!(all_rows(&app).await == live);
    let (after, _) = tables(&app).await;
    assert_eq!(
        after["crm_customers"], before["crm_customers"],
        "the table a view depends on was kept"
    );
    assert_ne!(
        after["crm_tickets"], before["crm_tickets"],
        "the others moved in"
    );
    assert_eq!(
        after["crm_conversations"], before["crm_conversations"],
        "the table whose shadow describes otherwise was kept"
    );
    assert_eq!(app.count("SELECT count(*) FROM customer_names").await, 5);
    assert_eq!(
        app.count(
            "SELECT count(*) FROM pg_statistic_ext
              WHERE stxname = 'conversation_counts' AND stxrelid = 'crm_conversations'::regclass"
        )
        .await,
        1
    );
    assert_eq!(app.count("SELECT count(*) FROM crm_conversations").await, 5);
    for statement in [
        "DROP VIEW customer_names",
        "DROP STATISTICS conversation_counts",
    ] {
        sqlx::query(statement).execute(app.pool()).await.unwrap();
    }
    app.stop().await;
}

/// What fills a shadow (each projector's `shadow_filler`, which keeps
/// ticket states and metrics facts in memory between pages) writes what the
/// live path writes, page by page (pages of two events), with no per-stream
/// sequence written: the baseline where the pages ended gives every
/// stream's, and they are the live projectors' (the view
/// `projector_stream_sequences`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_fillers_page_by_page_and_a_baseline_give_the_live_rows_and_sequences() {
    use casebook_projections::store::{stored_event, EVENT_COLUMNS};
    use casebook_projections::{apply_rebuild_page, set_baseline};
    use sqlx::Row;

    let mut app = TestApp::spawn_with(&[Role::Api, Role::Relay, Role::Projector], &[]).await;
    let live = live_rows(&mut app).await;
    empty_read_models(app.pool()).await;
    let rows = sqlx::query(&format!(
        "SELECT transaction_id::text AS tx, {EVENT_COLUMNS} FROM events ORDER BY transaction_id, position"
    ))
    .fetch_all(app.pool())
    .await
    .unwrap();
    let last: &sqlx::postgres::PgRow = rows.last().unwrap();
    let (last_tx, last_position): (String, i64) = (last.get("tx"), last.get("position"));
    let events: Vec<casebook_domain::EventEnvelope> = rows
        .iter()
        .map(|row| stored_event(row).unwrap().into())
        .collect();
    let mut fillers = 0;
    for projector in casebook_projections::all_projectors() {
        let filler = projector.shadow_filler();
        fillers += usize::from(filler.is_some());
        let filler: &dyn casebook_projections::Projector =
            filler.as_deref().unwrap_or(projector.as_ref());
        for page in events.chunks(2) {
            let mut tx = app.pool().begin().await.unwrap();
            apply_rebuild_page(&mut tx, filler, page).await.unwrap();
            tx.commit().await.unwrap();
        }
        let mut tx = app.pool().begin().await.unwrap();
        casebook_projections::finish_fill_in(&mut tx, filler)
            .await
            .unwrap();
        set_baseline(&mut tx, projector.as_ref(), &last_tx, last_position)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    assert_eq!(fillers, 2, "tickets and metrics fill shadows from memory");
    assert_eq!(
        app.count("SELECT count(*) FROM projector_streams").await,
        0,
        "no per-stream row was written"
    );
    let filled: String = all_rows(&app).await;
    assert!(filled == live, "filled:\n{filled}\nlive:\n{live}");

    // The tickets filler holding one ticket at a time: it writes what it
    // kept back and reads states back from its table, to the same rows.
    empty_read_models(app.pool()).await;
    let tickets = casebook_projections::crm::ShadowTickets::holding(1);
    for page in events.chunks(3) {
        let mut tx = app.pool().begin().await.unwrap();
        apply_rebuild_page(&mut tx, &tickets, page).await.unwrap();
        tx.commit().await.unwrap();
    }
    let mut tx = app.pool().begin().await.unwrap();
    casebook_projections::finish_fill_in(&mut tx, &tickets)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let tickets_part = |all: &str| all.split('|').next().unwrap().to_string();
    let filled: String = all_rows(&app).await;
    assert_eq!(tickets_part(&filled), tickets_part(&live));
    app.stop().await;
}

/// After a rebuild, a projector has a baseline and no per-stream row; the
/// live path goes on from it: a copy of an event the rebuild applied is
/// skipped, the next event of a stream is applied (and gets its row), and
/// a stream whose next event is missing is filled from the store from
/// where the baseline left it, each event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_rebuild_the_live_path_goes_on_from_the_baseline_with_no_gap_and_no_double() {
    use casebook_domain::{Actor, EventEnvelope, EventMetadata, Ticket, TicketCommand};
    use casebook_projections::store::{stored_event, EVENT_COLUMNS};
    use casebook_projections::{apply_batch, crm::TicketsProjector};

    let app = TestApp::spawn_with(&[Role::Api], &[]).await;
    let ids = submitted(&app, "baseline", "go on from here", 2).await;
    casebook_replay::rebuild(app.pool(), &casebook_projections::all_projectors())
        .await
        .unwrap();
    assert_eq!(app.count("SELECT count(*) FROM projector_streams").await, 0);
    assert_eq!(
        app.count("SELECT count(*) FROM projector_baselines").await,
        6
    );
    let stream = |id: String| {
        let pool = app.pool().clone();
        async move {
            sqlx::query(&format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE aggregate_type = 'ticket' AND aggregate_id = $1 ORDER BY sequence"
            ))
            .bind(id)
            .fetch_all(&pool)
            .await
            .unwrap()
            .iter()
            .map(|row| EventEnvelope::from(stored_event(row).unwrap()))
            .collect::<Vec<_>>()
        }
    };
    let sequence = |id: String| {
        let pool = app.pool().clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT last_sequence FROM projector_stream_sequences
                  WHERE projector = 'crm-tickets' AND aggregate_type = 'ticket' AND aggregate_id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let before = stream(ids[0].clone()).await;
    let rebuilt_to = before.last().unwrap().sequence;
    assert_eq!(sequence(ids[0].clone()).await, rebuilt_to);
    let projector = TicketsProjector;

    // Copies of what the rebuild applied: skipped.
    let applied = apply_batch(app.pool(), &projector, &before, &[])
        .await
        .unwrap();
    assert_eq!(applied, 0, "a copy of a rebuilt event was applied again");

    let store = casebook_commands::EventStore::new(app.pool().clone());
    let meta = EventMetadata::new("baseline-test", Actor::system("test"));
    let resolve = || TicketCommand::Resolve {
        resolved_by: "agent:grace".into(),
        resolution: Some("answered".into()),
        at: chrono::Utc::now(),
    };
    // The next event: applied once, and recorded as a row.
    store
        .execute::<Ticket>(&ids[0], resolve(), &meta)
        .await
        .unwrap();
    let after = stream(ids[0].clone()).await;
    let next = &after[before.len()..];
    assert_eq!(next.len(), 1);
    assert_eq!(
        apply_batch(app.pool(), &projector, next, &[])
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        apply_batch(app.pool(), &projector, next, &[])
            .await
            .unwrap(),
        0
    );
    assert_eq!(sequence(ids[0].clone()).await, rebuilt_to + 1);
    assert_eq!(app.count("SELECT count(*) FROM projector_streams").await, 1);

    // The other ticket: resolved and reopened, and only the reopening
    // arrives; the resolution is read from the store, from the baseline on.
    let before = stream(ids[1].clone()).await;
    store
        .execute::<Ticket>(&ids[1], resolve(), &meta)
        .await
        .unwrap();
    store
        .execute::<Ticket>(
            &ids[1],
            TicketCommand::Reopen {
                reopened_by: "agent:grace".into(),
                reason: None,
                at: chrono::Utc::now(),
            },
            &meta,
        )
        .await
        .unwrap();
    let after = stream(ids[1].clone()).await;
    assert_eq!(after.len(), before.len() + 2);
    let applied = apply_batch(app.pool(), &projector, &after[after.len() - 1..], &[])
        .await
        .unwrap();
    assert_eq!(
        applied, 2,
        "the missing resolution and the reopening, once each"
    );
    assert_eq!(
        sequence(ids[1].clone()).await,
        after.last().unwrap().sequence
    );
    let (status, resolved): (String, bool) = sqlx::query_as(
        "SELECT status, state->>'resolved_at' IS NOT NULL FROM crm_tickets WHERE ticket_id = $1::uuid",
    )
    .bind(&ids[1])
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert_ne!(status, "resolved", "{status} {resolved}");

    // A rebuild now gives the same rows and sequences the live path reached.
    let live: String = all_rows(&app).await;
    casebook_replay::rebuild(app.pool(), &casebook_projections::all_projectors())
        .await
        .unwrap();
    let rebuilt: String = all_rows(&app).await;
    // Only the tickets projector was driven by hand: compare its part.
    let tickets_part = |all: &str| all.split('|').next().unwrap().to_string();
    assert_eq!(tickets_part(&rebuilt), tickets_part(&live));
    assert_eq!(app.count("SELECT count(*) FROM projector_streams").await, 0);
    app.stop().await;
}
