//! The log-wide commitment: a Merkle tree over every stored event in log
//! order, built as RFC 6962 (Certificate Transparency) builds it.
//!
//! Leaves and inner nodes are hashed with different one-byte prefixes
//! (`0x00` for a leaf, `0x01` for a node), so an inner node can never be
//! passed off as a leaf and a proof cannot be confused. The tree over `n`
//! leaves splits at the largest power of two below `n`; its root is
//! `MTH(D[n]) = H(0x01 ‖ MTH(D[0:k]) ‖ MTH(D[k:n]))`.
//!
//! [`CompactTree`] keeps only the roots of the perfect subtrees (at most 64),
//! so a checkpoint can carry on from the previous one without rereading
//! the whole log; [`inclusion_proof`] and [`verify_inclusion`] are RFC 9162's
//! audit paths.

use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

/// The leaf of one event: its global position and its chain hash (hex, as
/// stored). The position is in the leaf, so moving an event to another
/// position changes the tree even when the log order stays the same.
pub fn event_leaf(position: i64, chain_hash_hex: &str) -> Hash {
    let mut data = Vec::with_capacity(8 + chain_hash_hex.len());
    data.extend_from_slice(&position.to_be_bytes());
    data.extend_from_slice(chain_hash_hex.as_bytes());
    leaf_hash(&data)
}

/// `H(0x00 ‖ data)`.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(data);
    h.finalize().into()
}

/// `H(0x01 ‖ left ‖ right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The root of the empty tree: `H()`.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// The largest power of two strictly below `n` (`n >= 2`).
fn split(n: usize) -> usize {
    debug_assert!(n >= 2);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// The root over `leaves` (already leaf-hashed).
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// The audit path of leaf `index` in the tree over `leaves` (RFC 6962
/// `PATH(m, D[n])`), nearest sibling first. `None` when `index` is out of
/// range.
pub fn inclusion_proof(leaves: &[Hash], index: usize) -> Option<Vec<Hash>> {
    if index >= leaves.len() {
        return None;
    }
    let mut path = Vec::new();
    fn walk(leaves: &[Hash], m: usize, path: &mut Vec<Hash>) {
        if leaves.len() <= 1 {
            return;
        }
        let k = split(leaves.len());
        if m < k {
            walk(&leaves[..k], m, path);
            path.push(root(&leaves[k..]));
        } else {
            walk(&leaves[k..], m - k, path);
            path.push(root(&leaves[..k]));
        }
    }
    walk(leaves, index, &mut path);
    Some(path)
}

/// Checks that `leaf` is leaf number `index` of the tree of `size` leaves
/// whose root is `root` (RFC 9162, 2.1.3.2).
pub fn verify_inclusion(index: u64, size: u64, leaf: &Hash, proof: &[Hash], root: &Hash) -> bool {
    if index >= size || proof.len() > 64 {
        return false;
    }
    let mut f = index;
    let mut s = size - 1;
    let mut r = *leaf;
    for p in proof {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            if f & 1 == 0 {
                while f & 1 == 0 && f != 0 {
                    f >>= 1;
                    s >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    s == 0 && &r == root
}

/// An append-only tree kept as the roots of its perfect subtrees, largest
/// (leftmost) first: enough to append and to compute the root.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactTree {
    size: u64,
    /// One root per set bit of `size`, from the highest bit down.
    frontier: Vec<Hash>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a compact tree of {size} leaves needs {expected} subtree roots, got {got}")]
pub struct FrontierMismatch {
    pub size: u64,
    pub expected: u32,
    pub got: usize,
}

impl CompactTree {
    /// Resumes a tree from a stored size and frontier.
    pub fn from_parts(size: u64, frontier: Vec<Hash>) -> Result<Self, FrontierMismatch> {
        if frontier.len() != size.count_ones() as usize {
            return Err(FrontierMismatch {
                size,
                expected: size.count_ones(),
                got: frontier.len(),
            });
        }
        Ok(Self { size, frontier })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn frontier(&self) -> &[Hash] {
        &self.frontier
    }

    pub fn push(&mut self, leaf: Hash) {
        let mut node = leaf;
        // Each trailing one bit of the old size is a subtree of the same
        // height as the carry: merge them.
        let mut size = self.size;
        while size & 1 == 1 {
            let left = self.frontier.pop().expect("one root per set bit");
            node = node_hash(&left, &node);
            size >>= 1;
        }
        self.frontier.push(node);
        self.size += 1;
    }

    pub fn root(&self) -> Hash {
        let mut iter = self.frontier.iter().rev();
        let Some(last) = iter.next() else {
            return empty_root();
        };
        iter.fold(*last, |acc, left| node_hash(left, &acc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n)
            .map(|i| event_leaf(i as i64 + 1, &format!("{i:064x}")))
            .collect()
    }

    #[test]
    fn the_compact_tree_agrees_with_the_recursive_definition() {
        let all = leaves(70);
        let mut tree = CompactTree::default();
        assert_eq!(tree.root(), empty_root());
        for (i, leaf) in all.iter().enumerate() {
            tree.push(*leaf);
            assert_eq!(tree.root(), root(&all[..=i]), "size {}", i + 1);
            let resumed = CompactTree::from_parts(tree.size(), tree.frontier().to_vec()).unwrap();
            assert_eq!(resumed, tree);
        }
        assert!(CompactTree::from_parts(3, vec![all[0]]).is_err());
    }

    #[test]
    fn rfc6962_shape_for_three_leaves() {
        let l = leaves(3);
        assert_eq!(root(&l), node_hash(&node_hash(&l[0], &l[1]), &l[2]));
        assert_eq!(root(&l[..1]), l[0]);
    }

    #[test]
    fn every_proof_verifies_and_nothing_else_does() {
        for n in 1..=33usize {
            let all = leaves(n);
            let r = root(&all);
            for m in 0..n {
                let proof = inclusion_proof(&all, m).unwrap();
                assert!(
                    verify_inclusion(m as u64, n as u64, &all[m], &proof, &r),
                    "{m}/{n}"
                );
                // Another leaf, another index or root: refused (the size is
                // bound by the checkpoint's signature).
                let other = leaf_hash(b"other");
                assert!(!verify_inclusion(m as u64, n as u64, &other, &proof, &r));
                if n > 1 {
                    let wrong = (m + 1) % n;
                    assert!(
                        all[wrong] == all[m]
                            || !verify_inclusion(wrong as u64, n as u64, &all[m], &proof, &r)
                    );
                }
                assert!(!verify_inclusion(
                    m as u64,
                    n as u64,
                    &all[m],
                    &proof,
                    &empty_root()
                ));
                assert!(!verify_inclusion(n as u64, n as u64, &all[m], &proof, &r));
            }
            assert!(inclusion_proof(&all, n).is_none());
        }
    }

    #[test]
    fn a_node_cannot_pass_for_a_leaf() {
        let all = leaves(4);
        let inner = node_hash(&all[0], &all[1]);
        let r = root(&all);
        // The two-leaf proof of the inner node as if the tree had 2 leaves
        // is for another size; at size 4 no path makes a node a leaf.
        let proof = vec![node_hash(&all[2], &all[3])];
        assert!(!verify_inclusion(0, 4, &inner, &proof, &r));
    }

    #[test]
    fn the_position_is_part_of_the_leaf() {
        assert_ne!(event_leaf(1, "ab"), event_leaf(2, "ab"));
        assert_ne!(event_leaf(1, "ab"), event_leaf(1, "ac"));
    }
}
