//! The scheduler's judgement calls, kept apart from its mechanics: which running sequence to
//! preempt when the pool is short, when a waiting request should let another compute a shared
//! prompt prefix first, and which KV policy fallback admits a request that does not fit.

use super::Scheduler;
use crate::kv::{Alloc, KvPool};
use crate::types::{RequestId, TenantId};

impl Scheduler {
    /// The running sequence to preempt so that `requester` (of `tenant`, short of `extra`
    /// blocks) can proceed, or `None` if preempting cannot help or is not allowed.
    ///
    /// Only blocks that `tenant` could then take help: its own sequences' if it is at its cap,
    /// otherwise also those of tenants holding more than their reservation (a tenant within its
    /// reservation keeps its blocks: they are guaranteed). Among those, the victim is from the
    /// tenant with the highest virtual counter (the most served), then the worst priority, then
    /// the latest arrival. A new admission (`admitting`) may only displace a sequence of a
    /// tenant served strictly more than its own, or one of its own tenant's of strictly worse
    /// priority; the requester itself is never the victim.
    pub(super) fn victim(
        &self,
        requester: RequestId,
        tenant: TenantId,
        extra: usize,
        pool: &KvPool,
        admitting: bool,
    ) -> Option<RequestId> {
        let own_only = pool.over_cap(tenant, extra);
        let my_counter = self.fair.counter(tenant);
        let my_priority = self.seqs[&requester].key.priority;
        self.running
            .iter()
            .filter(|&&r| r != requester)
            .map(|r| (r, &self.seqs[r]))
            .filter(|(_, s)| {
                if s.tenant == tenant {
                    !admitting || s.key.priority > my_priority
                } else {
                    !own_only
                        && pool.borrowed(s.tenant) > 0
                        && (!admitting || self.fair.counter(s.tenant) > my_counter)
                }
            })
            .max_by(|(_, a), (_, b)| {
                self.fair
                    .counter(a.tenant)
                    .total_cmp(&self.fair.counter(b.tenant))
                    .then(a.key.priority.cmp(&b.key.priority))
                    .then(a.key.arrival.cmp(&b.key.arrival))
            })
            .map(|(r, _)| *r)
    }

    /// Whether waiting request `id` should let a running sequence finish computing a prompt
    /// that starts with the same full block (same scope): it will then hit the prefix cache
    /// instead of computing the same KV again.
    pub(super) fn waits_for_shared_prefix(&self, id: RequestId) -> bool {
        let w = &self.seqs[&id];
        self.running.iter().any(|r| {
            let s = &self.seqs[r];
            if !s.is_prefilling() || s.scope != w.scope {
                return false;
            }
            let common = s.tokens[..s.prompt_len]
                .iter()
                .zip(&w.tokens)
                .take_while(|(a, b)| a == b)
                .count();
            // Blocks W could hit once S has computed them (at least one token of W stays to compute).
            let shareable = common.min(w.tokens.len() - 1);
            shareable >= self.cfg.block_size && s.computed < shareable
        })
    }

    /// The request does not fit under its policy: admits it under the first fallback that
    /// fits now (without preempting anyone; its first chunk shrunk down to one block if need
    /// be), replacing its blocks. Returns the tokens reserved for its first chunk.
    pub(super) fn admit_fallback(
        &mut self,
        id: RequestId,
        budget: usize,
        pool: &mut KvPool,
    ) -> Option<usize> {
        let bs = self.cfg.block_size;
        let seq = self.seqs.get_mut(&id).expect("admitting sequence exists");
        while !seq.kv.fallbacks.is_empty() {
            let policy = seq.kv.fallbacks.remove(0);
            let class = self.cfg.classes.class(&policy);
            let Ok((mut blocks, cached)) =
                pool.start_as(seq.tenant, &seq.scope, seq.cache_lookup(), class)
            else {
                continue;
            };
            let mut n = (seq.tokens.len() - cached).min(budget);
            loop {
                match pool.reserve(&mut blocks, cached + n) {
                    Alloc::Granted => {
                        if let Some(old) = seq.blocks.replace(blocks) {
                            pool.free(old);
                        }
                        seq.computed = cached;
                        seq.kv.policy = policy;
                        seq.kv.fallbacks.clear();
                        seq.kv_fallback = true;
                        return Some(n);
                    }
                    Alloc::NotNow if n > bs => n = (n / 2).max(bs) / bs * bs,
                    _ => break,
                }
            }
            pool.free(blocks);
        }
        None
    }
}
