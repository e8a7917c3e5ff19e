//! Runs one token sequence once per KV policy through the serving path — a [`KvPool`] and the
//! model's paged KV store, chunked prefill then teacher-forced decode — with every policy a
//! separate sequence of the same batched forward, so one pass serves all and every step hands
//! back the logits of all policies for the same positions.

use crate::backend::Backend;
use crate::kv::policy::KvPolicySpec;
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
    /// The most KV bytes the sequence held at once.
    pub peak_kv_bytes: usize,
    /// Tokens run.
    pub tokens: usize,
}

/// Tokens per KV block.
const BLOCK_SIZE: usize = KvPoolConfig::DEFAULT_BLOCK_SIZE;
/// Spare blocks beyond the exact need (copy-on-write never happens here, but a pool with no
/// slack would make a bookkeeping slip look like a capacity error).
const SLACK_BLOCKS: usize = 4;

/// Runs `tokens` through the model once per policy, all policies as separate sequences of ONE
/// batched forward per step (so one pass serves all), through the real serving path: a KvPool
/// and the model's paged KV store, chunked prefill of `chunk` tokens for the first
/// `tokens.len() - decode_tail` positions (LogitsFor::All), then teacher-forced decode one token
/// per step (LogitsFor::All) for the rest. Calls `on_rows(first_pos, rows)` after each step with,
/// per policy, the logits of that step's positions (`n × vocab` f32, same n for every policy).
///
/// The pool is private to the call (one tenant, its quota the whole pool) and every sequence
/// has its own cache scope, so no sequence ever starts from another's cached blocks: every
/// position is computed, under its own policy. Every sequence is freed on every exit path.
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
    let blocks_per_seq = tokens.len().div_ceil(BLOCK_SIZE);
    let num_blocks = blocks_per_seq * policies.len() + SLACK_BLOCKS;
    let mut cfg = KvPoolConfig::new(num_blocks, [0; 32]);
    cfg.block_size = BLOCK_SIZE;
    let mut pool = KvPool::new(cfg)?;
    let tenant = TenantId(0);
    pool.register_tenant(
        tenant,
        TenantQuota {
            reserved_blocks: 0,
            max_blocks: num_blocks,
            cached_floor: 0,
            share_group: None,
        },
    )?;
    let mut store = model.new_kv_store(num_blocks, BLOCK_SIZE);

    let mut seqs: Vec<SeqBlocks> = Vec::with_capacity(policies.len());
    let mut started = Ok(());
    for (i, _policy) in policies.iter().enumerate() {
        // A scope per sequence: identical tokens under different policies must never share.
        let scope = pool.scope(tenant, Some(&format!("eval-policy-{i}")));
        // POLICY: the integration passes `_policy` here (KvPool::start / SeqStep), so that this
        // sequence's blocks are sealed in, and attention reads, that policy's format.
        match pool.start(tenant, &scope, tokens) {
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

fn steps<B: Backend>(
    model: &Llama<B>,
    pool: &mut KvPool,
    store: &mut B::KvStore,
    seqs: &mut [SeqBlocks],
    tokens: &[u32],
    opts: &RunOptions,
    on_rows: &mut impl FnMut(usize, &[&[f32]]),
) -> Result<Vec<PolicyRunStats>> {
    let block_bytes = model.kv_bytes_per_block(BLOCK_SIZE);
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
            .map(|table| SeqStep {
                tokens: &tokens[start..end],
                start_pos: start,
                block_table: table,
                logits: LogitsFor::All,
            })
            .collect();
        let logits = model
            .forward(&batch, store)
            .with_context(|| format!("forward of positions {start}..{end}"))?;
        for (seq, st) in seqs.iter_mut().zip(&mut stats) {
            pool.commit(seq, &tokens[..end])?;
            st.peak_kv_bytes = st.peak_kv_bytes.max(seq.num_blocks() * block_bytes);
            st.tokens = end;
        }
        let rows: Vec<&[f32]> = logits.iter().map(Vec::as_slice).collect();
        on_rows(start, &rows);
        start = end;
    }
    Ok(stats)
}
