//! Exact-state tests of the prefix cache, scopes and the sequence lifecycle, in the style of
//! vLLM's `tests/v1/core/test_prefix_caching.py`: block ids, refcounts, free-stack and LRU orders
//! are pinned after each step, and every test ends with a leak check. Block size 4 throughout.
//! Copy-on-write and ledger tests are in `pool_tests`; the helpers here serve both.

use super::*;
use crate::types::{TenantId, TokenId};

/// Read-only views for the exact-state tests.
impl KvPool {
    pub(super) fn refcount(&self, b: u32) -> u32 {
        self.blocks[b as usize].refs
    }

    /// Uncached free blocks in the order they will be handed out.
    pub(super) fn free_order(&self) -> Vec<u32> {
        self.free.iter().rev().map(|b| b.0).collect()
    }

    /// `tenant`'s cached-free blocks, next to be evicted first.
    pub(super) fn lru_order(&self, tenant: TenantId) -> Vec<u32> {
        self.ledger
            .acct(tenant)
            .lru
            .iter()
            .map(|(_, b)| b.0)
            .collect()
    }

    pub(super) fn is_keyed(&self, b: u32) -> bool {
        self.blocks[b as usize].hash.is_some()
    }
}

pub(super) const A: TenantId = TenantId(1);
pub(super) const B: TenantId = TenantId(2);
pub(super) const C: TenantId = TenantId(3);
pub(super) const BS: usize = 4;

pub(super) fn quota(reserved: usize, max: usize, floor: usize, group: Option<&str>) -> TenantQuota {
    TenantQuota {
        reserved_blocks: reserved,
        max_blocks: max,
        cached_floor: floor,
        share_group: group.map(str::to_string),
    }
}

/// No reservation, no floor, no group.
pub(super) fn open(max: usize) -> TenantQuota {
    quota(0, max, 0, None)
}

pub(super) fn pool(num_blocks: usize, tenants: &[(TenantId, TenantQuota)]) -> KvPool {
    let mut cfg = KvPoolConfig::new(num_blocks, [7; 32]);
    cfg.block_size = BS;
    let mut p = KvPool::new(cfg).unwrap();
    for (t, q) in tenants {
        p.register_tenant(*t, q.clone()).unwrap();
    }
    ok(&p);
    p
}

pub(super) fn toks(start: u32, n: usize) -> Vec<TokenId> {
    (start..start + n as u32).collect()
}

pub(super) fn ok(p: &KvPool) {
    if let Err(e) = p.check_invariants() {
        panic!("invariant broken: {e}");
    }
}

/// A sequence after its prefill: started, reserved for the whole prompt, all of it committed.
pub(super) fn prefill(
    p: &mut KvPool,
    t: TenantId,
    salt: Option<&str>,
    prompt: &[TokenId],
) -> (SeqBlocks, usize) {
    let scope = p.scope(t, salt);
    let (mut s, cached) = p.start(t, &scope, prompt).unwrap();
    assert_eq!(p.reserve(&mut s, prompt.len()), Alloc::Granted);
    p.commit(&mut s, prompt).unwrap();
    ok(p);
    (s, cached)
}

/// Cached tokens a fresh `start` gets; the probe sequence is freed again.
pub(super) fn probe(p: &mut KvPool, t: TenantId, salt: Option<&str>, prompt: &[TokenId]) -> usize {
    let scope = p.scope(t, salt);
    let (s, cached) = p.start(t, &scope, prompt).unwrap();
    p.free(s);
    ok(p);
    cached
}

pub(super) fn tstats(p: &KvPool, t: TenantId) -> TenantKvStats {
    p.stats()
        .tenants
        .into_iter()
        .find(|(u, _)| *u == t)
        .unwrap()
        .1
}

pub(super) fn refs(p: &KvPool, blocks: &[u32]) -> Vec<u32> {
    blocks.iter().map(|&b| p.refcount(b)).collect()
}

/// All sequences are freed: no pending copy, nothing in use, every block free or cached.
pub(super) fn leak_check(p: &mut KvPool) {
    assert_eq!(p.take_copies(), vec![]);
    ok(p);
    let s = p.stats();
    assert_eq!(s.used, 0);
    assert_eq!(s.cached + s.free, s.capacity);
    for (t, ts) in &s.tenants {
        assert_eq!(ts.used, 0, "tenant {t:?} still charged");
    }
}

#[test]
fn prefix_hit_reuses_blocks_and_frees_tail_first() {
    let mut p = pool(10, &[(A, open(10))]);
    let prompt = toks(0, 10);
    let (s1, cached) = prefill(&mut p, A, None, &prompt);
    assert_eq!(cached, 0);
    assert_eq!(p.block_table(&s1), [0, 1, 2]);
    assert_eq!(refs(&p, &[0, 1, 2]), [1, 1, 1]);
    assert_eq!(
        [p.is_keyed(0), p.is_keyed(1), p.is_keyed(2)],
        [true, true, false]
    );
    assert_eq!(p.free_order(), [3, 4, 5, 6, 7, 8, 9]);

    let scope = p.scope(A, None);
    let (mut s2, cached) = p.start(A, &scope, &prompt).unwrap();
    assert_eq!(cached, 8);
    assert_eq!(s2.num_computed_tokens(), 8);
    assert_eq!(p.block_table(&s2), [0, 1]);
    assert_eq!(refs(&p, &[0, 1, 2]), [2, 2, 1]);
    assert_eq!(tstats(&p, A).used, 3, "shared blocks are charged once");
    assert_eq!(p.reserve(&mut s2, 10), Alloc::Granted);
    assert_eq!(p.block_table(&s2), [0, 1, 3]);
    p.commit(&mut s2, &prompt).unwrap();
    ok(&p);

    p.free(s1);
    ok(&p);
    assert_eq!(refs(&p, &[0, 1, 2]), [1, 1, 0]);
    assert_eq!(p.free_order(), [2, 4, 5, 6, 7, 8, 9]);
    assert_eq!(p.lru_order(A), Vec::<u32>::new());
    p.free(s2);
    // Tail first: unkeyed 3 goes back on the stack, then 1 and 0 enter the LRU in that order,
    // so the prefix's end is evicted before its head.
    assert_eq!(p.free_order(), [3, 2, 4, 5, 6, 7, 8, 9]);
    assert_eq!(p.lru_order(A), [1, 0]);
    let st = p.stats();
    assert_eq!((st.used, st.cached, st.free), (0, 2, 8));
    let ts = tstats(&p, A);
    assert_eq!(
        (
            ts.prefix_queries,
            ts.prefix_query_tokens,
            ts.prefix_hit_tokens
        ),
        (2, 20, 8)
    );
    leak_check(&mut p);

    // The cached-free blocks are revived by the next hit.
    let (s3, cached) = p.start(A, &scope, &prompt).unwrap();
    assert_eq!((cached, p.block_table(&s3)), (8, vec![0, 1]));
    assert_eq!(p.lru_order(A), Vec::<u32>::new());
    assert_eq!(tstats(&p, A).used, 2);
    p.free(s3);
    assert_eq!(p.lru_order(A), [1, 0]);
    leak_check(&mut p);
}

#[test]
fn at_least_one_prompt_token_is_computed() {
    let mut p = pool(8, &[(A, open(8))]);
    let prompt = toks(0, 8);
    let (s1, _) = prefill(&mut p, A, None, &prompt);
    assert_eq!(p.block_table(&s1), [0, 1]);
    p.free(s1);
    assert_eq!(p.lru_order(A), [1, 0]);

    // Both blocks are cached, but a hit on both would leave nothing to compute.
    let scope = p.scope(A, None);
    let (mut s2, cached) = p.start(A, &scope, &prompt).unwrap();
    assert_eq!((cached, p.block_table(&s2)), (4, vec![0]));
    assert_eq!(p.reserve(&mut s2, 8), Alloc::Granted);
    assert_eq!(p.block_table(&s2), [0, 2]);
    p.commit(&mut s2, &prompt).unwrap();
    // Block 2 has block 1's key; the first mapping stays and 2 is a duplicate, unkeyed.
    assert!(p.is_keyed(1) && !p.is_keyed(2));
    assert_eq!(p.lru_order(A), [1]);
    ok(&p);

    // One more token and the whole 8 are a hit.
    let longer: Vec<_> = prompt.iter().copied().chain([99]).collect();
    let (s3, cached) = p.start(A, &scope, &longer).unwrap();
    assert_eq!((cached, p.block_table(&s3)), (8, vec![0, 1]));
    assert_eq!(refs(&p, &[0, 1, 2]), [2, 1, 1]);
    assert_eq!(probe(&mut p, A, None, &[]), 0);
    assert_eq!(probe(&mut p, A, None, &toks(0, 1)), 0);
    assert_eq!(probe(&mut p, A, None, &toks(0, 4)), 0);
    assert_eq!(probe(&mut p, A, None, &toks(0, 5)), 4);
    p.free(s2);
    p.free(s3);
    assert_eq!(p.free_order(), [2, 3, 4, 5, 6, 7]);
    assert_eq!(p.lru_order(A), [1, 0]);
    leak_check(&mut p);
}

#[test]
fn partial_block_is_cached_once_decode_fills_it() {
    let mut p = pool(8, &[(A, open(8))]);
    let mut tokens = toks(0, 6);
    let (mut s, _) = prefill(&mut p, A, None, &tokens);
    assert_eq!(p.block_table(&s), [0, 1]);
    assert_eq!([p.is_keyed(0), p.is_keyed(1)], [true, false]);
    let query: Vec<_> = toks(0, 6).into_iter().chain([50, 51, 52]).collect();
    assert_eq!(
        probe(&mut p, A, None, &query),
        4,
        "a partial block is never a hit"
    );

    for t in [50, 51] {
        assert_eq!(p.reserve(&mut s, tokens.len() + 1), Alloc::Granted);
        tokens.push(t);
        p.commit(&mut s, &tokens).unwrap();
        ok(&p);
    }
    assert_eq!(p.block_table(&s), [0, 1]);
    assert!(p.is_keyed(1));
    assert_eq!(probe(&mut p, A, None, &query), 8);
    assert_eq!(refs(&p, &[0, 1]), [1, 1]);
    p.free(s);
    leak_check(&mut p);
}

#[test]
fn lru_evicts_a_prefix_from_its_end() {
    let mut p = pool(4, &[(A, open(4))]);
    let a = toks(0, 9);
    let (s1, _) = prefill(&mut p, A, None, &a);
    assert_eq!(p.block_table(&s1), [0, 1, 2]);
    p.free(s1);
    assert_eq!(p.free_order(), [2, 3]);
    assert_eq!(p.lru_order(A), [1, 0]);

    // Three blocks: the two free ones, then the least recently used cached one (a's 2nd block).
    let (s2, _) = prefill(&mut p, A, None, &toks(100, 9));
    assert_eq!(p.block_table(&s2), [2, 3, 1]);
    assert_eq!(p.stats().evictions, 1);
    assert!(
        !p.is_keyed(1),
        "an evicted block loses its key (and is partial now)"
    );
    assert_eq!(p.lru_order(A), [0]);

    // a's first block survived; its chain breaks at the evicted one.
    let scope = p.scope(A, None);
    let (s3, cached) = p.start(A, &scope, &a).unwrap();
    assert_eq!((cached, p.block_table(&s3)), (4, vec![0]));
    assert_eq!(p.lru_order(A), Vec::<u32>::new());
    assert_eq!(refs(&p, &[0, 1, 2, 3]), [1, 1, 1, 1]);
    p.free(s2);
    p.free(s3);
    assert_eq!(p.free_order(), [1]);
    assert_eq!(p.lru_order(A), [3, 2, 0]);
    leak_check(&mut p);
}

#[test]
fn concurrent_duplicate_prefill_leaves_second_copy_unkeyed() {
    let mut p = pool(8, &[(A, open(8))]);
    let prompt = toks(0, 8);
    let scope = p.scope(A, None);
    let (mut s1, c1) = p.start(A, &scope, &prompt).unwrap();
    let (mut s2, c2) = p.start(A, &scope, &prompt).unwrap();
    assert_eq!((c1, c2), (0, 0), "nothing is a hit before it is committed");
    assert_eq!(p.reserve(&mut s1, 8), Alloc::Granted);
    assert_eq!(p.reserve(&mut s2, 8), Alloc::Granted);
    assert_eq!(
        (p.block_table(&s1), p.block_table(&s2)),
        (vec![0, 1], vec![2, 3])
    );
    p.commit(&mut s1, &prompt).unwrap();
    p.commit(&mut s2, &prompt).unwrap();
    assert_eq!(
        [p.is_keyed(0), p.is_keyed(1), p.is_keyed(2), p.is_keyed(3)],
        [true, true, false, false]
    );
    p.free(s2);
    assert_eq!(p.free_order(), [2, 3, 4, 5, 6, 7]);
    p.free(s1);
    assert_eq!(p.lru_order(A), [1, 0]);
    leak_check(&mut p);
}

#[test]
fn tenants_never_hit_each_other() {
    let mut p = pool(12, &[(A, open(12)), (B, open(12))]);
    let prompt = toks(0, 9);
    let (sa, _) = prefill(&mut p, A, None, &prompt);
    let (sb, cached) = prefill(&mut p, B, None, &prompt);
    assert_eq!(cached, 0, "same prompt, other tenant: no hit");
    assert_eq!(
        (p.block_table(&sa), p.block_table(&sb)),
        (vec![0, 1, 2], vec![3, 4, 5])
    );
    assert!(p.is_keyed(3) && p.is_keyed(4), "B keys its own copy");
    assert_eq!(probe(&mut p, A, None, &prompt), 8);
    assert_eq!(probe(&mut p, B, None, &prompt), 8);
    p.free(sa);
    p.free(sb);
    assert_eq!((p.lru_order(A), p.lru_order(B)), (vec![1, 0], vec![4, 3]));
    assert_eq!(probe(&mut p, A, None, &prompt), 8);
    assert_eq!(tstats(&p, B).prefix_hit_tokens, 8);
    leak_check(&mut p);
}

#[test]
fn share_group_tenants_hit_the_same_blocks() {
    let sys = Some("sys");
    let mut p = pool(
        12,
        &[
            (A, quota(0, 12, 0, sys)),
            (B, quota(0, 12, 0, sys)),
            (C, open(12)),
        ],
    );
    let prompt = toks(0, 9);
    let (sa, _) = prefill(&mut p, A, None, &prompt);
    let scope_b = p.scope(B, None);
    let (sb, cached) = p.start(B, &scope_b, &prompt).unwrap();
    assert_eq!((cached, p.block_table(&sb)), (8, vec![0, 1]));
    assert_eq!(refs(&p, &[0, 1, 2]), [2, 2, 1]);
    // Each tenant pays for what it holds: sharing saves compute and memory, not quota.
    assert_eq!((tstats(&p, A).used, tstats(&p, B).used), (3, 2));
    assert_eq!(p.stats().used, 3);
    assert_eq!(
        probe(&mut p, C, None, &prompt),
        0,
        "outside the group: no hit"
    );

    p.free(sa);
    assert_eq!((tstats(&p, A).used, tstats(&p, B).used), (0, 2));
    assert_eq!(refs(&p, &[0, 1, 2]), [1, 1, 0]);
    p.free(sb);
    // The last tenant to let go owns the cached blocks (for its floor).
    assert_eq!((p.lru_order(A), p.lru_order(B)), (vec![], vec![1, 0]));
    let scope_a = p.scope(A, None);
    let (sa2, cached) = p.start(A, &scope_a, &prompt).unwrap();
    assert_eq!((cached, p.block_table(&sa2)), (8, vec![0, 1]));
    assert_eq!((tstats(&p, A).used, tstats(&p, B).cached), (2, 0));
    p.free(sa2);
    leak_check(&mut p);
}

#[test]
fn cache_salt_subdivides_a_tenant_scope() {
    let g = Some("g");
    let mut p = pool(
        12,
        &[
            (A, quota(0, 12, 0, g)),
            (B, quota(0, 12, 0, g)),
            (C, open(12)),
        ],
    );
    let prompt = toks(0, 9);
    let (s, _) = prefill(&mut p, A, Some("x"), &prompt);
    assert_eq!(probe(&mut p, A, Some("y"), &prompt), 0);
    assert_eq!(probe(&mut p, A, None, &prompt), 0);
    assert_eq!(
        probe(&mut p, A, Some("x"), &prompt),
        8,
        "the same salt still reuses"
    );
    assert_eq!(
        probe(&mut p, B, Some("x"), &prompt),
        8,
        "a salt subdivides the group scope"
    );
    assert_eq!(
        probe(&mut p, C, Some("x"), &prompt),
        0,
        "a salt never reaches another tenant"
    );
    assert_ne!(p.scope(A, Some("x")), p.scope(A, None));
    p.free(s);
    leak_check(&mut p);
}

#[test]
fn lifecycle_errors() {
    let mut p = pool(8, &[(A, open(8)), (B, open(8))]);
    let scope_b = p.scope(B, None);
    let err = p.start(A, &scope_b, &toks(0, 4)).unwrap_err();
    assert_eq!(
        err,
        KvError::ScopeMismatch {
            tenant: A,
            scope_tenant: B
        }
    );
    let scope_c = p.scope(C, None);
    assert_eq!(
        p.start(C, &scope_c, &toks(0, 4)).unwrap_err(),
        KvError::UnknownTenant(C)
    );

    let (mut s, _) = prefill(&mut p, A, None, &toks(0, 6));
    let err = p.commit(&mut s, &toks(0, 9)).unwrap_err();
    assert_eq!(
        err,
        KvError::CommitBeyondReserved {
            tokens: 9,
            capacity: 8
        }
    );
    let err = p.commit(&mut s, &toks(0, 5)).unwrap_err();
    assert_eq!(
        err,
        KvError::CommitRegressed {
            tokens: 5,
            computed: 6
        }
    );
    assert_eq!(s.num_computed_tokens(), 6);
    assert_eq!(
        p.reserve(&mut s, 3),
        Alloc::Granted,
        "nothing to write: a no-op"
    );
    assert_eq!(p.block_table(&s), [0, 1]);
    p.free(s);
    leak_check(&mut p);
}
