//! `GET /openapi.json`: utoipa's document of the API with this server's own request bounds
//! (`[server]` max_* keys, the vocabulary, the served model id) written into the request
//! schemas, so a client or a fuzzer reads the limits that actually apply here. A value the
//! document allows passes validation unless fields conflict (e.g. `stream_options` without
//! `stream`); a value outside it is a documented 400/404.

use super::ApiDoc;
use crate::config::ServerSection;
use serde_json::{json, Value};
use utoipa::OpenApi;

/// Merges `patch`'s keys into the object at `path` (which must exist: a renamed schema fails
/// the unit test below rather than producing a silently wrong document).
fn merge(doc: &mut Value, path: &[&str], patch: Value) {
    let mut at = &mut *doc;
    for key in path {
        match at.get_mut(*key) {
            Some(next) => at = next,
            None => {
                tracing::warn!(path = ?path, "openapi: no such schema node");
                return;
            }
        }
    }
    if let (Some(obj), Value::Object(p)) = (at.as_object_mut(), patch) {
        obj.extend(p);
    }
}

/// The document served at `/openapi.json`.
pub fn document(limits: &ServerSection, model_name: &str, vocab_size: usize) -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    let max_id = vocab_size.saturating_sub(1);
    let token = json!({"type": "integer", "format": "int32", "minimum": 0, "maximum": max_id});
    let s = |name: &'static str| ["components", "schemas", name];
    let common = ["components", "schemas", "CommonFields", "properties"];
    let prop = |name: &'static str| {
        let mut p = common.to_vec();
        p.push(name);
        p
    };
    let max_tokens = limits.max_tokens;
    for (name, patch) in [
        ("model", json!({"enum": [model_name, null]})),
        ("n", json!({"minimum": 1, "maximum": limits.max_n})),
        ("max_tokens", json!({"minimum": 1, "maximum": max_tokens})),
        ("min_tokens", json!({"minimum": 0, "maximum": max_tokens})),
        ("temperature", json!({"minimum": 0, "maximum": 2})),
        ("top_p", json!({"exclusiveMinimum": 0, "maximum": 1})),
        ("min_p", json!({"minimum": 0, "maximum": 1})),
        ("top_k", json!({"minimum": -1, "maximum": vocab_size})),
        ("presence_penalty", json!({"minimum": -2, "maximum": 2})),
        ("frequency_penalty", json!({"minimum": -2, "maximum": 2})),
        (
            "repetition_penalty",
            json!({"exclusiveMinimum": 0, "maximum": 2}),
        ),
        (
            "logit_bias",
            json!({
                "maxProperties": limits.max_logit_bias,
                "propertyNames": {"type": "string", "pattern": format!("^[0-9]{{1,{}}}$",
                    max_id.to_string().len().saturating_sub(1).max(1))},
                "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
            }),
        ),
        (
            "stop_token_ids",
            json!({"maxItems": limits.max_stop_sequences, "items": token}),
        ),
        ("cache_salt", json!({"maxLength": 256})),
        ("prompt_cache_key", json!({"maxLength": 256})),
    ] {
        merge(&mut doc, &prop(name), patch);
    }
    let stop = json!({"type": "string", "maxLength": limits.max_stop_bytes});
    merge(
        &mut doc,
        &s("StopInput"),
        json!({"oneOf": [stop, {"type": "array", "items": stop,
            "maxItems": limits.max_stop_sequences}]}),
    );
    let ids = json!({"type": "array", "items": token, "minItems": 1});
    merge(
        &mut doc,
        &s("PromptInput"),
        json!({"oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1,
             "maxItems": limits.max_prompts},
            ids,
            {"type": "array", "items": ids, "minItems": 1, "maxItems": limits.max_prompts},
        ]}),
    );
    let top = json!({"minimum": 0, "maximum": limits.max_top_logprobs});
    let messages = json!({"minItems": 1, "maxItems": limits.max_messages});
    let req = |name: &'static str, field: &'static str| {
        vec![
            "components",
            "schemas",
            name,
            "allOf",
            "1",
            "properties",
            field,
        ]
    };
    for (path, patch) in [
        (req("CompletionRequest", "logprobs"), top.clone()),
        (req("ChatRequest", "top_logprobs"), top),
        (
            req("ChatRequest", "max_completion_tokens"),
            json!({"minimum": 1, "maximum": max_tokens}),
        ),
        (req("ChatRequest", "messages"), messages.clone()),
    ] {
        merge_all_of(&mut doc, &path, patch);
    }
    merge(
        &mut doc,
        &[
            "components",
            "schemas",
            "ChatMessageIn",
            "properties",
            "role",
        ],
        json!({"enum": ["system", "developer", "user", "assistant", "tool"]}),
    );
    merge(
        &mut doc,
        &[
            "components",
            "schemas",
            "ResponseFormat",
            "properties",
            "type",
        ],
        json!({"enum": ["text"]}),
    );
    for field in ["tool_choice", "function_call"] {
        merge_all_of(
            &mut doc,
            &req("ChatRequest", field),
            json!({"enum": ["none", null]}),
        );
    }
    merge(
        &mut doc,
        &[
            "components",
            "schemas",
            "DetokenizeRequest",
            "properties",
            "tokens",
        ],
        json!({"items": token}),
    );
    // Streaming answers 200 with server-sent events instead of JSON: `schema` describes one
    // event (OpenAPI 3.1): its `data` is a chunk, an error envelope, or the final `[DONE]`.
    for (path, chunk) in [
        ("/v1/completions", "CompletionResponse"),
        ("/v1/chat/completions", "ChatChunk"),
    ] {
        let event = json!({
            "type": "object",
            "required": ["data"],
            "properties": {"data": {
                "type": "string",
                "if": {"const": "[DONE]"},
                "else": {
                    "contentMediaType": "application/json",
                    "contentSchema": {"oneOf": [
                        {"$ref": format!("#/components/schemas/{chunk}")},
                        {"$ref": "#/components/schemas/ErrorResponse"},
                    ]},
                },
            }},
        });
        merge(
            &mut doc,
            &["paths", path, "post", "responses", "200", "content"],
            json!({"text/event-stream": {"schema": event}}),
        );
    }
    doc
}

/// [`merge`] where `path` goes through an `allOf` array (the index is the segment after it).
fn merge_all_of(doc: &mut Value, path: &[&str], patch: Value) {
    let Some(i) = path.iter().position(|k| *k == "allOf") else {
        return merge(doc, path, patch);
    };
    let idx: usize = path.get(i + 1).and_then(|k| k.parse().ok()).unwrap_or(0);
    let mut at = &mut *doc;
    for key in &path[..=i] {
        match at.get_mut(*key) {
            Some(next) => at = next,
            None => return,
        }
    }
    if let Some(item) = at.get_mut(idx) {
        merge(item, &path[i + 2..], patch);
    }
}
