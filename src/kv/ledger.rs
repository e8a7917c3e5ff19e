//! Per-tenant accounting: quotas, blocks held, each tenant's LRU of cached-free blocks, prefix
//! stats, and the two decisions that protect tenants from each other — may tenant T take k more
//! blocks now (`admit`), and whose cached block is evicted next (`pick_victim`).
//!
//! Units: everything here is in pool units. In a uniform pool every block costs one unit; in the
//! engine's mixed pool a unit is a byte and a block costs what its format takes (exact while it
//! fills, less once sealed), so a quota holds ~3× more tokens under `kivi4` than under `bf16`.
//!
//! Charging: a tenant's `used` is the sum of the weights of the distinct in-use blocks it holds
//! at least one reference on. Forks of one tenant share blocks and pay once. A block held by two tenants of a
//! share group is charged to both: cross-tenant sharing saves compute and physical memory, not
//! quota. That is what keeps the guarantees exact — if the block were charged to one of them,
//! then when that one let go the other would suddenly hold a block it never paid for, which
//! could push it over its cap or eat into someone's reservation with no allocation to refuse.
//! The physical blocks saved this way stay as extra cache.
//!
//! Invariants (`V = Σ used`, `N = capacity` (units), `unres(U) = max(0, reserved(U) − used(U))`):
//! - `used(T) ≤ max_blocks(T)`;
//! - `N − V ≥ Σ_U unres(U)` (H): every tenant's unused reservation is backed by capacity that no
//!   other tenant's charges can claim. `admit` keeps H: tenant T may add k charges only if
//!   `k ≤ N − V − Σ_{U≠T} unres(U)`; releasing a charge lowers V by one and raises Σ unres by at
//!   most one. Physical free blocks (free + cached) are `N − in use ≥ N − V`, so H also means the
//!   blocks are physically there.
//! - Cached floors are soft against reservations, hard against borrowing: blocks a tenant takes
//!   within its reservation may evict anyone's cache (a reservation is a guarantee), blocks above
//!   it may only evict the free list, the requester's own cache and other tenants' cache above
//!   their floor.

use std::collections::{BTreeMap, BTreeSet};

use super::{BlockId, KvError, TenantQuota};
use crate::types::TenantId;

#[derive(Debug)]
pub(super) struct Account {
    pub(super) quota: TenantQuota,
    /// Units of the distinct in-use blocks this tenant holds a reference on.
    pub(super) used: usize,
    /// Units of the blocks in `lru`.
    pub(super) cached_units: usize,
    /// This tenant's cached-free blocks as `(tick, block)`, least recently used first.
    pub(super) lru: BTreeSet<(u64, BlockId)>,
    pub(super) prefix_queries: u64,
    pub(super) prefix_query_tokens: u64,
    pub(super) prefix_hit_tokens: u64,
}

impl Account {
    pub(super) fn unreserved(&self) -> usize {
        self.quota.reserved_blocks.saturating_sub(self.used)
    }

    /// Units of this tenant's cached-free blocks.
    pub(super) fn cached(&self) -> usize {
        self.cached_units
    }
}

#[derive(Debug)]
pub(super) struct Ledger {
    capacity: usize,
    accounts: BTreeMap<TenantId, Account>,
    /// V = Σ used.
    total_used: usize,
    total_reserved: usize,
}

impl Ledger {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            accounts: BTreeMap::new(),
            total_used: 0,
            total_reserved: 0,
        }
    }

    /// Adds a tenant. Its reservation must fit in the pool next to the others', and be
    /// honourable right now (a busy pool cannot promise a new reservation it cannot back).
    pub(super) fn register(&mut self, tenant: TenantId, quota: TenantQuota) -> Result<(), KvError> {
        let invalid = |reason: String| KvError::InvalidQuota { tenant, reason };
        if self.accounts.contains_key(&tenant) {
            return Err(KvError::DuplicateTenant(tenant));
        }
        if quota.reserved_blocks > quota.max_blocks {
            return Err(invalid(format!(
                "reserved_blocks {} > max_blocks {}",
                quota.reserved_blocks, quota.max_blocks
            )));
        }
        if quota.share_group.as_deref() == Some("") {
            return Err(invalid("share_group is empty".into()));
        }
        if self.total_reserved + quota.reserved_blocks > self.capacity {
            return Err(invalid(format!(
                "reservations would total {} blocks, the pool has {}",
                self.total_reserved + quota.reserved_blocks,
                self.capacity
            )));
        }
        let unres: usize = self.accounts.values().map(Account::unreserved).sum();
        if self.capacity - self.total_used < unres + quota.reserved_blocks {
            return Err(invalid(
                "the pool is too busy to back this reservation now".into(),
            ));
        }
        self.total_reserved += quota.reserved_blocks;
        self.accounts.insert(
            tenant,
            Account {
                quota,
                used: 0,
                cached_units: 0,
                lru: BTreeSet::new(),
                prefix_queries: 0,
                prefix_query_tokens: 0,
                prefix_hit_tokens: 0,
            },
        );
        Ok(())
    }

    pub(super) fn get(&self, tenant: TenantId) -> Result<&Account, KvError> {
        self.accounts
            .get(&tenant)
            .ok_or(KvError::UnknownTenant(tenant))
    }

    /// Every `SeqBlocks` and every cached block belongs to a registered tenant and tenants are
    /// never removed, so a miss here is a bug in `kv`, not a caller error.
    pub(super) fn acct_mut(&mut self, tenant: TenantId) -> &mut Account {
        self.accounts
            .get_mut(&tenant)
            .expect("kv: tenant of a live block is registered")
    }

    pub(super) fn acct(&self, tenant: TenantId) -> &Account {
        self.accounts
            .get(&tenant)
            .expect("kv: tenant of a live block is registered")
    }

    pub(super) fn accounts(&self) -> impl Iterator<Item = (&TenantId, &Account)> {
        self.accounts.iter()
    }

    /// The most blocks `tenant` could ever hold: its cap, or the pool less everyone else's
    /// reservation, whichever is smaller. A sequence needing more gets `Alloc::Never`.
    pub(super) fn ceiling(&self, tenant: TenantId) -> usize {
        let a = self.acct(tenant);
        let others_reserved = self.total_reserved - a.quota.reserved_blocks;
        a.quota.max_blocks.min(self.capacity - others_reserved)
    }

    /// New charges `tenant` may take without eating into anyone else's unused reservation.
    pub(super) fn headroom(&self, tenant: TenantId) -> usize {
        let others: usize = self
            .accounts
            .iter()
            .filter(|(u, _)| **u != tenant)
            .map(|(_, a)| a.unreserved())
            .sum();
        (self.capacity - self.total_used).saturating_sub(others)
    }

    /// May `tenant` take `k` new blocks from the free list / cache right now? Checks its cap,
    /// the others' reservations (H) and that enough blocks are evictable under the floor rules.
    pub(super) fn admit(&self, tenant: TenantId, k: usize, free_uncached: usize) -> bool {
        let a = self.acct(tenant);
        a.used + k <= a.quota.max_blocks
            && k <= self.headroom(tenant)
            && self.can_source(tenant, k, free_uncached)
    }

    /// Can `k` physical blocks be found for `tenant`: the part within its reservation may evict
    /// any cached block, the part above it (borrowed) only blocks that are not floor-protected.
    fn can_source(&self, tenant: TenantId, k: usize, free_uncached: usize) -> bool {
        if k <= free_uncached {
            return true;
        }
        let (mut open, mut protected) = (free_uncached, 0);
        for (u, a) in &self.accounts {
            if *u == tenant {
                open += a.cached();
            } else {
                let floor = a.quota.cached_floor.min(a.cached());
                protected += floor;
                open += a.cached() - floor;
            }
        }
        let within = k.min(self.acct(tenant).unreserved());
        k <= open + within.min(protected)
    }

    /// The next cached block to evict for `requester`: from the tenant furthest above its floor
    /// (cached − floor, largest first), least recently used within it; ties go to the older
    /// block. Others' blocks at or below their floor are only eligible with `allow_protected`;
    /// the requester's own always are.
    pub(super) fn pick_victim(
        &self,
        requester: TenantId,
        allow_protected: bool,
    ) -> Option<(TenantId, u64, BlockId)> {
        let mut best: Option<(i64, u64, TenantId, BlockId)> = None;
        for (u, a) in &self.accounts {
            let Some(&(tick, block)) = a.lru.first() else {
                continue;
            };
            let excess = a.cached() as i64 - a.quota.cached_floor as i64;
            if *u != requester && excess <= 0 && !allow_protected {
                continue;
            }
            let better = match best {
                None => true,
                Some((e, t, _, _)) => excess > e || (excess == e && tick < t),
            };
            if better {
                best = Some((excess, tick, *u, block));
            }
        }
        best.map(|(_, tick, u, b)| (u, tick, b))
    }

    pub(super) fn charge(&mut self, tenant: TenantId, units: usize) {
        self.acct_mut(tenant).used += units;
        self.total_used += units;
    }

    pub(super) fn uncharge(&mut self, tenant: TenantId, units: usize) {
        let a = self.acct_mut(tenant);
        debug_assert!(a.used >= units, "kv: uncharge below zero");
        a.used -= units;
        self.total_used -= units;
    }

    pub(super) fn cache_insert(
        &mut self,
        tenant: TenantId,
        tick: u64,
        block: BlockId,
        units: usize,
    ) {
        let a = self.acct_mut(tenant);
        let inserted = a.lru.insert((tick, block));
        debug_assert!(inserted, "kv: block cached twice");
        a.cached_units += units;
    }

    pub(super) fn cache_remove(
        &mut self,
        tenant: TenantId,
        tick: u64,
        block: BlockId,
        units: usize,
    ) {
        let a = self.acct_mut(tenant);
        let removed = a.lru.remove(&(tick, block));
        debug_assert!(removed, "kv: cached block missing from its owner's LRU");
        a.cached_units -= units;
    }

    /// Checks this module's invariants given the per-tenant counts recomputed from the blocks.
    pub(super) fn check(&self, used_by_tenant: &BTreeMap<TenantId, usize>) -> Result<(), String> {
        let mut sum = 0;
        for (t, a) in &self.accounts {
            let actual = used_by_tenant.get(t).copied().unwrap_or(0);
            if a.used != actual {
                return Err(format!(
                    "tenant {}: ledger used {} != held {}",
                    t.0, a.used, actual
                ));
            }
            if a.used > a.quota.max_blocks {
                return Err(format!(
                    "tenant {}: used {} > max {}",
                    t.0, a.used, a.quota.max_blocks
                ));
            }
            sum += a.used;
        }
        if used_by_tenant
            .keys()
            .any(|t| !self.accounts.contains_key(t))
        {
            return Err("a block is held by an unregistered tenant".into());
        }
        if sum != self.total_used {
            return Err(format!("Σ used {} != total_used {}", sum, self.total_used));
        }
        if self.total_used > self.capacity {
            return Err(format!(
                "Σ used {} > capacity {}",
                self.total_used, self.capacity
            ));
        }
        let unres: usize = self.accounts.values().map(Account::unreserved).sum();
        if self.capacity - self.total_used < unres {
            return Err(format!(
                "reservations not backed: N − Σ used = {} < Σ unused reservations {}",
                self.capacity - self.total_used,
                unres
            ));
        }
        Ok(())
    }
}
