//! Single-sequence generation through the paged KV pool: look up the cached prefix, prefill the
//! rest of the prompt, then decode token by token with the sampler. The continuous-batching
//! engine replaces this loop for serving; the CLI and the tests use it directly.

use super::paged::PagedKv;
use super::sampler::{Sampled, Sampler};
use crate::backend::Backend;
use crate::config::{KvSection, TenantConfig};
use crate::error::RunError;
use crate::kv::policy::KvPolicy;
use crate::kv::{Alloc, CacheScope, SeqBlocks};
use crate::model::llama::{Llama, LogitsFor, SeqStep};
use crate::types::{FinishReason, SamplingParams, TenantId, TokenId};
use std::time::{Duration, Instant};

/// Limits and stop conditions of one generation.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    /// Tokens that end generation (the model's EOS ids plus any extra stop ids).
    pub stop_ids: Vec<TokenId>,
    /// Keep going past stop ids.
    pub ignore_eos: bool,
    pub sampling: SamplingParams,
    /// How the sequence's KV is kept ([`KvPolicy::EXACT`] unless a tool asks otherwise).
    pub kv_policy: KvPolicy,
}

/// What a generation produced and how long its two phases took.
#[derive(Debug, Clone)]
pub struct GenerateOutput {
    pub tokens: Vec<Sampled>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens served from the prefix cache (not computed).
    pub cached_tokens: usize,
    pub prefill_time: Duration,
    /// Time spent producing tokens after the first (one forward pass each).
    pub decode_time: Duration,
}

/// Generates with a private pool just big enough for this request (one tenant, no sharing).
pub fn generate<B: Backend>(
    model: &Llama<B>,
    prompt: &[TokenId],
    opts: &GenerateOptions,
    on_token: impl FnMut(&Sampled),
) -> Result<GenerateOutput, RunError> {
    let kv_cfg = KvSection::default();
    let context = model.config().max_position_embeddings;
    let tokens = (prompt.len() + opts.max_tokens).min(context).max(1);
    let blocks = tokens.div_ceil(kv_cfg.block_size);
    let tenants = [TenantConfig::default()];
    let mut kv = PagedKv::with_blocks(model, &kv_cfg, &tenants, blocks)
        .map_err(|e| RunError::Invalid(e.to_string()))?;
    let tenant = TenantId(0);
    let scope = kv.pool.scope(tenant, None);
    generate_paged(model, &mut kv, tenant, &scope, prompt, opts, on_token)
}

/// Runs `prompt` for `tenant` through the shared pool `kv` and samples up to `opts.max_tokens`
/// tokens, calling `on_token` for each as soon as it is chosen (the stop token included, so a
/// caller can show or hide it). The sequence's blocks are freed (full ones stay cached) on
/// every exit path.
pub fn generate_paged<B: Backend>(
    model: &Llama<B>,
    kv: &mut PagedKv<B>,
    tenant: TenantId,
    scope: &CacheScope,
    prompt: &[TokenId],
    opts: &GenerateOptions,
    on_token: impl FnMut(&Sampled),
) -> Result<GenerateOutput, RunError> {
    if prompt.is_empty() {
        return Err(RunError::Invalid("the prompt is empty".into()));
    }
    let context = model.config().max_position_embeddings;
    if prompt.len() >= context {
        return Err(RunError::ContextLength {
            needed: prompt.len() + 1,
            max: context,
        });
    }
    let (mut seq, cached) = kv
        .pool
        .start_as(tenant, scope, prompt, kv.classes.class(&opts.kv_policy))
        .map_err(|e| RunError::Invalid(e.to_string()))?;
    let result = run(model, kv, &mut seq, cached, prompt, opts, on_token);
    kv.pool.free(seq);
    result
}

/// Grows the sequence's blocks to `total` tokens, performs queued copies and returns its table.
fn reserve<B: Backend>(
    model: &Llama<B>,
    kv: &mut PagedKv<B>,
    seq: &mut SeqBlocks,
    total: usize,
) -> Result<Vec<u32>, RunError> {
    match kv.pool.reserve(seq, total) {
        Alloc::Granted => {}
        Alloc::NotNow => return Err(RunError::KvFull { tokens: total }),
        Alloc::Never => return Err(RunError::KvNeverFits { tokens: total }),
    }
    kv.sync_store(model.backend());
    Ok(kv.pool.block_table(seq))
}

fn run<B: Backend>(
    model: &Llama<B>,
    kv: &mut PagedKv<B>,
    seq: &mut SeqBlocks,
    cached: usize,
    prompt: &[TokenId],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(&Sampled),
) -> Result<GenerateOutput, RunError> {
    let context = model.config().max_position_embeddings;
    // Never generate past the model's context.
    let max_tokens = opts.max_tokens.min(context - prompt.len());
    let mut sampler = Sampler::new(&opts.sampling);
    let mut history: Vec<TokenId> = prompt.to_vec();
    let mut tokens = Vec::with_capacity(max_tokens);

    let step = |kv: &mut PagedKv<B>,
                seq: &mut SeqBlocks,
                history: &[TokenId],
                start: usize|
     -> Result<Vec<f32>, RunError> {
        let table = reserve(model, kv, seq, history.len())?;
        let step = SeqStep {
            tokens: &history[start..],
            start_pos: start,
            block_table: &table,
            logits: LogitsFor::Last,
            policy: opts.kv_policy,
        };
        let logits = model.forward(&[step], &mut kv.store)?.swap_remove(0);
        kv.pool
            .commit(seq, history)
            .map_err(|e| RunError::Invalid(e.to_string()))?;
        Ok(logits)
    };

    let t0 = Instant::now();
    let mut logits = step(kv, seq, prompt, cached)?;
    let prefill_time = t0.elapsed();
    let t1 = Instant::now();
    let mut finish_reason = FinishReason::Length;
    while tokens.len() < max_tokens {
        let s = sampler.sample(&logits, &history, prompt.len());
        on_token(&s);
        let tok = s.token;
        tokens.push(s);
        history.push(tok);
        if !opts.ignore_eos && opts.stop_ids.contains(&tok) {
            finish_reason = FinishReason::Stop;
            break;
        }
        if tokens.len() == max_tokens {
            break;
        }
        logits = step(kv, seq, &history, history.len() - 1)?;
    }
    Ok(GenerateOutput {
        tokens,
        finish_reason,
        prompt_tokens: prompt.len(),
        cached_tokens: cached,
        prefill_time,
        decode_time: t1.elapsed(),
    })
}
