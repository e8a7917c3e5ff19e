//! The paged KV block pool's bookkeeping: which blocks each sequence uses, which blocks are shared
//! (prefix cache, `n > 1` forks, copy-on-write), and what each tenant may hold.
//!
//! This is a pure data structure: no I/O, no threads, no device. The physical KV storage belongs
//! to the backend; the pool hands it block tables ([`KvPool::block_table`], plain `u32`s, the only
//! way block ids leave this module) and the block copies to perform before the next forward
//! ([`KvPool::take_copies`]). Everything above `kv` holds opaque [`SeqBlocks`] handles.
//!
//! Sequence lifecycle: [`KvPool::start`] (reuses the longest cached prefix) → repeatedly
//! [`KvPool::reserve`] (cover the tokens about to be computed; copy-on-write of a shared tail),
//! forward, [`KvPool::commit`] (full blocks enter the prefix cache) → [`KvPool::free`]. The
//! caller must free every handle it started or forked; dropping one leaks its blocks.
//!
//! Module layout: `prefix` (scopes, hash chain, hash → block map), `ledger` (per-tenant quotas,
//! cached-block LRUs, eviction choice), `pool` (blocks, refcounts, lifecycle, copy-on-write),
//! `tests` / `pool_tests` (exact-state tests; the property test is `tests/kv_props.rs`).
//!
//! Invariants (all checked by [`KvPool::check_invariants`], at the end of this file):
//! - every block is in exactly one state: in use (refcount > 0), cached-free (refcount 0, keyed,
//!   in its owner tenant's LRU) or uncached-free (refcount 0, unkeyed, on the free stack);
//! - a block's refcount equals the sum of its per-tenant hold counts;
//! - a tenant's `used` is the number of distinct in-use blocks it holds a reference on (a block
//!   shared by forks of one tenant is charged once), `used ≤ max_blocks`, and Σ used ≤ num_blocks;
//! - reservations are always honourable: `num_blocks − Σ used ≥ Σ max(0, reserved − used)`, so a
//!   tenant asking for blocks within its reservation is always granted them;
//! - the prefix map points a hash at a block iff that block carries the hash;
//! - pending copies read pinned blocks and write distinct in-use blocks that no copy reads.

#[cfg(test)]
mod class_tests;
/// The block formats live with the backends that store them; re-exported for `kv`'s users.
pub use crate::backend::codec;
mod ledger;
pub mod policy;
mod pool;
#[cfg(test)]
mod pool_tests;
mod prefix;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;

pub use pool::KvPool;
pub use prefix::CacheScope;

use crate::types::TenantId;
use prefix::BlockHash;

/// Errors of the kv layer. Capacity shortfalls are not errors (see [`Alloc`]); these are bad
/// configuration or a caller breaking the lifecycle contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error("invalid kv pool config: {0}")]
    InvalidConfig(String),
    #[error("invalid quota for tenant {}: {reason}", tenant.0)]
    InvalidQuota { tenant: TenantId, reason: String },
    #[error("tenant {0:?} is not registered with the kv pool")]
    UnknownTenant(TenantId),
    #[error("tenant {0:?} is already registered with the kv pool")]
    DuplicateTenant(TenantId),
    #[error("cache scope belongs to tenant {}, not tenant {}", scope_tenant.0, tenant.0)]
    ScopeMismatch {
        tenant: TenantId,
        scope_tenant: TenantId,
    },
    #[error("commit of {tokens} tokens exceeds the {capacity} reserved")]
    CommitBeyondReserved { tokens: usize, capacity: usize },
    #[error("commit of {tokens} tokens is below the {computed} already computed")]
    CommitRegressed { tokens: usize, computed: usize },
}

/// A block index into the pool. Private to `kv`: it never leaves except as a plain `u32` in a
/// block table or a copy, so nothing outside can fabricate one or confuse it with another id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct BlockId(u32);

impl BlockId {
    /// A table entry whose block left the sequence (`window`); never a real block.
    const DROPPED: BlockId = BlockId(u32::MAX);

    fn idx(self) -> usize {
        self.0 as usize
    }
}

/// Pool shape and the secrets that go into its keys.
#[derive(Clone)]
pub struct KvPoolConfig {
    /// Block ids. In a uniform pool (every block one unit) this is also the capacity; a mixed
    /// pool needs `capacity / lightest block` ids so that ids never run out before units do.
    pub num_blocks: usize,
    /// Units of memory the pool may hold (quotas, reservations and stats are in units).
    pub capacity: usize,
    /// Tokens per block (16 by default).
    pub block_size: usize,
    /// Server secret keying the cache scopes. Generate it at start if the config has none:
    /// scopes (and so the prefix cache) then simply do not survive a restart.
    pub secret: [u8; 32],
    /// The KV policy whose blocks this pool stores; part of every block key so blocks of
    /// different policies never alias.
    pub policy_id: u32,
}

impl KvPoolConfig {
    pub const DEFAULT_BLOCK_SIZE: usize = 16;

    pub fn new(num_blocks: usize, secret: [u8; 32]) -> Self {
        Self {
            num_blocks,
            capacity: num_blocks,
            block_size: Self::DEFAULT_BLOCK_SIZE,
            secret,
            policy_id: 0,
        }
    }
}

impl fmt::Debug for KvPoolConfig {
    // The secret is masked: Debug output ends up in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvPoolConfig")
            .field("num_blocks", &self.num_blocks)
            .field("capacity", &self.capacity)
            .field("block_size", &self.block_size)
            .field("secret", &"<redacted>")
            .field("policy_id", &self.policy_id)
            .finish()
    }
}

/// A tenant's share of the pool, in pool units (blocks in a uniform pool, bytes in the engine's
/// mixed pool).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantQuota {
    /// Guaranteed: other tenants can never take these. Σ over tenants ≤ `num_blocks`.
    pub reserved_blocks: usize,
    /// Hard cap on blocks the tenant's sequences hold at once (≥ `reserved_blocks`).
    pub max_blocks: usize,
    /// Cached-free blocks of this tenant that other tenants' borrowing cannot evict.
    pub cached_floor: usize,
    /// Operator-declared sharing: tenants naming the same group share one cache scope.
    pub share_group: Option<String>,
}

/// The answer to [`KvPool::reserve`]. Nothing is allocated unless it is `Granted`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Alloc {
    Granted,
    /// Blocks are short right now: the caller may preempt (borrowers first) or wait.
    NotNow,
    /// The request needs more blocks than the tenant could ever hold (its `max_blocks`, or the
    /// pool minus other tenants' reservations): waiting will not help.
    Never,
}

/// How a sequence's blocks are charged, keyed and kept; the engine derives it from the sequence's
/// KV policy (`kv` knows weights and keys, not formats).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockClass {
    /// Units a block costs while it fills (the exact format).
    pub filling: usize,
    /// Units once it is full and sealed into the policy's format.
    pub sealed: usize,
    /// Identity of the sealed content, part of every block key (`KvPolicy::content_id`).
    pub content_id: u32,
    /// Whether full blocks are looked up in and published to the prefix cache.
    pub shares_prefix: bool,
    /// Keep only block 0 (attention sinks) and the last `n` blocks: older ones leave the
    /// sequence after each commit (`window:W`).
    pub window_blocks: Option<usize>,
}

impl BlockClass {
    /// Every block one unit, keyed under `content_id`, never dropped.
    pub fn uniform(content_id: u32) -> Self {
        Self {
            filling: 1,
            sealed: 1,
            content_id,
            shares_prefix: true,
            window_blocks: None,
        }
    }

    /// The fewest units a sequence of `tokens` tokens can ever be held in (each block filled
    /// and sealed in turn): if this exceeds what the tenant can hold, waiting cannot help.
    pub fn min_units(&self, tokens: usize, bs: usize) -> usize {
        let blocks = tokens.div_ceil(bs);
        let full = blocks.saturating_sub(1);
        let kept = self.window_blocks.map_or(full, |w| full.min(w));
        kept * self.sealed + usize::from(blocks > 0) * self.filling
    }
}

/// One sequence's blocks. Opaque outside `kv`; not `Clone` so a sequence is freed exactly once
/// (a second sequence sharing the blocks comes from [`KvPool::fork`]).
#[derive(Debug)]
#[must_use = "a SeqBlocks must be given back with KvPool::free, or its blocks leak"]
pub struct SeqBlocks {
    scope: CacheScope,
    class: BlockClass,
    /// Block table: block `i` holds positions `i*block_size .. (i+1)*block_size`; entries a
    /// window dropped are [`BlockId::DROPPED`].
    blocks: Vec<BlockId>,
    /// Hash chain of the leading full blocks whose KV is computed (`hashes.len() ≤ computed / bs`).
    hashes: Vec<BlockHash>,
    /// Tokens whose KV is computed (from the prefix cache or committed).
    computed: usize,
}

impl SeqBlocks {
    pub fn tenant(&self) -> TenantId {
        self.scope.tenant()
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    pub fn class(&self) -> BlockClass {
        self.class
    }

    /// Tokens whose KV is computed: cached at start, then as committed.
    pub fn num_computed_tokens(&self) -> usize {
        self.computed
    }
}

/// Pool-wide numbers for metrics, in units: `used + cached + free == capacity` (blocks in a
/// uniform pool, bytes in the engine's mixed pool).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvStats {
    pub num_blocks: usize,
    pub capacity: usize,
    pub block_size: usize,
    /// Units of blocks with refcount > 0.
    pub used: usize,
    /// Units of blocks free but still keyed (reusable by a prefix hit until evicted).
    pub cached: usize,
    /// Units not held by any block.
    pub free: usize,
    /// Blocks with refcount > 0.
    pub used_blocks: usize,
    /// Blocks free but still keyed.
    pub cached_blocks: usize,
    pub evictions: u64,
    pub cow_copies: u64,
    pub tenants: Vec<(TenantId, TenantKvStats)>,
}

/// One tenant's numbers. `used` counts each block the tenant holds once; a block held by two
/// tenants of a share group counts for both (see `ledger`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantKvStats {
    pub used: usize,
    pub cached: usize,
    pub reserved: usize,
    pub max: usize,
    pub prefix_queries: u64,
    pub prefix_query_tokens: u64,
    pub prefix_hit_tokens: u64,
}

impl KvPool {
    /// Checks every invariant listed in the `kv` module docs. O(blocks + tenants).
    pub fn check_invariants(&self) -> Result<(), String> {
        #[derive(Clone, Copy, PartialEq)]
        enum Seen {
            No,
            Free,
            Cached,
        }
        let mut seen = vec![Seen::No; self.blocks.len()];
        for &b in &self.free {
            let blk = &self.blocks[b.idx()];
            if seen[b.idx()] != Seen::No {
                return Err(format!("block {} twice on the free stack", b.0));
            }
            if blk.hash.is_some() || blk.cached.is_some() {
                return Err(format!("free block {} is keyed or cached", b.0));
            }
            seen[b.idx()] = Seen::Free;
        }
        for (t, a) in self.ledger.accounts() {
            for &(tick, b) in &a.lru {
                let blk = &self.blocks[b.idx()];
                if seen[b.idx()] != Seen::No {
                    return Err(format!(
                        "block {} both cached and free/cached elsewhere",
                        b.0
                    ));
                }
                if blk.hash.is_none() || blk.cached != Some((*t, tick)) {
                    return Err(format!("cached block {} unkeyed or misfiled", b.0));
                }
                seen[b.idx()] = Seen::Cached;
            }
        }
        let mut pins = vec![0u32; self.blocks.len()];
        for p in &self.pending {
            pins[p.src.idx()] += 1;
        }
        let mut used_by: BTreeMap<TenantId, usize> = BTreeMap::new();
        let mut keyed = 0;
        for (i, blk) in self.blocks.iter().enumerate() {
            let sum: u32 = blk.holders.iter().map(|(_, n)| n).sum();
            if blk.pins != pins[i] {
                return Err(format!(
                    "block {i}: pins {} != pending copies reading it {}",
                    blk.pins, pins[i]
                ));
            }
            if sum != blk.refs || blk.holders.iter().any(|(_, n)| *n == 0) {
                return Err(format!(
                    "block {i}: refs {} != holder counts {:?}",
                    blk.refs, blk.holders
                ));
            }
            for (j, (t, _)) in blk.holders.iter().enumerate() {
                if blk.holders[..j].iter().any(|(u, _)| u == t) {
                    return Err(format!("block {i}: tenant {} listed twice", t.0));
                }
                *used_by.entry(*t).or_default() += blk.weight;
            }
            match (blk.refs > 0, seen[i]) {
                (true, Seen::No) if blk.cached.is_none() => {}
                (false, Seen::Free | Seen::Cached) => {}
                (true, _) => return Err(format!("block {i} is both in use and free/cached")),
                (false, _) => return Err(format!("block {i} has no references and is not free")),
            }
            if let Some(h) = &blk.hash {
                keyed += 1;
                if self.prefix.get(h) != Some(BlockId(i as u32)) {
                    return Err(format!("block {i} carries a hash the map does not give it"));
                }
            }
        }
        let occupied: usize = self.blocks.iter().map(|b| b.weight).sum();
        if occupied != self.occupied {
            return Err(format!(
                "occupied {} != Σ block weights {occupied}",
                self.occupied
            ));
        }
        if self.occupied > self.cfg.capacity {
            return Err(format!(
                "occupied {} > capacity {}",
                self.occupied, self.cfg.capacity
            ));
        }
        if let Some(&b) = self.free.iter().find(|b| self.blocks[b.idx()].weight != 0) {
            return Err(format!("free block {} still weighs", b.0));
        }
        if keyed != self.prefix.len() {
            return Err(format!(
                "prefix map has {} entries, {} blocks keyed",
                self.prefix.len(),
                keyed
            ));
        }
        if let Some((h, b)) = self
            .prefix
            .iter()
            .find(|(h, b)| self.blocks[b.idx()].hash != Some(**h))
        {
            return Err(format!(
                "map entry {h:?} → {} not carried by the block",
                b.0
            ));
        }
        for (i, p) in self.pending.iter().enumerate() {
            let (src, dst) = (&self.blocks[p.src.idx()], &self.blocks[p.dst.idx()]);
            if src.refs == 0 || !src.holders.iter().any(|(t, _)| *t == p.tenant) || dst.refs == 0 {
                return Err(format!(
                    "pending copy {}→{} not pinned/live",
                    p.src.0, p.dst.0
                ));
            }
            if self.pending[..i].iter().any(|q| q.dst == p.dst)
                || self.pending.iter().any(|q| q.src == p.dst)
            {
                return Err(format!(
                    "pending copy {}→{} conflicts with another",
                    p.src.0, p.dst.0
                ));
            }
        }
        self.ledger.check(&used_by)
    }
}

impl std::fmt::Debug for KvPool {
    // A summary: the full block array would flood any log that prints the engine.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.stats();
        f.debug_struct("KvPool")
            .field("cfg", &self.cfg)
            .field("used", &s.used)
            .field("cached", &s.cached)
            .field("free", &s.free)
            .field("pending_copies", &self.pending.len())
            .finish()
    }
}
