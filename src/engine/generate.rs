//! Single-sequence generation: prefill the prompt, then decode token by token with the
//! sampler. The continuous-batching engine replaces this loop for serving; the CLI and the
//! golden tests use it directly.

use super::sampler::{Sampled, Sampler};
use crate::backend::Backend;
use crate::error::RunError;
use crate::model::llama::{Llama, LogitsFor};
use crate::types::{FinishReason, SamplingParams, TokenId};
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
}

/// What a generation produced and how long its two phases took.
#[derive(Debug, Clone)]
pub struct GenerateOutput {
    pub tokens: Vec<Sampled>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_time: Duration,
    /// Time spent producing tokens after the first (one forward pass each).
    pub decode_time: Duration,
}

/// Runs `prompt` through `model` and samples up to `opts.max_tokens` tokens, calling `on_token`
/// for each as soon as it is chosen (the stop token included, so a caller can show or hide it).
pub fn generate<B: Backend>(
    model: &Llama<B>,
    prompt: &[TokenId],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(&Sampled),
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
    // Never generate past the model's context.
    let max_tokens = opts.max_tokens.min(context - prompt.len());
    let mut cache = model.new_cache(prompt.len() + max_tokens);
    let mut sampler = Sampler::new(&opts.sampling);
    let mut history: Vec<TokenId> = prompt.to_vec();
    let mut tokens = Vec::with_capacity(max_tokens);

    let t0 = Instant::now();
    let mut logits = model.forward(prompt, 0, &mut cache, LogitsFor::Last)?;
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
        logits = model.forward(&[tok], history.len() - 1, &mut cache, LogitsFor::Last)?;
    }
    Ok(GenerateOutput {
        tokens,
        finish_reason,
        prompt_tokens: prompt.len(),
        prefill_time,
        decode_time: t1.elapsed(),
    })
}
