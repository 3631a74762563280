//! Bearer tokens (HS256 JWTs) and per-ticket status tokens.

use std::fmt;
use std::str::FromStr;

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Customer,
    Agent,
    Supervisor,
    Analyst,
    Auditor,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Customer => "customer",
            Role::Agent => "agent",
            Role::Supervisor => "supervisor",
            Role::Analyst => "analyst",
            Role::Auditor => "auditor",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "customer" => Ok(Role::Customer),
            "agent" => Ok(Role::Agent),
            "supervisor" => Ok(Role::Supervisor),
            "analyst" => Ok(Role::Analyst),
            "auditor" => Ok(Role::Auditor),
            other => Err(format!(
                "unknown role {other:?}: expected customer, agent, supervisor, analyst or auditor"
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<Uuid>,
    /// A session id: idle sessions expire by it.
    pub sid: Uuid,
    pub iat: i64,
    pub exp: i64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("a customer token needs a customer id")]
    MissingCustomerId,
    #[error("token is invalid or expired")]
    Invalid,
    #[error("token could not be signed: {0}")]
    Signing(String),
}

#[derive(Clone)]
pub struct TokenKeys {
    secret: Vec<u8>,
}

impl fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenKeys(..)")
    }
}

impl TokenKeys {
    pub fn new(secret: impl AsRef<[u8]>) -> Self {
        Self {
            secret: secret.as_ref().to_vec(),
        }
    }

    /// A signed token for a session id of its own. The API accepts a token
    /// only with its session row (`users::issue_token` writes both), so this
    /// alone serves tests of the signature.
    pub fn issue(
        &self,
        role: Role,
        sub: &str,
        customer_id: Option<Uuid>,
        ttl_secs: i64,
        now: i64,
    ) -> Result<String, TokenError> {
        self.issue_for_session(role, sub, customer_id, Uuid::new_v4(), ttl_secs, now)
    }

    /// A signed token naming session `sid`. Its role and customer id are
    /// what they were at issue; the API uses the user's current ones.
    pub fn issue_for_session(
        &self,
        role: Role,
        sub: &str,
        customer_id: Option<Uuid>,
        sid: Uuid,
        ttl_secs: i64,
        now: i64,
    ) -> Result<String, TokenError> {
        if role == Role::Customer && customer_id.is_none() {
            return Err(TokenError::MissingCustomerId);
        }
        let claims = Claims {
            sub: sub.to_string(),
            role,
            customer_id,
            sid,
            iat: now,
            exp: now + ttl_secs,
        };
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&self.secret),
        )
        .map_err(|e| TokenError::Signing(e.to_string()))
    }

    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub"]);
        decode::<Claims>(token, &DecodingKey::from_secret(&self.secret), &validation)
            .map(|data| data.claims)
            .map_err(|_| TokenError::Invalid)
    }

    /// The token a customer reads their ticket's messages with
    /// (`casebook_domain::status_link`, shared with the delivery worker).
    pub fn status_token(&self, ticket_id: Uuid) -> String {
        casebook_domain::status_link::status_token(&self.secret, ticket_id)
    }

    pub fn check_status_token(&self, ticket_id: Uuid, token: &str) -> bool {
        casebook_domain::status_link::check_status_token(&self.secret, ticket_id, token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_refuse_tampering() {
        let keys = TokenKeys::new("secret-one");
        let now = chrono::Utc::now().timestamp();
        let token = keys.issue(Role::Agent, "grace", None, 3600, now).unwrap();
        let claims = keys.verify(&token).unwrap();
        assert_eq!(claims.role, Role::Agent);
        assert_eq!(claims.sub, "grace");
        assert_eq!(
            TokenKeys::new("other").verify(&token),
            Err(TokenError::Invalid)
        );
        let expired = keys
            .issue(Role::Agent, "grace", None, 10, now - 3600)
            .unwrap();
        assert_eq!(keys.verify(&expired), Err(TokenError::Invalid));
    }

    #[test]
    fn customer_tokens_name_the_customer() {
        let keys = TokenKeys::new("k");
        assert_eq!(
            keys.issue(Role::Customer, "ada", None, 60, 0),
            Err(TokenError::MissingCustomerId)
        );
    }

    #[test]
    fn status_tokens_are_per_ticket() {
        let keys = TokenKeys::new("k");
        let a = Uuid::new_v4();
        let token = keys.status_token(a);
        assert!(keys.check_status_token(a, &token));
        assert!(!keys.check_status_token(Uuid::new_v4(), &token));
        assert!(!TokenKeys::new("j").check_status_token(a, &token));
    }
}
