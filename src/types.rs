//! Plain data types shared by every layer: token ids and sampling parameters.

/// A vocabulary index. Kept as a plain `u32` alias (not a newtype) because token ids are bulk
/// data that flows into tokenizers and kernels as slices; handles (sequences, tenants, blocks)
/// get real newtypes where they are introduced.
pub type TokenId = u32;

/// How to pick the next token. Defaults are greedy decoding with no penalties.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1.0 disables nucleus sampling.
    pub top_p: f32,
    /// 0.0 disables min-p.
    pub min_p: f32,
    /// RNG seed; `None` draws one from the OS at sequence start.
    pub seed: Option<u64>,
    /// HF-style multiplicative penalty on tokens already seen (prompt and output); 1.0 disables.
    pub repetition_penalty: f32,
    /// OpenAI-style additive penalty on tokens present in the output.
    pub presence_penalty: f32,
    /// OpenAI-style penalty proportional to the count of a token in the output.
    pub frequency_penalty: f32,
    /// Added to the logit of each listed token before sampling.
    pub logit_bias: Vec<(TokenId, f32)>,
    /// Report each sampled token's raw logprob. Off, the sampler skips the softmax pass over
    /// the vocabulary that only the logprob needs (greedy decoding is then one argmax).
    pub logprobs: bool,
    /// Number of top alternatives to report with each sampled token (with `logprobs`).
    pub top_logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: None,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            logprobs: false,
            top_logprobs: 0,
        }
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence or stop token/string was produced.
    Stop,
    /// The token limit was reached.
    Length,
    /// The request was aborted (by its caller, or because its receiver went away).
    Abort,
}

/// A tenant, as resolved by the server from an API key. Never taken from a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(pub u32);

/// One request inside the engine (one sequence: `n > 1` is `n` requests sharing a prompt).
/// Assigned by the engine handle, unique for the life of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);
