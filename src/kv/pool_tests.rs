//! Exact-state tests of copy-on-write and forks, then of the ledger: configuration checks, caps
//! (`Never` vs `NotNow`), reservations, borrowing, cached floors and the cross-tenant eviction
//! order, and stats. Block size 4; helpers come from `tests`. Every test ends with a leak check.

use super::tests::{
    leak_check, ok, open, pool, prefill, probe, quota, refs, toks, tstats, A, B, BS, C,
};
use super::*;

#[test]
fn fork_copy_on_write_first_writer_copies() {
    let mut p = pool(8, &[(A, open(8))]);
    let prompt = toks(0, 6);
    let (mut parent, _) = prefill(&mut p, A, None, &prompt);
    let mut child = p.fork(&parent);
    assert_eq!(p.block_table(&child), [0, 1]);
    assert_eq!(refs(&p, &[0, 1]), [2, 2]);
    assert_eq!(tstats(&p, A).used, 2, "forks are charged once");
    ok(&p);

    // The parent writes position 6 into shared block 1: it gets block 2 and a queued copy.
    assert_eq!(p.units_needed(&parent, 7), 1);
    assert_eq!(p.reserve(&mut parent, 7), Alloc::Granted);
    assert_eq!(p.block_table(&parent), [0, 2]);
    assert_eq!(
        refs(&p, &[0, 1, 2]),
        [2, 2, 1],
        "block 1: the child + the copy's pin"
    );
    assert_eq!(p.stats().cow_copies, 1);
    assert_eq!(tstats(&p, A).used, 3);
    ok(&p);
    // The child is now the only sequence on block 1: it writes in place.
    assert_eq!(p.units_needed(&child, 7), 0);
    assert_eq!(p.reserve(&mut child, 7), Alloc::Granted);
    assert_eq!(p.block_table(&child), [0, 1]);
    assert_eq!(p.take_copies(), [(1, 2)]);
    assert_eq!(p.take_copies(), []);
    assert_eq!(refs(&p, &[0, 1, 2]), [2, 1, 1]);

    let pt: Vec<_> = prompt.iter().copied().chain([50, 51, 52]).collect();
    let ct: Vec<_> = prompt.iter().copied().chain([60]).collect();
    p.commit(&mut parent, &pt[..7]).unwrap();
    p.commit(&mut child, &ct).unwrap();
    assert_eq!(p.reserve(&mut parent, 9), Alloc::Granted);
    assert_eq!(p.block_table(&parent), [0, 2, 3]);
    p.commit(&mut parent, &pt).unwrap();
    assert!(p.is_keyed(2) && !p.is_keyed(1));
    assert_eq!(p.stats().cow_copies, 1);
    ok(&p);
    p.free(parent);
    assert_eq!(p.lru_order(A), [2]);
    p.free(child);
    assert_eq!(p.lru_order(A), [2, 0]);
    assert_eq!(p.free_order(), [1, 3, 4, 5, 6, 7]);
    leak_check(&mut p);
}

#[test]
fn fork_at_a_block_boundary_copies_nothing() {
    let mut p = pool(8, &[(A, open(8))]);
    let (mut parent, _) = prefill(&mut p, A, None, &toks(0, 8));
    // Blocks reserved beyond the computed tokens are the parent's alone.
    assert_eq!(p.reserve(&mut parent, 12), Alloc::Granted);
    assert_eq!(p.block_table(&parent), [0, 1, 2]);
    let mut child = p.fork(&parent);
    assert_eq!(p.block_table(&child), [0, 1]);
    assert_eq!(refs(&p, &[0, 1, 2]), [2, 2, 1]);
    assert_eq!(p.reserve(&mut parent, 9), Alloc::Granted);
    assert_eq!(p.reserve(&mut child, 9), Alloc::Granted);
    assert_eq!(
        (p.block_table(&parent), p.block_table(&child)),
        (vec![0, 1, 2], vec![0, 1, 3])
    );
    assert_eq!(p.take_copies(), []);
    assert_eq!(p.stats().cow_copies, 0);
    p.free(child);
    p.free(parent);
    assert_eq!(p.free_order(), [2, 3, 4, 5, 6, 7]);
    assert_eq!(p.lru_order(A), [1, 0]);
    leak_check(&mut p);
}

#[test]
fn copies_never_chain() {
    let mut p = pool(8, &[(A, open(8))]);
    let (mut parent, _) = prefill(&mut p, A, None, &toks(0, 6));
    let mut c1 = p.fork(&parent);
    assert_eq!(p.reserve(&mut parent, 7), Alloc::Granted);
    assert_eq!(p.block_table(&parent), [0, 2]);
    // A fork of the parent before the copy ran shares block 2, which holds no data yet.
    let mut c2 = p.fork(&parent);
    assert_eq!(p.reserve(&mut c2, 7), Alloc::Granted);
    assert_eq!(p.block_table(&c2), [0, 3]);
    assert_eq!(p.reserve(&mut c1, 7), Alloc::Granted);
    assert_eq!(p.block_table(&c1), [0, 1]);
    assert_eq!(refs(&p, &[0, 1, 2, 3]), [3, 3, 1, 1]);
    ok(&p);
    // Both copies read block 1, so they may run in any order.
    assert_eq!(p.take_copies(), [(1, 2), (1, 3)]);
    assert_eq!(refs(&p, &[0, 1, 2, 3]), [3, 1, 1, 1]);
    assert_eq!(p.stats().cow_copies, 2);
    for s in [parent, c1, c2] {
        p.free(s);
    }
    leak_check(&mut p);
}

#[test]
fn freeing_a_copy_target_drops_the_copy() {
    let mut p = pool(8, &[(A, open(8))]);
    let (mut parent, _) = prefill(&mut p, A, None, &toks(0, 6));
    let child = p.fork(&parent);
    assert_eq!(p.reserve(&mut parent, 7), Alloc::Granted);
    assert_eq!(refs(&p, &[1, 2]), [2, 1]);
    p.free(parent); // e.g. aborted before the forward
    ok(&p);
    assert_eq!(refs(&p, &[0, 1, 2]), [1, 1, 0]);
    assert_eq!(p.take_copies(), []);
    assert_eq!(p.free_order(), [2, 3, 4, 5, 6, 7]);
    p.free(child);
    leak_check(&mut p);
}

#[test]
fn a_keyed_block_is_unkeyed_before_it_is_overwritten() {
    // Fork between reserve and commit: the parent fills block 1 and keys it, then leaves; the
    // child, alone on block 1, writes its own token 5 there. The key must not survive that.
    let mut p = pool(8, &[(A, open(8))]);
    let (mut parent, _) = prefill(&mut p, A, None, &toks(0, 5));
    assert_eq!(p.reserve(&mut parent, 8), Alloc::Granted);
    let mut child = p.fork(&parent);
    assert_eq!(p.block_table(&child), [0, 1]);
    p.commit(&mut parent, &toks(0, 8)).unwrap();
    assert!(p.is_keyed(1));
    p.free(parent);
    assert_eq!(refs(&p, &[0, 1]), [1, 1]);
    assert_eq!(p.reserve(&mut child, 6), Alloc::Granted);
    assert_eq!(
        (p.block_table(&child), p.take_copies()),
        (vec![0, 1], vec![])
    );
    assert!(!p.is_keyed(1));
    ok(&p);
    assert_eq!(probe(&mut p, A, None, &toks(0, 9)), 4);
    p.free(child);
    leak_check(&mut p);
}

#[test]
fn config_and_quota_validation() {
    let mut cfg = KvPoolConfig::new(0, [1; 32]);
    assert!(matches!(
        KvPool::new(cfg.clone()),
        Err(KvError::InvalidConfig(_))
    ));
    cfg.num_blocks = 4;
    assert!(
        matches!(KvPool::new(cfg.clone()), Err(KvError::InvalidConfig(_))),
        "capacity 0"
    );
    cfg.capacity = 4;
    cfg.block_size = 0;
    assert!(matches!(
        KvPool::new(cfg.clone()),
        Err(KvError::InvalidConfig(_))
    ));
    cfg.block_size = BS;
    assert!(
        !format!("{cfg:?}").contains("1, 1"),
        "the secret is masked in Debug"
    );

    let mut p = KvPool::new(cfg).unwrap();
    let bad = |r: Result<(), KvError>| matches!(r, Err(KvError::InvalidQuota { .. }));
    assert!(
        bad(p.register_tenant(A, quota(3, 2, 0, None))),
        "reserved > max"
    );
    assert!(
        bad(p.register_tenant(A, quota(0, 2, 0, Some("")))),
        "empty group"
    );
    p.register_tenant(A, quota(3, 4, 0, None)).unwrap();
    assert!(
        bad(p.register_tenant(B, quota(2, 4, 0, None))),
        "Σ reserved 5 > 4 blocks"
    );
    assert_eq!(
        p.register_tenant(A, open(4)),
        Err(KvError::DuplicateTenant(A))
    );

    // A reservation the pool cannot back right now is refused, then accepted once it can be.
    let (s, _) = prefill(&mut p, A, None, &toks(0, 16));
    assert!(bad(p.register_tenant(B, quota(1, 4, 0, None))));
    p.free(s);
    p.register_tenant(B, quota(1, 4, 0, None)).unwrap();
    ok(&p);
    leak_check(&mut p);
}

#[test]
fn max_blocks_never_vs_not_now_all_or_nothing() {
    let mut p = pool(8, &[(A, open(3))]);
    let scope = p.scope(A, None);
    let (mut s1, _) = p.start(A, &scope, &toks(0, 13)).unwrap();
    assert_eq!(p.reserve(&mut s1, 13), Alloc::Never, "4 blocks > max 3");
    assert_eq!(
        (p.block_table(&s1), p.free_order()),
        (vec![], vec![0, 1, 2, 3, 4, 5, 6, 7])
    );
    assert_eq!(p.reserve(&mut s1, 12), Alloc::Granted);
    assert_eq!(p.block_table(&s1), [0, 1, 2]);

    let (mut s2, _) = p.start(A, &scope, &toks(100, 5)).unwrap();
    assert_eq!(p.units_needed(&s2, 5), 2);
    assert_eq!(
        p.reserve(&mut s2, 1),
        Alloc::NotNow,
        "at max while s1 runs: not one more"
    );
    assert_eq!(
        (p.block_table(&s2), p.free_order()),
        (vec![], vec![3, 4, 5, 6, 7])
    );
    assert_eq!(tstats(&p, A).used, 3);
    ok(&p);
    p.free(s1);
    assert_eq!(p.reserve(&mut s2, 5), Alloc::Granted);
    assert_eq!(p.block_table(&s2), [0, 1]);
    p.free(s2);
    leak_check(&mut p);
}

#[test]
fn reservations_are_guaranteed_and_borrowing_is_reported() {
    let mut p = pool(8, &[(A, quota(2, 8, 0, None)), (B, open(8))]);
    let (sa, sb) = (p.scope(A, None), p.scope(B, None));
    // B can never hold more than the pool minus A's reservation.
    let (mut b1, _) = p.start(B, &sb, &toks(0, 28)).unwrap();
    assert_eq!(p.reserve(&mut b1, 28), Alloc::Never);
    assert_eq!(p.reserve(&mut b1, 24), Alloc::Granted);
    assert_eq!(p.block_table(&b1), [0, 1, 2, 3, 4, 5]);
    assert_eq!((p.borrowed(B), p.borrowed(A)), (6, 0));

    // The two free blocks are A's: B is refused, A is granted.
    let (mut b2, _) = p.start(B, &sb, &toks(100, 1)).unwrap();
    assert_eq!(p.reserve(&mut b2, 1), Alloc::NotNow);
    let (mut a1, _) = p.start(A, &sa, &toks(200, 8)).unwrap();
    assert_eq!(p.reserve(&mut a1, 8), Alloc::Granted);
    assert_eq!(p.block_table(&a1), [6, 7]);
    assert_eq!(p.reserve(&mut a1, 9), Alloc::NotNow, "the pool is full");
    ok(&p);

    // Preempting the borrower frees room; A may now borrow too.
    p.free(b1);
    assert_eq!(p.reserve(&mut a1, 9), Alloc::Granted);
    assert_eq!(p.block_table(&a1), [6, 7, 0]);
    assert_eq!(p.borrowed(A), 1);
    assert_eq!(p.reserve(&mut b2, 1), Alloc::Granted);
    assert_eq!(p.block_table(&b2), [1]);
    assert_eq!((tstats(&p, A).used, tstats(&p, B).used), (3, 1));
    for s in [a1, b2] {
        p.free(s);
    }
    leak_check(&mut p);
}

#[test]
fn eviction_picks_the_tenant_furthest_above_its_floor() {
    let mut p = pool(8, &[(A, quota(0, 8, 2, None)), (B, open(8)), (C, open(8))]);
    let (s, _) = prefill(&mut p, A, None, &toks(0, 12));
    assert_eq!(p.block_table(&s), [0, 1, 2]);
    p.free(s);
    let (s, _) = prefill(&mut p, B, None, &toks(100, 8));
    assert_eq!(p.block_table(&s), [3, 4]);
    p.free(s);
    assert_eq!(
        (p.lru_order(A), p.lru_order(B)),
        (vec![2, 1, 0], vec![4, 3])
    );
    assert_eq!(p.free_order(), [5, 6, 7]);

    // C needs 6: the 3 free ones, then B (2 above floor 0) before A (1 above floor 2); then
    // both are 1 above and A's LRU block is older; then A is at its floor and B goes again.
    let sc = p.scope(C, None);
    let (mut c1, _) = p.start(C, &sc, &toks(200, 24)).unwrap();
    assert_eq!(p.reserve(&mut c1, 24), Alloc::Granted);
    assert_eq!(p.block_table(&c1), [5, 6, 7, 4, 2, 3]);
    assert_eq!(p.stats().evictions, 3);
    assert_eq!((p.lru_order(A), p.lru_order(B)), (vec![1, 0], vec![]));
    assert!(!p.is_keyed(4) && !p.is_keyed(2) && !p.is_keyed(3));

    // A's last two cached blocks are its floor: C, borrowing, may not flush them ...
    let (mut c2, _) = p.start(C, &sc, &toks(300, 1)).unwrap();
    assert_eq!(p.reserve(&mut c2, 1), Alloc::NotNow);
    ok(&p);
    // ... but A's own allocations may.
    let sa = p.scope(A, None);
    let (mut a1, _) = p.start(A, &sa, &toks(400, 1)).unwrap();
    assert_eq!(p.reserve(&mut a1, 1), Alloc::Granted);
    assert_eq!((p.block_table(&a1), p.lru_order(A)), (vec![1], vec![0]));
    assert_eq!(p.stats().evictions, 4);
    for s in [c1, c2, a1] {
        p.free(s);
    }
    leak_check(&mut p);
}

#[test]
fn a_reservation_beats_other_tenants_cached_floors() {
    let mut p = pool(4, &[(A, quota(2, 4, 0, None)), (B, quota(0, 4, 4, None))]);
    for start in [0, 100] {
        let (s, _) = prefill(&mut p, B, None, &toks(start, 8));
        p.free(s);
    }
    assert_eq!((p.lru_order(B), p.free_order()), (vec![1, 0, 3, 2], vec![]));

    // All four blocks are B's floor, but two of them back A's reservation.
    let sa = p.scope(A, None);
    let (mut a1, _) = p.start(A, &sa, &toks(200, 8)).unwrap();
    assert_eq!(p.reserve(&mut a1, 8), Alloc::Granted);
    assert_eq!(
        (p.block_table(&a1), p.lru_order(B)),
        (vec![1, 0], vec![3, 2])
    );
    // Borrowing beyond the reservation may not go below B's floor.
    assert_eq!(p.reserve(&mut a1, 9), Alloc::NotNow);
    assert_eq!(p.block_table(&a1), [1, 0]);
    p.free(a1);
    leak_check(&mut p);
}

#[test]
fn start_shortens_a_hit_to_what_the_ledger_allows() {
    let g = Some("g");
    // B is capped at 2 blocks, so it takes only 2 of A's 3 cached blocks.
    let mut p = pool(8, &[(A, quota(0, 8, 0, g)), (B, quota(0, 2, 0, g))]);
    let (sa, _) = prefill(&mut p, A, None, &toks(0, 13));
    let sb = p.scope(B, None);
    let (b1, cached) = p.start(B, &sb, &toks(0, 13)).unwrap();
    assert_eq!((cached, p.block_table(&b1)), (8, vec![0, 1]));
    assert_eq!(tstats(&p, B).used, 2);
    for s in [sa, b1] {
        p.free(s);
    }
    leak_check(&mut p);

    // Sharing a group member's in-use blocks is a new charge for B, so it may not eat into
    // C's unused reservation either: no hit at all here.
    let mut p = pool(
        6,
        &[
            (A, quota(0, 6, 0, g)),
            (B, quota(0, 6, 0, g)),
            (C, quota(3, 6, 0, None)),
        ],
    );
    let (sa, _) = prefill(&mut p, A, None, &toks(0, 12));
    let sb = p.scope(B, None);
    let (b1, cached) = p.start(B, &sb, &toks(0, 13)).unwrap();
    assert_eq!((cached, p.block_table(&b1)), (0, vec![]));
    assert_eq!(tstats(&p, B).prefix_queries, 1);
    for s in [sa, b1] {
        p.free(s);
    }
    leak_check(&mut p);
}

#[test]
fn stats_report_pool_and_tenants() {
    let mut p = pool(8, &[(A, quota(2, 6, 1, None)), (B, open(4))]);
    let (sa, _) = prefill(&mut p, A, None, &toks(0, 9));
    let (sb, cached) = prefill(&mut p, B, None, &toks(0, 4));
    assert_eq!(cached, 0);
    p.free(sb);
    let tenant = |used, cached, reserved, max, q, qt| TenantKvStats {
        used,
        cached,
        reserved,
        max,
        prefix_queries: q,
        prefix_query_tokens: qt,
        prefix_hit_tokens: 0,
    };
    let expected = KvStats {
        num_blocks: 8,
        capacity: 8,
        block_size: BS,
        used: 3,
        cached: 1,
        free: 4,
        used_blocks: 3,
        cached_blocks: 1,
        evictions: 0,
        cow_copies: 0,
        tenants: vec![(A, tenant(3, 0, 2, 6, 1, 9)), (B, tenant(0, 1, 0, 4, 1, 4))],
    };
    assert_eq!(p.stats(), expected);
    assert_eq!((p.borrowed(A), p.borrowed(B), p.borrowed(C)), (1, 0, 0));
    p.free(sa);
    leak_check(&mut p);
}

#[test]
fn freed_blocks_are_reported_once_and_only_while_free() {
    let mut p = pool(4, &[(A, open(4))]);
    assert_eq!(
        p.take_freed(),
        Vec::<u32>::new(),
        "never used: nothing to forget"
    );
    // Block 0 fills (keyed), block 1 holds the tail (unkeyed).
    let (s, _) = prefill(&mut p, A, None, &toks(0, 6));
    assert_eq!(p.block_table(&s), [0, 1]);
    p.free(s);
    // Block 0 is cached (a later prompt may hit it), block 1 is garbage.
    assert_eq!(p.take_freed(), [1]);
    assert_eq!(p.take_freed(), Vec::<u32>::new());
    // Freed twice between takes: reported once.
    let (s, _) = prefill(&mut p, A, None, &toks(100, 2));
    assert_eq!(p.block_table(&s), [1]);
    p.free(s);
    let (s, _) = prefill(&mut p, A, None, &toks(200, 2));
    p.free(s);
    assert_eq!(p.take_freed(), [1]);
    // Freed, then handed out again before the take: its new owner writes it, not reported.
    let (s, _) = prefill(&mut p, A, None, &toks(300, 2));
    p.free(s);
    let (s, _) = prefill(&mut p, A, None, &toks(400, 2));
    assert_eq!(p.block_table(&s), [1]);
    assert_eq!(p.take_freed(), Vec::<u32>::new());
    p.free(s);
    assert_eq!(p.take_freed(), [1]);
    leak_check(&mut p);
}
