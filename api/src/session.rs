//! Who is calling: a bearer token, checked against its session row on
//! every request.
//!
//! The token's signature and expiry are checked first (`auth.rs`); then the
//! session row it names (`sid`) and its user, in one indexed read:
//!
//! | what | answer (all 401) |
//! | --- | --- |
//! | no token, a bad signature, an expired token, an unknown (deleted) or revoked session, a session of another sub | `unauthorized` |
//! | the user is disabled | `user_disabled` |
//! | the session idle longer than the limit (`CASEBOOK_SESSION_IDLE_SECS`, default 1 hour), or past its expiry | `session_expired` |
//!
//! The caller's role and customer id are the user's current ones, not the
//! token's: a role change acts on the very next request.
//!
//! A GraphQL request needs the check and then a read transaction scoped to
//! the caller: two round trips (and two connections from the pool). So the
//! API remembers the caller each session's last full check found, and the
//! next request of that session does both in one:
//! `casebook_session_scope` (migration `…_session_scope.sql`) checks that
//! the session and its user are still exactly as remembered (by a digest of
//! sub, role, customer, name and permissions) and scopes the transaction,
//! or refuses before the `BEGIN`; a refusal forgets the session and takes
//! the full check. What is remembered only ever saves a round trip: it
//! never admits a request the full check would refuse. `last_seen_at` is
//! written at most once a minute per session (a quarter of the idle limit
//! when that is shorter), so a busy session costs one read per request and
//! one small update a minute; a session is therefore refused after between
//! the idle limit less that interval and the idle limit of no use.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use axum::Json;
use casebook_projections::ReadScope;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::auth::{Role, TokenKeys};
use crate::error::ApiError;
use crate::state::AppState;
use crate::users::{self, IssuedToken, UserError};

/// The default idle limit of a session.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(3600);
/// `last_seen_at` is written at most this often per session.
const TOUCH_EVERY: Duration = Duration::from_secs(60);
/// Longer bearer tokens are refused before any parsing.
const MAX_TOKEN_BYTES: usize = 4096;
/// How many sessions' callers are remembered (least recently used first
/// out): about 300 bytes each.
const REMEMBERED_SESSIONS: usize = 10_000;
/// The SQLSTATE `casebook_session_scope` raises when a session is not as
/// remembered.
const NOT_AS_REMEMBERED: &str = "CB401";

/// An authenticated caller, as of this request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Caller {
    pub sub: String,
    /// The user's current role.
    pub role: Role,
    /// The customer a `customer` is; `None` for staff.
    pub customer_id: Option<Uuid>,
    pub session_id: Uuid,
    pub name: Option<String>,
    /// Permissions beyond the role (`users.permissions`), as of this
    /// request: `auditor_pii`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub permissions: Vec<String>,
}

impl Caller {
    /// Whether the user holds `permission` (see [`crate::users::Permission`]).
    pub fn has_permission(&self, permission: crate::users::Permission) -> bool {
        self.permissions.iter().any(|p| p == permission.as_str())
    }

    /// The row-level security scope of this caller's reads.
    pub fn scope(&self) -> ReadScope {
        ReadScope {
            role: self.role.as_str().to_string(),
            customer_id: match self.role {
                Role::Customer => self.customer_id,
                _ => None,
            },
        }
    }

    /// Agents, supervisors, analysts and auditors.
    pub fn is_staff(&self) -> bool {
        self.role != Role::Customer
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("a bearer token is required")]
    MissingToken,
    #[error("bearer token is invalid or expired")]
    InvalidToken,
    #[error("the session is unknown or was revoked")]
    UnknownSession,
    #[error("the session expired; get a new token")]
    Expired,
    #[error("the user is disabled")]
    UserDisabled,
    #[error("sessions cannot be checked: {0}")]
    Store(#[from] sqlx::Error),
}

impl SessionError {
    /// The `error` code of the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            SessionError::MissingToken
            | SessionError::InvalidToken
            | SessionError::UnknownSession => "unauthorized",
            SessionError::Expired => "session_expired",
            SessionError::UserDisabled => "user_disabled",
            SessionError::Store(_) => "unavailable",
        }
    }
}

/// The `Authorization: Bearer …` token of a request, if it has one.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    bearer_value(headers.get(header::AUTHORIZATION)?.to_str().ok()?)
}

/// The token of an `Authorization` value such as `Bearer abc` (also as
/// sent in a graphql-transport-ws `connection_init` payload).
pub fn bearer_value(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Sessions in Postgres.
#[derive(Clone)]
pub struct Sessions {
    pool: PgPool,
    keys: TokenKeys,
    idle: Duration,
    touch_every: Duration,
    /// The caller each recently checked session stood for, with its
    /// [`fingerprint`].
    remembered: Arc<Mutex<lru::LruCache<Uuid, (Caller, Fingerprint)>>>,
}

/// A digest of who a caller is: `casebook_caller_fingerprint` in SQL
/// computes the same from the user's row.
pub fn fingerprint(caller: &Caller) -> Fingerprint {
    const UNIT: char = '\u{1f}';
    const RECORD: char = '\u{1e}';
    let customer = caller
        .customer_id
        .map(|c| c.hyphenated().to_string())
        .unwrap_or_default();
    let name = match &caller.name {
        Some(n) => format!("={n}"),
        None => "-".to_string(),
    };
    let text = format!(
        "{sub}{UNIT}{role}{UNIT}{customer}{UNIT}{name}{UNIT}{permissions}",
        sub = caller.sub,
        role = caller.role.as_str(),
        permissions = caller.permissions.join(&RECORD.to_string()),
    );
    Fingerprint(Sha256::digest(text.as_bytes()).into())
}

/// A caller's SHA-256 digest; shown as lowercase hex, as
/// `casebook_caller_fingerprint` returns it (and so safe to put in SQL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint([u8; 32]);

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// The statement that checks a remembered session and opens its scoped read
/// transaction; built only from a UUID, a hex digest and a number.
fn scope_statement(session_id: Uuid, fingerprint: Fingerprint, fresh: Duration) -> String {
    format!(
        "SELECT casebook_session_scope('{}', '{fingerprint}', {}); BEGIN READ ONLY",
        session_id.hyphenated(),
        fresh.as_secs_f64()
    )
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("idle", &self.idle)
            .finish_non_exhaustive()
    }
}

type SessionRow = (
    String,
    String,
    Option<Uuid>,
    Option<String>,
    bool,
    bool,
    bool,
    bool,
    bool,
    Vec<String>,
);

impl Sessions {
    /// Sessions idle longer than `idle` are refused.
    pub fn new(pool: PgPool, keys: TokenKeys, idle: Duration) -> Self {
        let idle = idle.max(Duration::from_secs(1));
        Self {
            pool,
            keys,
            idle,
            touch_every: TOUCH_EVERY.min(idle / 4).max(Duration::from_secs(1)),
            remembered: Arc::new(Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(REMEMBERED_SESSIONS).expect("not zero"),
            ))),
        }
    }

    pub fn idle_limit(&self) -> Duration {
        self.idle
    }

    /// Creates or updates the user and opens a new session for them
    /// (`casebook token issue`).
    pub async fn issue(
        &self,
        role: Role,
        sub: &str,
        customer_id: Option<Uuid>,
        ttl_secs: i64,
    ) -> Result<IssuedToken, UserError> {
        users::issue_token(&self.pool, &self.keys, role, sub, customer_id, ttl_secs).await
    }

    /// The caller a bearer token stands for, now.
    pub async fn authenticate(&self, bearer_token: &str) -> Result<Caller, SessionError> {
        let claims = self.verify(bearer_token)?;
        self.check(claims.sid, &claims.sub).await
    }

    /// The caller a bearer token stands for, now, and, when their session
    /// is as this process remembers it, a read-only transaction already
    /// scoped to them (see the module's notes): one round trip instead of
    /// two. `None`: scope the reads yourself
    /// (`casebook_projections::access::begin_scoped`).
    pub async fn authenticate_scoped(
        &self,
        bearer_token: &str,
    ) -> Result<(Caller, Option<Transaction<'static, Postgres>>), SessionError> {
        let claims = self.verify(bearer_token)?;
        let remembered = self
            .remembered
            .lock()
            .expect("not poisoned")
            .get(&claims.sid)
            .cloned();
        if let Some((caller, fingerprint)) = remembered.filter(|(c, _)| c.sub == claims.sub) {
            let statement = scope_statement(claims.sid, fingerprint, self.touch_every);
            match self.pool.begin_with(statement).await {
                Ok(tx) => return Ok((caller, Some(tx))),
                Err(e) => {
                    let changed = matches!(&e, sqlx::Error::Database(db)
                        if db.code().as_deref() == Some(NOT_AS_REMEMBERED));
                    if !changed {
                        tracing::warn!(error = %e, "the remembered session could not be checked");
                    }
                    self.forget(claims.sid);
                }
            }
        }
        Ok((self.check(claims.sid, &claims.sub).await?, None))
    }

    /// Forgets a session's remembered caller: its next request takes the
    /// full check.
    pub fn forget(&self, session_id: Uuid) {
        self.remembered
            .lock()
            .expect("not poisoned")
            .pop(&session_id);
    }

    fn verify(&self, bearer_token: &str) -> Result<crate::auth::Claims, SessionError> {
        if bearer_token.len() > MAX_TOKEN_BYTES {
            return Err(SessionError::InvalidToken);
        }
        self.keys
            .verify(bearer_token)
            .map_err(|_| SessionError::InvalidToken)
    }

    /// The full check of a session, from its row and its user's.
    async fn check(&self, session_id: Uuid, claimed_sub: &str) -> Result<Caller, SessionError> {
        let row: Option<SessionRow> = sqlx::query_as(
            "SELECT s.sub, u.role, u.customer_id, u.name,
                    u.disabled_at IS NOT NULL,
                    s.revoked_at IS NOT NULL,
                    s.expires_at <= now(),
                    s.last_seen_at < now() - make_interval(secs => $2),
                    s.last_seen_at < now() - make_interval(secs => $3),
                    u.permissions
               FROM sessions s JOIN users u ON u.sub = s.sub
              WHERE s.session_id = $1",
        )
        .bind(session_id)
        .bind(self.idle.as_secs_f64())
        .bind(self.touch_every.as_secs_f64())
        .fetch_optional(&self.pool)
        .await?;
        let Some((
            sub,
            role,
            customer_id,
            name,
            disabled,
            revoked,
            expired,
            idle,
            stale,
            permissions,
        )) = row
        else {
            return Err(SessionError::UnknownSession);
        };
        if sub != claimed_sub {
            return Err(SessionError::UnknownSession);
        }
        if disabled {
            return Err(SessionError::UserDisabled);
        }
        if revoked {
            return Err(SessionError::UnknownSession);
        }
        if expired || idle {
            return Err(SessionError::Expired);
        }
        let role: Role = role.parse().map_err(|_| SessionError::UnknownSession)?;
        if stale {
            // Guarded, so concurrent requests of one session write once.
            sqlx::query(
                "UPDATE sessions SET last_seen_at = now()
                  WHERE session_id = $1 AND last_seen_at < now() - make_interval(secs => $2)",
            )
            .bind(session_id)
            .bind(self.touch_every.as_secs_f64())
            .execute(&self.pool)
            .await?;
        }
        let caller = Caller {
            sub,
            role,
            customer_id: if role == Role::Customer {
                customer_id
            } else {
                None
            },
            session_id,
            name,
            permissions,
        };
        let fingerprint = fingerprint(&caller);
        self.remembered
            .lock()
            .expect("not poisoned")
            .put(session_id, (caller.clone(), fingerprint));
        Ok(caller)
    }
}

/// A route that takes a `Caller` answers 401 without a valid session.
impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(&parts.headers).ok_or(SessionError::MissingToken)?;
        Ok(state.sessions.authenticate(token).await?)
    }
}

#[derive(Debug, Serialize)]
pub struct Me {
    sub: String,
    role: Role,
    #[serde(skip_serializing_if = "Option::is_none")]
    customer_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
}

/// `GET /me`: who the bearer token stands for, as of now.
pub async fn me(caller: Caller) -> Json<Me> {
    Json(Me {
        sub: caller.sub,
        role: caller.role,
        customer_id: caller.customer_id,
        name: caller.name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn the_bearer_token_is_read_from_the_authorization_header() {
        assert_eq!(bearer(&headers("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&headers("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(&headers("Basic abc")), None);
        assert_eq!(bearer(&headers("Bearer ")), None);
        assert_eq!(bearer(&HeaderMap::new()), None);
        assert_eq!(bearer_value(" Bearer xyz"), Some("xyz"));
        assert_eq!(bearer_value("xyz"), None);
    }

    #[test]
    fn a_callers_scope_names_a_customer_only_for_customers() {
        let id = Uuid::new_v4();
        let mut caller = Caller {
            sub: "ada".into(),
            role: Role::Customer,
            customer_id: Some(id),
            session_id: Uuid::new_v4(),
            name: None,
            permissions: Vec::new(),
        };
        assert_eq!(caller.scope(), ReadScope::customer(id));
        assert!(!caller.is_staff());
        caller.role = Role::Analyst;
        assert_eq!(caller.scope(), ReadScope::staff("analyst"));
        assert!(caller.is_staff());
    }

    #[test]
    fn session_errors_have_stable_codes() {
        assert_eq!(SessionError::Expired.code(), "session_expired");
        assert_eq!(SessionError::UnknownSession.code(), "unauthorized");
        assert_eq!(SessionError::InvalidToken.code(), "unauthorized");
        assert_eq!(SessionError::MissingToken.code(), "unauthorized");
        assert_eq!(SessionError::UserDisabled.code(), "user_disabled");
    }
}
