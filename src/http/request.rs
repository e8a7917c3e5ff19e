//! OpenAI request bodies as clients send them (`/v1/completions`, `/v1/chat/completions`),
//! deserialized leniently: unknown fields are kept aside (logged at debug) and ignored, as
//! OpenAI clients send fields a server may not know. `validate.rs` turns these into engine
//! requests.

use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// `prompt`: a string, a list of strings, a list of token ids, or a list of such lists.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StopInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` (and `choices: []`) before `[DONE]`.
    #[serde(default)]
    pub include_usage: bool,
}

/// The fields completions and chat share.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct CommonFields {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    /// 0 = greedy; at most 2.
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// 0 or -1 = off.
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    /// Choices per prompt.
    pub n: Option<i64>,
    pub stop: Option<StopInput>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    /// Token id (as a string) → bias in [-100, 100].
    pub logit_bias: Option<BTreeMap<String, f32>>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// Recorded nowhere; accepted for compatibility.
    pub user: Option<String>,
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<i64>,
    /// Lower runs first, within the caller's own tenant only.
    pub priority: Option<i32>,
    /// Subdivides the caller's own prefix-cache scope (never widens it).
    pub cache_salt: Option<String>,
    /// OpenAI's name for the same thing as `cache_salt`.
    pub prompt_cache_key: Option<String>,
    /// KV cache policy for this request (kvserve extension), e.g. `bf16`.
    pub kv_policy: Option<String>,
    /// Only `{"type": "text"}`: this server does not constrain decoding, so `json_object` and
    /// `json_schema` are refused (400) rather than answered with unconstrained text.
    pub response_format: Option<ResponseFormat>,
}

/// `response_format`: its `type` (other keys, e.g. `json_schema`, are read by no one).
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CompletionRequest {
    pub prompt: PromptInput,
    #[serde(flatten)]
    pub common: CommonFields,
    /// Top alternatives per token (0..=20); `null` = no logprobs.
    pub logprobs: Option<i64>,
    /// Prepend the prompt to the text (and its logprobs when asked).
    pub echo: Option<bool>,
    /// Not supported: must be absent or empty.
    pub suffix: Option<String>,
    /// Only 1 or equal to `n` (no server-side best-of).
    pub best_of: Option<i64>,
    #[serde(flatten)]
    #[schema(ignore)]
    pub unknown: BTreeMap<String, Value>,
}

/// A content part of a chat message; only text parts are supported.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatMessageIn {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    pub content: Option<MessageContent>,
    pub name: Option<String>,
    pub tool_call_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessageIn>,
    #[serde(flatten)]
    pub common: CommonFields,
    /// OpenAI's newer name for `max_tokens`.
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
    /// 0..=20, needs `logprobs: true`.
    pub top_logprobs: Option<i64>,
    /// Continue the last (assistant) message instead of starting a new one.
    pub add_generation_prompt: Option<bool>,
    /// Tool definitions. The server parses no tool calls, so a non-empty list is refused
    /// (400) unless `tool_choice` is `"none"`.
    pub tools: Option<Vec<Value>>,
    /// Only `"none"`: `"auto"`, `"required"` or a named tool would need tool calls (400).
    pub tool_choice: Option<Value>,
    /// Deprecated name of `tools`, refused the same way.
    pub functions: Option<Vec<Value>>,
    /// Deprecated name of `tool_choice`: only `"none"`.
    pub function_call: Option<Value>,
    #[serde(flatten)]
    #[schema(ignore)]
    pub unknown: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum TokenizeRequest {
    Chat {
        model: Option<String>,
        messages: Vec<ChatMessageIn>,
        add_generation_prompt: Option<bool>,
    },
    Prompt {
        model: Option<String>,
        prompt: String,
        add_special_tokens: Option<bool>,
    },
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}
