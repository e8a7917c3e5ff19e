//! The mixed pool: blocks of different classes (KV policies) in one pool, charged by weight
//! (filling, then sealed), keyed apart, and windows that drop blocks. Block size 4.

use super::tests::{ok, open, toks, tstats, A, B, BS};
use super::*;

/// 100 units of memory, ids for the lightest block (weight 2).
fn mixed(capacity: usize, tenants: &[(TenantId, TenantQuota)]) -> KvPool {
    let mut cfg = KvPoolConfig::new(capacity / 2, [9; 32]);
    cfg.capacity = capacity;
    cfg.block_size = BS;
    let mut p = KvPool::new(cfg).unwrap();
    for (t, q) in tenants {
        p.register_tenant(*t, q.clone()).unwrap();
    }
    p
}

fn class(filling: usize, sealed: usize, content_id: u32) -> BlockClass {
    BlockClass {
        filling,
        sealed,
        content_id,
        shares_prefix: true,
        window_blocks: None,
    }
}

/// Grows a sequence one token at a time (reserve + commit) until the pool says no; returns
/// the tokens it holds and the answer that stopped it.
fn grow_until_refused(p: &mut KvPool, t: TenantId, c: BlockClass, salt: u32) -> (usize, Alloc) {
    let scope = p.scope(t, None);
    let tokens = toks(salt * 1000, 400);
    let (mut s, _) = p.start_as(t, &scope, &tokens[..1], c).unwrap();
    let mut n = 0;
    loop {
        match p.reserve(&mut s, n + 1) {
            Alloc::Granted => {}
            other => {
                p.free(s);
                ok(p);
                return (n, other);
            }
        }
        n += 1;
        p.commit(&mut s, &tokens[..n]).unwrap();
        ok(p);
    }
}

#[test]
fn a_quota_holds_more_tokens_of_a_lighter_policy() {
    // Quota 60 units; a block costs 10 while it fills. Sealed at 6 ("bf16") vs 2 ("kivi").
    let mut p = mixed(200, &[(A, open(60))]);
    let (heavy, why) = grow_until_refused(&mut p, A, class(10, 6, 1), 1);
    assert_eq!(why, Alloc::Never);
    // 8 sealed blocks (48) + a filling one (10) = 58 ≤ 60; a 9th sealed + filling = 64 > 60.
    assert_eq!(heavy, 8 * BS + BS);
    let (light, _) = grow_until_refused(&mut p, A, class(10, 2, 2), 2);
    // 25 sealed (50) + a filling one (10) = 60.
    assert_eq!(light, 25 * BS + BS);
    assert!(light >= 2 * heavy, "{light} vs {heavy}");
    assert_eq!(tstats(&p, A).used, 0);
}

#[test]
fn sealing_recharges_every_holder_and_frees_units() {
    let mut p = mixed(100, &[(A, open(100))]);
    let scope = p.scope(A, None);
    let c = class(10, 4, 1);
    let (mut s, _) = p.start_as(A, &scope, &toks(0, 6), c).unwrap();
    assert_eq!(p.reserve(&mut s, 6), Alloc::Granted);
    assert_eq!(tstats(&p, A).used, 20, "two filling blocks");
    assert_eq!(p.units_needed(&s, 9), 10);
    p.commit(&mut s, &toks(0, 6)).unwrap();
    // Block 0 is full: sealed at 4; block 1 still filling.
    assert_eq!(tstats(&p, A).used, 14);
    let st = p.stats();
    assert_eq!((st.used, st.free, st.used_blocks), (14, 86, 2));
    let child = p.fork(&s);
    assert_eq!(tstats(&p, A).used, 14, "forks of one tenant pay once");
    p.free(child);
    p.free(s);
    ok(&p);
    // The full block stays cached at its sealed weight.
    let st = p.stats();
    assert_eq!((st.used, st.cached, st.free), (0, 4, 96));
}

#[test]
fn classes_with_different_content_never_share_blocks() {
    let mut p = mixed(200, &[(A, open(200))]);
    let scope = p.scope(A, None);
    let prompt = toks(0, 9);
    for (id, expect) in [(1, 0), (2, 0), (1, 8), (2, 8)] {
        let c = class(10, 4, id);
        let (mut s, cached) = p.start_as(A, &scope, &prompt, c).unwrap();
        assert_eq!(cached, expect, "content {id}");
        assert_eq!(p.reserve(&mut s, 9), Alloc::Granted);
        p.commit(&mut s, &prompt).unwrap();
        p.free(s);
        ok(&p);
    }
    let mut no_share = class(10, 4, 1);
    no_share.shares_prefix = false;
    let (s, cached) = p.start_as(A, &scope, &prompt, no_share).unwrap();
    assert_eq!(cached, 0, "a class that does not share never hits");
    p.free(s);
}

#[test]
fn a_window_drops_old_blocks_and_memory_stops_growing() {
    let mut p = mixed(400, &[(A, open(400)), (B, open(400))]);
    let scope = p.scope(A, None);
    let mut c = class(10, 4, 1);
    c.shares_prefix = false;
    c.window_blocks = Some(3);
    let tokens = toks(0, 200);
    let (mut s, _) = p.start_as(A, &scope, &tokens[..1], c).unwrap();
    let mut peak = 0;
    for n in 1..=200 {
        assert_eq!(p.reserve(&mut s, n), Alloc::Granted, "token {n}");
        p.commit(&mut s, &tokens[..n]).unwrap();
        ok(&p);
        let used = tstats(&p, A).used;
        peak = peak.max(used);
        if n >= 40 {
            // Sink block + the last 3 blocks, at most one of them filling.
            assert!(used <= 4 * 4 + 10, "token {n}: {used} units");
        }
        let table = p.block_table(&s);
        let live = table.iter().filter(|&&b| b != u32::MAX).count();
        assert!(live <= 4, "token {n}: {table:?}");
        assert_ne!(table[0], u32::MAX, "the sink block stays");
    }
    assert!(peak <= 4 * 4 + 10);
    // A fork shares only the live blocks; freeing both returns everything.
    let child = p.fork(&s);
    p.free(child);
    p.free(s);
    ok(&p);
    let st = p.stats();
    assert_eq!(
        (st.used, st.cached, st.free),
        (0, 0, 400),
        "windowed blocks are never cached"
    );
    // The units went back: B can take the whole pool.
    let (held, _) = grow_until_refused(&mut p, B, class(10, 10, 5), 3);
    assert_eq!(held, 40 * BS);
}

#[test]
fn never_is_judged_on_the_sealed_size() {
    let mut p = mixed(100, &[(A, open(30))]);
    let scope = p.scope(A, None);
    let c = class(10, 2, 1);
    let (mut s, _) = p.start_as(A, &scope, &toks(0, 1), c).unwrap();
    // 40 tokens = 9 sealed blocks (18) + 1 filling (10) = 28 ≤ 30: possible in steps.
    assert_eq!(p.reserve(&mut s, 4), Alloc::Granted);
    p.free(s);
    let (mut s, _) = p.start_as(A, &scope, &toks(0, 1), c).unwrap();
    // 11 blocks: 10 sealed (20) + 1 filling (10) = 30 ok; 12 blocks: 32 > 30 → Never.
    assert_eq!(p.reserve(&mut s, 48), Alloc::Never);
    p.free(s);
    ok(&p);
}
