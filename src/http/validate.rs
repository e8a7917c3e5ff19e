//! Parse, don't validate: an OpenAI request body becomes a [`Plan`] (token ids, sampling and
//! stop parameters, output options) with every bound checked, before the engine sees anything.
//! Every refusal is a 400 naming the offending field. Prompts themselves (chat rendering,
//! tokenization, token-id prompts) are checked in `prompt.rs`.

use super::error::ApiError;
use super::prompt::{id_prompt, render_chat, text_prompt, PromptPlan};
use super::request::{ChatRequest, CommonFields, CompletionRequest, PromptInput, StopInput};
use super::state::ModelInfo;
use crate::config::ServerSection;
use crate::engine::KvChoice;
use crate::engine::{EngineRequest, StopParams};
use crate::types::{SamplingParams, TenantId};
use serde_json::Value;

/// Completions' default `max_tokens` (OpenAI's legacy default).
const COMPLETIONS_DEFAULT_MAX_TOKENS: usize = 16;

/// A validated request: what to run and how to answer.
#[derive(Debug, Clone)]
pub struct Plan {
    pub prompts: Vec<PromptPlan>,
    /// Choices per prompt.
    pub n: usize,
    pub sampling: SamplingParams,
    pub stop: StopParams,
    /// Stop strings (never empty strings).
    pub stops: Vec<String>,
    /// `Some(k)`: report logprobs with `k` alternatives.
    pub logprobs: Option<usize>,
    pub echo: bool,
    pub stream: bool,
    pub include_usage: bool,
    pub priority: i32,
    pub cache_salt: Option<String>,
    /// The KV policy (and fallbacks) every choice runs under.
    pub kv: KvChoice,
}

impl Plan {
    /// The engine requests, choice by choice (`prompt index * n + i` is the choice index).
    /// Seeded requests give choice `i` the seed `seed + i`, so `n` choices differ but the
    /// whole response is reproducible.
    pub fn engine_requests(&self, tenant: TenantId) -> Vec<EngineRequest> {
        let mut out = Vec::new();
        for p in &self.prompts {
            for i in 0..self.n {
                let mut sampling = self.sampling.clone();
                sampling.seed = sampling.seed.map(|s| s.wrapping_add(i as u64));
                out.push(EngineRequest {
                    kv: self.kv.clone(),
                    tenant,
                    cache_salt: self.cache_salt.clone(),
                    prompt: p.ids.clone(),
                    sampling,
                    stop: self.stop.clone(),
                    priority: self.priority,
                    prompt_logprobs: (self.echo && self.logprobs.is_some())
                        .then(|| self.logprobs.unwrap_or(0)),
                });
            }
        }
        out
    }

    /// The most tokens this request can use (rate limiting charges this up front).
    pub fn token_cost(&self) -> u64 {
        self.prompts
            .iter()
            .map(|p| (p.ids.len() + self.n * self.stop.max_tokens) as u64)
            .sum()
    }
}

/// A request body parsed as JSON into `T` (400 on anything else): what every handler does with
/// the bytes before validating them.
pub fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::Invalid {
        message: format!("invalid JSON body: {e}"),
        param: None,
    })
}

/// A `/v1/chat/completions` body → its plan, exactly as the handler gets there (minus
/// authentication and admission): the pure entry point for the parser fuzz targets and tests.
pub fn chat_body(
    body: &[u8],
    model: &ModelInfo,
    limits: &ServerSection,
    kv: &dyn Fn(Option<&str>) -> Result<KvChoice, ApiError>,
) -> Result<Plan, ApiError> {
    chat(&json_body(body)?, model, limits, kv)
}

/// A `/v1/completions` body → its plan (see [`chat_body`]).
pub fn completion_body(
    body: &[u8],
    model: &ModelInfo,
    limits: &ServerSection,
    kv: &dyn Fn(Option<&str>) -> Result<KvChoice, ApiError>,
) -> Result<Plan, ApiError> {
    completion(&json_body(body)?, model, limits, kv)
}

pub fn completion(
    req: &CompletionRequest,
    model: &ModelInfo,
    limits: &ServerSection,
    kv: &dyn Fn(Option<&str>) -> Result<KvChoice, ApiError>,
) -> Result<Plan, ApiError> {
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix", "`suffix` is not supported"));
    }
    let n = count(req.common.n, 1, limits.max_n, "n")?;
    if let Some(b) = req.best_of {
        if b != 1 && b != n as i64 {
            return Err(ApiError::invalid(
                "best_of",
                "`best_of` must be 1 or equal to `n`",
            ));
        }
    }
    let prompts: Vec<PromptPlan> = match &req.prompt {
        PromptInput::Text(t) => vec![text_prompt(model, t)?],
        PromptInput::Texts(ts) => ts
            .iter()
            .map(|t| text_prompt(model, t))
            .collect::<Result<_, _>>()?,
        PromptInput::Tokens(ids) => vec![id_prompt(model, ids)?],
        PromptInput::TokenLists(ls) => ls
            .iter()
            .map(|ids| id_prompt(model, ids))
            .collect::<Result<_, _>>()?,
    };
    if prompts.is_empty() || prompts.len() > limits.max_prompts {
        return Err(ApiError::invalid(
            "prompt",
            format!("give 1 to {} prompts", limits.max_prompts),
        ));
    }
    let logprobs = match req.logprobs {
        None => None,
        Some(k) => Some(count(Some(k), 0, limits.max_top_logprobs, "logprobs")?),
    };
    let max_tokens = req.common.max_tokens;
    let mut plan = common(
        &req.common,
        max_tokens,
        // The default never exceeds the server's bound (which may be set below it).
        COMPLETIONS_DEFAULT_MAX_TOKENS.min(limits.max_tokens),
        prompts,
        n,
        logprobs,
        model,
        limits,
        kv,
    )?;
    plan.echo = req.echo.unwrap_or(false);
    Ok(plan)
}

pub fn chat(
    req: &ChatRequest,
    model: &ModelInfo,
    limits: &ServerSection,
    kv: &dyn Fn(Option<&str>) -> Result<KvChoice, ApiError>,
) -> Result<Plan, ApiError> {
    let n = count(req.common.n, 1, limits.max_n, "n")?;
    // `functions` / `function_call`: OpenAI's deprecated names of the same two fields.
    for (defs, choice, names) in [
        (&req.tools, &req.tool_choice, ("tools", "tool_choice")),
        (
            &req.functions,
            &req.function_call,
            ("functions", "function_call"),
        ),
    ] {
        no_tool_calls(defs.as_deref(), choice.as_ref(), names.0, names.1)?;
    }
    let text = render_chat(&req.messages, req.add_generation_prompt, model, limits)?;
    let ids = model
        .tokenizer
        .encode(&text, false)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    if ids.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "the conversation renders to no tokens",
        ));
    }
    let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (false, Some(k)) if k > 0 => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "`top_logprobs` needs `logprobs: true`",
            ))
        }
        (false, _) => None,
        (true, k) => Some(count(
            Some(k.unwrap_or(0)),
            0,
            limits.max_top_logprobs,
            "top_logprobs",
        )?),
    };
    let max_tokens = req.max_completion_tokens.or(req.common.max_tokens);
    let default_max = model
        .max_context
        .saturating_sub(ids.len())
        .min(limits.max_tokens);
    common(
        &req.common,
        max_tokens,
        default_max,
        vec![PromptPlan { ids, text }],
        n,
        logprobs,
        model,
        limits,
        kv,
    )
}

/// No tool calls are parsed, so definitions may only come with the choice `"none"`: a list of
/// them without it, or any other choice, is a 400 naming the field (not free text that ignores
/// them).
fn no_tool_calls(
    defs: Option<&[Value]>,
    choice: Option<&Value>,
    defs_name: &'static str,
    choice_name: &'static str,
) -> Result<(), ApiError> {
    match choice {
        None | Some(Value::Null) if defs.is_some_and(|d| !d.is_empty()) => Err(ApiError::invalid(
            defs_name,
            format!(
                "tool calling is not supported by this server: send no `{defs_name}`, or \
                 `{choice_name}: \"none\"`"
            ),
        )),
        None | Some(Value::Null) => Ok(()),
        Some(c) if c == "none" => Ok(()),
        Some(_) => Err(ApiError::invalid(
            choice_name,
            format!(
                "tool calling is not supported by this server: `{choice_name}` can only be \
                 `\"none\"`"
            ),
        )),
    }
}

fn count(
    v: Option<i64>,
    default: usize,
    max: usize,
    param: &'static str,
) -> Result<usize, ApiError> {
    let v = v.unwrap_or(default as i64);
    let lo = if matches!(param, "n" | "max_tokens") {
        1
    } else {
        0
    };
    if v < lo || v > max as i64 {
        return Err(ApiError::invalid(
            param,
            format!("`{param}` must be between {lo} and {max}, got {v}"),
        ));
    }
    Ok(v as usize)
}

fn range(
    v: Option<f32>,
    default: f32,
    lo: f32,
    hi: f32,
    param: &'static str,
) -> Result<f32, ApiError> {
    let v = v.unwrap_or(default);
    if !(v.is_finite() && v >= lo && v <= hi) {
        return Err(ApiError::invalid(
            param,
            format!("`{param}` must be between {lo} and {hi}, got {v}"),
        ));
    }
    Ok(v)
}

#[allow(clippy::too_many_arguments)]
fn common(
    c: &CommonFields,
    max_tokens: Option<i64>,
    default_max_tokens: usize,
    prompts: Vec<PromptPlan>,
    n: usize,
    logprobs: Option<usize>,
    model: &ModelInfo,
    limits: &ServerSection,
    kv: &dyn Fn(Option<&str>) -> Result<KvChoice, ApiError>,
) -> Result<Plan, ApiError> {
    if let Some(m) = &c.model {
        if m != &model.name {
            return Err(ApiError::NotFound {
                message: format!(
                    "the model `{m}` does not exist; this server serves `{}`",
                    model.name
                ),
                code: "model_not_found",
            });
        }
    }
    if let Some(f) = c.response_format.as_ref().filter(|f| f.kind != "text") {
        return Err(ApiError::invalid(
            "response_format",
            format!(
                "`response_format` type `{}` is not supported: this server does not constrain \
                 its output to JSON (only `text`)",
                f.kind
            ),
        ));
    }
    let max_tokens = match max_tokens {
        None => default_max_tokens.max(1),
        Some(v) => count(Some(v), 1, limits.max_tokens, "max_tokens")?,
    };
    let longest = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0);
    if longest + max_tokens > model.max_context {
        return Err(ApiError::ContextLength(format!(
            "this model's maximum context length is {} tokens; the request has {longest} prompt tokens and max_tokens {max_tokens}",
            model.max_context
        )));
    }
    let min_tokens = count(c.min_tokens, 0, max_tokens, "min_tokens")?;
    let top_k = match c.top_k {
        None | Some(-1) => 0,
        Some(k) if k >= 0 && k <= model.vocab_size as i64 => k as usize,
        Some(k) => {
            return Err(ApiError::invalid(
                "top_k",
                format!("`top_k` must be -1, 0 or at most the vocabulary size, got {k}"),
            ))
        }
    };
    let temperature = range(c.temperature, 1.0, 0.0, 2.0, "temperature")?;
    let top_p = range(c.top_p, 1.0, f32::MIN_POSITIVE, 1.0, "top_p")?;
    let min_p = range(c.min_p, 0.0, 0.0, 1.0, "min_p")?;
    let presence_penalty = range(c.presence_penalty, 0.0, -2.0, 2.0, "presence_penalty")?;
    let frequency_penalty = range(c.frequency_penalty, 0.0, -2.0, 2.0, "frequency_penalty")?;
    let repetition_penalty = range(
        c.repetition_penalty,
        1.0,
        f32::MIN_POSITIVE,
        2.0,
        "repetition_penalty",
    )?;
    let mut logit_bias = Vec::new();
    if let Some(map) = &c.logit_bias {
        if map.len() > limits.max_logit_bias {
            return Err(ApiError::invalid(
                "logit_bias",
                format!("at most {} `logit_bias` entries", limits.max_logit_bias),
            ));
        }
        for (k, v) in map {
            let id: u32 = k
                .trim()
                .parse()
                .map_err(|_| ApiError::invalid("logit_bias", format!("`{k}` is not a token id")))?;
            if id as usize >= model.vocab_size {
                return Err(ApiError::invalid(
                    "logit_bias",
                    format!("token id {id} is outside the vocabulary"),
                ));
            }
            logit_bias.push((id, range(Some(*v), 0.0, -100.0, 100.0, "logit_bias")?));
        }
    }
    let stops: Vec<String> = match &c.stop {
        None => Vec::new(),
        Some(StopInput::One(s)) => vec![s.clone()],
        Some(StopInput::Many(v)) => v.clone(),
    };
    let stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
    if stops.len() > limits.max_stop_sequences
        || stops.iter().any(|s| s.len() > limits.max_stop_bytes)
    {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "at most {} stop sequences of at most {} bytes",
                limits.max_stop_sequences, limits.max_stop_bytes
            ),
        ));
    }
    let mut stop_ids = model.eos_token_ids.clone();
    for &id in c.stop_token_ids.iter().flatten() {
        if id as usize >= model.vocab_size {
            return Err(ApiError::invalid(
                "stop_token_ids",
                format!("token id {id} is outside the vocabulary"),
            ));
        }
        if !stop_ids.contains(&id) {
            stop_ids.push(id);
        }
    }
    if stop_ids.len() > limits.max_stop_sequences + model.eos_token_ids.len() {
        return Err(ApiError::invalid(
            "stop_token_ids",
            "too many stop token ids",
        ));
    }
    let kv = kv(c.kv_policy.as_deref())?;
    let cache_salt = match (&c.cache_salt, &c.prompt_cache_key) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::invalid(
                "cache_salt",
                "`cache_salt` and `prompt_cache_key` differ; send one",
            ))
        }
        (Some(a), _) | (None, Some(a)) => Some(a.clone()),
        (None, None) => None,
    };
    if cache_salt.as_ref().is_some_and(|s| s.len() > 256) {
        return Err(ApiError::invalid("cache_salt", "at most 256 bytes"));
    }
    let stream = c.stream.unwrap_or(false);
    if c.stream_options.is_some() && !stream {
        return Err(ApiError::invalid(
            "stream_options",
            "`stream_options` needs `stream: true`",
        ));
    }
    Ok(Plan {
        prompts,
        n,
        sampling: SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            seed: c.seed.map(|s| s as u64),
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            logit_bias,
            logprobs: logprobs.is_some(),
            top_logprobs: logprobs.unwrap_or(0),
        },
        stop: StopParams {
            max_tokens,
            min_tokens,
            stop_ids,
            ignore_eos: c.ignore_eos.unwrap_or(false),
        },
        stops,
        logprobs,
        echo: false,
        stream,
        include_usage: c.stream_options.as_ref().is_some_and(|o| o.include_usage),
        priority: c.priority.unwrap_or(0),
        cache_salt,
        kv,
    })
}
