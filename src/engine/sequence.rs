//! One request's state inside the scheduler: its tokens, how many have KV computed, its blocks
//! while running, its sampler (RNG stream included, so a preempted seeded request resumes the
//! same stream) and its stop conditions.

use super::fair::WaitKey;
use super::paged::KvClasses;
use super::request::{KvChoice, StopParams, Usage};
use super::sampler::Sampler;
use crate::kv::{CacheScope, SeqBlocks};
use crate::types::{FinishReason, TenantId, TokenId};
use std::time::Instant;

pub(super) struct Sequence {
    pub tenant: TenantId,
    pub scope: CacheScope,
    pub key: WaitKey,
    pub arrived: Instant,
    /// Prompt followed by the generated tokens.
    pub tokens: Vec<TokenId>,
    pub prompt_len: usize,
    /// `stop.max_tokens` clamped to the model's context.
    pub max_tokens: usize,
    pub stop: StopParams,
    pub sampler: Sampler,
    /// `Some` exactly while running.
    pub blocks: Option<SeqBlocks>,
    /// Tokens whose KV is in `blocks` (0 while waiting).
    pub computed: usize,
    /// Prefix-cache hit at the first admission; `None` until then (never admitted).
    pub cached_tokens: Option<usize>,
    pub preemptions: u32,
    /// Top alternatives to report with prompt logprobs; `None` when not asked for.
    pub prompt_logprobs: Option<usize>,
    /// Prompt logprobs so far: entry `i` scores `tokens[i + 1]` (kept across preemptions).
    pub prompt_lps: Vec<super::sampler::Sampled>,
    /// The KV policy it runs under and the fallbacks left to try.
    pub kv: KvChoice,
    /// Admitted under a fallback.
    pub kv_fallback: bool,
}

impl Sequence {
    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Tokens still to compute before the next sample.
    pub fn uncomputed(&self) -> usize {
        self.tokens.len() - self.computed
    }

    pub fn is_prefilling(&self) -> bool {
        self.computed < self.prompt_len
    }

    /// Whether the last generated token ends the sequence, and why.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        let last = *self.tokens.last()?;
        let generated = self.generated();
        if generated == 0 {
            return None;
        }
        if !self.stop.ignore_eos
            && generated > self.stop.min_tokens
            && self.stop.stop_ids.contains(&last)
        {
            return Some(FinishReason::Stop);
        }
        (generated >= self.max_tokens).then_some(FinishReason::Length)
    }

    /// The stop ids to mask for the next sample: all of them until `min_tokens` are generated.
    pub fn banned(&self) -> &[TokenId] {
        if self.generated() < self.stop.min_tokens {
            &self.stop.stop_ids
        } else {
            &[]
        }
    }

    /// Prompt logprobs still to compute: the prefix lookup must stop before them, and steps
    /// over them need every row's logits.
    pub fn wants_prompt_logits(&self) -> bool {
        self.prompt_logprobs.is_some() && self.prompt_lps.len() + 1 < self.prompt_len
    }

    /// The tokens whose cached blocks may be reused: all of them, except that prompt positions
    /// whose logprobs are still missing must be computed.
    pub fn cache_lookup(&self) -> &[TokenId] {
        if self.wants_prompt_logits() {
            &self.tokens[..self.prompt_lps.len() + 1]
        } else {
            &self.tokens
        }
    }

    pub fn usage(&self, classes: &KvClasses) -> Usage {
        let tokens = self.tokens.len();
        Usage {
            prompt_tokens: self.prompt_len,
            cached_tokens: self.cached_tokens.unwrap_or(0),
            completion_tokens: self.generated(),
            kv_policy: self.kv.policy,
            kv_fallback: self.kv_fallback,
            kv_bytes: classes.bytes(&self.kv.policy, tokens),
            kv_bytes_bf16: classes.bytes(
                &crate::kv::policy::KvPolicy::format(crate::kv::codec::Codec::Bf16),
                tokens,
            ),
        }
    }
}
