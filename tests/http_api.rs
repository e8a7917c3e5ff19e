//! The HTTP API end to end: the real server (real model, real sockets on 127.0.0.1:0) checked
//! with a real HTTP client: response shapes, SSE framing, streamed = plain text, stop strings,
//! logprobs and echo, every error status, tenants (auth, rate limits, cache isolation), client
//! disconnects freeing KV blocks, and draining on shutdown.
//!
//! Fails (does not skip) when the model is missing: run scripts/fetch-model.sh.

mod common;

use common::server::{self, TestServer};
use kvserve::config::Config;
use kvserve::tenancy::{hash_key, Tenancy};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;
use tokio::sync::oneshot;

const KEY_A: &str = "sk-test-alpha";
const KEY_B: &str = "sk-test-beta";

fn tenants(rpm_a: u32) -> Tenancy {
    let toml = format!(
        r#"
[[tenant]]
id = "alpha"
api_keys_sha256 = ["{}"]
requests_per_minute = {rpm_a}
max_concurrent = 16
[[tenant]]
id = "beta"
api_keys_sha256 = ["{}"]
"#,
        hash_key(KEY_A),
        hash_key(KEY_B)
    );
    Tenancy::from_toml(&toml, Path::new("tenants.toml")).unwrap()
}

/// The shared test server with a 64 KiB body limit, so the 413 test crosses it cheaply.
async fn start(tenancy: Option<Tenancy>, tweak: impl FnOnce(&mut Config)) -> TestServer {
    server::start(tenancy, |cfg| {
        cfg.server.max_body_bytes = 64 << 10;
        tweak(cfg)
    })
    .await
}

/// This file's requests, each on a fresh connection (`TestServer::post` reuses one client).
impl TestServer {
    /// POST `body` as JSON: status, headers and JSON body (a non-JSON body as a string).
    async fn call(
        &self,
        path: &str,
        key: Option<&str>,
        body: &Value,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut r = reqwest::Client::new().post(self.url(path)).json(body);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, headers, v)
    }

    /// GET `path` (with `key` as bearer token) and its JSON body.
    async fn get_json(&self, path: &str, key: Option<&str>) -> Value {
        let mut r = reqwest::Client::new().get(self.url(path));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send().await.unwrap().json().await.unwrap()
    }

    /// A streaming request's `data:` payloads, in order (the last is `[DONE]`).
    async fn stream(&self, path: &str, key: Option<&str>, body: &Value) -> Vec<String> {
        let mut r = reqwest::Client::new().post(self.url(path)).json(body);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        let resp = r.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        server::sse_payloads(&resp.text().await.unwrap())
    }
}

fn chunks(frames: &[String]) -> Vec<Value> {
    assert_eq!(
        frames.last().map(String::as_str),
        Some("[DONE]"),
        "{frames:?}"
    );
    frames[..frames.len() - 1]
        .iter()
        .map(|f| serde_json::from_str(f).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_plain_and_streaming_agree() {
    let s = start(None, |_| {}).await;
    let body = json!({"model": "SmolLM2-135M-Instruct", "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0});
    let (status, _, v) = s.call("/v1/completions", None, &body).await;
    assert_eq!(status, 200, "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], "SmolLM2-135M-Instruct");
    assert!(v["created"].as_u64().unwrap() > 1_700_000_000);
    let choice = &v["choices"][0];
    let text = choice["text"].as_str().unwrap().to_string();
    assert!(!text.is_empty());
    assert!(["stop", "length"].contains(&choice["finish_reason"].as_str().unwrap()));
    let u = &v["usage"];
    assert_eq!(u["prompt_tokens"], 5);
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap())
    );
    assert!(u["prompt_tokens_details"]["cached_tokens"].is_u64());

    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let frames = chunks(&s.stream("/v1/completions", None, &sbody).await);
    let usage = frames.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], u["completion_tokens"]);
    let body_chunks = &frames[..frames.len() - 1];
    let streamed: String = body_chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        streamed, text,
        "streamed text equals the plain text at temperature 0"
    );
    let finishes: Vec<_> = body_chunks
        .iter()
        .filter(|c| !c["choices"][0]["finish_reason"].is_null())
        .collect();
    assert_eq!(finishes.len(), 1);
    assert_eq!(
        finishes[0]["choices"][0]["finish_reason"],
        choice["finish_reason"]
    );
    assert!(body_chunks.iter().all(|c| c["id"] == body_chunks[0]["id"]));
    s.assert_all_free().await;
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_streaming_with_two_choices() {
    let s = start(None, |_| {}).await;
    let body = json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Name a color."}]}], "max_tokens": 10, "temperature": 0, "n": 2});
    let (status, _, v) = s.call("/v1/chat/completions", None, &body).await;
    assert_eq!(status, 200, "{v}");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["message"]["role"], "assistant");
    }
    // Greedy: both choices are the same text; usage counts the prompt once.
    assert_eq!(
        choices[0]["message"]["content"],
        choices[1]["message"]["content"]
    );
    let plain = choices[0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, _, one) = s
        .call(
            "/v1/chat/completions",
            None,
            &json!({"messages": body["messages"], "max_tokens": 10, "temperature": 0}),
        )
        .await;
    assert_eq!(v["usage"]["prompt_tokens"], one["usage"]["prompt_tokens"]);

    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let frames = chunks(&s.stream("/v1/chat/completions", None, &sbody).await);
    for i in 0..2 {
        let mine: Vec<&Value> = frames
            .iter()
            .filter(|c| c["choices"][0]["index"] == i)
            .collect();
        assert_eq!(
            mine[0]["choices"][0]["delta"]["role"], "assistant",
            "first chunk carries the role"
        );
        assert_eq!(mine[0]["object"], "chat.completion.chunk");
        let fin = mine
            .iter()
            .filter(|c| !c["choices"][0]["finish_reason"].is_null())
            .count();
        assert_eq!(fin, 1, "exactly one finish_reason per choice");
        let text: String = mine
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, plain);
    }
    assert!(
        frames.iter().all(|c| c.get("usage").is_none()),
        "no usage chunk unless asked"
    );
    s.assert_all_free().await;
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_logprobs_echo_and_seeds() {
    let s = start(None, |_| {}).await;
    let prompt = "Once upon a time, there was a little";
    let base = json!({"prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": true});
    let (_, _, v) = s.call("/v1/completions", None, &base).await;
    let full = v["choices"][0]["text"].as_str().unwrap().to_string();
    // A stop string that the greedy text contains, starting mid-text.
    let words: Vec<&str> = full.split_whitespace().collect();
    assert!(words.len() >= 4, "{full:?}");
    let stop_word = words[2];
    let cut = full.find(stop_word).unwrap();
    let mut body = base.clone();
    body["stop"] = json!(["NEVER-APPEARS", stop_word]);
    let (_, _, v) = s.call("/v1/completions", None, &body).await;
    assert_eq!(v["choices"][0]["text"], json!(full[..cut]));
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    body["stream"] = json!(true);
    let frames = chunks(&s.stream("/v1/completions", None, &body).await);
    let streamed: String = frames
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, &full[..cut], "the stop string is never streamed");

    // logprobs with echo: prompt tokens first (the first has no logprob), then 2 generated.
    let body =
        json!({"prompt": prompt, "max_tokens": 2, "temperature": 0, "logprobs": 2, "echo": true});
    let (status, _, v) = s.call("/v1/completions", None, &body).await;
    assert_eq!(status, 200, "{v}");
    let c = &v["choices"][0];
    assert!(c["text"].as_str().unwrap().starts_with(prompt));
    let lp = &c["logprobs"];
    let n_prompt = v["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    let n = lp["tokens"].as_array().unwrap().len();
    assert_eq!(n, n_prompt + 2);
    for k in ["token_logprobs", "top_logprobs", "text_offset"] {
        assert_eq!(lp[k].as_array().unwrap().len(), n, "{k}");
    }
    assert!(lp["token_logprobs"][0].is_null());
    for i in 1..n {
        let x = lp["token_logprobs"][i].as_f64().unwrap();
        assert!(x <= 0.0, "{x}");
        assert_eq!(lp["top_logprobs"][i].as_object().unwrap().len(), 2);
    }
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "{offsets:?}");

    // A prompt logprob is the same number as the sampled logprob of that token when it was
    // generated: score prompt + first generated token with echo.
    let (_, _, ids) = s.call("/tokenize", None, &json!({"prompt": prompt})).await;
    let mut ids: Vec<u64> = ids["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    let (_, _, gen) = s
        .call(
            "/v1/completions",
            None,
            &json!({"prompt": ids, "max_tokens": 1, "temperature": 0, "logprobs": 1}),
        )
        .await;
    let sampled_lp = gen["choices"][0]["logprobs"]["token_logprobs"][0]
        .as_f64()
        .unwrap();
    let (_, _, t) = s
        .call(
            "/tokenize",
            None,
            &json!({"prompt": gen["choices"][0]["text"], "add_special_tokens": false}),
        )
        .await;
    assert_eq!(t["count"], 1, "{t}");
    ids.push(t["tokens"][0].as_u64().unwrap());
    let (_, _, echo) = s
        .call(
            "/v1/completions",
            None,
            &json!({"prompt": ids, "max_tokens": 1, "temperature": 0, "logprobs": 0, "echo": true}),
        )
        .await;
    let lps = echo["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap();
    let prompt_lp = lps[ids.len() - 1].as_f64().unwrap();
    assert!(
        (prompt_lp - sampled_lp).abs() < 1e-3,
        "{prompt_lp} vs {sampled_lp}"
    );

    // Chat logprobs: one entry per generated token, with raw bytes and alternatives.
    let body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0, "logprobs": true, "top_logprobs": 3, "ignore_eos": true});
    let (_, _, v) = s.call("/v1/chat/completions", None, &body).await;
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 4);
    let joined: Vec<u8> = content
        .iter()
        .flat_map(|e| {
            e["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8)
        })
        .collect();
    assert_eq!(
        String::from_utf8(joined).unwrap(),
        v["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert!(content
        .iter()
        .all(|e| e["top_logprobs"].as_array().unwrap().len() == 3));

    // Seeds: the same seed gives the same text at temperature 1.
    let body = json!({"prompt": prompt, "max_tokens": 12, "temperature": 1.0, "seed": 1234});
    let (_, _, a) = s.call("/v1/completions", None, &body).await;
    let (_, _, b) = s.call("/v1/completions", None, &body).await;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    s.assert_all_free().await;
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_have_the_right_status_and_envelope() {
    let s = start(Some(tenants(1000)), |_| {}).await;
    let ok = json!({"prompt": "Hello", "max_tokens": 2});
    let check = |status: u16, v: &Value, want: u16, code: &str| {
        assert_eq!(status, want, "{v}");
        let e = &v["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(e["type"].is_string());
        assert_eq!(e["code"], code, "{v}");
    };
    // 401: no key, wrong key; x-api-key works like Bearer.
    let (st, _, v) = s.call("/v1/completions", None, &ok).await;
    check(st, &v, 401, "invalid_api_key");
    let (st, _, v) = s.call("/v1/completions", Some("sk-wrong"), &ok).await;
    check(st, &v, 401, "invalid_api_key");
    let r = reqwest::Client::new()
        .post(s.url("/v1/completions"))
        .header("x-api-key", KEY_B)
        .json(&ok)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // 400s name the parameter.
    for (patch, param) in [
        (json!({"temperature": -1}), "temperature"),
        (json!({"n": 0}), "n"),
        (json!({"top_p": 0}), "top_p"),
        (json!({"logprobs": 50}), "logprobs"),
        (json!({"logit_bias": {"99999999": 1}}), "logit_bias"),
        (json!({"kv_policy": "nonsense"}), "kv_policy"),
        (json!({"max_tokens": 0}), "max_tokens"),
        (
            json!({"response_format": {"type": "json_object"}}),
            "response_format",
        ),
    ] {
        let mut b = ok.clone();
        b.as_object_mut()
            .unwrap()
            .extend(patch.as_object().unwrap().clone());
        let (st, _, v) = s.call("/v1/completions", Some(KEY_A), &b).await;
        check(st, &v, 400, "invalid_value");
        assert_eq!(v["error"]["param"], param);
    }
    let (st, _, v) = s
        .call(
            "/v1/completions",
            Some(KEY_A),
            &json!({"prompt": "Hello", "max_tokens": 8192}),
        )
        .await;
    check(st, &v, 400, "context_length_exceeded");
    let (st, _, v) = s
        .call("/v1/completions", Some(KEY_A), &json!({"prompt": 5}))
        .await;
    check(st, &v, 400, "invalid_value");
    // Malformed JSON is 400, never 422.
    let r = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(KEY_A)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // 404: unknown model, unknown route.
    let (st, _, v) = s
        .call(
            "/v1/completions",
            Some(KEY_A),
            &json!({"model": "gpt-9", "prompt": "x"}),
        )
        .await;
    check(st, &v, 404, "model_not_found");
    let (st, _, v) = s.call("/v1/nothing", Some(KEY_A), &ok).await;
    check(st, &v, 404, "not_found");
    // 413: a body over the limit.
    let big = json!({"prompt": "a ".repeat(40_000)});
    let (st, _, v) = s.call("/v1/completions", Some(KEY_A), &big).await;
    check(st, &v, 413, "request_too_large");
    // Unknown fields are ignored; the server still answers after every error.
    let mut b = ok.clone();
    b["some_future_field"] = json!({"x": 1});
    let (st, _, v) = s.call("/v1/completions", Some(KEY_A), &b).await;
    assert_eq!(st, 200, "{v}");
    // Structured output and tool calls are refused, not answered with free text; `text` and
    // `tool_choice: "none"` are served.
    let chat = |extra: Value| {
        let mut b = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        b
    };
    let tool = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
    let schema = json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {}}});
    for (extra, refused) in [
        (json!({"response_format": schema}), Some("response_format")),
        (json!({"tools": tool}), Some("tools")),
        (
            json!({"tools": tool, "tool_choice": "auto"}),
            Some("tool_choice"),
        ),
        (json!({"tool_choice": "required"}), Some("tool_choice")),
        (json!({"functions": [{"name": "f"}]}), Some("functions")),
        (json!({"function_call": "auto"}), Some("function_call")),
        (
            json!({"functions": [{"name": "f"}], "function_call": "none"}),
            None,
        ),
        (json!({"response_format": {"type": "text"}}), None),
        (json!({"tools": tool, "tool_choice": "none"}), None),
        (json!({"tools": []}), None),
    ] {
        let (st, _, v) = s
            .call("/v1/chat/completions", Some(KEY_A), &chat(extra.clone()))
            .await;
        match refused {
            Some(param) => {
                check(st, &v, 400, "invalid_value");
                assert_eq!(v["error"]["param"], param, "{extra}");
            }
            None => assert_eq!(st, 200, "{extra}: {v}"),
        }
    }
    // The small endpoints.
    let models: Value = s.get_json("/v1/models", Some(KEY_A)).await;
    assert_eq!(models["data"][0]["id"], "SmolLM2-135M-Instruct");
    let (st, _, v) = s
        .call("/tokenize", Some(KEY_A), &json!({"prompt": "Hello world"}))
        .await;
    assert_eq!(st, 200);
    let ids = v["tokens"].clone();
    assert_eq!(v["count"], ids.as_array().unwrap().len());
    let (_, _, v) = s
        .call("/detokenize", Some(KEY_A), &json!({"tokens": ids}))
        .await;
    assert_eq!(v["prompt"], "Hello world");
    let health = reqwest::get(s.url("/health")).await.unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(reqwest::get(s.url("/ready")).await.unwrap().status(), 200);
    let spec: Value = reqwest::get(s.url("/openapi.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for p in [
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/tokenize",
        "/detokenize",
        "/health",
        "/ready",
        "/metrics",
    ] {
        assert!(spec["paths"].get(p).is_some(), "openapi lacks {p}");
    }
    let metrics = reqwest::get(s.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("kvserve_http_requests_total"), "{metrics}");
    assert!(metrics.contains("kvserve_kv_cache_bytes{state=\"free\"}"));
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_rate_limited_and_cache_isolated_separately() {
    let s = start(Some(tenants(2)), |_| {}).await;
    // A ~100-token prompt sent by alpha twice hits alpha's prefix cache the second time.
    let prompt = "The history of the city begins with a small settlement on the river bank, where fishermen and traders met every spring to exchange salt, grain, wool and news from the distant mountain villages, and over the centuries the settlement grew into a market town with stone walls, a cathedral, a university and a harbour full of ships from every country of the known world.";
    let body = json!({"prompt": prompt, "max_tokens": 1});
    let (st, _, a1) = s.call("/v1/completions", Some(KEY_A), &body).await;
    assert_eq!(st, 200, "{a1}");
    assert!(a1["usage"]["prompt_tokens"].as_u64().unwrap() >= 64);
    let (_, _, a2) = s.call("/v1/completions", Some(KEY_A), &body).await;
    assert!(
        a2["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 0,
        "{a2}"
    );
    // beta sends the same prompt: no hit on alpha's blocks.
    let (_, _, b1) = s.call("/v1/completions", Some(KEY_B), &body).await;
    assert_eq!(
        b1["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
        "{b1}"
    );
    // alpha is over its 2 requests/minute: 429 with Retry-After and x-ratelimit headers.
    let (st, h, v) = s.call("/v1/completions", Some(KEY_A), &body).await;
    assert_eq!(st, 429, "{v}");
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert!(h["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(h["x-ratelimit-limit-requests"], "2");
    assert_eq!(h["x-ratelimit-remaining-requests"], "0");
    // beta is served normally meanwhile.
    let (st, _, _) = s.call("/v1/completions", Some(KEY_B), &body).await;
    assert_eq!(st, 200);
    // A client salt only subdivides alpha's own scope: a new salt misses.
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnected_streams_free_their_blocks() {
    let s = start(None, |_| {}).await;
    let body = json!({"prompt": "Write a long story about a dragon.", "max_tokens": 2000, "ignore_eos": true, "stream": true, "temperature": 0});
    for _ in 0..4 {
        let mut resp = reqwest::Client::new()
            .post(s.url("/v1/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        // Read a few chunks, then hang up.
        let mut got = 0;
        while got < 3 {
            let c = resp.chunk().await.unwrap().unwrap();
            got += String::from_utf8_lossy(&c).matches("data: ").count();
        }
        drop(resp);
    }
    s.assert_all_free().await;
    // The engine keeps serving.
    let (st, _, _) = s
        .call(
            "/v1/completions",
            None,
            &json!({"prompt": "Hi", "max_tokens": 2}),
        )
        .await;
    assert_eq!(st, 200);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_streams() {
    let s = start(None, |_| {}).await;
    let body = json!({"prompt": "Count:", "max_tokens": 40, "ignore_eos": true, "stream": true, "temperature": 0});
    let resp = reqwest::Client::new()
        .post(s.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let state = s.state.clone();
    let addr = s.addr;
    let reader = tokio::spawn(async move { resp.text().await.unwrap() });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let shutdown = tokio::spawn(s.shutdown());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!state.is_ready(), "/ready reports draining");
    // No new connections are accepted while draining.
    let refused = reqwest::Client::new()
        .post(format!("http://{addr}/v1/completions"))
        .json(&json!({"prompt": "x", "max_tokens": 1}))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(refused.is_err() || refused.unwrap().status() == 503);
    let text = reader.await.unwrap();
    assert!(
        text.trim_end().ends_with("data: [DONE]"),
        "the in-flight stream finished: {text}"
    );
    assert!(text.contains("\"finish_reason\":\"length\""));
    shutdown.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_loading_health_answers_and_ready_is_503() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(kvserve::http::serve_loading(listener, async move {
        let _ = rx.await;
    }));
    let get = |p: &str| reqwest::get(format!("http://{addr}{p}"));
    assert_eq!(get("/health").await.unwrap().status(), 200);
    let r = get("/ready").await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let r = reqwest::Client::new()
        .post(format!("http://{addr}/v1/completions"))
        .json(&json!({"prompt": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "loading");
    tx.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_policies_per_tenant_and_per_request() {
    // alpha: kivi4 by default, may ask for int8 only. beta: bf16, a quota of 6 bf16 blocks,
    // falls back to kivi2 when a request does not fit.
    let toml = format!(
        r#"
[[tenant]]
id = "alpha"
api_keys_sha256 = ["{}"]
kv_policy = "kivi4"
kv_policies_allowed = ["kivi4", "int8"]
[[tenant]]
id = "beta"
api_keys_sha256 = ["{}"]
max_blocks = 6
kv_policy_fallback = ["kivi2"]
"#,
        hash_key(KEY_A),
        hash_key(KEY_B)
    );
    let tenancy = Tenancy::from_toml(&toml, Path::new("tenants.toml")).unwrap();
    let s = start(Some(tenancy), |_| {}).await;

    // The catalog: every policy with bytes per token, bf16 the heaviest of the formats.
    let list: Value = s.get_json("/v1/kv_policies", Some(KEY_A)).await;
    assert_eq!(list["object"], "list");
    let entry = |name: &str| {
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing: {list}"))
            .clone()
    };
    let bf16 = entry("bf16")["bytes_per_token"].as_f64().unwrap();
    // SmolLM2-135M: 30 layers × 2 × 192 × 2 bytes.
    assert_eq!(bf16, 23040.0);
    let kivi4 = entry("kivi4")["bytes_per_token"].as_f64().unwrap();
    assert!((kivi4 / bf16 - 0.344).abs() < 0.01, "{kivi4}");
    assert!(entry("int8")["memory_vs_bf16"].as_f64().unwrap() < 0.53);
    assert_eq!(entry("bf16+window:1024")["prefix_sharing"], false);

    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(12);
    let body = |policy: Option<&str>| {
        let mut b = json!({"prompt": prompt, "max_tokens": 4, "temperature": 0});
        if let Some(p) = policy {
            b["kv_policy"] = json!(p);
        }
        b
    };
    // Tenant default, then an allowed request override: usage.kv reports policy and bytes.
    let (st, _, v) = s.call("/v1/completions", Some(KEY_A), &body(None)).await;
    assert_eq!(st, 200, "{v}");
    let kv = &v["usage"]["kv"];
    assert_eq!(kv["policy"], "kivi4", "{v}");
    let (bytes, saved) = (
        kv["bytes"].as_u64().unwrap(),
        kv["bytes_saved_vs_bf16"].as_u64().unwrap(),
    );
    assert!(bytes > 0 && saved > bytes, "kivi4 saves ~2/3: {kv}");
    let (st, _, v) = s
        .call("/v1/completions", Some(KEY_A), &body(Some("int8")))
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["usage"]["kv"]["policy"], "int8");
    assert_eq!(
        v["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
        "int8 never reads kivi4 blocks of the same prompt: {v}"
    );
    // Not allowed for alpha, and unknown: 400 naming the allowed ones.
    for bad in ["kivi2", "fp4", "mhc:64"] {
        let (st, _, v) = s
            .call("/v1/completions", Some(KEY_A), &body(Some(bad)))
            .await;
        assert_eq!(st, 400, "{bad}: {v}");
        assert_eq!(v["error"]["param"], "kv_policy");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("kivi4") && msg.contains("int8"), "{msg}");
    }
    // The same prompt under another policy never hits alpha's kivi4 blocks.
    let (_, _, v) = s.call("/v1/completions", Some(KEY_A), &body(None)).await;
    assert!(
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
    let (_, _, v) = s
        .call("/v1/completions", Some(KEY_A), &body(Some("int8")))
        .await;
    let int8_hit = v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    let (_, _, v2) = s
        .call(
            "/v1/completions",
            Some(KEY_A),
            &json!({"prompt": prompt, "max_tokens": 4, "kv_policy": "int8", "cache_salt": "fresh"}),
        )
        .await;
    assert_eq!(
        v2["usage"]["prompt_tokens_details"]["cached_tokens"], 0,
        "{v2}"
    );
    assert!(int8_hit > 0, "int8 hits its own earlier blocks");

    // beta: ~130 tokens cannot fit 6 bf16 blocks, but fit under kivi2: admitted, reported.
    let (st, _, v) = s.call("/v1/completions", Some(KEY_B), &body(None)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["usage"]["kv"]["policy"], "kivi2", "{v}");
    assert_eq!(v["usage"]["kv"]["fallback"], true);
    s.assert_all_free().await;
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mhc_is_served_from_a_calibration_file() {
    // `kvserve calibrate` on a GFDL excerpt (the CLI end to end), then a server with the file.
    let dir = tempfile::tempdir().unwrap();
    let proj = dir.path().join("mhc32.safetensors");
    let text = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/gfdl-1.3-head.txt");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvserve"))
        .args(["calibrate", "--model"])
        .arg(server::model_path())
        .arg("--text")
        .arg(&text)
        .args(["--rank", "32", "--ctx", "256", "--out"])
        .arg(&proj)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("calibrated mhc:32"), "{stderr}");
    let s = start(None, |c| c.kv.calibrations = vec![proj.clone()]).await;

    let list: Value = s.get_json("/v1/kv_policies", None).await;
    let entry = |name: &str| {
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing: {list}"))
            .clone()
    };
    // Per layer and block: a 16 × 32 bf16 latent + 3 heads of int8 (or 4-bit) values.
    let ratio = |name: &str| entry(name)["memory_vs_bf16"].as_f64().unwrap();
    assert!((ratio("mhc:32+int8") - 4192.0 / 12288.0).abs() < 1e-6);
    assert!((ratio("mhc:32+kivi4") - 2944.0 / 12288.0).abs() < 1e-6);
    assert_eq!(entry("mhc:32+int8")["prefix_sharing"], true);

    let body = |p: &str| json!({"prompt": "The quick brown fox jumps over the lazy dog. ".repeat(6), "max_tokens": 4, "temperature": 0, "kv_policy": p});
    let (st, _, v) = s.call("/v1/completions", None, &body("mhc:32")).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["usage"]["kv"]["policy"], "mhc:32+int8", "{v}");
    assert!(!v["choices"][0]["text"].as_str().unwrap().is_empty());
    // No projection of rank 48: refused, naming what is served.
    let (st, _, v) = s.call("/v1/completions", None, &body("mhc:48")).await;
    assert_eq!(st, 400, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("mhc:32+int8"), "{msg}");
    s.assert_all_free().await;
    s.shutdown().await;
}
