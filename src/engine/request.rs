//! What crosses the engine's boundary: a validated request going in, events coming out.
//! Tokens only: the HTTP layer owns text, stop strings and JSON.

use super::sampler::Sampled;
use crate::kv::policy::KvPolicy;
use crate::types::{FinishReason, SamplingParams, TenantId, TokenId};

/// A request as the engine takes it: already tokenized, validated and bound to its tenant.
#[derive(Debug, Clone)]
pub struct EngineRequest {
    /// The authenticated tenant (never taken from the client).
    pub tenant: TenantId,
    /// The client's `cache_salt` / `prompt_cache_key`: only subdivides the tenant's cache scope.
    pub cache_salt: Option<String>,
    pub prompt: Vec<TokenId>,
    pub sampling: SamplingParams,
    pub stop: StopParams,
    /// Orders requests within a tenant: lower values are admitted first (vLLM's convention);
    /// ties go to the earlier arrival. Never orders across tenants (that is fair share).
    pub priority: i32,
    /// `Some(k)`: report the logprob of every prompt token after the first (and its top `k`
    /// alternatives) in one [`EngineEvent::PromptLogprobs`] before the first token. Such a
    /// request computes its whole prompt (no prefix-cache hits: the cached blocks have no
    /// logits).
    pub prompt_logprobs: Option<usize>,
    /// How the request's KV is kept (resolved by the caller from the tenant's default and the
    /// request's `kv_policy`).
    pub kv: KvChoice,
}

/// The KV policy a request runs under, and what it may fall back to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvChoice {
    pub policy: KvPolicy,
    /// Tried in order when the request does not fit under `policy` right now (it would wait)
    /// or ever: the first that fits admits it instead (reported in its `usage`).
    pub fallbacks: Vec<KvPolicy>,
}

impl KvChoice {
    pub fn only(policy: KvPolicy) -> Self {
        Self {
            policy,
            fallbacks: Vec::new(),
        }
    }
}

impl Default for KvChoice {
    /// Exact f32 KV: tools and tests that do not choose.
    fn default() -> Self {
        Self::only(KvPolicy::EXACT)
    }
}

/// When a sequence stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopParams {
    /// Tokens to generate at most (clamped to what the model's context leaves).
    pub max_tokens: usize,
    /// Stop ids cannot be drawn before this many tokens (they are masked for sampling).
    pub min_tokens: usize,
    /// Token ids that end the sequence: the model's EOS ids plus the request's `stop_token_ids`.
    pub stop_ids: Vec<TokenId>,
    /// Generate past stop ids (benchmarks).
    pub ignore_eos: bool,
}

impl Default for StopParams {
    fn default() -> Self {
        Self {
            max_tokens: 16,
            min_tokens: 0,
            stop_ids: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// Token accounting of a finished request (OpenAI's `usage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Prompt tokens served from the prefix cache at the request's first admission.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    /// The KV policy the request ran under (a fallback if it was admitted under one).
    pub kv_policy: KvPolicy,
    /// Whether `kv_policy` is a fallback rather than the policy asked for.
    pub kv_fallback: bool,
    /// Bytes the request's KV took at its end (sealed blocks + the exact tail block).
    pub kv_bytes: usize,
    /// What the same tokens take under `bf16`.
    pub kv_bytes_bf16: usize,
}

impl Default for Usage {
    fn default() -> Self {
        Self {
            prompt_tokens: 0,
            cached_tokens: 0,
            completion_tokens: 0,
            kv_policy: KvPolicy::EXACT,
            kv_fallback: false,
            kv_bytes: 0,
            kv_bytes_bf16: 0,
        }
    }
}

/// What the engine sends back for one request, in order: any number of `Token`s, then exactly
/// one `Finished` or `Error`.
#[derive(Debug, Clone)]
pub enum EngineEvent {
    /// Entry `i` scores prompt token `i + 1` (the first token has no logprob); sent once, before
    /// the first `Token`, only when the request asked for it.
    PromptLogprobs(Vec<Sampled>),
    Token(Sampled),
    Finished {
        reason: FinishReason,
        usage: Usage,
        /// Times this request was preempted (its KV recomputed).
        preemptions: u32,
    },
    Error(EngineError),
}

/// Why the engine refused or failed a request. The HTTP layer maps each to a status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The waiting queue is full (503 with `Retry-After`).
    #[error("the server is overloaded: {0}")]
    Overloaded(String),
    /// The request waited longer than `max_queue_ms` for admission.
    #[error("the request waited {waited_ms} ms in the queue without being admitted")]
    QueueTimeout { waited_ms: u64 },
    #[error("this model's maximum context length is {max} tokens, the request needs {needed}")]
    ContextLength { needed: usize, max: usize },
    /// The sequence can never fit in its tenant's share of the KV pool.
    #[error("the request needs {tokens} tokens of KV cache, more than this tenant may ever hold")]
    KvQuota { tokens: usize },
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The engine is gone (shut down or crashed).
    #[error("the engine is not running")]
    Shutdown,
    /// A failure inside the forward pass; the cause is logged, not shown.
    #[error("internal error")]
    Internal,
    /// The engine stopped for good: its device failed (an error that leaves the GPU context
    /// unusable) or its loop panicked. Every request in flight gets this, new ones are
    /// refused with it, and the server exits so that its supervisor starts a fresh one. The
    /// cause is logged, not shown.
    #[error("the inference engine failed and this server is restarting; retry the request")]
    Failed,
}
