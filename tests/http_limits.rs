//! Every request bound, over real HTTP against the real server (one start for all of them):
//! each limit in docs/http.md ("Request limits") answers its documented status with OpenAI's
//! error envelope naming the parameter and code, and the server keeps serving afterwards. Also
//! the regressions found by the API fuzzer (tests/api_fuzz.py).
//!
//! Fails (does not skip) when the model is missing: run scripts/fetch-model.sh.

mod common;

use common::server::{self, TestServer};
use kvserve::tenancy::{hash_key, Tenancy};
use serde_json::{json, Value};
use std::path::Path;

const KEY: &str = "sk-test-limits";

// Small bounds so each can be crossed with a small body.
const MAX_BODY: usize = 64 << 10;
const MAX_N: usize = 3;
const MAX_TOKENS: usize = 8;
const MAX_STOPS: usize = 2;
const MAX_STOP_BYTES: usize = 16;
const MAX_BIAS: usize = 4;
const MAX_TOP: usize = 3;
const MAX_MESSAGES: usize = 4;
const MAX_PROMPTS: usize = 2;
const MAX_TEMPLATE: usize = 2048;

/// The shared test server with every request bound set small, and one tenant (`KEY`).
async fn start() -> TestServer {
    let toml = format!(
        "[[tenant]]\nid = \"limits\"\napi_keys_sha256 = [\"{}\"]\n",
        hash_key(KEY)
    );
    let tenancy = Tenancy::from_toml(&toml, Path::new("tenants.toml")).unwrap();
    server::start(Some(tenancy), |cfg| {
        let s = &mut cfg.server;
        s.max_body_bytes = MAX_BODY;
        s.max_n = MAX_N;
        s.max_tokens = MAX_TOKENS;
        s.max_stop_sequences = MAX_STOPS;
        s.max_stop_bytes = MAX_STOP_BYTES;
        s.max_logit_bias = MAX_BIAS;
        s.max_top_logprobs = MAX_TOP;
        s.max_messages = MAX_MESSAGES;
        s.max_prompts = MAX_PROMPTS;
        s.max_template_bytes = MAX_TEMPLATE;
    })
    .await
}

/// This file's requests, all with `KEY`.
impl TestServer {
    /// POSTs raw bytes as JSON with the key; status and body (JSON, or the text as a string).
    async fn post_raw(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        let resp = self
            .client
            .post(format!("http://{}{path}", self.addr))
            .bearer_auth(KEY)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, v)
    }

    /// Asserts `body` at `path` is refused with `status`, OpenAI's envelope, `param` and `code`.
    async fn refused(
        &self,
        path: &str,
        body: &Value,
        status: u16,
        param: Option<&str>,
        code: &str,
    ) {
        let (st, v) = self.post(path, Some(KEY), body).await;
        assert_error(st, &v, status, param, code, &format!("{path} {body:.200}"));
    }

    async fn ok(&self, path: &str, body: &Value) -> Value {
        let (st, v) = self.post(path, Some(KEY), body).await;
        assert_eq!(st, 200, "{path} {body}: {v}");
        v
    }
}

fn assert_error(st: u16, v: &Value, status: u16, param: Option<&str>, code: &str, what: &str) {
    assert_eq!(st, status, "{what}: {v}");
    let e = &v["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {v}"
    );
    assert_eq!(e["type"], "invalid_request_error", "{what}: {v}");
    assert_eq!(e["code"], code, "{what}: {v}");
    match param {
        Some(p) => assert_eq!(e["param"], p, "{what}: {v}"),
        None => assert!(e.get("param").is_some_and(Value::is_null), "{what}: {v}"),
    }
}

/// `base` with `patch`'s fields set.
fn with(base: &Value, patch: Value) -> Value {
    let mut b = base.clone();
    b.as_object_mut()
        .unwrap()
        .extend(patch.as_object().unwrap().clone());
    b
}

fn user(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_bound_has_its_status_param_and_code() {
    let s = start().await;
    let cmpl = json!({"prompt": "Hello", "max_tokens": 1, "temperature": 0});
    let chat = json!({"messages": [user("Hi")], "max_tokens": 1, "temperature": 0});
    const C: &str = "/v1/completions";
    const CH: &str = "/v1/chat/completions";
    const INV: &str = "invalid_value";

    // At each bound: accepted.
    let stops: Vec<String> = (0..MAX_STOPS).map(|i| format!("{i}").repeat(16)).collect();
    let bias: serde_json::Map<String, Value> =
        (0..MAX_BIAS).map(|i| (i.to_string(), json!(1))).collect();
    let at_bounds = with(
        &cmpl,
        json!({"n": MAX_N, "max_tokens": MAX_TOKENS, "stop": stops, "logit_bias": bias,
               "logprobs": MAX_TOP, "prompt": vec!["Hi"; MAX_PROMPTS]}),
    );
    let v = s.ok(C, &at_bounds).await;
    assert_eq!(v["choices"].as_array().unwrap().len(), MAX_N * MAX_PROMPTS);
    let chat_at = with(
        &chat,
        json!({"messages": vec![user("Hi"); MAX_MESSAGES], "logprobs": true,
               "top_logprobs": MAX_TOP, "max_completion_tokens": MAX_TOKENS}),
    );
    s.ok(CH, &chat_at).await;

    // Body size: 413 on every route that takes a body, whatever the content.
    let big = vec![b' '; MAX_BODY + 1];
    for path in [C, CH, "/tokenize", "/detokenize"] {
        let (st, v) = s.post_raw(path, big.clone()).await;
        assert_error(st, &v, 413, None, "request_too_large", path);
    }
    let big_prompt = with(&cmpl, json!({"prompt": "a ".repeat(MAX_BODY / 2)}));
    s.refused(C, &big_prompt, 413, None, "request_too_large")
        .await;

    // Prompt length: prompt + max_tokens must fit the model's context (8192 for SmolLM2).
    let long_ids = vec![28; 8192 - MAX_TOKENS + 1];
    let long = with(&cmpl, json!({"prompt": long_ids, "max_tokens": MAX_TOKENS}));
    s.refused(C, &long, 400, Some("messages"), "context_length_exceeded")
        .await;
    // Prompts per request.
    let many = with(&cmpl, json!({"prompt": vec!["Hi"; MAX_PROMPTS + 1]}));
    s.refused(C, &many, 400, Some("prompt"), INV).await;

    // n, max_tokens (both names on chat), stop strings (count and length), logit_bias entries,
    // top logprobs.
    for (path, base) in [(C, &cmpl), (CH, &chat)] {
        for (patch, param) in [
            (json!({"n": MAX_N + 1}), "n"),
            (json!({"n": 0}), "n"),
            (json!({"max_tokens": MAX_TOKENS + 1}), "max_tokens"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (
                json!({"stop": (0..=MAX_STOPS).map(|i| format!("s{i}")).collect::<Vec<_>>()}),
                "stop",
            ),
            (json!({"stop": "x".repeat(MAX_STOP_BYTES + 1)}), "stop"),
            (
                json!({"stop_token_ids": (100..=100 + MAX_STOPS as u32).collect::<Vec<_>>()}),
                "stop_token_ids",
            ),
            (
                json!({"logit_bias": (0..=MAX_BIAS).map(|i| (i.to_string(), json!(1)))
                    .collect::<serde_json::Map<_, _>>()}),
                "logit_bias",
            ),
            (json!({"cache_salt": "s".repeat(257)}), "cache_salt"),
        ] {
            s.refused(path, &with(base, patch), 400, Some(param), INV)
                .await;
        }
    }
    let chat_max = with(&chat, json!({"max_completion_tokens": MAX_TOKENS + 1}));
    s.refused(CH, &chat_max, 400, Some("max_tokens"), INV).await;
    let top = with(
        &chat,
        json!({"logprobs": true, "top_logprobs": MAX_TOP + 1}),
    );
    s.refused(CH, &top, 400, Some("top_logprobs"), INV).await;
    let top = with(&cmpl, json!({"logprobs": MAX_TOP + 1}));
    s.refused(C, &top, 400, Some("logprobs"), INV).await;

    // Messages: count, and the size of what the template renders (on /tokenize too).
    let msgs = with(
        &chat,
        json!({"messages": vec![user("Hi"); MAX_MESSAGES + 1]}),
    );
    s.refused(CH, &msgs, 400, Some("messages"), INV).await;
    let huge = with(
        &chat,
        json!({"messages": [user(&"x".repeat(MAX_TEMPLATE))]}),
    );
    s.refused(CH, &huge, 400, Some("messages"), INV).await;
    let (st, v) = s
        .post(
            "/tokenize",
            Some(KEY),
            &json!({"messages": [user(&"x".repeat(MAX_TEMPLATE))]}),
        )
        .await;
    assert_error(st, &v, 400, Some("messages"), INV, "/tokenize template");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&MAX_TEMPLATE.to_string()),
        "{v}"
    );

    // Regression (fuzzer): a completion without `max_tokens` took the legacy default of 16
    // even when `server.max_tokens` is lower; the default is now capped by the bound.
    let v = s
        .ok(
            C,
            &json!({"prompt": "Once upon a time", "ignore_eos": true}),
        )
        .await;
    assert_eq!(v["usage"]["completion_tokens"], MAX_TOKENS, "{v}");

    // The OpenAPI document (what tests/api_fuzz.py fuzzes) carries these bounds and documents
    // every status an operation can answer.
    openapi_documents_bounds_and_statuses(&s).await;

    // After all of that the server still serves.
    s.ok(C, &cmpl).await;
    s.ok(CH, &chat).await;
    s.shutdown().await;
}

/// Regressions found by the API fuzzer (tests/api_fuzz.py, schemathesis): `/tokenize` and
/// `/detokenize` answered 401, 404 and 413 without documenting them; streaming answers were
/// documented as JSON only; the request schemas had no bounds, so the fuzzer's "valid" data was
/// mostly refused. The served document now carries this server's configured bounds.
async fn openapi_documents_bounds_and_statuses(s: &TestServer) {
    let doc: Value = s
        .client
        .get(format!("http://{}/openapi.json", s.addr))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let statuses: Vec<&str> = op["responses"]
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            if op.get("security").is_some() {
                assert!(statuses.contains(&"401"), "{method} {path}: {statuses:?}");
            }
            if method == "post" {
                for st in ["400", "401", "404", "413"] {
                    assert!(statuses.contains(&st), "{method} {path}: {statuses:?}");
                }
            }
        }
    }
    for path in ["/v1/completions", "/v1/chat/completions"] {
        let ok = &doc["paths"][path]["post"]["responses"]["200"]["content"];
        assert!(ok.get("text/event-stream").is_some(), "{path}: {ok}");
        assert!(ok.get("application/json").is_some(), "{path}: {ok}");
    }
    let sch = &doc["components"]["schemas"];
    assert!(
        sch.get("ChatChunk").is_some(),
        "the chat stream's chunk schema"
    );
    let common = &sch["CommonFields"]["properties"];
    assert_eq!(common["n"]["maximum"], MAX_N);
    assert_eq!(common["max_tokens"]["maximum"], MAX_TOKENS);
    assert_eq!(common["model"]["enum"][0], "SmolLM2-135M-Instruct");
    assert_eq!(common["logit_bias"]["maxProperties"], MAX_BIAS);
    assert_eq!(common["stop_token_ids"]["maxItems"], MAX_STOPS);
    assert_eq!(common["stop_token_ids"]["items"]["maximum"], 49151);
    let chat = &sch["ChatRequest"]["allOf"][1]["properties"];
    assert_eq!(chat["messages"]["maxItems"], MAX_MESSAGES);
    assert_eq!(chat["top_logprobs"]["maximum"], MAX_TOP);
    assert_eq!(chat["max_completion_tokens"]["maximum"], MAX_TOKENS);
    let cmpl = &sch["CompletionRequest"]["allOf"][1]["properties"];
    assert_eq!(cmpl["logprobs"]["maximum"], MAX_TOP);
    assert_eq!(sch["PromptInput"]["oneOf"][1]["maxItems"], MAX_PROMPTS);
    assert_eq!(sch["StopInput"]["oneOf"][0]["maxLength"], MAX_STOP_BYTES);
    assert_eq!(sch["StopInput"]["oneOf"][1]["maxItems"], MAX_STOPS);
    assert_eq!(
        sch["DetokenizeRequest"]["properties"]["tokens"]["items"]["maximum"],
        49151
    );
    assert!(sch["ChatMessageIn"]["properties"]["role"]["enum"].is_array());
}
