//! What crosses the engine's boundary: a validated request going in, events coming out.
//! Tokens only: the HTTP layer owns text, stop strings and JSON.

use super::sampler::Sampled;
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Prompt tokens served from the prefix cache at the request's first admission.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
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
}
