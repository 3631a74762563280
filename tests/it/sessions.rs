//! Users and sessions in Postgres: the `casebook user` and `casebook token
//! issue` commands through the real binary, and every bearer request
//! checked against its session row (idle, demoted, disabled, deleted).

use std::process::{Command, Output};

use casebook::app::Role;
use casebook_api::users::issue_token;
use casebook_api::{Role as TokenRole, TokenKeys};
use serde_json::Value;
use uuid::Uuid;

use crate::common::{form, TestApp, JWT_SECRET};

async fn api_only() -> TestApp {
    TestApp::spawn_with(&[Role::Api], &[]).await
}

/// The `casebook` binary against the test's database, signing with the
/// test's key.
fn casebook(app: &TestApp, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_casebook"))
        .args(args)
        .env("DATABASE_URL", &app.config.database_url)
        .env("KAFKA_BROKERS", &app.config.kafka_brokers)
        .env("KAFKA_TOPIC_PREFIX", &app.config.topic_prefix)
        .env("CASEBOOK_JWT_SECRET", JWT_SECRET)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the casebook binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `casebook token issue …`, expecting success; the token is the last line.
fn issue(app: &TestApp, args: &[&str]) -> String {
    let mut all = vec!["token", "issue"];
    all.extend_from_slice(args);
    let out = casebook(app, &all);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    stdout(&out)
        .lines()
        .last()
        .expect("a token line")
        .to_string()
}

/// `GET /me` with a bearer token: status and body.
async fn me(app: &TestApp, token: &str) -> (u16, Value) {
    let response = app
        .http
        .get(app.url("/me"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// `GET /ticket/{id}` with a bearer token: status and body.
async fn ticket(app: &TestApp, id: &str, token: &str) -> (u16, Value) {
    let response = app
        .http
        .get(app.url(&format!("/ticket/{id}")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// A web-form ticket and the customer who wrote it.
async fn a_ticket(app: &TestApp, email: &str) -> (String, Uuid) {
    let body: Value = app
        .submit_form(form(email, "Private detail"))
        .await
        .json()
        .await
        .unwrap();
    let ticket_id = body["ticket_id"].as_str().unwrap().to_string();
    let customer_id: Uuid = sqlx::query_scalar(
        "SELECT (payload->>'customer_id')::uuid FROM events WHERE aggregate_id = $1 AND sequence = 1",
    )
    .bind(&ticket_id)
    .fetch_one(app.pool())
    .await
    .unwrap();
    (ticket_id, customer_id)
}

async fn customer_token(app: &TestApp, sub: &str, customer_id: Uuid) -> String {
    issue_token(
        app.pool(),
        &TokenKeys::new(JWT_SECRET),
        TokenRole::Customer,
        sub,
        Some(customer_id),
        600,
    )
    .await
    .unwrap()
    .token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_issues_tokens_and_manages_users_with_effect_on_the_next_request() {
    let app = api_only().await;

    let token = issue(&app, &["--role", "agent", "--sub", "grace"]);
    let (status, body) = me(&app, &token).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["sub"], "grace");
    assert_eq!(body["role"], "agent");
    assert_eq!(
        app.count("SELECT count(*) FROM sessions WHERE sub = 'grace'")
            .await,
        1
    );

    // A customer token needs the customer: bad usage, exit 2, said clearly.
    let out = casebook(
        &app,
        &["token", "issue", "--role", "customer", "--sub", "ada"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--customer-id"), "{}", stderr(&out));
    assert!(stdout(&out).is_empty());
    assert_eq!(
        app.count("SELECT count(*) FROM users WHERE sub = 'ada'")
            .await,
        0
    );
    let customer = Uuid::new_v4().to_string();
    let ada = issue(
        &app,
        &[
            "--role",
            "customer",
            "--sub",
            "ada",
            "--customer-id",
            &customer,
        ],
    );
    let (_, body) = me(&app, &ada).await;
    assert_eq!(body["role"], "customer");
    assert_eq!(body["customer_id"], customer.as_str());

    // Demotion acts on the very next request, with the same token.
    let out = casebook(&app, &["user", "set-role", "grace", "analyst"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let (status, body) = me(&app, &token).await;
    assert_eq!(status, 200);
    assert_eq!(body["role"], "analyst");

    // A staff user added with a name; an existing sub is refused (exit 1).
    let out = casebook(
        &app,
        &[
            "user",
            "add",
            "linus",
            "--role",
            "supervisor",
            "--name",
            "Linus T",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = casebook(&app, &["user", "add", "linus", "--role", "agent"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    let linus = issue(&app, &["--role", "supervisor", "--sub", "linus"]);
    let (_, body) = me(&app, &linus).await;
    assert_eq!(body["name"], "Linus T");
    assert_eq!(body["role"], "supervisor");

    // A customer needs their customer id, and only a customer has one.
    let out = casebook(&app, &["user", "set-role", "grace", "customer"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--customer-id"), "{}", stderr(&out));
    let out = casebook(
        &app,
        &[
            "token",
            "issue",
            "--role",
            "agent",
            "--sub",
            "grace",
            "--customer-id",
            &customer,
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = casebook(
        &app,
        &[
            "token",
            "issue",
            "--role",
            "agent",
            "--sub",
            "grace",
            "--ttl-secs",
            "0",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(me(&app, &token).await.1["role"], "analyst");

    // Unknown users and roles.
    let out = casebook(&app, &["user", "set-role", "nobody", "agent"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no user"), "{}", stderr(&out));
    let out = casebook(&app, &["user", "set-role", "grace", "root"]);
    assert_eq!(out.status.code(), Some(2));

    // Disabled: the next request is refused, and no new token is issued.
    let out = casebook(&app, &["user", "disable", "grace"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let (status, body) = me(&app, &token).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"], "user_disabled");
    let out = casebook(
        &app,
        &["token", "issue", "--role", "agent", "--sub", "grace"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("disabled"), "{}", stderr(&out));
    // Enabled again, the old token stays revoked; a new one works.
    let out = casebook(&app, &["user", "enable", "grace"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(me(&app, &token).await.1["error"], "unauthorized");
    let again = issue(&app, &["--role", "agent", "--sub", "grace"]);
    assert_eq!(me(&app, &again).await.1["role"], "agent");

    // No token at all.
    let response = app.http.get(app.url("/me")).send().await.unwrap();
    assert_eq!(response.status(), 401);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_is_refused_with_session_expired() {
    let app = api_only().await;
    let (ticket_id, customer_id) = a_ticket(&app, "ada@example.com").await;
    let token = customer_token(&app, "ada", customer_id).await;
    let (status, body) = ticket(&app, &ticket_id, &token).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["messages"][0]["body"], "Private detail");

    // Used five minutes ago: accepted, and the use is recorded.
    sqlx::query("UPDATE sessions SET last_seen_at = now() - interval '5 minutes'")
        .execute(app.pool())
        .await
        .unwrap();
    assert_eq!(ticket(&app, &ticket_id, &token).await.0, 200);
    let age: f64 =
        sqlx::query_scalar("SELECT extract(epoch FROM now() - last_seen_at)::float8 FROM sessions")
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert!(age < 60.0, "last_seen_at touched: {age} s old");
    // Used 20 s ago: accepted without a write (at most one a minute).
    sqlx::query("UPDATE sessions SET last_seen_at = now() - interval '20 seconds'")
        .execute(app.pool())
        .await
        .unwrap();
    assert_eq!(ticket(&app, &ticket_id, &token).await.0, 200);
    let age: f64 =
        sqlx::query_scalar("SELECT extract(epoch FROM now() - last_seen_at)::float8 FROM sessions")
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert!(age >= 19.0, "last_seen_at left alone: {age} s old");

    // Idle for more than an hour: refused, and it stays refused.
    sqlx::query("UPDATE sessions SET last_seen_at = now() - interval '61 minutes'")
        .execute(app.pool())
        .await
        .unwrap();
    for _ in 0..2 {
        let (status, body) = ticket(&app, &ticket_id, &token).await;
        assert_eq!(status, 401);
        assert_eq!(body["error"], "session_expired");
        assert!(body.get("messages").is_none());
    }
    assert_eq!(me(&app, &token).await.1["error"], "session_expired");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_change_applies_to_the_next_request() {
    let app = api_only().await;
    let (ticket_id, customer_id) = a_ticket(&app, "ada@example.com").await;
    let token = customer_token(&app, "ada", customer_id).await;
    let (_, body) = ticket(&app, &ticket_id, &token).await;
    assert_eq!(body["messages"][0]["body"], "Private detail");

    // Ada is made an agent: the status page no longer shows her the
    // conversation (staff read it through GraphQL), with the same token.
    casebook_api::users::set_role(app.pool(), "ada", TokenRole::Agent, None)
        .await
        .unwrap();
    let (status, body) = ticket(&app, &ticket_id, &token).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.get("messages").is_none(), "{body}");
    assert_eq!(me(&app, &token).await.1["role"], "agent");

    // Made the customer of someone else's account: the ticket is gone.
    casebook_api::users::set_role(app.pool(), "ada", TokenRole::Customer, Some(Uuid::new_v4()))
        .await
        .unwrap();
    assert_eq!(ticket(&app, &ticket_id, &token).await.0, 404);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_user_is_refused_on_the_next_request() {
    let app = api_only().await;
    let (ticket_id, customer_id) = a_ticket(&app, "ada@example.com").await;
    let token = customer_token(&app, "ada", customer_id).await;
    assert_eq!(ticket(&app, &ticket_id, &token).await.0, 200);
    casebook_api::users::disable_user(app.pool(), "ada")
        .await
        .unwrap();
    let (status, body) = ticket(&app, &ticket_id, &token).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"], "user_disabled");
    assert!(body.get("messages").is_none());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_or_unknown_session_is_refused() {
    let app = api_only().await;
    let (ticket_id, customer_id) = a_ticket(&app, "ada@example.com").await;
    let token = customer_token(&app, "ada", customer_id).await;
    let other = customer_token(&app, "ada", customer_id).await;
    assert_eq!(ticket(&app, &ticket_id, &token).await.0, 200);

    let deleted = sqlx::query("DELETE FROM sessions WHERE session_id = $1")
        .bind(
            TokenKeys::new(JWT_SECRET)
                .verify(&token)
                .expect("our own token")
                .sid,
        )
        .execute(app.pool())
        .await
        .unwrap();
    assert_eq!(deleted.rows_affected(), 1);
    let (status, body) = ticket(&app, &ticket_id, &token).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"], "unauthorized");
    // The user's other session is untouched.
    assert_eq!(ticket(&app, &ticket_id, &other).await.0, 200);

    // Correctly signed, but no session was ever opened for it.
    let unsessioned = TokenKeys::new(JWT_SECRET)
        .issue(
            TokenRole::Customer,
            "ada",
            Some(customer_id),
            600,
            chrono::Utc::now().timestamp(),
        )
        .unwrap();
    let (status, body) = ticket(&app, &ticket_id, &unsessioned).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"], "unauthorized");

    // A session named by a token for another sub.
    let sid = TokenKeys::new(JWT_SECRET).verify(&other).unwrap().sid;
    let borrowed = TokenKeys::new(JWT_SECRET)
        .issue_for_session(
            TokenRole::Customer,
            "mallory",
            Some(customer_id),
            sid,
            600,
            chrono::Utc::now().timestamp(),
        )
        .unwrap();
    assert_eq!(ticket(&app, &ticket_id, &borrowed).await.0, 401);
    app.stop().await;
}

/// What a transaction opened by the session check runs as.
async fn scope_of(tx: &mut sqlx::PgConnection) -> (String, String, String, String) {
    sqlx::query_as(
        "SELECT current_user::text, current_setting('casebook.role'),
                current_setting('casebook.customer_id'), current_setting('transaction_read_only')",
    )
    .fetch_one(tx)
    .await
    .unwrap()
}

/// The pool's only connection is usable, as its owner, outside any
/// transaction: a refused check left nothing behind.
async fn connection_is_clean(pool: &sqlx::PgPool) {
    let user: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_ne!(user, "casebook_api");
    // VACUUM cannot run inside a transaction block.
    sqlx::query("VACUUM sessions")
        .execute(pool)
        .await
        .expect("not in a transaction");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remembered_session_opens_its_scoped_reads_in_the_same_round_trip_until_anything_changes()
{
    use casebook_api::session::fingerprint;
    use std::time::Duration;

    let db = crate::common::TestDb::create().await;
    // One connection: a refused check must leave it clean for the next use.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&db.url)
        .await
        .unwrap();
    let keys = TokenKeys::new(JWT_SECRET);
    let sessions =
        casebook_api::Sessions::new(pool.clone(), keys.clone(), Duration::from_secs(3600));
    let customer = Uuid::new_v4();
    let token = issue_token(
        &pool,
        &keys,
        TokenRole::Customer,
        "ada",
        Some(customer),
        600,
    )
    .await
    .unwrap()
    .token;

    // First request: the full check, no transaction yet; then remembered.
    let (caller, open) = sessions.authenticate_scoped(&token).await.unwrap();
    assert!(open.is_none());
    assert_eq!(caller.customer_id, Some(customer));
    let (again, open) = sessions.authenticate_scoped(&token).await.unwrap();
    assert_eq!(again, caller);
    let mut tx = open.expect("a remembered session opens its transaction with the check");
    assert_eq!(
        scope_of(&mut tx).await,
        (
            "casebook_api".to_string(),
            "customer".to_string(),
            customer.to_string(),
            "on".to_string()
        )
    );
    tx.commit().await.unwrap();
    connection_is_clean(&pool).await;

    // Each change, made behind the API's back as a DBA would, is seen on
    // the very next request: the remembered caller is refused, the full
    // check answers, and the one after that is remembered again.
    type Holds = fn(&casebook_api::Caller) -> bool;
    let changes: [(&str, Holds); 4] = [
        ("UPDATE users SET name = 'Ada L.'", |c| {
            c.name.as_deref() == Some("Ada L.")
        }),
        ("UPDATE users SET name = NULL", |c| c.name.is_none()),
        ("UPDATE users SET role = 'agent', customer_id = NULL", |c| {
            c.role == TokenRole::Agent && c.customer_id.is_none()
        }),
        (
            "UPDATE users SET role = 'auditor', permissions = '{auditor_pii}'",
            |c| c.role == TokenRole::Auditor && c.permissions == ["auditor_pii"],
        ),
    ];
    for (change, holds) in changes {
        sqlx::query(change).execute(&pool).await.unwrap();
        let (now, open) = sessions.authenticate_scoped(&token).await.unwrap();
        assert!(
            open.is_none(),
            "{change}: the remembered caller was refused"
        );
        assert!(holds(&now), "{change}: {now:?}");
        connection_is_clean(&pool).await;
        let (same, open) = sessions.authenticate_scoped(&token).await.unwrap();
        assert_eq!(same, now);
        let mut tx = open.expect("remembered again");
        let (user, role, customer_id, _) = scope_of(&mut tx).await;
        let expected_customer = now.customer_id.map(|c| c.to_string()).unwrap_or_default();
        assert_eq!(
            (user.as_str(), role.as_str(), customer_id.as_str()),
            (
                "casebook_api",
                now.role.as_str(),
                expected_customer.as_str()
            )
        );
        tx.rollback().await.unwrap();
        assert_eq!(fingerprint(&now), fingerprint(&same));
    }

    // Unseen for five minutes (longer than the touch interval): the full
    // check, which records the use.
    let run = |sql: &'static str| {
        let pool = pool.clone();
        async move { sqlx::query(sql).execute(&pool).await.unwrap() }
    };
    let opens = || async {
        sessions
            .authenticate_scoped(&token)
            .await
            .map(|(_, tx)| tx.is_some())
    };
    run("UPDATE sessions SET last_seen_at = now() - interval '5 minutes'").await;
    assert!(!opens().await.unwrap());
    assert!(opens().await.unwrap());

    // Idle past the limit, disabled, deleted: refused, with the full
    // check's answer, and the connection clean after each.
    let refusals = [
        (
            "UPDATE sessions SET last_seen_at = now() - interval '61 minutes'",
            "UPDATE sessions SET last_seen_at = now()",
            "session_expired",
        ),
        (
            "UPDATE users SET disabled_at = now()",
            "UPDATE users SET disabled_at = NULL",
            "user_disabled",
        ),
        ("DELETE FROM sessions", "SELECT 1", "unauthorized"),
    ];
    for (change, undo, code) in refusals {
        assert!(opens().await.unwrap(), "{change}: remembered before");
        run(change).await;
        let refused = opens().await.expect_err(change);
        assert_eq!(refused.code(), code, "{change}");
        connection_is_clean(&pool).await;
        run(undo).await;
        if code != "unauthorized" {
            assert!(!opens().await.unwrap(), "{undo}: the full check again");
        }
    }
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_fingerprint_is_the_same_in_rust_and_in_postgres() {
    use casebook_api::session::fingerprint;

    let db = crate::common::TestDb::create().await;
    let customer = Uuid::new_v4();
    let callers = [
        (TokenRole::Customer, Some(customer), None, vec![]),
        (TokenRole::Agent, None, Some(""), vec![]),
        (TokenRole::Analyst, None, Some("-"), vec![]),
        (
            TokenRole::Auditor,
            None,
            Some("Zoë O'Brien \u{1f}\u{1e} 李"),
            vec!["auditor_pii".to_string()],
        ),
    ];
    let mut seen = std::collections::HashSet::new();
    for (role, customer_id, name, permissions) in callers {
        let caller = casebook_api::Caller {
            sub: "user-ü".into(),
            role,
            customer_id,
            session_id: Uuid::new_v4(),
            name: name.map(str::to_string),
            permissions: permissions.clone(),
        };
        let in_sql: String =
            sqlx::query_scalar("SELECT casebook_caller_fingerprint($1, $2, $3, $4, $5)")
                .bind(&caller.sub)
                .bind(role.as_str())
                .bind(customer_id)
                .bind(name)
                .bind(&permissions)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(fingerprint(&caller).to_string(), in_sql, "{caller:?}");
        assert!(
            seen.insert(in_sql),
            "{caller:?}: each caller its own digest"
        );
    }
}
