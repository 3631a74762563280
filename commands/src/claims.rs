//! Web-form email claims: the one-time confirmation link, confirming it,
//! and whose conversations a customer's history may include.
//!
//! A web-form submission names an address nobody proved. It gets a customer
//! of its own holding the address as a claim, and an `email_claim` whose
//! id is the SHA-256 of a confirmation token. The token is
//! HMAC-SHA256(secret, claim id): the delivery worker derives it again to
//! put the link in the acknowledgement, the store never holds it, and
//! without the secret it cannot be guessed. Following the link once, within
//! 48 hours, makes the claimant the proven owner of the address, or joins
//! it to the customer that already owns it; only then does history flow.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use casebook_domain::identity::email_claim_id;
use casebook_domain::{
    Actor, Customer, CustomerCommand, CustomerIdentity, CustomerIdentityCommand, EmailClaim,
    EmailClaimCommand, EmailClaimError, EventMetadata,
};
use chrono::Utc;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use uuid::Uuid;

use crate::retry::sleep_backoff;
use crate::store::{CommandError, EventStore, StoreError, CONFLICT_BACKOFF};

/// The longest token [`confirm`] looks at (ours are 43 characters).
pub const TOKEN_MAX: usize = 128;

/// Derives the tokens of the links we mail: the confirmation token of a
/// claim, and the status token of a ticket (the same one the API hands the
/// submitter).
#[derive(Clone)]
pub struct LinkKeys {
    secret: Vec<u8>,
}

impl std::fmt::Debug for LinkKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkKeys(..)")
    }
}

impl LinkKeys {
    pub fn new(secret: impl AsRef<[u8]>) -> Self {
        Self {
            secret: secret.as_ref().to_vec(),
        }
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC takes any key length")
    }

    /// The confirmation token of a claim: 256 bits no one can compute
    /// without the secret.
    pub fn confirm_token(&self, claim_id: Uuid) -> String {
        let mut mac = self.mac();
        mac.update(b"confirm-email:");
        mac.update(claim_id.as_bytes());
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    /// The id of the `email_claim` aggregate of a new claim.
    pub fn claim_aggregate_id(&self, claim_id: Uuid) -> String {
        email_claim_id(&self.confirm_token(claim_id))
    }

    /// The ticket status token (`casebook_domain::status_link`), the one
    /// the API hands out and checks.
    pub fn status_token(&self, ticket_id: Uuid) -> String {
        casebook_domain::status_link::status_token(&self.secret, ticket_id)
    }
}

/// A claim to open with a web-form submission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewClaim {
    pub claim_id: Uuid,
    /// `email-claim:<sha256 of the token>`.
    pub aggregate_id: String,
}

impl NewClaim {
    pub fn new(keys: &LinkKeys) -> Self {
        let claim_id = Uuid::new_v4();
        Self {
            claim_id,
            aggregate_id: keys.claim_aggregate_id(claim_id),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfirmError {
    #[error("no such confirmation link")]
    NotFound,
    #[error("this confirmation link was already used")]
    Used,
    #[error("this confirmation link has expired")]
    Expired,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<CommandError<EmailClaimError>> for ConfirmError {
    fn from(e: CommandError<EmailClaimError>) -> Self {
        match e {
            CommandError::Rejected(EmailClaimError::AlreadyConfirmed) => ConfirmError::Used,
            CommandError::Rejected(EmailClaimError::Expired) => ConfirmError::Expired,
            CommandError::Rejected(_) => ConfirmError::NotFound,
            CommandError::Store(e) => ConfirmError::Store(e),
        }
    }
}

fn store_error<E: std::error::Error>(e: CommandError<E>) -> ConfirmError {
    match e {
        CommandError::Store(e) => ConfirmError::Store(e),
        CommandError::Rejected(e) => ConfirmError::Store(StoreError::Corrupt(e.to_string())),
    }
}

/// What a confirmation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confirmed {
    pub ticket_id: Uuid,
    pub customer_id: Uuid,
    /// The customer who already owned the address, now joined by the
    /// claimant; `None` when the claimant became the owner.
    pub joined: Option<Uuid>,
}

/// Follows a confirmation link: at most once, before it expires. In the
/// same commit the address becomes the claimant's proven identity, or, when
/// another customer already owns it, the claimant joins that customer.
pub async fn confirm(
    store: &EventStore,
    token: &str,
    correlation_id: &str,
) -> Result<Confirmed, ConfirmError> {
    let token = token.trim();
    if token.is_empty()
        || token.len() > TOKEN_MAX
        || !token
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(ConfirmError::NotFound);
    }
    let claim_key = email_claim_id(token);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let meta = EventMetadata::new(correlation_id, Actor::system("email-confirmation"));
        let mut uow = store.unit_of_work(meta);
        let claim = uow.load::<EmailClaim>(&claim_key).await?.clone();
        let (Some(identity), Some(claimant), Some(ticket_id)) =
            (claim.identity, claim.customer_id, claim.ticket_id)
        else {
            return Err(ConfirmError::NotFound);
        };
        let at = Utc::now();
        uow.execute::<EmailClaim>(&claim_key, EmailClaimCommand::Confirm { at })
            .await?;
        let identity_key = identity.aggregate_id();
        let owner = uow.load::<CustomerIdentity>(&identity_key).await?.owner;
        let joined = match owner {
            None => {
                uow.execute::<CustomerIdentity>(
                    &identity_key,
                    CustomerIdentityCommand::Claim {
                        identity: identity.clone(),
                        customer_id: claimant,
                        at,
                    },
                )
                .await
                .map_err(store_error)?;
                uow.execute::<Customer>(
                    &claimant.to_string(),
                    CustomerCommand::LinkIdentity { identity, at },
                )
                .await
                .map_err(store_error)?;
                None
            }
            Some(owner) if owner == claimant => None,
            Some(owner) => {
                uow.execute::<CustomerIdentity>(
                    &identity_key,
                    CustomerIdentityCommand::JoinClaimant { claimant, at },
                )
                .await
                .map_err(store_error)?;
                Some(owner)
            }
        };
        match uow.commit().await {
            Ok(_) => {
                tracing::info!(%ticket_id, joined = joined.is_some(), "email claim confirmed");
                return Ok(Confirmed {
                    ticket_id,
                    customer_id: claimant,
                    joined,
                });
            }
            Err(StoreError::Conflict) if CONFLICT_BACKOFF.should_retry(attempt) => {
                sleep_backoff(&CONFLICT_BACKOFF, attempt).await
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The customers whose conversations may be shown to the model for a
/// ticket of `customer_id`: only identities a channel proved unlock
/// others. A web-form claimant whose address is not confirmed gets its own
/// tickets only; once confirmed, it shares history with the address's
/// owner (and the owner's other confirmed claimants).
pub async fn history_customers(
    store: &EventStore,
    customer_id: Uuid,
) -> Result<Vec<Uuid>, StoreError> {
    let customer = store
        .load::<Customer>(&customer_id.to_string())
        .await?
        .aggregate;
    let mut people = Vec::new();
    if customer.is_proven() {
        people.push((customer_id, customer));
    } else {
        for claimed in &customer.claimed {
            let identity = store
                .load::<CustomerIdentity>(&claimed.aggregate_id())
                .await?
                .aggregate;
            if let (Some(owner), true) = (identity.owner, identity.claimants.contains(&customer_id))
            {
                let owner_customer = store.load::<Customer>(&owner.to_string()).await?.aggregate;
                people.push((owner, owner_customer));
            }
        }
    }
    let mut customers = vec![customer_id];
    for (id, person) in people {
        customers.push(id);
        for identity in &person.identities {
            let owned = store
                .load::<CustomerIdentity>(&identity.aggregate_id())
                .await?
                .aggregate;
            if owned.owner == Some(id) {
                customers.extend(owned.claimants);
            }
        }
    }
    customers.sort();
    customers.dedup();
    Ok(customers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirmation_tokens_are_per_claim_and_per_secret() {
        let keys = LinkKeys::new("k1");
        let a = Uuid::from_u128(1);
        let token = keys.confirm_token(a);
        assert_eq!(token.len(), 43);
        assert_eq!(token, keys.confirm_token(a));
        assert_ne!(token, keys.confirm_token(Uuid::from_u128(2)));
        assert_ne!(token, LinkKeys::new("k2").confirm_token(a));
        assert_eq!(keys.claim_aggregate_id(a), email_claim_id(&token));
        assert!(!keys.claim_aggregate_id(a).contains(&token));
    }
}
