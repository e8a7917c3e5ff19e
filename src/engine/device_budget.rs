//! The KV pool's size on a device with memory of its own (a GPU). The host's rule (a share of
//! `MemAvailable`, `KvSection::resolved_cache_bytes`) means nothing there: the pool has to fit
//! in what the weights, the driver's context and a step's working memory leave, and a pool
//! sized past it fails its requests with out-of-memory errors mid-serving instead of refusing
//! to start. As vLLM does (`gpu_memory_utilization`, default 0.9), the working memory is
//! measured, not guessed: after the weights are loaded the largest steps the engine can
//! schedule run on a throwaway store (a prompt chunk of `max_batched_tokens` tokens asking for
//! every row's logits, then `max_running` one-token rows). The backend's memory pool keeps
//! what they took, so the memory still free after them is what the KV pool may have, less the
//! share `1 − gpu_memory_utilization` of the device kept free as headroom and the store's
//! allocation slack.

use crate::backend::Backend;
use crate::config::{ConfigError, EngineSection, KvSection};
use crate::kv::policy::KvPolicy;
use crate::model::llama::{Llama, LogitsFor, SeqStep};

/// How the KV pool's bytes were found on a device (all in bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceBudget {
    /// The device's memory.
    pub total: u64,
    /// Free after the weights were loaded, before the measuring steps.
    pub free_before: u64,
    /// What the measuring steps took and the memory pool kept: activations, scratch, the
    /// throwaway store.
    pub working: u64,
    /// Set aside for the store's allocation granularity and the sealed copies a step makes of
    /// the blocks it fills.
    pub slack: u64,
    /// Kept free: `(1 − gpu_memory_utilization) × total` (0 when `kv.cache_bytes` is given).
    pub headroom: u64,
    /// The KV pool.
    pub kv_bytes: u64,
}

/// The KV pool's bytes for `model`'s backend when it computes on a device of its own; `None`
/// for host memory (then `KvSection::resolved_cache_bytes` applies). An explicit
/// `kv.cache_bytes` is checked against what is free; 0 takes what the headroom leaves. Either
/// way a pool that cannot fit is an error that says what to change.
pub fn device_budget<B: Backend>(
    model: &Llama<B>,
    kv: &KvSection,
    engine: &EngineSection,
) -> Result<Option<DeviceBudget>, ConfigError> {
    let be = model.backend();
    let Some(before) = be.device_memory() else {
        return Ok(None);
    };
    let step_blocks = run_largest_steps(model, kv.block_size, engine)?;
    let after = be.device_memory().unwrap_or(before);
    let cfg = model.config();
    let exact = model.kv_bytes_per_block(kv.block_size) as u64;
    let slack = be.kv_store_slack(cfg.num_layers, kv.block_size, model.attn_shape()) as u64
        + step_blocks as u64 * exact;
    let mut b = DeviceBudget {
        total: before.total,
        free_before: before.free,
        working: before.free.saturating_sub(after.free),
        slack,
        headroom: 0,
        kv_bytes: 0,
    };
    let usable = after.free.saturating_sub(slack);
    let gib = |x: u64| x as f64 / (1u64 << 30) as f64;
    if kv.cache_bytes > 0 {
        if kv.cache_bytes > usable {
            return Err(ConfigError::Invalid(format!(
                "kv.cache_bytes = {} ({:.2} GiB) does not fit on the device: {:.2} GiB of \
                 {:.2} GiB are free after the weights and a step's working memory ({:.2} GiB, \
                 engine.max_batched_tokens = {}, max_running = {}), less {:.2} GiB set aside \
                 for the store's chunks; lower it, or give 0 to size the pool to the device",
                kv.cache_bytes,
                gib(kv.cache_bytes),
                gib(after.free),
                gib(b.total),
                gib(b.working),
                engine.max_batched_tokens,
                engine.max_running,
                gib(slack),
            )));
        }
        b.kv_bytes = kv.cache_bytes;
        return Ok(Some(b));
    }
    b.headroom = ((1.0 - kv.gpu_memory_utilization) * b.total as f64) as u64;
    b.kv_bytes = usable.saturating_sub(b.headroom);
    if b.kv_bytes < exact {
        return Err(ConfigError::Invalid(format!(
            "no device memory left for the KV cache: {:.2} GiB of {:.2} GiB are free after the \
             weights and a step's working memory ({:.2} GiB, engine.max_batched_tokens = {}, \
             max_running = {}), and kv.gpu_memory_utilization = {} keeps {:.2} GiB free; raise \
             it, or lower max_batched_tokens or max_running",
            gib(after.free),
            gib(b.total),
            gib(b.working),
            engine.max_batched_tokens,
            engine.max_running,
            kv.gpu_memory_utilization,
            gib(b.headroom),
        )));
    }
    Ok(Some(b))
}

/// Runs the largest steps `engine` allows on a throwaway store: one prompt chunk of
/// `max_batched_tokens` tokens with every row's logits (prompt logprobs), then
/// `min(max_running, max_batched_tokens)` sequences of one token. Returns the blocks the
/// larger step fills (a step may hold that many exact copies beside their sealed ones).
fn run_largest_steps<B: Backend>(
    model: &Llama<B>,
    block_size: usize,
    engine: &EngineSection,
) -> Result<usize, ConfigError> {
    let tokens = engine.max_batched_tokens;
    let rows = engine.max_running.min(tokens);
    let chunk_blocks = tokens.div_ceil(block_size);
    let mut store = model.new_kv_store(chunk_blocks + rows, block_size);
    let prompt = vec![0u32; tokens];
    let table: Vec<u32> = (0..chunk_blocks as u32).collect();
    let one = |tokens, block_table, logits| SeqStep {
        tokens,
        start_pos: 0,
        block_table,
        logits,
        policy: KvPolicy::EXACT,
    };
    let tables: Vec<[u32; 1]> = (0..rows).map(|i| [(chunk_blocks + i) as u32]).collect();
    let decode: Vec<SeqStep<'_>> = tables
        .iter()
        .map(|t| one(&prompt[..1], &t[..], LogitsFor::Last))
        .collect();
    let batches = [vec![one(&prompt, &table, LogitsFor::All)], decode];
    for batch in &batches {
        // Device ops panic on device errors (an allocation that does not fit): say which
        // setting asked for too much instead of unwinding out of start.
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            model.forward_step(batch, &mut store).map(drop)
        }));
        let err = match run {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e.to_string(),
            Err(p) => p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".into()),
        };
        return Err(ConfigError::Invalid(format!(
            "a step of engine.max_batched_tokens = {tokens} tokens (max_running = {}) does not \
             run on the device: {err}",
            engine.max_running
        )));
    }
    Ok(chunk_blocks.max(rows))
}

/// What a [`DeviceBudget`] says, for the start-up log.
pub fn describe(b: &DeviceBudget) -> String {
    let gib = |x: u64| x as f64 / (1u64 << 30) as f64;
    format!(
        "KV pool {:.2} GiB of the device's {:.2} GiB ({:.2} GiB free after the weights, a \
         step's working memory {:.2} GiB, {:.2} GiB kept free, {:.2} GiB set aside for the \
         store's chunks)",
        gib(b.kv_bytes),
        gib(b.total),
        gib(b.free_before),
        gib(b.working),
        gib(b.headroom),
        gib(b.slack),
    )
}
