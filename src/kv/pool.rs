//! The block pool: block states and refcounts, the uncached free stack, the sequence lifecycle
//! (start / reserve / commit / fork / free), copy-on-write, eviction, stats and the invariant
//! check.
//!
//! Who frees: a block's references come from sequence tables (one per `SeqBlocks` holding it)
//! and from pending copies (one per copy reading it, so a copy source cannot be reallocated and
//! overwritten before the backend has read it; dropped by `take_copies`). When the last one goes
//! the block is parked: keyed blocks go to the releasing tenant's cached LRU, unkeyed ones onto
//! the free stack. Unkeyed free blocks are unreachable: nothing maps to them and every block
//! handed out again is written before it is read (attention only reads positions its own
//! sequence wrote, or keyed prefix blocks whose content the key pins down).
//!
//! Orders (pinned by the tests): the free stack pops the most recently freed block first
//! (initially 0, 1, 2, …) and a freed table is parked tail first, so the next allocation reuses
//! it head first; in the cached LRU a freed table's tail is older than its head, so a prefix is
//! evicted from its end and its shared head survives longest (as in vLLM). Eviction order across
//! tenants is `Ledger::pick_victim`.

use super::ledger::Ledger;
use super::prefix::{block_hash, derive_scope, BlockHash, PrefixMap};
use super::{
    Alloc, BlockClass, BlockId, CacheScope, KvError, KvPoolConfig, KvStats, SeqBlocks,
    TenantKvStats, TenantQuota,
};
use crate::types::{TenantId, TokenId};

#[derive(Debug, Default)]
pub(super) struct Block {
    /// One per sequence-table entry holding the block plus one per pending copy reading it.
    pub(super) refs: u32,
    /// The pending-copy part of `refs`. Pins only stop reallocation: copies run before the next
    /// forward, so the last sequence holding a pinned block may still write it in place.
    pub(super) pins: u32,
    /// Per-tenant split of `refs` (Σ counts == refs, no zero counts). A tenant listed here is
    /// charged for the block once, however many of its references there are.
    pub(super) holders: Vec<(TenantId, u32)>,
    /// Set iff the prefix map points this hash at this block.
    pub(super) hash: Option<BlockHash>,
    /// For a cached-free block: the tenant whose LRU it is in and its tick there.
    pub(super) cached: Option<(TenantId, u64)>,
    /// Units the block occupies (0 iff it is on the free stack): its class's `filling` weight
    /// until sealed by `commit`, `sealed` after.
    pub(super) weight: usize,
}

/// A copy-on-write the backend has not performed yet. `src` is pinned (one reference, held on
/// behalf of `tenant`) until `take_copies`.
#[derive(Debug)]
pub(super) struct PendingCopy {
    pub(super) src: BlockId,
    pub(super) dst: BlockId,
    pub(super) tenant: TenantId,
}

/// What `reserve` would do for a sequence (computed without side effects, so that a refusal
/// leaves nothing behind).
struct Plan {
    /// Table indices to be written that are shared: each gets a fresh block.
    replace: Vec<usize>,
    /// Table indices to be written that are exclusive but keyed: they leave the prefix map
    /// before being written, so a key never describes content it no longer has.
    unkey: Vec<usize>,
    /// Blocks to append to the table.
    grow: usize,
}

/// The pool. Its fields are visible to the rest of `kv` only for the invariant check in `mod.rs`.
pub struct KvPool {
    pub(super) cfg: KvPoolConfig,
    pub(super) blocks: Vec<Block>,
    /// Uncached free blocks; `pop` takes the next one to hand out.
    pub(super) free: Vec<BlockId>,
    pub(super) prefix: PrefixMap,
    pub(super) ledger: Ledger,
    pub(super) pending: Vec<PendingCopy>,
    /// Blocks put on the free stack since [`KvPool::take_freed`]: their data is garbage to the
    /// pool, and a backend that keeps blocks in memory of its own frees it.
    freed: Vec<BlockId>,
    /// Σ weights of blocks in use or cached: `capacity − occupied` units are free.
    pub(super) occupied: usize,
    /// LRU clock: bumped each time a block is parked in a cached LRU.
    tick: u64,
    evictions: u64,
    cow_copies: u64,
}

impl KvPool {
    pub fn new(cfg: KvPoolConfig) -> Result<Self, KvError> {
        if cfg.num_blocks == 0 || cfg.num_blocks > u32::MAX as usize {
            return Err(KvError::InvalidConfig(format!(
                "num_blocks {} out of range",
                cfg.num_blocks
            )));
        }
        if cfg.block_size == 0 {
            return Err(KvError::InvalidConfig("block_size must be > 0".into()));
        }
        if cfg.capacity == 0 {
            return Err(KvError::InvalidConfig("capacity must be > 0".into()));
        }
        let n = cfg.num_blocks;
        Ok(Self {
            blocks: (0..n).map(|_| Block::default()).collect(),
            free: (0..n as u32).rev().map(BlockId).collect(),
            prefix: PrefixMap::default(),
            ledger: Ledger::new(cfg.capacity),
            pending: Vec::new(),
            freed: Vec::new(),
            occupied: 0,
            tick: 0,
            evictions: 0,
            cow_copies: 0,
            cfg,
        })
    }

    /// Registers a tenant. Fails if its reservation does not fit next to the others' (or cannot
    /// be backed right now), if `reserved > max`, or if the tenant is already registered.
    pub fn register_tenant(&mut self, tenant: TenantId, quota: TenantQuota) -> Result<(), KvError> {
        self.ledger.register(tenant, quota)
    }

    pub fn block_size(&self) -> usize {
        self.cfg.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.cfg.num_blocks
    }

    /// The cache scope of `tenant` (its share group's if it has one), subdivided by the
    /// client's `cache_salt` if given.
    pub fn scope(&self, tenant: TenantId, cache_salt: Option<&str>) -> CacheScope {
        let group = self
            .ledger
            .get(tenant)
            .ok()
            .and_then(|a| a.quota.share_group.as_deref());
        derive_scope(&self.cfg.secret, tenant, group, cache_salt)
    }

    /// Starts a sequence: takes references on the longest chain of cached full blocks matching
    /// `prompt` under `scope`, leaving at least one prompt token to compute (the forward needs
    /// it for logits). Blocks the tenant does not already hold are charged to it; if its cap or
    /// the others' reservations allow fewer, the hit is shortened. Returns the handle and the
    /// number of cached tokens (a multiple of the block size).
    pub fn start(
        &mut self,
        tenant: TenantId,
        scope: &CacheScope,
        prompt: &[TokenId],
    ) -> Result<(SeqBlocks, usize), KvError> {
        let class = BlockClass::uniform(self.cfg.policy_id);
        self.start_as(tenant, scope, prompt, class)
    }

    /// [`Self::start`] for a sequence whose blocks are of `class` (its KV policy's weights and
    /// key). Only blocks of the same content id are hits.
    pub fn start_as(
        &mut self,
        tenant: TenantId,
        scope: &CacheScope,
        prompt: &[TokenId],
        class: BlockClass,
    ) -> Result<(SeqBlocks, usize), KvError> {
        if scope.tenant() != tenant {
            return Err(KvError::ScopeMismatch {
                tenant,
                scope_tenant: scope.tenant(),
            });
        }
        let acct = self.ledger.get(tenant)?;
        let mut budget =
            (acct.quota.max_blocks.saturating_sub(acct.used)).min(self.ledger.headroom(tenant));
        let bs = self.cfg.block_size;
        let mut hashes: Vec<BlockHash> = Vec::new();
        let mut hits = Vec::new();
        let lookups = if class.shares_prefix {
            prompt.len().saturating_sub(1) / bs
        } else {
            0
        };
        for chunk in prompt.chunks_exact(bs).take(lookups) {
            let h = block_hash(scope, hashes.last(), class.content_id, chunk);
            let Some(b) = self.prefix.get(&h) else { break };
            if !self.holds(b, tenant) {
                let w = self.blocks[b.idx()].weight;
                if budget < w {
                    break;
                }
                budget -= w;
            }
            hashes.push(h);
            hits.push(b);
        }
        for &b in &hits {
            if self.blocks[b.idx()].refs == 0 {
                self.revive(b, tenant);
            } else {
                self.add_ref(b, tenant);
            }
        }
        let cached = hits.len() * bs;
        let a = self.ledger.acct_mut(tenant);
        a.prefix_queries += 1;
        a.prefix_query_tokens += prompt.len() as u64;
        a.prefix_hit_tokens += cached as u64;
        Ok((
            SeqBlocks {
                scope: *scope,
                class,
                blocks: hits,
                hashes,
                computed: cached,
            },
            cached,
        ))
    }

    /// Units `reserve(seq, total_tokens)` would charge (appended + copy-on-write blocks), so
    /// the scheduler can budget before asking.
    pub fn units_needed(&self, seq: &SeqBlocks, total_tokens: usize) -> usize {
        let p = self.plan(seq, total_tokens);
        (p.replace.len() + p.grow) * seq.class.filling
    }

    /// Ensures blocks cover positions `0..total_tokens`, all of them writable from the first
    /// uncomputed position on: a shared block there is replaced by a fresh one (with a queued
    /// copy if it holds computed KV). All or nothing.
    pub fn reserve(&mut self, seq: &mut SeqBlocks, total_tokens: usize) -> Alloc {
        let tenant = seq.tenant();
        let bs = self.cfg.block_size;
        if seq.class.min_units(total_tokens, bs) > self.ledger.ceiling(tenant) {
            return Alloc::Never;
        }
        let plan = self.plan(seq, total_tokens);
        let k = (plan.replace.len() + plan.grow) * seq.class.filling;
        if k > 0
            && !self
                .ledger
                .admit(tenant, k, self.cfg.capacity - self.occupied)
        {
            return Alloc::NotNow;
        }
        let w = seq.class.filling;
        for i in plan.unkey {
            let b = seq.blocks[i];
            let h = self.blocks[b.idx()].hash.take().expect("plan: keyed");
            self.prefix.remove(&h);
        }
        for i in plan.replace {
            let old = seq.blocks[i];
            let new = self.alloc_block(tenant, w);
            if i * bs < seq.computed {
                // The sequence's reference on `old` moves to the pending copy, which pins it.
                // If `old` is itself a pending copy's target, copy from that copy's source
                // instead (same content, nothing written in between), so the copies handed to
                // the backend never depend on each other and may run in any order.
                let src = match self
                    .pending
                    .iter()
                    .find(|p| p.dst == old && p.tenant == tenant)
                {
                    Some(p) => {
                        let src = p.src;
                        self.add_ref(src, tenant);
                        self.release(old, tenant);
                        src
                    }
                    None => old,
                };
                self.blocks[src.idx()].pins += 1;
                self.pending.push(PendingCopy {
                    src,
                    dst: new,
                    tenant,
                });
                self.cow_copies += 1;
            } else {
                self.release(old, tenant);
            }
            seq.blocks[i] = new;
        }
        for _ in 0..plan.grow {
            let b = self.alloc_block(tenant, w);
            seq.blocks.push(b);
        }
        Alloc::Granted
    }

    /// The `(src, dst)` block copies the backend must perform before the next forward. They are
    /// independent (distinct targets, no target is a source) and their sources stay pinned
    /// until this call, which releases them.
    pub fn take_copies(&mut self) -> Vec<(u32, u32)> {
        let pending = std::mem::take(&mut self.pending);
        let out = pending.iter().map(|p| (p.src.0, p.dst.0)).collect();
        for p in pending {
            self.blocks[p.src.idx()].pins -= 1;
            self.release(p.src, p.tenant);
        }
        out
    }

    /// The blocks that went to the free stack since the last call and are still free: nothing
    /// reads their data again (a block handed out anew is rewritten from its first position or
    /// copied into before it is read), so the backend may free the memory behind them (the
    /// CUDA store gives their slots back). Call after [`KvPool::take_copies`]' copies are
    /// queued: a copy's source can be freed by that call. Sorted, each block once.
    pub fn take_freed(&mut self) -> Vec<u32> {
        let mut out: Vec<u32> = std::mem::take(&mut self.freed)
            .into_iter()
            .filter(|b| self.blocks[b.idx()].weight == 0 && self.blocks[b.idx()].refs == 0)
            .map(|b| b.0)
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Records that the KV of `tokens` (the sequence's whole token list so far) is computed.
    /// Every newly full block is hashed into the chain and enters the prefix map, unless its
    /// hash already maps to another block (first writer wins; this one stays unkeyed).
    pub fn commit(&mut self, seq: &mut SeqBlocks, tokens: &[TokenId]) -> Result<(), KvError> {
        let bs = self.cfg.block_size;
        let capacity = seq.blocks.len() * bs;
        if tokens.len() > capacity {
            return Err(KvError::CommitBeyondReserved {
                tokens: tokens.len(),
                capacity,
            });
        }
        if tokens.len() < seq.computed {
            return Err(KvError::CommitRegressed {
                tokens: tokens.len(),
                computed: seq.computed,
            });
        }
        let class = seq.class;
        let newly_full = seq.computed / bs..tokens.len() / bs;
        for i in newly_full {
            // Sealed now (the backend encoded it in the same forward): it weighs less.
            let b = seq.blocks[i];
            if b != BlockId::DROPPED && self.blocks[b.idx()].weight == class.filling {
                self.reweight(b, class.sealed);
            }
        }
        if class.shares_prefix {
            for i in seq.hashes.len()..tokens.len() / bs {
                let h = block_hash(
                    &seq.scope,
                    seq.hashes.last(),
                    class.content_id,
                    &tokens[i * bs..(i + 1) * bs],
                );
                let b = seq.blocks[i];
                if self.blocks[b.idx()].hash.is_none() && self.prefix.insert_if_absent(h, b) {
                    self.blocks[b.idx()].hash = Some(h);
                }
                seq.hashes.push(h);
            }
        }
        seq.computed = tokens.len();
        if let Some(keep) = class.window_blocks {
            // The next query (position `computed`) sees block 0 and the last `keep` blocks.
            let first_kept = (seq.computed / bs + 1).saturating_sub(keep);
            let tenant = seq.tenant();
            for i in 1..first_kept.min(seq.blocks.len()) {
                let b = std::mem::replace(&mut seq.blocks[i], BlockId::DROPPED);
                if b != BlockId::DROPPED {
                    self.release(b, tenant);
                }
            }
        }
        Ok(())
    }

    /// Changes an in-use block's weight, re-charging every holder.
    fn reweight(&mut self, b: BlockId, weight: usize) {
        let blk = &mut self.blocks[b.idx()];
        let old = std::mem::replace(&mut blk.weight, weight);
        for &(t, _) in &blk.holders {
            self.ledger.uncharge(t, old);
            self.ledger.charge(t, weight);
        }
        self.occupied = self.occupied - old + weight;
    }

    /// A second sequence (`n > 1`) sharing every block that holds computed KV. The partial tail
    /// is copied by whichever of the two writes into it first. Call it after `commit`; the
    /// tenant already holds every shared block, so its ledger does not change.
    pub fn fork(&mut self, seq: &SeqBlocks) -> SeqBlocks {
        let shared = seq
            .computed
            .div_ceil(self.cfg.block_size)
            .min(seq.blocks.len());
        let blocks = seq.blocks[..shared].to_vec();
        for &b in blocks.iter().filter(|&&b| b != BlockId::DROPPED) {
            self.add_ref(b, seq.tenant());
        }
        SeqBlocks {
            scope: seq.scope,
            class: seq.class,
            blocks,
            hashes: seq.hashes.clone(),
            computed: seq.computed,
        }
    }

    /// Drops the sequence's references, tail first (see the module docs for the orders).
    pub fn free(&mut self, seq: SeqBlocks) {
        let tenant = seq.tenant();
        for &b in seq.blocks.iter().rev().filter(|&&b| b != BlockId::DROPPED) {
            self.release(b, tenant);
        }
    }

    /// The block table the backend reads: block `i` holds positions `i*block_size..`. Blocks a
    /// window dropped read as `u32::MAX` (attention never visits them).
    pub fn block_table(&self, seq: &SeqBlocks) -> Vec<u32> {
        seq.blocks.iter().map(|b| b.0).collect()
    }

    /// Whether `tenant` is registered.
    pub fn has_tenant(&self, tenant: TenantId) -> bool {
        self.ledger.get(tenant).is_ok()
    }

    /// Whether `extra` more units would put `tenant` over its own `max_blocks`: then only
    /// freeing the tenant's own blocks can help; other tenants' blocks cannot.
    pub fn over_cap(&self, tenant: TenantId, extra: usize) -> bool {
        self.ledger
            .get(tenant)
            .is_ok_and(|a| a.used + extra > a.quota.max_blocks)
    }

    /// Units `tenant` holds above its reservation (0 if none): preempt the largest first.
    pub fn borrowed(&self, tenant: TenantId) -> usize {
        self.ledger
            .get(tenant)
            .map_or(0, |a| a.used.saturating_sub(a.quota.reserved_blocks))
    }

    pub fn stats(&self) -> KvStats {
        // O(tenants): every block is free, cached (in one tenant's LRU) or in use.
        let cached: usize = self.ledger.accounts().map(|(_, a)| a.cached()).sum();
        let cached_blocks: usize = self.ledger.accounts().map(|(_, a)| a.lru.len()).sum();
        KvStats {
            num_blocks: self.cfg.num_blocks,
            capacity: self.cfg.capacity,
            block_size: self.cfg.block_size,
            used: self.occupied - cached,
            cached,
            free: self.cfg.capacity - self.occupied,
            used_blocks: self.cfg.num_blocks - self.free.len() - cached_blocks,
            cached_blocks,
            evictions: self.evictions,
            cow_copies: self.cow_copies,
            tenants: self
                .ledger
                .accounts()
                .map(|(t, a)| {
                    let s = TenantKvStats {
                        used: a.used,
                        cached: a.cached(),
                        reserved: a.quota.reserved_blocks,
                        max: a.quota.max_blocks,
                        prefix_queries: a.prefix_queries,
                        prefix_query_tokens: a.prefix_query_tokens,
                        prefix_hit_tokens: a.prefix_hit_tokens,
                    };
                    (*t, s)
                })
                .collect(),
        }
    }

    fn plan(&self, seq: &SeqBlocks, total_tokens: usize) -> Plan {
        let mut plan = Plan {
            replace: Vec::new(),
            unkey: Vec::new(),
            grow: 0,
        };
        if total_tokens <= seq.computed {
            return plan; // nothing will be written
        }
        let needed = total_tokens.div_ceil(self.cfg.block_size);
        let first = seq.computed / self.cfg.block_size;
        for i in first..needed.min(seq.blocks.len()) {
            let b = &self.blocks[seq.blocks[i].idx()];
            if b.refs - b.pins > 1 {
                plan.replace.push(i);
            } else if b.hash.is_some() {
                plan.unkey.push(i);
            }
        }
        plan.grow = needed.saturating_sub(seq.blocks.len());
        plan
    }

    fn holds(&self, b: BlockId, tenant: TenantId) -> bool {
        self.blocks[b.idx()]
            .holders
            .iter()
            .any(|(t, _)| *t == tenant)
    }

    /// Counts one more reference of `tenant` on `b`, charging the tenant if it is new to it.
    fn hold(&mut self, b: BlockId, tenant: TenantId) {
        let blk = &mut self.blocks[b.idx()];
        blk.refs += 1;
        match blk.holders.iter_mut().find(|(t, _)| *t == tenant) {
            Some((_, n)) => *n += 1,
            None => {
                blk.holders.push((tenant, 1));
                let w = blk.weight;
                self.ledger.charge(tenant, w);
            }
        }
    }

    fn add_ref(&mut self, b: BlockId, tenant: TenantId) {
        debug_assert!(self.blocks[b.idx()].refs > 0, "kv: add_ref on a free block");
        self.hold(b, tenant);
    }

    /// Takes a cached-free block back into use (a prefix hit), keeping its key.
    fn revive(&mut self, b: BlockId, tenant: TenantId) {
        let (owner, tick) = self.blocks[b.idx()]
            .cached
            .take()
            .expect("kv: revive of a cached block");
        let w = self.blocks[b.idx()].weight;
        self.ledger.cache_remove(owner, tick, b, w);
        self.hold(b, tenant);
    }

    /// A fresh block of `weight` units for `tenant`: evictions until the units are free (ids
    /// never run out first: the pool has `capacity / lightest block` of them), then the free
    /// stack. `Ledger::admit` has checked that enough is evictable.
    fn alloc_block(&mut self, tenant: TenantId, weight: usize) -> BlockId {
        while self.cfg.capacity - self.occupied < weight || self.free.is_empty() {
            let (owner, tick, b) = self
                .ledger
                .pick_victim(tenant, false)
                .or_else(|| self.ledger.pick_victim(tenant, true))
                .expect("kv: admit guaranteed an evictable block");
            let w = self.blocks[b.idx()].weight;
            self.ledger.cache_remove(owner, tick, b, w);
            let blk = &mut self.blocks[b.idx()];
            blk.cached = None;
            blk.weight = 0;
            let h = blk.hash.take().expect("kv: cached block is keyed");
            self.prefix.remove(&h);
            self.occupied -= w;
            self.push_free(b);
            self.evictions += 1;
        }
        let b = self.free.pop().expect("kv: a free id after eviction");
        self.blocks[b.idx()].weight = weight;
        self.occupied += weight;
        self.hold(b, tenant);
        b
    }

    /// Puts `b` on the free stack and remembers it for [`KvPool::take_freed`] (a caller that
    /// never takes them, a pool without a device store, keeps at most one entry per block).
    fn push_free(&mut self, b: BlockId) {
        self.free.push(b);
        self.freed.push(b);
        if self.freed.len() > 2 * self.cfg.num_blocks {
            self.freed.sort_unstable_by_key(|b| b.0);
            self.freed.dedup();
        }
    }

    /// Drops one reference of `tenant` on `b`; parks the block if it was the last.
    fn release(&mut self, b: BlockId, tenant: TenantId) {
        let mut work = vec![(b, tenant)];
        while let Some((b, tenant)) = work.pop() {
            let blk = &mut self.blocks[b.idx()];
            let i = blk
                .holders
                .iter()
                .position(|(t, _)| *t == tenant)
                .expect("kv: release by a holder");
            blk.refs -= 1;
            blk.holders[i].1 -= 1;
            if blk.holders[i].1 == 0 {
                blk.holders.remove(i);
                let w = blk.weight;
                self.ledger.uncharge(tenant, w);
            }
            if blk.refs > 0 {
                continue;
            }
            // Nobody will read a pending copy's target any more: drop the copy, unpin its source.
            if let Some(i) = self.pending.iter().position(|p| p.dst == b) {
                let p = self.pending.remove(i);
                self.blocks[p.src.idx()].pins -= 1;
                work.push((p.src, p.tenant));
            }
            let w = self.blocks[b.idx()].weight;
            if self.blocks[b.idx()].hash.is_some() {
                self.tick += 1;
                self.blocks[b.idx()].cached = Some((tenant, self.tick));
                self.ledger.cache_insert(tenant, self.tick, b, w);
            } else {
                self.blocks[b.idx()].weight = 0;
                self.occupied -= w;
                self.push_free(b);
            }
        }
    }
}
