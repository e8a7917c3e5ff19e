//! Pure scheduler tests: a real `KvPool` (bookkeeping only) and a fake model whose "logits"
//! make the next token a function of the sequence so far. Every test checks the pool's
//! invariants after each step and ends with a leak check.

use super::*;
use crate::engine::request::{EngineEvent, EngineRequest, StopParams};
use crate::kv::{KvPool, KvPoolConfig, TenantQuota};
use crate::types::{SamplingParams, TokenId};

const VOCAB: usize = 64;
const EOS: TokenId = 63;
const BS: usize = 4;

fn quota(reserved: usize, max: usize) -> TenantQuota {
    TenantQuota {
        reserved_blocks: reserved,
        max_blocks: max,
        cached_floor: 0,
        share_group: None,
    }
}

fn pool(num_blocks: usize, tenants: &[(u32, TenantQuota)]) -> KvPool {
    let mut cfg = KvPoolConfig::new(num_blocks, [7; 32]);
    cfg.block_size = BS;
    let mut p = KvPool::new(cfg).unwrap();
    for (t, q) in tenants {
        p.register_tenant(TenantId(*t), q.clone()).unwrap();
    }
    p
}

fn sched(budget: usize, running: usize, weights: &[(u32, f64)]) -> Scheduler {
    Scheduler::new(SchedulerConfig {
        max_batched_tokens: budget,
        max_running: running,
        max_queue_time: None,
        max_context: 1 << 20,
        block_size: BS,
        weights: weights.iter().map(|&(t, w)| (TenantId(t), w)).collect(),
        classes: crate::engine::paged::KvClasses::uniform(BS),
    })
}

fn req(tenant: u32, prompt: Vec<TokenId>, max_tokens: usize) -> EngineRequest {
    EngineRequest {
        kv: crate::engine::request::KvChoice::default(),
        tenant: TenantId(tenant),
        cache_salt: None,
        prompt,
        sampling: SamplingParams::default(),
        stop: StopParams {
            max_tokens,
            min_tokens: 0,
            stop_ids: vec![EOS],
            ignore_eos: false,
        },
        priority: 0,
        prompt_logprobs: None,
    }
}

/// The fake model: next token = (sum of the sequence's tokens) mod 61, so it never emits EOS
/// unless `eos_after` says so, and a recomputed sequence continues exactly as before.
fn next_token(tokens: &[TokenId]) -> TokenId {
    (tokens.iter().map(|&t| t as u64).sum::<u64>() % 61) as TokenId
}

fn one_hot(t: TokenId) -> Vec<f32> {
    let mut v = vec![0.0; VOCAB];
    v[t as usize] = 10.0;
    v
}

/// The forward pass's output for `st` from each entry's logits rows, as the worker asks for
/// it: a greedy entry that samples gets its token (the backend's argmax), so does a drawing one
/// (the backend's dense draw), the others their rows.
fn output(st: &Step, rows: impl Fn(&Scheduled) -> Vec<f32>) -> StepOutput {
    let mut out = StepOutput::new(VOCAB);
    for e in &st.entries {
        let r = rows(e);
        if e.sample && e.greedy && !e.all_logits {
            out.push_token(crate::backend::cpu::argmax::argmax(&r) as TokenId);
        } else if let (true, false, Some((inv_t, u01))) = (e.sample, e.all_logits, e.draw) {
            let mut blocks = Vec::new();
            out.push_token(crate::backend::cpu::draw::draw_dense_row(
                &r,
                inv_t,
                u01,
                &mut blocks,
            ));
        } else {
            out.push_logits(&r);
        }
    }
    out
}

/// Runs one step with the fake model; returns the step and the outputs.
fn step(s: &mut Scheduler, p: &mut KvPool, now: Instant) -> (Step, Vec<Output>) {
    let st = s.schedule(p, now);
    p.check_invariants().unwrap();
    let _ = p.take_copies();
    let logits = output(&st, |e| {
        if e.all_logits {
            let t = s.tokens(e.id);
            (e.start..e.start + e.len)
                .flat_map(|pos| one_hot(next_token(&t[..=pos])))
                .collect()
        } else if e.sample {
            one_hot(next_token(s.tokens(e.id)))
        } else {
            Vec::new()
        }
    });
    s.update(&st, &logits, p);
    p.check_invariants().unwrap();
    let out = s.take_outputs();
    (st, out)
}

/// Runs until idle; returns each request's generated tokens and finish events in order.
fn run_all(
    s: &mut Scheduler,
    p: &mut KvPool,
) -> HashMap<RequestId, (Vec<TokenId>, Option<EngineEvent>)> {
    let mut got: HashMap<RequestId, (Vec<TokenId>, Option<EngineEvent>)> = HashMap::new();
    let now = Instant::now();
    for _ in 0..100_000 {
        if s.is_idle() {
            break;
        }
        let (_, out) = step(s, p, now);
        for o in out {
            let e = got.entry(o.id).or_default();
            match o.event {
                EngineEvent::Token(t) => e.0.push(t.token),
                ev => e.1 = Some(ev),
            }
        }
    }
    assert!(s.is_idle(), "scheduler did not drain");
    assert_eq!(p.stats().used, 0, "blocks leaked");
    got
}

/// The request of each token event in `out` (one entry per generated token).
fn token_ids(out: &[Output]) -> impl Iterator<Item = RequestId> + '_ {
    out.iter()
        .filter(|o| matches!(o.event, EngineEvent::Token(_)))
        .map(|o| o.id)
}

fn ids(n: u64) -> impl Iterator<Item = RequestId> {
    (0..n).map(RequestId)
}

#[test]
fn chunked_prefill_shares_the_budget_with_decodes() {
    let mut p = pool(64, &[(0, quota(0, 64))]);
    let mut s = sched(8, 8, &[]);
    let now = Instant::now();
    s.add(RequestId(0), req(0, vec![1; 3], 4), &p, now).unwrap();
    let (st, _) = step(&mut s, &mut p, now);
    assert_eq!(st.entries.len(), 1);
    assert!(st.entries[0].sample && st.entries[0].len == 3);
    // A 20-token prompt arrives while request 0 decodes: 1 decode token + a 7-token chunk.
    s.add(RequestId(1), req(0, (0..20).collect(), 2), &p, now)
        .unwrap();
    let (st, _) = step(&mut s, &mut p, now);
    let lens: Vec<(u64, usize, usize, bool)> = st
        .entries
        .iter()
        .map(|e| (e.id.0, e.start, e.len, e.sample))
        .collect();
    assert_eq!(lens, vec![(0, 3, 1, true), (1, 0, 7, false)]);
    let (st, _) = step(&mut s, &mut p, now);
    let lens: Vec<(u64, usize, usize, bool)> = st
        .entries
        .iter()
        .map(|e| (e.id.0, e.start, e.len, e.sample))
        .collect();
    assert_eq!(lens, vec![(0, 4, 1, true), (1, 7, 7, false)]);
    let mut generated = HashMap::new();
    while !s.is_idle() {
        let (st, out) = step(&mut s, &mut p, now);
        assert!(st.num_tokens() <= 8);
        for id in token_ids(&out) {
            *generated.entry(id.0).or_insert(0) += 1;
        }
    }
    // Request 0 had 3 of its 4 tokens before the loop; request 1 gets both of its own.
    assert_eq!(generated[&0], 1);
    assert_eq!(generated[&1], 2);
    assert_eq!(p.stats().used, 0);
}

#[test]
fn running_cap_and_budget_are_respected_and_every_request_finishes() {
    let mut p = pool(256, &[(0, quota(0, 256))]);
    let mut s = sched(16, 3, &[]);
    let now = Instant::now();
    for id in ids(10) {
        let len = 1 + (id.0 as usize * 7) % 23;
        s.add(id, req(0, (0..len as u32).collect(), 5), &p, now)
            .unwrap();
    }
    let mut max_running = 0;
    let mut all = HashMap::new();
    while !s.is_idle() {
        let (st, out) = step(&mut s, &mut p, now);
        assert!(st.num_tokens() <= 16);
        max_running = max_running.max(s.num_running());
        assert!(st.entries.len() <= 3);
        for id in token_ids(&out) {
            *all.entry(id).or_insert(0) += 1;
        }
    }
    assert_eq!(max_running, 3);
    assert!(ids(10).all(|id| all[&id] == 5));
    assert_eq!(p.stats().used, 0);
}

#[test]
fn stop_ids_min_tokens_max_tokens_and_ignore_eos() {
    // The fake model emits EOS when banned logits allow it: make EOS the best token always.
    let mut p = pool(64, &[(0, quota(0, 64))]);
    let mut s = sched(64, 8, &[]);
    let now = Instant::now();
    let mut r = req(0, vec![5, 6], 10);
    r.stop.min_tokens = 3;
    s.add(RequestId(0), r.clone(), &p, now).unwrap();
    r.stop.ignore_eos = true;
    r.stop.min_tokens = 0;
    s.add(RequestId(1), r, &p, now).unwrap();
    let mut toks: HashMap<RequestId, Vec<TokenId>> = HashMap::new();
    let mut fin = HashMap::new();
    while !s.is_idle() {
        let st = s.schedule(&mut p, now);
        for e in st.entries.iter().filter(|e| e.sample) {
            // Request 0 bans EOS for its first 3 tokens: the sampler applies the ban, so the
            // backend cannot pick its token until then.
            let n = toks.get(&e.id).map_or(0, Vec::len);
            assert_eq!(
                e.greedy,
                e.id != RequestId(0) || n >= 3,
                "{:?} at {n}",
                e.id
            );
        }
        let logits = output(&st, |e| {
            // EOS best, token 1 second best.
            let mut v = one_hot(EOS);
            v[1] = 5.0;
            if e.sample {
                v
            } else {
                Vec::new()
            }
        });
        s.update(&st, &logits, &mut p);
        for o in s.take_outputs() {
            match o.event {
                EngineEvent::Token(t) => toks.entry(o.id).or_default().push(t.token),
                EngineEvent::Finished { reason, usage, .. } => {
                    fin.insert(o.id, (reason, usage));
                }
                EngineEvent::Error(e) => panic!("{e}"),
                EngineEvent::PromptLogprobs(_) => panic!("not asked for"),
            }
        }
    }
    // min_tokens 3: three non-EOS tokens, then EOS stops it (the EOS is reported).
    assert_eq!(toks[&RequestId(0)], vec![1, 1, 1, EOS]);
    assert_eq!(fin[&RequestId(0)].0, FinishReason::Stop);
    assert_eq!(fin[&RequestId(0)].1.completion_tokens, 4);
    // ignore_eos: runs to max_tokens.
    assert_eq!(toks[&RequestId(1)], vec![EOS; 10]);
    assert_eq!(fin[&RequestId(1)].0, FinishReason::Length);
    assert_eq!(p.stats().used, 0);
}

#[test]
fn preemption_by_recompute_gives_the_same_tokens() {
    let prompts: Vec<Vec<TokenId>> = (0..6u32)
        .map(|i| (0..(5 + 3 * i)).map(|t| (t * 7 + i) % 50).collect())
        .collect();
    let run = |blocks: usize| {
        let mut p = pool(blocks, &[(0, quota(0, blocks))]);
        let mut s = sched(32, 6, &[]);
        for (i, pr) in prompts.iter().enumerate() {
            s.add(
                RequestId(i as u64),
                req(0, pr.clone(), 24),
                &p,
                Instant::now(),
            )
            .unwrap();
        }
        let got = run_all(&mut s, &mut p);
        // Each request's first admission is reported once, preempted or not.
        let mut admitted: Vec<RequestId> = s.take_admissions().iter().map(|a| a.id).collect();
        admitted.sort();
        assert_eq!(admitted, ids(6).collect::<Vec<_>>());
        (got, s.stats().preemptions)
    };
    let (free_run, pre0) = run(1024);
    let (tight, pre1) = run(14);
    assert_eq!(pre0, 0);
    assert!(pre1 > 0, "a 14-block pool must preempt");
    for id in ids(6) {
        assert_eq!(free_run[&id].0, tight[&id].0, "request {id:?}");
        assert_eq!(tight[&id].0.len(), 24);
        match &tight[&id].1 {
            Some(EngineEvent::Finished { reason, .. }) => assert_eq!(*reason, FinishReason::Length),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn a_request_that_can_never_fit_fails_alone() {
    let mut p = pool(16, &[(0, quota(0, 4))]);
    let mut s = sched(64, 8, &[]);
    let now = Instant::now();
    s.add(RequestId(0), req(0, vec![1; 30], 4), &p, now)
        .unwrap(); // 34 tokens > 4 blocks of 4
    s.add(RequestId(1), req(0, vec![2; 5], 4), &p, now).unwrap();
    let got = run_all(&mut s, &mut p);
    assert!(matches!(
        got[&RequestId(0)].1,
        Some(EngineEvent::Error(EngineError::KvQuota { .. }))
    ));
    assert_eq!(got[&RequestId(1)].0.len(), 4);
}

/// Tokens generated per tenant while both tenants are backlogged.
fn contended_share(weights: &[(u32, f64)], quiet_reqs: u64, noisy_reqs: u64) -> f64 {
    let mut p = pool(4096, &[(0, quota(0, 4096)), (1, quota(0, 4096))]);
    let mut s = sched(64, 8, weights);
    let now = Instant::now();
    // Distinct prompts (identical ones would wait for each other's prefix: see the last test).
    let prompt =
        |i: u64| -> Vec<TokenId> { (0..8).map(|k| ((i * 8 + k) % 61) as TokenId).collect() };
    // Output lengths 8..=39, varied so that requests do not finish in lockstep waves.
    let max_tokens = |i: u64| 8 + ((i * 2654435761) >> 7) as usize % 32;
    for i in 0..noisy_reqs {
        s.add(RequestId(i), req(1, prompt(i), max_tokens(i)), &p, now)
            .unwrap();
    }
    let quiet: Vec<RequestId> = (0..quiet_reqs).map(|i| RequestId(noisy_reqs + i)).collect();
    for &q in &quiet {
        s.add(q, req(0, prompt(q.0), max_tokens(q.0)), &p, now)
            .unwrap();
    }
    let mut tokens = [0usize; 2];
    // Contended while the quiet tenant still has a request waiting.
    while s.fair.waiting_of(TenantId(0)).next().is_some() {
        let (_, out) = step(&mut s, &mut p, now);
        for id in token_ids(&out) {
            tokens[usize::from(quiet.contains(&id))] += 1;
        }
    }
    let _ = run_all(&mut s, &mut p);
    tokens[1] as f64 / (tokens[0] + tokens[1]) as f64
}

#[test]
fn quiet_tenant_gets_its_fair_share_against_a_noisy_one() {
    let share = contended_share(&[], 40, 400);
    eprintln!("equal weights: quiet share {share}");
    assert!(
        (share - 0.5).abs() <= 0.05,
        "equal weights: quiet share {share}"
    );
    let share = contended_share(&[(0, 2.0)], 40, 400);
    eprintln!("weight 2:1: quiet share {share}");
    assert!(
        (share - 2.0 / 3.0).abs() <= 2.0 / 30.0,
        "weight 2:1: quiet share {share}"
    );
}

#[test]
fn priority_orders_within_a_tenant_not_across() {
    let mut p = pool(256, &[(0, quota(0, 256)), (1, quota(0, 256))]);
    let mut s = sched(64, 1, &[]);
    let now = Instant::now();
    let mut low = req(0, vec![1; 4], 1);
    low.priority = 10;
    s.add(RequestId(0), low, &p, now).unwrap();
    let mut high = req(0, vec![1; 4], 1);
    high.priority = -10;
    s.add(RequestId(1), high, &p, now).unwrap();
    let mut other = req(1, vec![1; 4], 1);
    other.priority = 100;
    s.add(RequestId(2), other, &p, now).unwrap();
    let mut order = Vec::new();
    while !s.is_idle() {
        let (st, _) = step(&mut s, &mut p, now);
        order.extend(st.entries.iter().map(|e| e.id.0));
    }
    // Tenant 0 first (tie on counters → lower id), its best priority; then tenant 1 (now the
    // lower counter) before tenant 0's low-priority request.
    assert_eq!(order, vec![1, 2, 0]);
}

#[test]
fn queue_timeout_refuses_only_never_admitted_requests() {
    let mut p = pool(64, &[(0, quota(0, 64))]);
    let mut s = Scheduler::new(SchedulerConfig {
        max_queue_time: Some(Duration::from_millis(100)),
        ..sched(64, 1, &[]).cfg
    });
    let t0 = Instant::now();
    s.add(RequestId(0), req(0, vec![1; 4], 50), &p, t0).unwrap();
    s.add(RequestId(1), req(0, vec![1; 4], 1), &p, t0).unwrap();
    let (_, _) = step(&mut s, &mut p, t0);
    let (_, out) = step(&mut s, &mut p, t0 + Duration::from_millis(150));
    let errs: Vec<_> = out
        .iter()
        .filter_map(|o| match &o.event {
            EngineEvent::Error(e) => Some((o.id, e.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].0, RequestId(1));
    assert!(matches!(
        errs[0].1,
        EngineError::QueueTimeout { waited_ms: 150 }
    ));
    let got = run_all(&mut s, &mut p);
    assert_eq!(got[&RequestId(0)].0.len(), 48);
}

#[test]
fn abort_frees_blocks_at_once_and_emits_a_final_event() {
    let mut p = pool(64, &[(0, quota(0, 64))]);
    let mut s = sched(64, 8, &[]);
    let now = Instant::now();
    s.add(RequestId(0), req(0, vec![1; 9], 100), &p, now)
        .unwrap();
    s.add(RequestId(1), req(0, vec![2; 9], 100), &p, now)
        .unwrap();
    step(&mut s, &mut p, now);
    step(&mut s, &mut p, now);
    assert!(p.stats().used >= 6);
    assert!(s.abort(RequestId(0), &mut p));
    assert!(s.abort(RequestId(1), &mut p));
    assert!(!s.abort(RequestId(1), &mut p));
    p.check_invariants().unwrap();
    assert_eq!(p.stats().used, 0);
    let out = s.take_outputs();
    assert_eq!(out.len(), 2);
    for o in out {
        match o.event {
            EngineEvent::Finished { reason, usage, .. } => {
                assert_eq!(reason, FinishReason::Abort);
                assert_eq!(usage.completion_tokens, 2);
            }
            e => panic!("{e:?}"),
        }
    }
    assert!(s.is_idle());
}

#[test]
fn identical_prompts_arriving_together_compute_the_prefix_once() {
    let mut p = pool(256, &[(0, quota(0, 256))]);
    // A budget that fits all four prompts at once: only the prefix wait keeps them apart.
    let mut s = sched(256, 8, &[]);
    let now = Instant::now();
    let prompt: Vec<TokenId> = (0..30).collect();
    for id in ids(4) {
        s.add(id, req(0, prompt.clone(), 2), &p, now).unwrap();
    }
    let mut computed = 0;
    while !s.is_idle() {
        let (st, _) = step(&mut s, &mut p, now);
        computed += st.num_tokens();
    }
    // The first computes 30 prompt tokens; the others hit 7 full blocks (28 tokens) and compute 2.
    // Each computes 1 more token to generate its second one.
    assert_eq!(computed, 30 + 3 * 2 + 4);
    let st = p.stats();
    assert_eq!(st.tenants[0].1.prefix_hit_tokens, 3 * 28);
}

#[test]
fn prompt_logprobs_score_every_prompt_token_once_without_cache_hits() {
    let mut p = pool(64, &[(0, quota(0, 64))]);
    let mut s = sched(4, 8, &[]);
    let prompt: Vec<TokenId> = (1..=13).collect();
    // A first request puts the prompt's full blocks in the prefix cache.
    s.add(RequestId(0), req(0, prompt.clone(), 2), &p, Instant::now())
        .unwrap();
    run_all(&mut s, &mut p);
    let mut r = req(0, prompt.clone(), 3);
    r.prompt_logprobs = Some(2);
    s.add(RequestId(1), r, &p, Instant::now()).unwrap();
    let mut events = Vec::new();
    let now = Instant::now();
    while !s.is_idle() {
        let (st, out) = step(&mut s, &mut p, now);
        assert!(
            st.entries.iter().all(|e| e.len <= 4),
            "chunked by the budget"
        );
        events.extend(out.into_iter().map(|o| o.event));
    }
    assert_eq!(p.stats().used, 0, "blocks leaked");
    let EngineEvent::PromptLogprobs(lps) = &events[0] else {
        panic!("prompt logprobs come first: {:?}", events[0]);
    };
    assert_eq!(lps.len(), prompt.len() - 1);
    for (i, lp) in lps.iter().enumerate() {
        assert_eq!(lp.token, prompt[i + 1]);
        let predicted = next_token(&prompt[..=i]);
        assert_eq!(lp.top_logprobs.len(), 2);
        assert_eq!(lp.top_logprobs[0].0, predicted);
        if lp.token == predicted {
            assert!(lp.logprob.unwrap() > -0.01, "{lp:?}");
        } else {
            assert!(lp.logprob.unwrap() < -9.0, "{lp:?}");
        }
    }
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, EngineEvent::PromptLogprobs(_)))
            .count(),
        1
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, EngineEvent::Token(_)))
            .count(),
        3
    );
    let Some(EngineEvent::Finished { usage, .. }) = events.last() else {
        panic!("no finish");
    };
    assert_eq!(
        usage.cached_tokens, 0,
        "prompt logprobs need the whole prompt computed"
    );
}

#[test]
fn stats_report_each_tenants_load() {
    let mut p = pool(64, &[(0, quota(0, 64)), (1, quota(0, 64))]);
    let mut s = sched(64, 2, &[]);
    let now = Instant::now();
    for (i, t) in [0u32, 1, 0].into_iter().enumerate() {
        s.add(RequestId(i as u64), req(t, vec![1, 2, 3, 4, 5], 4), &p, now)
            .unwrap();
    }
    let load = |running, waiting| TenantLoad { running, waiting };
    assert_eq!(
        s.stats().tenants,
        [(TenantId(0), load(0, 2)), (TenantId(1), load(0, 1))]
    );
    step(&mut s, &mut p, now);
    // Two running slots: one request of each tenant runs, alpha's second waits.
    assert_eq!(
        s.stats().tenants,
        [(TenantId(0), load(1, 1)), (TenantId(1), load(1, 0))]
    );
    let first: Vec<Admission> = s.take_admissions();
    assert_eq!(first.len(), 2);
    assert!(first.iter().all(|a| a.fallback.is_none()));
    run_all(&mut s, &mut p);
    assert_eq!(s.stats().tenants, []);
    assert_eq!(s.take_admissions().len(), 1);
}

/// A spread-out distribution that depends on the sequence so far (so draws differ per
/// sequence and per step), with EOS possible.
fn spread_row(tokens: &[TokenId]) -> Vec<f32> {
    let h = next_token(tokens) as usize;
    (0..VOCAB)
        .map(|v| ((h * 7 + v * 13) % 17) as f32 / 4.0)
        .collect()
}

#[test]
fn rows_read_in_parallel_give_each_sequence_its_own_samplers_tokens() {
    // Sampled (top-p / top-k on the host, temperature only drawn by the "backend" with the
    // uniform the scheduler peeked), greedy-with-logprobs, plain greedy (token from the
    // "backend") and prompt-logprob requests in the same steps; each must get exactly what its
    // own sampler, fed its own rows in order, draws alone.
    let mut p = pool(256, &[(0, quota(0, 256))]);
    let mut s = sched(256, 16, &[]);
    let mut reqs = Vec::new();
    for i in 0..10u32 {
        let prompt: Vec<TokenId> = (0..3 + i % 4).map(|j| (i * 5 + j) % 60).collect();
        let mut r = req(0, prompt, 14);
        r.sampling = SamplingParams {
            temperature: if i % 5 == 4 {
                0.0
            } else {
                0.5 + i as f32 / 10.0
            },
            top_p: if i % 2 == 0 { 0.9 } else { 1.0 },
            top_k: if i % 3 == 0 { 20 } else { 0 },
            seed: Some(1000 + u64::from(i)),
            logprobs: i == 9,
            ..SamplingParams::default()
        };
        if i == 3 {
            r.prompt_logprobs = Some(1);
        }
        s.add(RequestId(i.into()), r.clone(), &p, Instant::now())
            .unwrap();
        reqs.push(r);
    }
    let mut got: HashMap<RequestId, Vec<TokenId>> = HashMap::new();
    let (mut most_rows, mut drawn) = (0, 0);
    let now = Instant::now();
    while !s.is_idle() {
        let st = s.schedule(&mut p, now);
        let _ = p.take_copies();
        most_rows = most_rows.max(st.entries.iter().filter(|e| e.sample && !e.greedy).count());
        drawn += st
            .entries
            .iter()
            .filter(|e| e.sample && e.draw.is_some() && !e.all_logits)
            .count();
        let out = output(&st, |e| {
            let t = s.tokens(e.id);
            if e.all_logits {
                (e.start..e.start + e.len)
                    .flat_map(|pos| spread_row(&t[..=pos]))
                    .collect()
            } else if e.sample {
                spread_row(t)
            } else {
                Vec::new()
            }
        });
        s.update(&st, &out, &mut p);
        p.check_invariants().unwrap();
        for o in s.take_outputs() {
            if let EngineEvent::Token(t) = o.event {
                got.entry(o.id).or_default().push(t.token);
            }
        }
    }
    assert!(most_rows >= 8, "rows of {most_rows} sequences in one step");
    // Requests 1, 5 and 7 (temperature only) had their tokens drawn by the "backend".
    assert!(
        drawn >= 3 * 10,
        "{drawn} tokens drawn where the logits were"
    );
    for (i, r) in reqs.iter().enumerate() {
        let mut sampler = Sampler::new(&r.sampling);
        let mut history = r.prompt.clone();
        let mut want = Vec::new();
        while want.len() < r.stop.max_tokens {
            let t = sampler
                .sample(&spread_row(&history), &history, r.prompt.len())
                .token;
            history.push(t);
            want.push(t);
            if t == EOS {
                break;
            }
        }
        assert_eq!(got[&RequestId(i as u64)], want, "request {i}");
    }
    let distinct: std::collections::HashSet<_> = got.values().collect();
    assert!(distinct.len() >= 8, "the draws differ between sequences");
    assert_eq!(p.stats().used, 0, "blocks leaked");
}
