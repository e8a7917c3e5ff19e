//! Greedy token streams through the engine on both backends (the scheduler, the paged pool
//! and the device's argmax on top of the forward pass), and the device store's handling of the
//! blocks the pool frees: their slots given back and sparsely used chunks compacted.

use super::model::{Pair, BS};
use super::{measure, Row};
use anyhow::Result;
use kvserve::backend::codec::Codec;
use kvserve::backend::cpu::CpuBackend;
use kvserve::backend::cuda::parity::max_rel_err;
use kvserve::backend::kv_policy::KvPolicy;
use kvserve::backend::Backend;
use kvserve::config::EngineSection;
use kvserve::engine::request::KvChoice;
use kvserve::engine::{Engine, EngineEvent, EngineRequest, StopParams};
use kvserve::model::llama::{Llama, LogitsFor, SeqStep};
use kvserve::types::{SamplingParams, TenantId};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

/// The KV pool (in exact blocks) and the step size of a [`generate`] run.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub blocks: usize,
    pub max_batched_tokens: usize,
}

impl Limits {
    /// Room for every sequence at once, and the engine's default step.
    pub fn roomy(prompts: &[Vec<u32>], max_tokens: usize) -> Self {
        let tokens: usize = prompts.iter().map(|p| p.len() + max_tokens).sum();
        Limits {
            blocks: tokens.div_ceil(BS) + prompts.len() + 16,
            max_batched_tokens: EngineSection::default().max_batched_tokens,
        }
    }

    /// Room for the longest sequence (exact, with 2 blocks to spare) and no more, in steps of
    /// 32 tokens: sequences wait and are preempted, finished ones' cached blocks are evicted
    /// and their ids handed out again, so the store frees and reuses memory as it serves.
    pub fn tight(prompts: &[Vec<u32>], max_tokens: usize) -> Self {
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0) + max_tokens;
        Limits {
            blocks: longest.div_ceil(BS) + 2,
            max_batched_tokens: 32,
        }
    }
}

/// Greedy generation of `max_tokens` for each prompt through the engine (the scheduler, the
/// paged pool and the backend's argmax) under `policy`; the token streams in prompt order.
pub fn generate<B>(
    model: Arc<Llama<B>>,
    prompts: &[Vec<u32>],
    max_tokens: usize,
    policy: KvPolicy,
    limits: Limits,
) -> Result<Vec<Vec<u32>>>
where
    B: Backend + 'static,
    Llama<B>: Send + Sync,
    B::KvStore: Send,
{
    let blocks = limits.blocks;
    let cfg = EngineSection {
        max_running: prompts.len(),
        max_batched_tokens: limits.max_batched_tokens,
        ..EngineSection::default()
    };
    let engine = Engine::single_tenant(model, blocks, &cfg)?;
    let h = engine.handle();
    let mut subs = Vec::new();
    for p in prompts {
        subs.push(h.submit(EngineRequest {
            kv: KvChoice::only(policy),
            tenant: TenantId(0),
            cache_salt: None,
            prompt: p.clone(),
            sampling: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            stop: StopParams {
                max_tokens,
                ignore_eos: true,
                ..StopParams::default()
            },
            priority: 0,
            prompt_logprobs: None,
        })?);
    }
    let mut streams = Vec::new();
    for mut s in subs {
        let mut toks = Vec::new();
        while let Some(ev) = s.events.blocking_recv() {
            match ev {
                EngineEvent::Token(t) => toks.push(t.token),
                EngineEvent::Error(e) => anyhow::bail!("engine: {e}"),
                _ => {}
            }
        }
        streams.push(toks);
    }
    Ok(streams)
}

/// Streams equal throughout, and the mean length of the common start, of `a` against `b`.
pub fn agreement(a: &[Vec<u32>], b: &[Vec<u32>]) -> (usize, f64) {
    let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
    let prefix: usize = a
        .iter()
        .zip(b)
        .map(|(x, y)| x.iter().zip(y).take_while(|(p, q)| p == q).count())
        .sum();
    (same, prefix as f64 / a.len().max(1) as f64)
}

/// Greedy streams of 48 tokens from each prompt on both backends: `bf16` and `kivi4` with room
/// for all, and `kivi4` under a window on a pool with room for one sequence. One row each.
pub fn compare<B>(
    cpu: &Arc<Llama<CpuBackend>>,
    dev: &Arc<Llama<B>>,
    prompts: &[Vec<u32>],
    label: &str,
    what: &str,
    rows: &mut Vec<Row>,
) -> Result<()>
where
    B: Backend + 'static,
    Llama<B>: Send + Sync,
    B::KvStore: Send,
{
    let roomy = Limits::roomy(prompts, 48);
    let tight = Limits::tight(prompts, 48);
    // Under a window the pool frees blocks as sequences grow, so the store's slabs get holes.
    let windowed = KvPolicy {
        window: Some(64),
        ..KvPolicy::format(Codec::Kivi4)
    };
    for (policy, limits, how) in [
        (KvPolicy::format(Codec::Bf16), roomy, ""),
        (KvPolicy::format(Codec::Kivi4), roomy, ""),
        (windowed, tight, ", tight pool"),
    ] {
        let want = generate::<CpuBackend>(cpu.clone(), prompts, 48, policy, limits)?;
        let got = generate(dev.clone(), prompts, 48, policy, limits)?;
        let (same, prefix) = agreement(&got, &want);
        rows.push(measure(
            &format!("{label} engine greedy streams, {policy}{how}"),
            same as f64,
            "of 4 equal",
            &format!(
                "{what}; 48 tokens each; mean common start {prefix:.1} tokens; pool of {} exact blocks, steps of {} tokens",
                limits.blocks, limits.max_batched_tokens
            ),
        ));
    }
    Ok(())
}

/// The store after the pool frees blocks, against the CPU: 16 one-block prompts sealed as
/// `kivi4` in one step, the even ones' blocks forgotten ([`Backend::forget_blocks`], as the
/// engine does when the pool frees them), then a decode step of the odd ones. On the device
/// the survivors sit one per chunk when a chunk holds two blocks (`--kv-chunk-bytes`), so the
/// slab is compacted before they are read. The same steps on a second device store that
/// forgets nothing give the reference the device must match bit for bit: forgetting and
/// compaction move blocks, they change no value. Returns the worst logits error against the
/// CPU and against that reference.
pub fn compaction_parity<B: Backend>(pair: &Pair<B>) -> Result<(f64, f64)> {
    const SEQS: usize = 16;
    let policy = KvPolicy::format(Codec::Kivi4);
    let rng = &mut ChaCha8Rng::seed_from_u64(11);
    let vocab = pair.cpu.config().vocab_size as u32;
    let prompts: Vec<Vec<u32>> = (0..SEQS)
        .map(|_| (0..BS).map(|_| rng.random_range(0..vocab)).collect())
        .collect();
    let tables: Vec<[u32; 2]> = (0..SEQS as u32).map(|i| [i, SEQS as u32 + i]).collect();
    let mut kc = pair.cpu.new_kv_store(2 * SEQS, BS);
    let mut kd = pair.dev.new_kv_store(2 * SEQS, BS);
    let mut kr = pair.dev.new_kv_store(2 * SEQS, BS);
    let step = |i: usize, tokens: &'static [u32], start_pos, logits| SeqStep {
        tokens,
        start_pos,
        block_table: &tables[i][..1 + start_pos / BS],
        logits,
        policy,
    };
    let prefill: Vec<SeqStep<'_>> = (0..SEQS)
        .map(|i| SeqStep {
            tokens: &prompts[i],
            ..step(i, &[], 0, LogitsFor::None)
        })
        .collect();
    pair.cpu.forward_step(&prefill, &mut kc)?;
    pair.dev.forward_step(&prefill, &mut kd)?;
    pair.dev.forward_step(&prefill, &mut kr)?;
    let gone: Vec<u32> = (0..SEQS as u32).step_by(2).collect();
    pair.cpu.backend().forget_blocks(&mut kc, &gone);
    pair.dev.backend().forget_blocks(&mut kd, &gone);
    let decode: Vec<SeqStep<'_>> = (1..SEQS)
        .step_by(2)
        .map(|i| step(i, &[1], BS, LogitsFor::Last))
        .collect();
    let want = pair.cpu.forward_step(&decode, &mut kc)?;
    let got = pair.dev.forward_step(&decode, &mut kd)?;
    let kept = pair.dev.forward_step(&decode, &mut kr)?;
    let worst = |of: &dyn Fn(usize) -> f64| (0..decode.len()).map(of).fold(0.0, f64::max);
    Ok((
        worst(&|s| max_rel_err(got.logits(s), want.logits(s))),
        worst(&|s| max_rel_err(got.logits(s), kept.logits(s))),
    ))
}
