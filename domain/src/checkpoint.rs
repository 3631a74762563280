//! Signed checkpoints of the log-wide Merkle tree, and inclusion proofs that
//! verify against one without the database.
//!
//! A checkpoint says: the first `size` events in log order (transaction id,
//! then position), the last of them at (`last_transaction_id`,
//! `last_position`), have the Merkle root `root`. It is signed with Ed25519
//! over a fixed, versioned text encoding of those fields, so that anyone
//! holding the public key can check it.

use chrono::{DateTime, Utc};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::audit::{chain_hash, ChainInput};
use crate::merkle::{self, Hash};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckpointError {
    #[error("signing key: expected 64 hex digits (a 32-byte Ed25519 seed)")]
    BadSigningKey,
    #[error("public key: expected 64 hex digits of a valid Ed25519 key")]
    BadPublicKey,
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("the checkpoint's signature does not verify with the given public key")]
    BadSignature,
    #[error("the inclusion proof does not lead to the checkpoint's root")]
    NotIncluded,
    #[error("the event's content does not hash to the proven hash")]
    ContentMismatch,
}

/// Parses a signing key: 64 hex digits, the Ed25519 secret seed.
pub fn signing_key_from_hex(text: &str) -> Result<SigningKey, CheckpointError> {
    let bytes = hex::decode(text.trim()).map_err(|_| CheckpointError::BadSigningKey)?;
    let seed: [u8; 32] = bytes
        .try_into()
        .map_err(|_| CheckpointError::BadSigningKey)?;
    Ok(SigningKey::from_bytes(&seed))
}

pub fn public_key_from_hex(text: &str) -> Result<VerifyingKey, CheckpointError> {
    let bytes = hex::decode(text.trim()).map_err(|_| CheckpointError::BadPublicKey)?;
    let key: [u8; 32] = bytes
        .try_into()
        .map_err(|_| CheckpointError::BadPublicKey)?;
    VerifyingKey::from_bytes(&key).map_err(|_| CheckpointError::BadPublicKey)
}

/// What a checkpoint commits to, before it is signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointBody {
    pub size: u64,
    pub last_transaction_id: u64,
    pub last_position: i64,
    /// The Merkle root, hex.
    pub root: String,
    pub created_at: DateTime<Utc>,
}

impl CheckpointBody {
    /// The exact bytes that are signed.
    pub fn message(&self) -> Vec<u8> {
        format!(
            "casebook checkpoint v1\nsize {}\nlast_transaction_id {}\nlast_position {}\nroot {}\ncreated_at {}\n",
            self.size,
            self.last_transaction_id,
            self.last_position,
            self.root,
            self.created_at.timestamp_micros()
        )
        .into_bytes()
    }

    pub fn sign(self, key: &SigningKey) -> Checkpoint {
        let signature = key.sign(&self.message());
        Checkpoint {
            public_key: hex::encode(key.verifying_key().as_bytes()),
            signature: hex::encode(signature.to_bytes()),
            body: self,
        }
    }
}

/// A signed checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    #[serde(flatten)]
    pub body: CheckpointBody,
    /// The signer's public key, hex: which key signed, not a reason to
    /// trust it (verification takes the trusted key separately).
    pub public_key: String,
    /// Ed25519 signature over [`CheckpointBody::message`], hex.
    pub signature: String,
}

impl Checkpoint {
    /// Checks the signature with the trusted `key`.
    pub fn verify(&self, key: &VerifyingKey) -> Result<(), CheckpointError> {
        let bytes = hex::decode(&self.signature).map_err(|_| CheckpointError::BadSignature)?;
        let bytes: [u8; 64] = bytes
            .try_into()
            .map_err(|_| CheckpointError::BadSignature)?;
        key.verify(&self.body.message(), &Signature::from_bytes(&bytes))
            .map_err(|_| CheckpointError::BadSignature)
    }

    pub fn root(&self) -> Result<Hash, CheckpointError> {
        parse_hash(&self.body.root).ok_or(CheckpointError::Malformed("checkpoint root"))
    }
}

pub fn parse_hash(text: &str) -> Option<Hash> {
    hex::decode(text).ok()?.try_into().ok()
}

/// An event's content as the chain covers it, so a proof can show that the
/// proven hash is this content's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvenContent {
    /// The stream's previous hash (`""` for the first event).
    pub previous_hash: String,
    pub event_id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub occurred_at_micros: i64,
    /// `jsonb` text of the payload and metadata.
    pub payload: String,
    pub metadata: String,
}

impl ProvenContent {
    /// The chain hash this content makes after `previous_hash`.
    pub fn chain_hash(&self) -> String {
        chain_hash(
            &self.previous_hash,
            &ChainInput {
                event_id: &self.event_id,
                aggregate_type: &self.aggregate_type,
                aggregate_id: &self.aggregate_id,
                sequence: self.sequence,
                event_type: &self.event_type,
                event_version: &self.event_version,
                occurred_at_micros: self.occurred_at_micros,
                payload: &self.payload,
                metadata: &self.metadata,
            },
        )
    }
}

/// `casebook audit prove`'s output: one event's inclusion in a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InclusionProof {
    pub checkpoint: Checkpoint,
    pub position: i64,
    /// The event's chain hash, hex.
    pub hash: String,
    /// The leaf's index in log order.
    pub leaf_index: u64,
    /// Sibling hashes, hex, nearest first.
    pub path: Vec<String>,
    pub content: ProvenContent,
}

impl InclusionProof {
    /// Checks everything without the database: the checkpoint's signature
    /// under `key`, that the content hashes to `hash`, and that the leaf of
    /// (`position`, `hash`) is in the checkpoint's tree.
    pub fn verify(&self, key: &VerifyingKey) -> Result<(), CheckpointError> {
        self.checkpoint.verify(key)?;
        let recomputed = self.content.chain_hash();
        if recomputed != self.hash {
            return Err(CheckpointError::ContentMismatch);
        }
        let path: Vec<Hash> = self
            .path
            .iter()
            .map(|h| parse_hash(h).ok_or(CheckpointError::Malformed("proof path")))
            .collect::<Result<_, _>>()?;
        let leaf = merkle::event_leaf(self.position, &self.hash);
        if merkle::verify_inclusion(
            self.leaf_index,
            self.checkpoint.body.size,
            &leaf,
            &path,
            &self.checkpoint.root()?,
        ) {
            Ok(())
        } else {
            Err(CheckpointError::NotIncluded)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle::{event_leaf, inclusion_proof, root};

    fn key() -> SigningKey {
        signing_key_from_hex(&"07".repeat(32)).unwrap()
    }

    fn content(seq: i64, prev: &str) -> ProvenContent {
        ProvenContent {
            previous_hash: prev.into(),
            event_id: format!("00000000-0000-4000-8000-00000000000{seq}"),
            aggregate_type: "ticket".into(),
            aggregate_id: "t-1".into(),
            sequence: seq,
            event_type: "TicketOpened".into(),
            event_version: "1".into(),
            occurred_at_micros: 1_795_000_000_000_000 + seq,
            payload: "{\"a\": 1}".into(),
            metadata: "{}".into(),
        }
    }

    fn hash_of(c: &ProvenContent) -> String {
        c.chain_hash()
    }

    fn proof() -> InclusionProof {
        let mut contents = Vec::new();
        let mut prev = String::new();
        for seq in 1..=5 {
            let c = content(seq, &prev);
            prev = hash_of(&c);
            contents.push(c);
        }
        let leaves: Vec<Hash> = contents
            .iter()
            .enumerate()
            .map(|(i, c)| event_leaf(i as i64 + 10, &hash_of(c)))
            .collect();
        let checkpoint = CheckpointBody {
            size: 5,
            last_transaction_id: 900,
            last_position: 14,
            root: hex::encode(root(&leaves)),
            created_at: DateTime::from_timestamp_micros(1_795_000_000_123_456).unwrap(),
        }
        .sign(&key());
        InclusionProof {
            checkpoint,
            position: 12,
            hash: hash_of(&contents[2]),
            leaf_index: 2,
            path: inclusion_proof(&leaves, 2)
                .unwrap()
                .iter()
                .map(hex::encode)
                .collect(),
            content: contents[2].clone(),
        }
    }

    #[test]
    fn a_proof_verifies_offline_and_any_change_is_refused() {
        let trusted = key().verifying_key();
        let good = proof();
        assert_eq!(good.verify(&trusted), Ok(()));

        let other_key = signing_key_from_hex(&"08".repeat(32))
            .unwrap()
            .verifying_key();
        assert_eq!(good.verify(&other_key), Err(CheckpointError::BadSignature));

        let mut p = good.clone();
        p.checkpoint.body.size = 6;
        assert_eq!(p.verify(&trusted), Err(CheckpointError::BadSignature));

        let mut p = good.clone();
        p.content.payload = "{\"a\": 2}".into();
        assert_eq!(p.verify(&trusted), Err(CheckpointError::ContentMismatch));

        let mut p = good.clone();
        p.position = 13;
        assert_eq!(p.verify(&trusted), Err(CheckpointError::NotIncluded));

        let mut p = good.clone();
        p.leaf_index = 3;
        assert_eq!(p.verify(&trusted), Err(CheckpointError::NotIncluded));

        let mut p = good;
        p.path.pop();
        assert_eq!(p.verify(&trusted), Err(CheckpointError::NotIncluded));
    }

    #[test]
    fn keys_parse_from_hex_only() {
        assert!(signing_key_from_hex("zz").is_err());
        assert!(signing_key_from_hex(&"07".repeat(31)).is_err());
        let k = key();
        let public = hex::encode(k.verifying_key().as_bytes());
        assert_eq!(public_key_from_hex(&public).unwrap(), k.verifying_key());
        assert!(public_key_from_hex(&"00".repeat(33)).is_err());
    }
}
