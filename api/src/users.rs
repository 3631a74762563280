//! Users in Postgres, and issuing a token: a new session row for a user.
//!
//! The `casebook user …` and `casebook token issue` commands call these.
//! A user's role, customer id and disabled flag are read again on every
//! request (`session.rs`), so every change here acts on the next request.

use chrono::{DateTime, Duration, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::auth::{Role, TokenError, TokenKeys};

/// The longest a token (and its session) may live.
pub const MAX_TOKEN_TTL_SECS: i64 = 30 * 24 * 3600;
const MAX_SUB_CHARS: usize = 200;
const MAX_NAME_CHARS: usize = 200;
/// Sessions expired longer ago than this are deleted when a token is issued.
const EXPIRED_SESSIONS_KEPT: Duration = Duration::days(7);

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("a user's sub must be 1 to {MAX_SUB_CHARS} characters with no control characters")]
    InvalidSub,
    #[error("a user's name must be 1 to {MAX_NAME_CHARS} characters with no control characters")]
    InvalidName,
    #[error("a customer needs a customer id (--customer-id)")]
    CustomerNeedsId,
    #[error("only a customer has a customer id (--customer-id is for --role customer)")]
    StaffHasNoCustomerId,
    #[error("the token lifetime must be from 1 to {MAX_TOKEN_TTL_SECS} seconds")]
    InvalidTtl,
    #[error("user {0:?} already exists (change it with `casebook user set-role`)")]
    Exists(String),
    #[error("no user {0:?}")]
    NotFound(String),
    #[error("user {0:?} is disabled (`casebook user enable` lets them back in)")]
    Disabled(String),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

impl UserError {
    /// The command line was wrong (exit 2), not the world (exit 1).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            UserError::InvalidSub
                | UserError::InvalidName
                | UserError::CustomerNeedsId
                | UserError::StaffHasNoCustomerId
                | UserError::InvalidTtl
                | UserError::Token(TokenError::MissingCustomerId)
        )
    }
}

/// A permission a user may hold beyond their role (`users.permissions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    /// An auditor sees emails and phone numbers in audit trails unmasked.
    AuditorPii,
}

impl Permission {
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::AuditorPii => "auditor_pii",
        }
    }
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Permission {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auditor_pii" => Ok(Permission::AuditorPii),
            other => Err(format!(
                "unknown permission {:?}: expected auditor_pii",
                other.chars().take(40).collect::<String>()
            )),
        }
    }
}

/// Grants (`granted`) or revokes a permission; it acts on the user's next
/// request. Granting twice, or revoking what is not held, changes nothing.
pub async fn set_permission(
    pool: &PgPool,
    sub: &str,
    permission: Permission,
    granted: bool,
) -> Result<Vec<String>, UserError> {
    check_sub(sub)?;
    let row: Option<(Vec<String>,)> = sqlx::query_as(
        "UPDATE users
            SET permissions = CASE WHEN $3
                                   THEN (SELECT array_agg(DISTINCT p ORDER BY p) FROM unnest(permissions || $2::text) p)
                                   ELSE array_remove(permissions, $2::text) END,
                updated_at = now()
          WHERE sub = $1
          RETURNING permissions",
    )
    .bind(sub)
    .bind(permission.as_str())
    .bind(granted)
    .fetch_optional(pool)
    .await?;
    row.map(|(p,)| p)
        .ok_or_else(|| UserError::NotFound(sub.to_string()))
}

/// A user as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub sub: String,
    pub role: Role,
    pub name: Option<String>,
    pub customer_id: Option<Uuid>,
    pub disabled_at: Option<DateTime<Utc>>,
}

type UserRow = (
    String,
    String,
    Option<String>,
    Option<Uuid>,
    Option<DateTime<Utc>>,
);

fn user_from_row((sub, role, name, customer_id, disabled_at): UserRow) -> Result<User, UserError> {
    let role = role
        .parse()
        .map_err(|e: String| UserError::Db(sqlx::Error::Decode(e.into())))?;
    Ok(User {
        sub,
        role,
        name,
        customer_id,
        disabled_at,
    })
}

fn printable(s: &str, max: usize) -> bool {
    let n = s.chars().count();
    n >= 1 && n <= max && !s.chars().any(char::is_control) && s.trim() == s
}

/// A sub is 1 to 200 printable characters, without surrounding spaces.
pub fn check_sub(sub: &str) -> Result<(), UserError> {
    printable(sub, MAX_SUB_CHARS)
        .then_some(())
        .ok_or(UserError::InvalidSub)
}

/// A customer has exactly one customer id; staff have none.
pub fn check_customer(role: Role, customer_id: Option<Uuid>) -> Result<(), UserError> {
    match (role, customer_id) {
        (Role::Customer, None) => Err(UserError::CustomerNeedsId),
        (Role::Customer, Some(_)) | (_, None) => Ok(()),
        (_, Some(_)) => Err(UserError::StaffHasNoCustomerId),
    }
}

const RETURNING: &str = "RETURNING sub, role, name, customer_id, disabled_at";

/// A new user; an existing sub is refused.
pub async fn add_user(
    pool: &PgPool,
    sub: &str,
    role: Role,
    name: Option<&str>,
    customer_id: Option<Uuid>,
) -> Result<User, UserError> {
    check_sub(sub)?;
    if let Some(name) = name {
        if !printable(name, MAX_NAME_CHARS) {
            return Err(UserError::InvalidName);
        }
    }
    check_customer(role, customer_id)?;
    let row: Option<UserRow> = sqlx::query_as(&format!(
        "INSERT INTO users (sub, role, name, customer_id) VALUES ($1, $2, $3, $4)
         ON CONFLICT (sub) DO NOTHING {RETURNING}"
    ))
    .bind(sub)
    .bind(role.as_str())
    .bind(name)
    .bind(customer_id)
    .fetch_optional(pool)
    .await?;
    user_from_row(row.ok_or_else(|| UserError::Exists(sub.to_string()))?)
}

/// Changes a user's role; it applies to their very next request. Making a
/// user a customer needs a customer id; any other role drops it.
pub async fn set_role(
    pool: &PgPool,
    sub: &str,
    role: Role,
    customer_id: Option<Uuid>,
) -> Result<User, UserError> {
    check_sub(sub)?;
    check_customer(role, customer_id)?;
    let row: Option<UserRow> = sqlx::query_as(&format!(
        "UPDATE users SET role = $2, customer_id = $3, updated_at = now() WHERE sub = $1 {RETURNING}"
    ))
    .bind(sub)
    .bind(role.as_str())
    .bind(customer_id)
    .fetch_optional(pool)
    .await?;
    user_from_row(row.ok_or_else(|| UserError::NotFound(sub.to_string()))?)
}

/// Disables a user and revokes every session they hold: their next
/// request is refused, and enabling them again does not revive old tokens.
/// Disabling a disabled user changes nothing.
pub async fn disable_user(pool: &PgPool, sub: &str) -> Result<User, UserError> {
    check_sub(sub)?;
    let mut tx = pool.begin().await?;
    let row: Option<UserRow> = sqlx::query_as(&format!(
        "UPDATE users SET disabled_at = coalesce(disabled_at, now()), updated_at = now()
          WHERE sub = $1 {RETURNING}"
    ))
    .bind(sub)
    .fetch_optional(&mut *tx)
    .await?;
    let user = user_from_row(row.ok_or_else(|| UserError::NotFound(sub.to_string()))?)?;
    sqlx::query("UPDATE sessions SET revoked_at = now() WHERE sub = $1 AND revoked_at IS NULL")
        .bind(sub)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(user)
}

/// Lets a disabled user sign in again (with a new token).
pub async fn enable_user(pool: &PgPool, sub: &str) -> Result<User, UserError> {
    check_sub(sub)?;
    let row: Option<UserRow> = sqlx::query_as(&format!(
        "UPDATE users SET disabled_at = NULL, updated_at = now() WHERE sub = $1 {RETURNING}"
    ))
    .bind(sub)
    .fetch_optional(pool)
    .await?;
    user_from_row(row.ok_or_else(|| UserError::NotFound(sub.to_string()))?)
}

/// A signed token and the session it opens.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub token: String,
    pub session_id: Uuid,
    pub expires_at: DateTime<Utc>,
    pub user: User,
}

/// Creates or updates the user `sub` with `role` (and customer id), opens a
/// new session for them and signs a token naming it. A disabled user gets
/// no token. One transaction: no session without its user, no token without
/// its session.
pub async fn issue_token(
    pool: &PgPool,
    keys: &TokenKeys,
    role: Role,
    sub: &str,
    customer_id: Option<Uuid>,
    ttl_secs: i64,
) -> Result<IssuedToken, UserError> {
    check_sub(sub)?;
    check_customer(role, customer_id)?;
    if !(1..=MAX_TOKEN_TTL_SECS).contains(&ttl_secs) {
        return Err(UserError::InvalidTtl);
    }
    let mut tx = pool.begin().await?;
    let row: UserRow = sqlx::query_as(&format!(
        "INSERT INTO users (sub, role, customer_id) VALUES ($1, $2, $3)
         ON CONFLICT (sub) DO UPDATE SET role = excluded.role, customer_id = excluded.customer_id,
                                         updated_at = now()
         {RETURNING}"
    ))
    .bind(sub)
    .bind(role.as_str())
    .bind(customer_id)
    .fetch_one(&mut *tx)
    .await?;
    let user = user_from_row(row)?;
    if user.disabled_at.is_some() {
        return Err(UserError::Disabled(sub.to_string()));
    }
    let now = Utc::now();
    let expires_at = now + Duration::seconds(ttl_secs);
    sqlx::query("DELETE FROM sessions WHERE expires_at < $1")
        .bind(now - EXPIRED_SESSIONS_KEPT)
        .execute(&mut *tx)
        .await?;
    let session_id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO sessions (session_id, sub, created_at, last_seen_at, expires_at)
         VALUES ($1, $2, now(), now(), $3)",
    )
    .bind(session_id)
    .bind(sub)
    .bind(expires_at)
    .execute(&mut *tx)
    .await?;
    let token = keys.issue_for_session(
        role,
        sub,
        customer_id,
        session_id,
        ttl_secs,
        now.timestamp(),
    )?;
    tx.commit().await?;
    Ok(IssuedToken {
        token,
        session_id,
        expires_at,
        user,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subs_and_names_are_bounded_and_printable() {
        assert!(check_sub("grace").is_ok());
        assert!(check_sub("").is_err());
        assert!(check_sub(" grace").is_err());
        assert!(check_sub("gr\u{0}ace").is_err());
        assert!(check_sub(&"x".repeat(201)).is_err());
        assert!(check_sub(&"é".repeat(200)).is_ok());
    }

    #[test]
    fn only_customers_have_a_customer_id() {
        let id = Some(Uuid::new_v4());
        assert!(check_customer(Role::Customer, id).is_ok());
        assert!(matches!(
            check_customer(Role::Customer, None),
            Err(UserError::CustomerNeedsId)
        ));
        assert!(check_customer(Role::Agent, None).is_ok());
        assert!(matches!(
            check_customer(Role::Analyst, id),
            Err(UserError::StaffHasNoCustomerId)
        ));
        assert!(UserError::CustomerNeedsId.is_usage());
        assert!(!UserError::NotFound("x".into()).is_usage());
    }
}
