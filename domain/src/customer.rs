//! Customers and the identities that belong to them.
//!
//! A `customer` aggregate (id: a UUID) holds the person; a
//! `customer_identity` aggregate per identity key (`email:…`, `phone:…`,
//! `whatsapp:…`) records which customer owns that identity. Claiming an
//! identity and linking it to the customer happen in the same commit, so an
//! address or number can never belong to two customers.
//!
//! A claim is not an identity: an address a channel did not prove (a
//! web-form email) is recorded as `claimed` on the customer, where replies
//! may be sent, but it owns no `customer_identity` and unlocks no earlier
//! conversation. Confirming the address (see [`crate::identity::EmailClaim`])
//! either makes this customer the proven owner, or joins it to the
//! customer that already owns the address (`ClaimantJoined`), and only then
//! does history flow between them.

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::identity::IdentityKey;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CustomerCommand {
    Register {
        customer_id: Uuid,
        name: Option<String>,
        /// Identities the channel proved.
        identities: Vec<IdentityKey>,
        /// Addresses the customer gave that nobody has proven (web form).
        claimed: Vec<IdentityKey>,
        at: DateTime<Utc>,
    },
    LinkIdentity {
        identity: IdentityKey,
        at: DateTime<Utc>,
    },
    /// Records a name the customer gave (web form, email display name,
    /// WhatsApp profile name) when it differs from the one on file.
    UpdateName { name: String, at: DateTime<Utc> },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum CustomerEvent {
    CustomerRegistered {
        customer_id: Uuid,
        name: Option<String>,
        identities: Vec<IdentityKey>,
        /// Unproven addresses (absent in events written before claims
        /// existed).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        claimed: Vec<IdentityKey>,
        registered_at: DateTime<Utc>,
    },
    IdentityLinked {
        customer_id: Uuid,
        identity: IdentityKey,
        linked_at: DateTime<Utc>,
    },
    CustomerNameUpdated {
        customer_id: Uuid,
        name: String,
        updated_at: DateTime<Utc>,
    },
}

impl DomainEvent for CustomerEvent {
    fn event_type(&self) -> String {
        match self {
            CustomerEvent::CustomerRegistered { .. } => "CustomerRegistered",
            CustomerEvent::IdentityLinked { .. } => "IdentityLinked",
            CustomerEvent::CustomerNameUpdated { .. } => "CustomerNameUpdated",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        "1".to_string()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CustomerError {
    #[error("customer is already registered")]
    AlreadyRegistered,
    #[error("customer does not exist")]
    NotFound,
    #[error("a customer needs at least one identity")]
    NoIdentity,
    #[error("name must be 1 to 100 characters")]
    InvalidName,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Customer {
    pub id: Option<Uuid>,
    pub name: Option<String>,
    /// Proven identities: each one's `customer_identity` names this customer.
    pub identities: Vec<IdentityKey>,
    /// Addresses given but not proven.
    pub claimed: Vec<IdentityKey>,
    pub registered_at: Option<DateTime<Utc>>,
}

impl Customer {
    /// Where to reach the customer on a channel of `kind`: a proven
    /// identity first, else an address they gave us (a web-form email is
    /// where that submission's replies go, proven or not).
    pub fn address(&self, kind: crate::identity::IdentityKind) -> Option<&str> {
        self.identities
            .iter()
            .chain(self.claimed.iter())
            .find(|i| i.kind == kind)
            .map(|i| i.value.as_str())
    }

    /// Whether any identity of this customer was proven by a channel.
    pub fn is_proven(&self) -> bool {
        !self.identities.is_empty()
    }
}

fn valid_name(name: &str) -> bool {
    let n = name.chars().count();
    (1..=100).contains(&n)
}

impl Customer {
    pub fn decide(&self, command: CustomerCommand) -> Result<Vec<CustomerEvent>, CustomerError> {
        match command {
            CustomerCommand::Register {
                customer_id,
                name,
                identities,
                claimed,
                at,
            } => {
                if self.id.is_some() {
                    return Err(CustomerError::AlreadyRegistered);
                }
                if identities.is_empty() && claimed.is_empty() {
                    return Err(CustomerError::NoIdentity);
                }
                if name.as_deref().is_some_and(|n| !valid_name(n)) {
                    return Err(CustomerError::InvalidName);
                }
                let claimed = claimed
                    .into_iter()
                    .filter(|c| !identities.contains(c))
                    .collect();
                Ok(vec![CustomerEvent::CustomerRegistered {
                    customer_id,
                    name,
                    identities,
                    claimed,
                    registered_at: at,
                }])
            }
            CustomerCommand::LinkIdentity { identity, at } => {
                let customer_id = self.id.ok_or(CustomerError::NotFound)?;
                if self.identities.contains(&identity) {
                    return Ok(vec![]);
                }
                Ok(vec![CustomerEvent::IdentityLinked {
                    customer_id,
                    identity,
                    linked_at: at,
                }])
            }
            CustomerCommand::UpdateName { name, at } => {
                let customer_id = self.id.ok_or(CustomerError::NotFound)?;
                if !valid_name(&name) {
                    return Err(CustomerError::InvalidName);
                }
                if self.name.as_deref() == Some(name.as_str()) {
                    return Ok(vec![]);
                }
                Ok(vec![CustomerEvent::CustomerNameUpdated {
                    customer_id,
                    name,
                    updated_at: at,
                }])
            }
        }
    }

    pub fn apply_event(&mut self, event: CustomerEvent) {
        match event {
            CustomerEvent::CustomerRegistered {
                customer_id,
                name,
                identities,
                claimed,
                registered_at,
            } => {
                self.id = Some(customer_id);
                self.name = name;
                self.identities = identities;
                self.claimed = claimed;
                self.registered_at = Some(registered_at);
            }
            CustomerEvent::IdentityLinked { identity, .. } => {
                // A confirmed claim becomes a proven identity.
                self.claimed.retain(|c| c != &identity);
                self.identities.push(identity)
            }
            CustomerEvent::CustomerNameUpdated { name, .. } => self.name = Some(name),
        }
    }
}

crate::impl_aggregate!(
    Customer,
    "customer",
    CustomerCommand,
    CustomerEvent,
    CustomerError
);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CustomerIdentityCommand {
    Claim {
        identity: IdentityKey,
        customer_id: Uuid,
        at: DateTime<Utc>,
    },
    /// A customer who claimed this address (web form) proved it: their
    /// conversations join the owner's.
    JoinClaimant { claimant: Uuid, at: DateTime<Utc> },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum CustomerIdentityEvent {
    IdentityClaimed {
        identity: IdentityKey,
        customer_id: Uuid,
        claimed_at: DateTime<Utc>,
    },
    ClaimantJoined {
        customer_id: Uuid,
        claimant: Uuid,
        joined_at: DateTime<Utc>,
    },
}

impl DomainEvent for CustomerIdentityEvent {
    fn event_type(&self) -> String {
        match self {
            CustomerIdentityEvent::IdentityClaimed { .. } => "IdentityClaimed",
            CustomerIdentityEvent::ClaimantJoined { .. } => "ClaimantJoined",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        "1".to_string()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CustomerIdentityError {
    #[error("identity already belongs to customer {owner}")]
    ClaimedByAnother { owner: Uuid },
    #[error("nobody owns this identity yet")]
    NoOwner,
}

/// Who owns one identity key, and the customers who claimed it on a channel
/// that proves nothing and then confirmed it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CustomerIdentity {
    pub owner: Option<Uuid>,
    pub claimants: Vec<Uuid>,
}

impl CustomerIdentity {
    pub fn decide(
        &self,
        command: CustomerIdentityCommand,
    ) -> Result<Vec<CustomerIdentityEvent>, CustomerIdentityError> {
        match command {
            CustomerIdentityCommand::Claim {
                identity,
                customer_id,
                at,
            } => match self.owner {
                Some(owner) if owner == customer_id => Ok(vec![]),
                Some(owner) => Err(CustomerIdentityError::ClaimedByAnother { owner }),
                None => Ok(vec![CustomerIdentityEvent::IdentityClaimed {
                    identity,
                    customer_id,
                    claimed_at: at,
                }]),
            },
            CustomerIdentityCommand::JoinClaimant { claimant, at } => {
                let owner = self.owner.ok_or(CustomerIdentityError::NoOwner)?;
                if owner == claimant || self.claimants.contains(&claimant) {
                    return Ok(vec![]);
                }
                Ok(vec![CustomerIdentityEvent::ClaimantJoined {
                    customer_id: owner,
                    claimant,
                    joined_at: at,
                }])
            }
        }
    }

    pub fn apply_event(&mut self, event: CustomerIdentityEvent) {
        match event {
            CustomerIdentityEvent::IdentityClaimed { customer_id, .. } => {
                self.owner = Some(customer_id)
            }
            CustomerIdentityEvent::ClaimantJoined { claimant, .. } => self.claimants.push(claimant),
        }
    }
}

crate::impl_aggregate!(
    CustomerIdentity,
    "customer_identity",
    CustomerIdentityCommand,
    CustomerIdentityEvent,
    CustomerIdentityError
);

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    fn at() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-24T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn ada() -> Uuid {
        Uuid::from_u128(1)
    }

    fn email() -> IdentityKey {
        IdentityKey::email("ada@example.com").unwrap()
    }

    fn registered() -> CustomerEvent {
        CustomerEvent::CustomerRegistered {
            customer_id: ada(),
            name: Some("Ada".into()),
            identities: vec![email()],
            claimed: vec![],
            registered_at: at(),
        }
    }

    #[test]
    fn a_customer_registers_with_an_identity() {
        TestFramework::<Customer>::with(())
            .given_no_previous_events()
            .when(CustomerCommand::Register {
                customer_id: ada(),
                name: Some("Ada".into()),
                identities: vec![email()],
                claimed: vec![],
                at: at(),
            })
            .then_expect_events(vec![registered()]);
    }

    #[test]
    fn registering_twice_is_refused() {
        TestFramework::<Customer>::with(())
            .given(vec![registered()])
            .when(CustomerCommand::Register {
                customer_id: ada(),
                name: None,
                identities: vec![email()],
                claimed: vec![],
                at: at(),
            })
            .then_expect_error(CustomerError::AlreadyRegistered);
    }

    #[test]
    fn a_customer_without_identity_is_refused() {
        TestFramework::<Customer>::with(())
            .given_no_previous_events()
            .when(CustomerCommand::Register {
                customer_id: ada(),
                name: None,
                identities: vec![],
                claimed: vec![],
                at: at(),
            })
            .then_expect_error(CustomerError::NoIdentity);
    }

    #[test]
    fn linking_a_known_identity_changes_nothing() {
        TestFramework::<Customer>::with(())
            .given(vec![registered()])
            .when(CustomerCommand::LinkIdentity {
                identity: email(),
                at: at(),
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn a_new_phone_is_linked() {
        let phone = IdentityKey::phone("+15551234567").unwrap();
        TestFramework::<Customer>::with(())
            .given(vec![registered()])
            .when(CustomerCommand::LinkIdentity {
                identity: phone.clone(),
                at: at(),
            })
            .then_expect_events(vec![CustomerEvent::IdentityLinked {
                customer_id: ada(),
                identity: phone,
                linked_at: at(),
            }]);
    }

    #[test]
    fn linking_to_an_unknown_customer_is_refused() {
        TestFramework::<Customer>::with(())
            .given_no_previous_events()
            .when(CustomerCommand::LinkIdentity {
                identity: email(),
                at: at(),
            })
            .then_expect_error(CustomerError::NotFound);
    }

    #[test]
    fn names_are_updated_only_when_they_change() {
        TestFramework::<Customer>::with(())
            .given(vec![registered()])
            .when(CustomerCommand::UpdateName {
                name: "Ada".into(),
                at: at(),
            })
            .then_expect_events(vec![]);
        TestFramework::<Customer>::with(())
            .given(vec![registered()])
            .when(CustomerCommand::UpdateName {
                name: String::new(),
                at: at(),
            })
            .then_expect_error(CustomerError::InvalidName);
    }

    #[test]
    fn an_identity_is_claimed_once() {
        let claimed = CustomerIdentityEvent::IdentityClaimed {
            identity: email(),
            customer_id: ada(),
            claimed_at: at(),
        };
        TestFramework::<CustomerIdentity>::with(())
            .given_no_previous_events()
            .when(CustomerIdentityCommand::Claim {
                identity: email(),
                customer_id: ada(),
                at: at(),
            })
            .then_expect_events(vec![claimed.clone()]);
        // The owner claiming again is a no-op, anyone else is refused.
        TestFramework::<CustomerIdentity>::with(())
            .given(vec![claimed.clone()])
            .when(CustomerIdentityCommand::Claim {
                identity: email(),
                customer_id: ada(),
                at: at(),
            })
            .then_expect_events(vec![]);
        TestFramework::<CustomerIdentity>::with(())
            .given(vec![claimed])
            .when(CustomerIdentityCommand::Claim {
                identity: email(),
                customer_id: Uuid::from_u128(2),
                at: at(),
            })
            .then_expect_error(CustomerIdentityError::ClaimedByAnother { owner: ada() });
    }

    fn claimant() -> Uuid {
        Uuid::from_u128(9)
    }

    #[test]
    fn a_web_form_customer_registers_with_a_claim_only() {
        TestFramework::<Customer>::with(())
            .given_no_previous_events()
            .when(CustomerCommand::Register {
                customer_id: claimant(),
                name: Some("Eve".into()),
                identities: vec![],
                claimed: vec![email()],
                at: at(),
            })
            .then_expect_events(vec![CustomerEvent::CustomerRegistered {
                customer_id: claimant(),
                name: Some("Eve".into()),
                identities: vec![],
                claimed: vec![email()],
                registered_at: at(),
            }]);
    }

    #[test]
    fn a_claimant_is_unproven_until_its_claim_is_linked() {
        let mut customer = Customer::default();
        customer.apply_event(CustomerEvent::CustomerRegistered {
            customer_id: claimant(),
            name: None,
            identities: vec![],
            claimed: vec![email()],
            registered_at: at(),
        });
        assert!(!customer.is_proven());
        assert_eq!(
            customer.address(crate::identity::IdentityKind::Email),
            Some("ada@example.com")
        );
        customer.apply_event(CustomerEvent::IdentityLinked {
            customer_id: claimant(),
            identity: email(),
            linked_at: at(),
        });
        assert!(customer.is_proven());
        assert!(customer.claimed.is_empty());
    }

    #[test]
    fn events_written_before_claims_existed_still_read() {
        let old = serde_json::json!({"type": "CustomerRegistered", "customer_id": ada(),
            "name": "Ada", "identities": [{"kind": "email", "value": "ada@example.com"}],
            "registered_at": "2026-11-24T10:00:00Z"});
        assert_eq!(
            serde_json::from_value::<CustomerEvent>(old).unwrap(),
            registered()
        );
    }

    #[test]
    fn a_confirmed_claimant_joins_the_owner_once() {
        let claimed = CustomerIdentityEvent::IdentityClaimed {
            identity: email(),
            customer_id: ada(),
            claimed_at: at(),
        };
        let joined = CustomerIdentityEvent::ClaimantJoined {
            customer_id: ada(),
            claimant: claimant(),
            joined_at: at(),
        };
        TestFramework::<CustomerIdentity>::with(())
            .given(vec![claimed.clone()])
            .when(CustomerIdentityCommand::JoinClaimant {
                claimant: claimant(),
                at: at(),
            })
            .then_expect_events(vec![joined.clone()]);
        TestFramework::<CustomerIdentity>::with(())
            .given(vec![claimed, joined])
            .when(CustomerIdentityCommand::JoinClaimant {
                claimant: claimant(),
                at: at(),
            })
            .then_expect_events(vec![]);
        TestFramework::<CustomerIdentity>::with(())
            .given_no_previous_events()
            .when(CustomerIdentityCommand::JoinClaimant {
                claimant: claimant(),
                at: at(),
            })
            .then_expect_error(CustomerIdentityError::NoOwner);
    }
}
