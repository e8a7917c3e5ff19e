//! Prefix-cache keys: cache scopes and the block hash chain, plus the hash → block index.
//!
//! A full block's key is `blake3(scope || parent || policy_id || tokens)`, so its KV content is a
//! pure function of the key and two blocks with the same key are interchangeable. The scope is
//! what keeps tenants apart: it is a keyed hash (server secret) of the tenant id, or of an
//! operator-declared share group, optionally subdivided by a client `cache_salt`. A client never
//! supplies a scope, only a salt, and a salt can only narrow its own tenant's scope, never reach
//! another tenant's: there is no way to name the secret-keyed base of someone else.
//!
//! Invariants of [`PrefixMap`] (checked by the pool): a hash maps to at most one block, and a
//! block is keyed (has a hash) iff the map points that hash at it.

use std::collections::HashMap;
use std::fmt;

use super::BlockId;
use crate::types::{TenantId, TokenId};

/// Domain-separation tags: every keyed-hash input starts with one, so inputs of different kinds
/// can never be equal byte strings.
const TAG_TENANT: &[u8] = b"kvserve/scope/tenant\0";
const TAG_GROUP: &[u8] = b"kvserve/scope/group\0";
const TAG_SALT: &[u8] = b"kvserve/scope/salt\0";

/// The namespace a sequence's prefix-cache keys live in, bound to the tenant it was derived for.
///
/// Only [`super::KvPool::scope`] builds one (the fields are private), so a scope always comes
/// from the server secret and an authenticated tenant, never from a client.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CacheScope {
    tenant: TenantId,
    key: [u8; 32],
}

impl CacheScope {
    /// The tenant this scope was derived for (the one `start` must be called with).
    pub fn tenant(&self) -> TenantId {
        self.tenant
    }
}

impl fmt::Debug for CacheScope {
    // Enough of the key to tell scopes apart in logs; the key itself is not a secret (it is a
    // hash output) but there is no reason to print all of it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CacheScope {{ tenant: {}, key: {:02x}{:02x}{:02x}{:02x}… }}",
            self.tenant.0, self.key[0], self.key[1], self.key[2], self.key[3]
        )
    }
}

/// Derives the scope of `tenant`: from its share group if the operator declared one, else from
/// the tenant id; a salt, if any, subdivides that base.
pub(super) fn derive_scope(
    secret: &[u8; 32],
    tenant: TenantId,
    share_group: Option<&str>,
    cache_salt: Option<&str>,
) -> CacheScope {
    let base = match share_group {
        Some(group) => {
            let mut h = blake3::Hasher::new_keyed(secret);
            h.update(TAG_GROUP);
            h.update(group.as_bytes());
            h.finalize()
        }
        None => {
            let mut h = blake3::Hasher::new_keyed(secret);
            h.update(TAG_TENANT);
            h.update(&tenant.0.to_le_bytes());
            h.finalize()
        }
    };
    let key = match cache_salt {
        Some(salt) => {
            let mut h = blake3::Hasher::new_keyed(secret);
            h.update(TAG_SALT);
            h.update(base.as_bytes());
            h.update(salt.as_bytes());
            *h.finalize().as_bytes()
        }
        None => *base.as_bytes(),
    };
    CacheScope { tenant, key }
}

/// The key of one full block: it commits to the scope, the whole prefix (through the parent) and
/// the KV policy, so equal keys mean equal KV content.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct BlockHash(pub(super) [u8; 32]);

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "BlockHash({:02x}{:02x}{:02x}{:02x}…)",
            self.0[0], self.0[1], self.0[2], self.0[3]
        )
    }
}

/// Hashes one full block. The first block's parent is all zeros. Every field has a fixed width
/// (the block size is fixed per pool), so the byte string is unambiguous.
pub(super) fn block_hash(
    scope: &CacheScope,
    parent: Option<&BlockHash>,
    policy_id: u32,
    tokens: &[TokenId],
) -> BlockHash {
    let mut h = blake3::Hasher::new();
    h.update(&scope.key);
    h.update(parent.map_or(&[0u8; 32], |p| &p.0));
    h.update(&policy_id.to_le_bytes());
    for t in tokens {
        h.update(&t.to_le_bytes());
    }
    BlockHash(*h.finalize().as_bytes())
}

/// hash → block for cached full blocks (in use or cached-free). Evicted blocks leave it.
#[derive(Debug, Default)]
pub(super) struct PrefixMap {
    map: HashMap<BlockHash, BlockId>,
}

impl PrefixMap {
    pub(super) fn get(&self, hash: &BlockHash) -> Option<BlockId> {
        self.map.get(hash).copied()
    }

    /// Maps `hash` to `block` unless the hash is already mapped; returns whether it was inserted.
    /// First writer wins: a later duplicate block stays unkeyed, so the map never has to choose.
    pub(super) fn insert_if_absent(&mut self, hash: BlockHash, block: BlockId) -> bool {
        match self.map.entry(hash) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(block);
                true
            }
        }
    }

    pub(super) fn remove(&mut self, hash: &BlockHash) -> Option<BlockId> {
        self.map.remove(hash)
    }

    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&BlockHash, &BlockId)> {
        self.map.iter()
    }
}
