//! Property test of the KV block pool: random interleavings of start / reserve / commit / fork /
//! free / take_copies across three tenants (0 and 1 in one share group, 2 alone), random small
//! pools, block sizes and quotas. After every operation:
//! - `check_invariants` holds and `used + cached + free == num_blocks`;
//! - a tenant asking for blocks within its reservation is granted them, whatever the others do,
//!   and a borrowing request never evicts another tenant's cached blocks below its floor;
//! - `Never` is answered exactly when the sequence needs more blocks than the tenant could ever
//!   hold, and a refusal changes nothing;
//! - a prefix hit is always a prefix committed under the same scope (tenant or share group, and
//!   salt), so no hit crosses tenants outside a share group;
//! - two live sequences share a block only if they share a scope, and the blocks a granted
//!   reserve will write are the sequence's alone;
//! - pending copies are independent and land in live blocks;
//! - on a simulated KV store (copies applied before each commit, which stands for the forward;
//!   a commit writes the new tokens into the sequence's blocks), every live sequence still reads
//!   its own tokens at every computed position, and a prefix hit reads exactly the prompt.
//!
//! At the end everything is freed and every block must be free or cached. 1024 cases (well under
//! a second): fewer miss the rarer paths (a fork between reserve and commit or take_copies).

use std::collections::{HashMap, HashSet};

use kvserve::kv::{Alloc, KvPool, KvPoolConfig, SeqBlocks, TenantQuota};
use kvserve::types::{TenantId, TokenId};
use proptest::prelude::*;

const TENANTS: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    Start {
        tenant: usize,
        salt: Option<u8>,
        base: usize,
        base_len: usize,
        suffix: Vec<TokenId>,
    },
    Reserve {
        seq: usize,
        n: usize,
        fill: TokenId,
    },
    Commit {
        seq: usize,
    },
    /// What the engine does per step: reserve, then the forward (copies + commit) if granted.
    Step {
        seq: usize,
        n: usize,
        fill: TokenId,
    },
    Fork {
        seq: usize,
    },
    Free {
        seq: usize,
    },
    TakeCopies,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..TENANTS, prop::option::weighted(0.2, 0u8..2), 0usize..3, 0usize..14,
              prop::collection::vec(0u32..3, 0..4))
            .prop_map(|(tenant, salt, base, base_len, suffix)| Op::Start { tenant, salt, base, base_len, suffix }),
        2 => (any::<usize>(), 1usize..10, 0u32..3).prop_map(|(seq, n, fill)| Op::Reserve { seq, n, fill }),
        2 => any::<usize>().prop_map(|seq| Op::Commit { seq }),
        4 => (any::<usize>(), 1usize..10, 0u32..3).prop_map(|(seq, n, fill)| Op::Step { seq, n, fill }),
        2 => any::<usize>().prop_map(|seq| Op::Fork { seq }),
        2 => any::<usize>().prop_map(|seq| Op::Free { seq }),
        1 => Just(Op::TakeCopies),
    ]
}

#[derive(Debug, Clone)]
struct Setup {
    num_blocks: usize,
    block_size: usize,
    quotas: Vec<TenantQuota>,
}

fn setup() -> impl Strategy<Value = Setup> {
    (4usize..24, 1usize..5).prop_flat_map(|(n, bs)| {
        // Caps mostly generous (so sequences grow and share), sometimes tight.
        let max = prop_oneof![3 => n / 2..=n, 1 => 0..=n];
        let quota =
            (0..=n / TENANTS, max, 0usize..4).prop_map(move |(r, m, floor)| (r, m.max(r), floor));
        prop::collection::vec(quota, TENANTS).prop_map(move |qs| Setup {
            num_blocks: n,
            block_size: bs,
            quotas: qs
                .into_iter()
                .enumerate()
                .map(
                    |(i, (reserved_blocks, max_blocks, cached_floor))| TenantQuota {
                        reserved_blocks,
                        max_blocks,
                        cached_floor,
                        share_group: (i < 2).then(|| "g".to_string()),
                    },
                )
                .collect(),
        })
    })
}

/// Tenants 0 and 1 share a scope; the salt subdivides it.
type Label = (usize, Option<u8>);

struct Live {
    seq: SeqBlocks,
    tenant: usize,
    label: Label,
    tokens: Vec<TokenId>,
    /// Tokens covered by the last granted reserve (what the next commit claims as computed).
    reserved_to: usize,
}

struct Model {
    pool: KvPool,
    setup: Setup,
    live: Vec<Live>,
    /// Every block-aligned prefix committed under each scope.
    committed: HashSet<(Label, Vec<TokenId>)>,
    /// Simulated KV: the token whose KV each slot of each block holds.
    store: Vec<Vec<Option<TokenId>>>,
}

fn tid(i: usize) -> TenantId {
    TenantId(i as u32 + 1)
}

fn base_tokens(base: usize) -> Vec<TokenId> {
    // Small alphabet and overlapping bases, so hits (and near-miss hash chains) are frequent.
    (0..14)
        .map(|i| ((base * 5 + i * 3 + i / 4) % 4) as TokenId)
        .collect()
}

impl Model {
    fn new(setup: Setup) -> Self {
        let mut cfg = KvPoolConfig::new(setup.num_blocks, [42; 32]);
        cfg.block_size = setup.block_size;
        let mut pool = KvPool::new(cfg).unwrap();
        for (i, q) in setup.quotas.iter().enumerate() {
            pool.register_tenant(tid(i), q.clone()).unwrap();
        }
        let store = vec![vec![None; setup.block_size]; setup.num_blocks];
        Model {
            pool,
            setup,
            live: Vec::new(),
            committed: HashSet::new(),
            store,
        }
    }

    fn used(&self, t: usize) -> usize {
        self.pool
            .stats()
            .tenants
            .iter()
            .find(|(u, _)| *u == tid(t))
            .unwrap()
            .1
            .used
    }

    fn apply(&mut self, op: Op) -> Result<(), TestCaseError> {
        let bs = self.setup.block_size;
        let pick = |i: usize, live: &Vec<Live>| (!live.is_empty()).then(|| i % live.len());
        match op {
            Op::Start {
                tenant,
                salt,
                base,
                base_len,
                suffix,
            } => {
                let salt_str = salt.map(|s| format!("salt{s}"));
                let scope = self.pool.scope(tid(tenant), salt_str.as_deref());
                let mut prompt = base_tokens(base)[..base_len].to_vec();
                prompt.extend(suffix);
                let (seq, cached) = self.pool.start(tid(tenant), &scope, &prompt).unwrap();
                let label = (if tenant < 2 { 0 } else { tenant }, salt);
                prop_assert_eq!(cached % bs, 0);
                prop_assert!(
                    cached == 0 || cached < prompt.len(),
                    "at least one token computed"
                );
                prop_assert_eq!(seq.num_computed_tokens(), cached);
                if cached > 0 {
                    let key = (label, prompt[..cached].to_vec());
                    prop_assert!(
                        self.committed.contains(&key),
                        "hit on a prefix never committed in scope {:?}",
                        label
                    );
                }
                let table = self.pool.block_table(&seq);
                for (p, &tok) in prompt[..cached].iter().enumerate() {
                    let got = self.store[table[p / bs] as usize][p % bs];
                    prop_assert_eq!(
                        got,
                        Some(tok),
                        "hit block {} holds other KV at position {}",
                        table[p / bs],
                        p
                    );
                }
                self.live.push(Live {
                    seq,
                    tenant,
                    label,
                    tokens: prompt,
                    reserved_to: cached,
                });
            }
            Op::Reserve { seq, n, fill } => {
                let Some(i) = pick(seq, &self.live) else {
                    return Ok(());
                };
                let computed = self.live[i].seq.num_computed_tokens();
                let target = computed + n;
                let l = &mut self.live[i];
                while l.tokens.len() < target {
                    l.tokens.push((fill + l.tokens.len() as u32) % 3);
                }
                let t = l.tenant;
                let q = self.setup.quotas[t].clone();
                let need = self.pool.units_needed(&self.live[i].seq, target);
                let used = self.used(t);
                let others_reserved: usize = (0..TENANTS)
                    .filter(|&u| u != t)
                    .map(|u| self.setup.quotas[u].reserved_blocks)
                    .sum();
                let ceiling = q.max_blocks.min(self.setup.num_blocks - others_reserved);
                let (table_before, stats_before) =
                    (self.pool.block_table(&self.live[i].seq), self.pool.stats());
                let res = self.pool.reserve(&mut self.live[i].seq, target);
                prop_assert_eq!(
                    res == Alloc::Never,
                    target.div_ceil(bs) > ceiling,
                    "Never iff beyond the ceiling"
                );
                if used + need <= q.reserved_blocks {
                    prop_assert_eq!(res, Alloc::Granted, "denied within its reservation");
                }
                if res == Alloc::Granted {
                    let table = self.pool.block_table(&self.live[i].seq);
                    prop_assert!(table.len() >= target.div_ceil(bs));
                    prop_assert_eq!(self.used(t), used + need);
                    // Cached floors: only the part of the request within T's reservation may
                    // evict other tenants' cached blocks below their floor.
                    let stats_after = self.pool.stats();
                    let below_floor_lost: usize = (0..TENANTS)
                        .filter(|&u| u != t)
                        .map(|u| {
                            let floor = self.setup.quotas[u].cached_floor;
                            let before = stats_before.tenants[u].1.cached.min(floor);
                            before.saturating_sub(stats_after.tenants[u].1.cached)
                        })
                        .sum();
                    let within = need.min(q.reserved_blocks.saturating_sub(used));
                    prop_assert!(below_floor_lost <= within, "borrowing flushed a floor");
                    // The blocks about to be written belong to this sequence alone.
                    for &b in &table[computed / bs..target.div_ceil(bs)] {
                        for (j, other) in self.live.iter().enumerate() {
                            prop_assert!(
                                j == i || !self.pool.block_table(&other.seq).contains(&b),
                                "write to shared block {}",
                                b
                            );
                        }
                    }
                    let l = &mut self.live[i];
                    l.reserved_to = l.reserved_to.max(target);
                } else {
                    prop_assert_eq!(self.pool.block_table(&self.live[i].seq), table_before);
                    prop_assert_eq!(self.pool.stats(), stats_before);
                }
            }
            Op::Step { seq, n, fill } => {
                self.apply(Op::Reserve { seq, n, fill })?;
                return self.apply(Op::Commit { seq });
            }
            Op::Commit { seq } => {
                let Some(i) = pick(seq, &self.live) else {
                    return Ok(());
                };
                if self.live[i].reserved_to <= self.live[i].seq.num_computed_tokens() {
                    return self.check();
                }
                // The forward: pending copies first, then the new tokens' KV.
                self.check_copies()?;
                let l = &mut self.live[i];
                let table = self.pool.block_table(&l.seq);
                for p in l.seq.num_computed_tokens()..l.reserved_to {
                    self.store[table[p / bs] as usize][p % bs] = Some(l.tokens[p]);
                }
                {
                    let tokens = &l.tokens[..l.reserved_to];
                    self.pool.commit(&mut l.seq, tokens).unwrap();
                    for k in (bs..=tokens.len()).step_by(bs) {
                        self.committed.insert((l.label, tokens[..k].to_vec()));
                    }
                }
                self.check_views()?;
            }
            Op::Fork { seq } => {
                let Some(i) = pick(seq, &self.live) else {
                    return Ok(());
                };
                let child = self.pool.fork(&self.live[i].seq);
                let l = &self.live[i];
                let computed = child.num_computed_tokens();
                prop_assert_eq!(computed, l.seq.num_computed_tokens());
                let fork = Live {
                    seq: child,
                    tenant: l.tenant,
                    label: l.label,
                    tokens: l.tokens[..computed].to_vec(),
                    reserved_to: computed,
                };
                self.live.push(fork);
            }
            Op::Free { seq } => {
                let Some(i) = pick(seq, &self.live) else {
                    return Ok(());
                };
                let l = self.live.swap_remove(i);
                self.pool.free(l.seq);
            }
            Op::TakeCopies => self.check_copies()?,
        }
        self.check()
    }

    /// Takes the pending copies, checks them and applies them to the simulated store.
    fn check_copies(&mut self) -> Result<(), TestCaseError> {
        let copies = self.pool.take_copies();
        let live_blocks: HashSet<u32> = self
            .live
            .iter()
            .flat_map(|l| self.pool.block_table(&l.seq))
            .collect();
        let srcs: HashSet<u32> = copies.iter().map(|c| c.0).collect();
        let mut dsts = HashSet::new();
        for &(_, dst) in &copies {
            prop_assert!(dsts.insert(dst), "two copies into {}", dst);
            prop_assert!(
                !srcs.contains(&dst),
                "copy into a block another copy reads: {}",
                dst
            );
            prop_assert!(live_blocks.contains(&dst), "copy into a dead block {}", dst);
        }
        for &(src, dst) in &copies {
            self.store[dst as usize] = self.store[src as usize].clone();
        }
        self.check_views()
    }

    fn check(&self) -> Result<(), TestCaseError> {
        if let Err(e) = self.pool.check_invariants() {
            return Err(TestCaseError::fail(format!("invariant broken: {e}")));
        }
        let s = self.pool.stats();
        prop_assert_eq!(s.used + s.cached + s.free, s.num_blocks);
        for (t, ts) in &s.tenants {
            prop_assert!(ts.used <= ts.max, "tenant {:?} over max", t);
        }
        // A block is shared only within one scope (forks, prefix hits of the same scope).
        let mut owner: HashMap<u32, Label> = HashMap::new();
        for l in &self.live {
            for b in self.pool.block_table(&l.seq) {
                let prev = *owner.entry(b).or_insert(l.label);
                prop_assert_eq!(prev, l.label, "block {} shared across scopes", b);
            }
        }
        Ok(())
    }

    /// Every sequence still reads its own KV at every computed position. Only meaningful once
    /// the pending copies are applied (as before a forward), so it runs after take_copies.
    fn check_views(&self) -> Result<(), TestCaseError> {
        let bs = self.setup.block_size;
        for l in &self.live {
            let table = self.pool.block_table(&l.seq);
            for p in 0..l.seq.num_computed_tokens() {
                let got = self.store[table[p / bs] as usize][p % bs];
                prop_assert_eq!(
                    got,
                    Some(l.tokens[p]),
                    "sequence lost its KV at position {}",
                    p
                );
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Result<(), TestCaseError> {
        self.check_copies()?;
        for l in std::mem::take(&mut self.live) {
            self.pool.free(l.seq);
            self.check()?;
        }
        prop_assert_eq!(self.pool.take_copies(), vec![]);
        let s = self.pool.stats();
        prop_assert_eq!(s.used, 0);
        prop_assert_eq!(s.cached + s.free, s.num_blocks);
        prop_assert!(s.tenants.iter().all(|(_, t)| t.used == 0));
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn pool_keeps_its_invariants(setup in setup(), ops in prop::collection::vec(op(), 1..100)) {
        let mut m = Model::new(setup);
        for op in ops {
            m.apply(op)?;
        }
        m.finish()?;
    }
}
