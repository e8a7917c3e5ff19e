//! Metrics and logs end to end: the real server (real model, 127.0.0.1:0) serves a few
//! requests of two tenants, some refused; then `/metrics` must pass `promtool check metrics`,
//! every counter and histogram must have moved by exactly what the responses report, per
//! tenant, and the JSON logs must carry request ids and tenants but no prompt or completion
//! text.
//!
//! Fails (does not skip) when the model or `promtool` is missing: run scripts/fetch-model.sh,
//! and install the `prometheus` Debian package (or point KVSERVE_PROMTOOL at a promtool).

mod common;

use common::server::{self, TestServer};
use kvserve::tenancy::{hash_key, Tenancy};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

const KEY_A: &str = "sk-obs-alpha";
const KEY_B: &str = "sk-obs-beta";
/// Words that appear in the prompts and must never appear in the logs.
const MARKER: &str = "Zebrafinch quokka marmalade";

/// Log lines of the whole test binary (one global subscriber, JSON, debug for kvserve).
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let w = buf.clone();
        let make = move || SharedWriter(w.clone());
        let sub = kvserve::logging::subscriber(
            "info,kvserve=debug",
            kvserve::logging::LogFormat::Json,
            make,
        )
        .unwrap();
        tracing::subscriber::set_global_default(sub).unwrap();
        buf
    })
    .clone()
}

struct SharedWriter(Arc<Mutex<Vec<u8>>>);

impl Write for SharedWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn promtool() -> String {
    let p = std::env::var("KVSERVE_PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let ok = Command::new(&p)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "`{p}` is missing: install the `prometheus` Debian package (apt-get install \
         prometheus; .ci/run does) or set KVSERVE_PROMTOOL"
    );
    p
}

/// This file's requests, each on a fresh connection (`TestServer::post` reuses one client).
impl TestServer {
    /// POST `body` as JSON with `key`: status and JSON body (a non-JSON body as a string).
    async fn call(&self, path: &str, key: &str, body: &Value) -> (u16, Value) {
        let resp = reqwest::Client::new()
            .post(self.url(path))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// A streaming request's chunks (the `[DONE]` frame checked and dropped).
    async fn stream(&self, path: &str, key: &str, body: &Value) -> Vec<Value> {
        let resp = reqwest::Client::new()
            .post(self.url(path))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let text = resp.text().await.unwrap();
        let frames: Vec<&str> = text
            .split("\n\n")
            .filter(|f| f.starts_with("data: "))
            .map(|f| &f[6..])
            .collect();
        assert_eq!(frames.last(), Some(&"[DONE]"), "{text}");
        frames[..frames.len() - 1]
            .iter()
            .map(|f| serde_json::from_str(f).unwrap())
            .collect()
    }

    async fn wait_idle(&self) {
        let t0 = Instant::now();
        loop {
            let st = self.state.engine.stats();
            if st.scheduler.running == 0 && st.scheduler.waiting == 0 {
                return;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "engine never idled");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Parsed Prometheus text: every sample as (name, labels) → value.
struct Samples(Vec<(String, BTreeMap<String, String>, f64)>);

impl Samples {
    fn parse(text: &str) -> Self {
        let mut out = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                None => (series.to_string(), BTreeMap::new()),
                Some((n, rest)) => {
                    let body = rest.strip_suffix('}').unwrap();
                    let labels = body
                        .split("\",")
                        .filter(|kv| !kv.is_empty())
                        .map(|kv| {
                            let (k, v) = kv.split_once("=\"").unwrap();
                            (k.to_string(), v.trim_end_matches('"').to_string())
                        })
                        .collect();
                    (n.to_string(), labels)
                }
            };
            let v = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap(),
            };
            out.push((name, labels, v));
        }
        Self(out)
    }

    /// The value of the sample named `name` with exactly `labels`; 0 if it does not exist
    /// (an untouched labelled counter).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.0
            .iter()
            .find(|(n, l, _)| n == name && *l == want)
            .map_or(0.0, |(_, _, v)| *v)
    }

    /// The `le` edges of a histogram's buckets for `tenant` (without `+Inf`).
    fn edges(&self, name: &str, tenant: &str) -> Vec<f64> {
        let bucket = format!("{name}_bucket");
        self.0
            .iter()
            .filter(|(n, l, _)| *n == bucket && l["tenant"] == tenant && l["le"] != "+Inf")
            .map(|(_, l, _)| l["le"].parse().unwrap())
            .collect()
    }
}

fn tenancy() -> Tenancy {
    // alpha: two requests a minute. beta: 6 bf16 blocks at most, falls back to kivi2.
    let toml = format!(
        r#"
[[tenant]]
id = "alpha"
api_keys_sha256 = ["{}"]
requests_per_minute = 2
[[tenant]]
id = "beta"
api_keys_sha256 = ["{}"]
max_blocks = 6
kv_policy_fallback = ["kivi2"]
"#,
        hash_key(KEY_A),
        hash_key(KEY_B)
    );
    Tenancy::from_toml(&toml, Path::new("tenants.toml")).unwrap()
}

fn usage_u64(v: &Value, path: &[&str]) -> u64 {
    let mut x = &v["usage"];
    for p in path {
        x = &x[*p];
    }
    x.as_u64()
        .unwrap_or_else(|| panic!("usage.{path:?} in {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_by_what_the_requests_did_and_logs_hold_no_text() {
    let logs = logs();
    let promtool = promtool();
    let s = server::start(Some(tenancy()), |_| {}).await;

    // ~140 tokens: a prefix hit of whole blocks on the repeat; too big for beta under bf16.
    let prompt = format!(
        "{MARKER}. {}",
        "The quick brown fox jumps over the lazy dog. ".repeat(12)
    );
    let body = json!({"prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": true});

    // alpha: the same prompt twice (the second hits the prefix cache).
    let (st, a1) = s.call("/v1/completions", KEY_A, &body).await;
    assert_eq!(st, 200, "{a1}");
    let (st, a2) = s.call("/v1/completions", KEY_A, &body).await;
    assert_eq!(st, 200, "{a2}");
    assert_eq!(
        usage_u64(&a1, &["prompt_tokens_details", "cached_tokens"]),
        0
    );
    let hit = usage_u64(&a2, &["prompt_tokens_details", "cached_tokens"]);
    assert!(hit >= 16 && hit.is_multiple_of(16), "{a2}");

    // beta: a streamed chat, then the long prompt (admitted under its kivi2 fallback).
    let chunks = s
        .stream(
            "/v1/chat/completions",
            KEY_B,
            &json!({"messages": [{"role": "user", "content": format!("{MARKER}: say hi")}],
                "max_tokens": 3, "temperature": 0, "ignore_eos": true, "stream": true,
                "stream_options": {"include_usage": true}}),
        )
        .await;
    let b1 = chunks.last().unwrap().clone();
    assert_eq!(usage_u64(&b1, &["completion_tokens"]), 3, "{b1}");
    let (st, b2) = s.call("/v1/completions", KEY_B, &body).await;
    assert_eq!(st, 200, "{b2}");
    assert_eq!(b2["usage"]["kv"]["policy"], "kivi2", "{b2}");
    let saved = usage_u64(&b2, &["kv", "bytes_saved_vs_bf16"]);
    assert!(saved > 0);

    // Refusals: a bad key, a prompt longer than the context, alpha's third request a minute.
    let (st, _) = s.call("/v1/completions", "sk-wrong", &body).await;
    assert_eq!(st, 401);
    let too_long = json!({"prompt": vec![28; 8192], "max_tokens": 1});
    let (st, v) = s.call("/v1/completions", KEY_A, &too_long).await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let (st, v) = s.call("/v1/completions", KEY_A, &body).await;
    assert_eq!(st, 429, "{v}");

    s.wait_idle().await;
    let resp = reqwest::get(s.url("/metrics")).await.unwrap();
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = resp.text().await.unwrap();

    // promtool: the exposition is valid and lint-clean.
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let m = Samples::parse(&text);
    fn t(name: &str) -> [(&str, &str); 1] {
        [("tenant", name)]
    }
    let count = |h: &str, tenant: &str| m.get(&format!("kvserve_{h}_count"), &t(tenant));

    // Tokens, per tenant.
    let prompt_a = usage_u64(&a1, &["prompt_tokens"]) + usage_u64(&a2, &["prompt_tokens"]);
    let prompt_b = usage_u64(&b1, &["prompt_tokens"]) + usage_u64(&b2, &["prompt_tokens"]);
    assert_eq!(
        m.get("kvserve_prompt_tokens_total", &t("alpha")),
        prompt_a as f64
    );
    assert_eq!(
        m.get("kvserve_prompt_tokens_total", &t("beta")),
        prompt_b as f64
    );
    assert_eq!(m.get("kvserve_generation_tokens_total", &t("alpha")), 8.0);
    assert_eq!(m.get("kvserve_generation_tokens_total", &t("beta")), 7.0);
    assert_eq!(m.get("kvserve_generation_tokens_total", &t("other")), 0.0);
    // Prefix cache: alpha looked up both prompts in full and hit what a2 reports.
    assert_eq!(
        m.get("kvserve_prefix_cache_queries_total", &t("alpha")),
        prompt_a as f64
    );
    assert_eq!(
        m.get("kvserve_prefix_cache_hits_total", &t("alpha")),
        hit as f64
    );
    assert_eq!(m.get("kvserve_prefix_cache_hits_total", &t("beta")), 0.0);

    // Histograms: one TTFT, e2e and queue time per request; one ITL per token after the first.
    for h in [
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
    ] {
        assert_eq!(count(h, "alpha"), 2.0, "{h}");
        assert_eq!(count(h, "beta"), 2.0, "{h}");
        assert_eq!(count(h, "other"), 0.0, "{h}");
    }
    assert_eq!(count("inter_token_latency_seconds", "alpha"), 6.0);
    assert_eq!(count("inter_token_latency_seconds", "beta"), 5.0);
    let sum = |h: &str, tenant: &str| m.get(&format!("kvserve_{h}_sum"), &t(tenant));
    for tenant in ["alpha", "beta"] {
        let (ttft, e2e) = (
            sum("time_to_first_token_seconds", tenant),
            sum("e2e_request_latency_seconds", tenant),
        );
        assert!(ttft > 0.0 && ttft <= e2e, "{tenant}: ttft {ttft} e2e {e2e}");
        assert!(sum("request_queue_time_seconds", tenant) <= ttft);
    }
    // vLLM's bucket edges.
    assert_eq!(
        m.edges("kvserve_time_to_first_token_seconds", "alpha"),
        kvserve::metrics::TTFT_BUCKETS
    );
    assert_eq!(
        m.edges("kvserve_inter_token_latency_seconds", "beta"),
        kvserve::metrics::ITL_BUCKETS
    );
    assert_eq!(
        m.edges("kvserve_e2e_request_latency_seconds", "alpha"),
        kvserve::metrics::REQUEST_BUCKETS
    );

    // Finished requests, compression, fallbacks.
    let fin = |tenant, reason| {
        m.get(
            "kvserve_request_success_total",
            &[("tenant", tenant), ("finished_reason", reason)],
        )
    };
    assert_eq!((fin("alpha", "length"), fin("beta", "length")), (2.0, 2.0));
    // As `usage.kv` reported them (b1 may or may not have needed the fallback too).
    let pol = |tenant, policy| [("tenant", tenant), ("policy", policy)];
    let mut saved_by: BTreeMap<&str, u64> = BTreeMap::new();
    let mut fallbacks: BTreeMap<&str, u64> = BTreeMap::new();
    for v in [&b1, &b2] {
        let kv = &v["usage"]["kv"];
        let policy = kv["policy"].as_str().unwrap();
        *saved_by.entry(policy).or_default() += kv["bytes_saved_vs_bf16"].as_u64().unwrap();
        *fallbacks.entry(policy).or_default() += u64::from(kv["fallback"] == true);
    }
    assert_eq!(
        fallbacks["kivi2"],
        1 + u64::from(b1["usage"]["kv"]["fallback"] == true)
    );
    assert!(saved_by["kivi2"] >= saved);
    for (policy, bytes) in &saved_by {
        let got = m.get(
            "kvserve_kv_compression_bytes_saved_total",
            &pol("beta", policy),
        );
        assert_eq!(got, *bytes as f64, "{policy}");
        let got = m.get("kvserve_kv_fallback_admissions_total", &pol("beta", policy));
        assert_eq!(got, fallbacks[policy] as f64, "{policy}");
    }
    assert_eq!(
        m.get(
            "kvserve_kv_compression_bytes_saved_total",
            &pol("alpha", "bf16")
        ),
        0.0
    );

    // Rejections by tenant and reason; nothing else refused.
    let rej = |tenant, reason| {
        m.get(
            "kvserve_request_rejections_total",
            &[("tenant", tenant), ("reason", reason)],
        )
    };
    assert_eq!(rej("other", "auth"), 1.0);
    assert_eq!(rej("alpha", "context_length"), 1.0);
    assert_eq!(rej("alpha", "rate_limit"), 1.0);
    let total: f64 =
        m.0.iter()
            .filter(|(n, _, _)| n == "kvserve_request_rejections_total")
            .map(|(_, _, v)| v)
            .sum();
    assert_eq!(total, 3.0);
    let http = |endpoint, status| {
        m.get(
            "kvserve_http_requests_total",
            &[("endpoint", endpoint), ("status", status)],
        )
    };
    assert_eq!(http("/v1/completions", "200"), 3.0);
    assert_eq!(http("/v1/chat/completions", "200"), 1.0);
    assert_eq!(http("/v1/completions", "401"), 1.0);
    assert_eq!(http("/v1/completions", "400"), 1.0);
    assert_eq!(http("/v1/completions", "429"), 1.0);

    // Idle: nothing running or waiting, no KV in use, the prompts' blocks cached.
    for tenant in ["alpha", "beta", "other"] {
        assert_eq!(m.get("kvserve_num_requests_running", &t(tenant)), 0.0);
        assert_eq!(m.get("kvserve_num_requests_waiting", &t(tenant)), 0.0);
    }
    assert_eq!(m.get("kvserve_kv_cache_usage_perc", &[]), 0.0);
    assert_eq!(m.get("kvserve_engine_healthy", &[]), 1.0);
    assert!(m.get("kvserve_kv_cache_blocks", &[("state", "cached")]) >= (hit / 16) as f64);
    assert!(m.get("kvserve_kv_cache_bytes", &[("state", "free")]) > 0.0);
    // Every family (docs/deploy.md lists them) is exported, the unmoved ones too.
    let mut families: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap())
        .filter(|f| !f.starts_with("process_"))
        .collect();
    families.sort();
    let mut expected = vec![
        "kvserve_computed_tokens_total",
        "kvserve_e2e_request_latency_seconds",
        "kvserve_engine_healthy",
        "kvserve_generation_tokens_total",
        "kvserve_http_requests_total",
        "kvserve_inter_token_latency_seconds",
        "kvserve_kv_cache_blocks",
        "kvserve_kv_cache_bytes",
        "kvserve_kv_cache_evictions_total",
        "kvserve_kv_cache_tenant_bytes",
        "kvserve_kv_cache_tenant_usage_perc",
        "kvserve_kv_cache_usage_perc",
        "kvserve_kv_compression_bytes_saved_total",
        "kvserve_kv_fallback_admissions_total",
        "kvserve_num_preemptions_total",
        "kvserve_num_requests_running",
        "kvserve_num_requests_waiting",
        "kvserve_prefix_cache_hits_total",
        "kvserve_prefix_cache_queries_total",
        "kvserve_prompt_tokens_total",
        "kvserve_request_queue_time_seconds",
        "kvserve_request_rejections_total",
        "kvserve_request_success_total",
        "kvserve_time_to_first_token_seconds",
    ];
    expected.sort();
    assert_eq!(families, expected);
    assert!(!text.contains("kvserve:"), "colons are for recording rules");
    // The standard process families: this test process holds the model's weights, and its
    // start time is the wall clock's past.
    assert!(m.get("process_resident_memory_bytes", &[]) > 50e6);
    let start = m.get("process_start_time_seconds", &[]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        start > now - 86_400.0 && start <= now,
        "start {start}, now {now}"
    );
    assert!(m.get("process_threads", &[]) >= 2.0);
    assert!(m.get("process_cpu_seconds_total", &[]) > 0.0);

    s.shutdown().await;

    // Logs: JSON lines with the request span (id, tenant); never the prompt's or the
    // completion's text.
    let log = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    for word in MARKER.split(' ').chain(["quick brown fox", "say hi"]) {
        assert!(!log.contains(word), "`{word}` leaked into the logs");
    }
    for done in [&a1, &a2, &b2] {
        let text = done["choices"][0]["text"].as_str().unwrap();
        if text.trim().len() >= 12 {
            assert!(!log.contains(text), "completion text leaked into the logs");
        }
    }
    let finished: Vec<&Value> = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "choice finished")
        .collect();
    assert_eq!(finished.len(), 4, "{log}");
    let a1_line = finished
        .iter()
        .find(|l| l["span"]["id"] == a1["id"])
        .expect("a log line for a1's request span");
    assert_eq!(a1_line["span"]["tenant"], "alpha");
    assert_eq!(a1_line["span"]["endpoint"], "/v1/completions");
    assert_eq!(a1_line["fields"]["completion_tokens"], 4);
    let refused: Vec<(u64, Value)> = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "request refused")
        .map(|l| {
            (
                l["fields"]["status"].as_u64().unwrap(),
                l["span"]["tenant"].clone(),
            )
        })
        .collect();
    assert!(refused.contains(&(401, Value::Null)), "{refused:?}");
    assert!(refused.contains(&(400, json!("alpha"))), "{refused:?}");
    assert!(refused.contains(&(429, json!("alpha"))), "{refused:?}");
    // The engine's debug events name requests and tenants too.
    assert!(lines
        .iter()
        .any(|l| l["fields"]["message"] == "admitted" && l["fields"]["tenant"] == "beta"));
}
