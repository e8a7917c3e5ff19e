//! Runs one token sequence once per KV policy through the serving path — a [`KvPool`] and the
//! model's paged KV store, chunked prefill then teacher-forced decode — with every policy a
//! separate sequence of the same batched forward, so one pass serves all and every step hands
//! back the logits of all policies for the same positions.

use crate::backend::Backend;
use crate::engine::paged::KvClasses;
use crate::kv::policy::{KvPolicy, KvPolicySpec};
use crate::kv::{Alloc, KvPool, KvPoolConfig, SeqBlocks, TenantQuota};
use crate::model::llama::{Llama, LogitsFor, SeqStep};
use crate::types::TenantId;
use anyhow::{bail, Context, Result};

/// How the sequence is fed: prompt chunks, then one token per step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunOptions {
    /// Tokens per prefill step.
    pub chunk: usize,
    /// Trailing tokens fed one per step, as decode would (the rest is chunked prefill).
    pub decode_tail: usize,
}

/// What one policy's sequence used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyRunStats {
    /// The most KV bytes the sequence held between steps (full blocks sealed in its policy's
    /// format, the tail block exact; a window's dropped blocks gone).
    pub peak_kv_bytes: usize,
    /// Tokens run.
    pub tokens: usize,
}

/// Tokens per KV block.
pub const BLOCK_SIZE: usize = KvPoolConfig::DEFAULT_BLOCK_SIZE;
/// Spare blocks beyond the need (copy-on-write never happens here, but a pool with no slack
/// would make a bookkeeping slip look like a capacity error).
const SLACK_BLOCKS: usize = 4;

/// Runs `tokens` through the model once per policy, all policies as separate sequences of ONE
/// batched forward per step (so one pass serves all), through the real serving path: a KvPool
/// and the model's paged KV store, chunked prefill of `chunk` tokens for the first
/// `tokens.len() - decode_tail` positions (LogitsFor::All), then teacher-forced decode one token
/// per step (LogitsFor::All) for the rest. Calls `on_rows(first_pos, rows)` after each step with,
/// per policy, the logits of that step's positions (`n × vocab` f32, same n for every policy).
///
/// The pool is private to the call: one mixed pool charged in bytes, one tenant per policy (so
/// each policy's bytes are its tenant's), every sequence in its own cache scope, so no sequence
/// ever starts from another's cached blocks: every position is computed, under its own policy,
/// its blocks sealed into that policy's format as they fill. Every sequence is freed on every
/// exit path.
pub fn run_lockstep<B: Backend>(
    model: &Llama<B>,
    tokens: &[u32],
    policies: &[KvPolicySpec],
    opts: &RunOptions,
    mut on_rows: impl FnMut(usize, &[&[f32]]),
) -> Result<Vec<PolicyRunStats>> {
    if tokens.is_empty() || policies.is_empty() {
        bail!(
            "nothing to run: {} tokens, {} policies",
            tokens.len(),
            policies.len()
        );
    }
    if opts.chunk == 0 {
        bail!("the prefill chunk must be at least one token");
    }
    let resolved: Vec<KvPolicy> = policies
        .iter()
        .map(|p| p.resolve().map_err(anyhow::Error::msg))
        .collect::<Result<_>>()?;
    if let Some(p) = resolved.iter().find(|p| !model.serves_policy(p)) {
        bail!(
            "KV policy `{p}` is not served by this model on the {} backend{}",
            model.backend().name(),
            if p.codec.and_then(|c| c.latent_rank()).is_some() {
                " (`mhc:R` needs `--kv-calibration FILE` of rank R, from `kvserve calibrate`)"
            } else {
                ""
            }
        );
    }
    let classes = KvClasses::for_model(model, BLOCK_SIZE);
    // Room for every block of every sequence at its filling (heaviest) weight.
    let blocks_per_seq = tokens.len().div_ceil(BLOCK_SIZE);
    let per_seq = (blocks_per_seq + SLACK_BLOCKS) * model.kv_bytes_per_block(BLOCK_SIZE);
    let capacity = per_seq * policies.len();
    let num_ids = capacity / classes.lightest() + 1;
    let mut cfg = KvPoolConfig::new(num_ids, [0; 32]);
    cfg.capacity = capacity;
    cfg.block_size = BLOCK_SIZE;
    let mut pool = KvPool::new(cfg)?;
    for i in 0..policies.len() {
        pool.register_tenant(
            TenantId(i as u32),
            TenantQuota {
                reserved_blocks: per_seq,
                max_blocks: per_seq,
                cached_floor: 0,
                share_group: None,
            },
        )?;
    }
    let mut store = model.new_kv_store(num_ids, BLOCK_SIZE);

    let mut seqs: Vec<SeqBlocks> = Vec::with_capacity(policies.len());
    let mut started = Ok(());
    for (i, policy) in resolved.iter().enumerate() {
        let tenant = TenantId(i as u32);
        // A scope per sequence: identical tokens under different policies must never share.
        let scope = pool.scope(tenant, Some(&format!("eval-policy-{i}")));
        match pool.start_as(tenant, &scope, tokens, classes.class(policy)) {
            Ok((seq, 0)) => seqs.push(seq),
            Ok((seq, cached)) => {
                seqs.push(seq);
                started = Err(anyhow::anyhow!(
                    "sequence {i} started from {cached} cached tokens in a fresh pool"
                ));
                break;
            }
            Err(e) => {
                started = Err(e.into());
                break;
            }
        }
    }
    let result = started.and_then(|()| {
        steps(
            model,
            &mut pool,
            &mut store,
            &mut seqs,
            &resolved,
            tokens,
            opts,
            &mut on_rows,
        )
    });
    for seq in seqs {
        pool.free(seq);
    }
    result
}

#[allow(clippy::too_many_arguments)]
fn steps<B: Backend>(
    model: &Llama<B>,
    pool: &mut KvPool,
    store: &mut B::KvStore,
    seqs: &mut [SeqBlocks],
    policies: &[KvPolicy],
    tokens: &[u32],
    opts: &RunOptions,
    on_rows: &mut impl FnMut(usize, &[&[f32]]),
) -> Result<Vec<PolicyRunStats>> {
    let prefill_end = tokens.len() - opts.decode_tail.min(tokens.len());
    let mut stats = vec![PolicyRunStats::default(); seqs.len()];
    let mut start = 0;
    while start < tokens.len() {
        let end = if start < prefill_end {
            (start + opts.chunk).min(prefill_end)
        } else {
            start + 1
        };
        let mut tables = Vec::with_capacity(seqs.len());
        for seq in seqs.iter_mut() {
            match pool.reserve(seq, end) {
                Alloc::Granted => {}
                other => bail!("the eval pool refused {end} tokens ({other:?})"),
            }
            tables.push(pool.block_table(seq));
        }
        // Fresh sequences share nothing, so there is nothing to copy; keep the serving
        // path's contract anyway.
        let copies = pool.take_copies();
        if !copies.is_empty() {
            model.backend().copy_blocks(store, &copies);
        }
        let batch: Vec<SeqStep<'_>> = tables
            .iter()
            .zip(policies)
            .map(|(table, &policy)| SeqStep {
                tokens: &tokens[start..end],
                start_pos: start,
                block_table: table,
                logits: LogitsFor::All,
                policy,
            })
            .collect();
        let logits = model
            .forward(&batch, store)
            .with_context(|| format!("forward of positions {start}..{end}"))?;
        for (seq, st) in seqs.iter_mut().zip(&mut stats) {
            pool.commit(seq, &tokens[..end])?;
            st.tokens = end;
        }
        let kv = pool.stats();
        for (i, st) in stats.iter_mut().enumerate() {
            let held = kv
                .tenants
                .iter()
                .find(|(t, _)| t.0 as usize == i)
                .map_or(0, |(_, s)| s.used);
            st.peak_kv_bytes = st.peak_kv_bytes.max(held);
        }
        let rows: Vec<&[f32]> = logits.iter().map(Vec::as_slice).collect();
        on_rows(start, &rows);
        start = end;
    }
    Ok(stats)
}
