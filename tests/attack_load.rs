//! Attacks on the running server (issue 8, items 3 and 4), on the real model over loopback,
//! every loop and wait bounded:
//!
//! - overload at 10× capacity from three tenants (the real binary, so its RSS is its own):
//!   refusals are 429/503 with `Retry-After` and come fast, admitted requests finish, memory
//!   stays under the KV budget plus a stated overhead, the pool is all free afterwards;
//! - 100 clients hanging up mid-stream free every block and the engine keeps serving;
//! - a forward pass that fails (a backend that panics on a poison token) fails only the
//!   request that carries it: the others in its batch finish with the fault-free output;
//! - SIGTERM to the real binary under load: every in-flight stream finishes, new requests are
//!   refused, the process exits 0 within the drain timeout;
//! - slow clients (slowloris headers, a trickled body, a client that never reads its stream)
//!   are cut off by the server's timeouts and hold no KV blocks.
//!
//! Fails (does not skip) when the model is missing: run scripts/fetch-model.sh.

mod common;

use common::server::{self, model_path, TestServer};
use kvserve::backend::cpu::CpuBackend;
use kvserve::backend::kv_policy::KvPolicy;
use kvserve::backend::latent::LatentKeys;
use kvserve::backend::{AttnSeq, AttnShape, Backend, RopeParams, Seal};
use kvserve::config::Config;
use kvserve::error::BackendError;
use kvserve::model::tensor::HostTensor;
use kvserve::server::Server;
use kvserve::tenancy::{hash_key, Tenancy};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

// ---------------------------------------------------------------------------------------------
// Helpers: the shared in-process server (tests/common/server.rs), the real binary, /metrics, SSE.

/// This file's in-process servers use 96 MiB of KV rather than the shared 64 MiB.
fn more_kv(cfg: &mut Config) {
    cfg.kv.cache_bytes = 96 << 20;
}

/// A client that opens a fresh connection per request (servers here may close idle ones fast).
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// This file's requests, each on a fresh connection ([`client`]).
impl TestServer {
    /// POST `body` to `/v1/completions`: status and JSON body.
    async fn complete(&self, body: &Value) -> (u16, Value) {
        let resp = client()
            .post(self.url("/v1/completions"))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap())
    }

    async fn metrics(&self) -> String {
        let r = client().get(self.url("/metrics")).send().await.unwrap();
        r.text().await.unwrap()
    }

    /// Waits (≤ 30 s) until nothing runs or waits and no block is in use, checked both by the
    /// pool's invariant check on the engine thread and through `/metrics`.
    async fn assert_all_free_everywhere(&self) {
        let t0 = Instant::now();
        loop {
            let st = self.state.engine.stats();
            let kv = tokio::task::block_in_place(|| self.state.engine.check_kv())
                .expect("KV pool invariants hold");
            let m = self.metrics().await;
            if st.scheduler.running == 0
                && st.scheduler.waiting == 0
                && kv.used == 0
                && pool_is_free(&m)
            {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "blocks still in use: {kv:?}, running {}, waiting {}",
                st.scheduler.running,
                st.scheduler.waiting
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The sum of every series of `name` whose labels include all of `labels`.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (lbl, value) = match rest.strip_prefix('{') {
                Some(r) => {
                    let (lbl, v) = r.split_once('}')?;
                    (lbl, v)
                }
                None if rest.starts_with(' ') => ("", rest),
                None => return None,
            };
            labels
                .iter()
                .all(|(k, v)| lbl.contains(&format!("{k}=\"{v}\"")))
                .then(|| value.trim().parse::<f64>().ok())?
        })
        .sum()
}

/// `/metrics` says: no block in use, nothing running or waiting, usage 0.
fn pool_is_free(m: &str) -> bool {
    metric(m, "kvserve_kv_cache_blocks", &[("state", "used")]) == 0.0
        && metric(m, "kvserve_kv_cache_usage_perc", &[]) == 0.0
        && metric(m, "kvserve_num_requests_running", &[]) == 0.0
        && metric(m, "kvserve_num_requests_waiting", &[]) == 0.0
        && metric(m, "kvserve_kv_cache_blocks", &[("state", "free")]) > 0.0
}

/// The `data:` payloads of an SSE body.
fn sse_payloads(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter(|f| !f.trim().is_empty() && !f.starts_with(':'))
        .map(|f| f.strip_prefix("data: ").unwrap_or(f).to_string())
        .collect()
}

/// Checks a finished stream: ends with `[DONE]`, no error frame, one `finish_reason` per
/// choice; returns the text of choice 0.
fn check_complete_stream(text: &str, choices: usize) -> String {
    let frames = sse_payloads(text);
    assert_eq!(
        frames.last().map(String::as_str),
        Some("[DONE]"),
        "stream ends with [DONE]: {text}"
    );
    let mut out = String::new();
    let mut finishes = 0;
    for f in &frames[..frames.len() - 1] {
        let v: Value = serde_json::from_str(f).unwrap();
        assert!(v.get("error").is_none(), "error frame in stream: {f}");
        for c in v["choices"].as_array().unwrap() {
            if c["index"] == 0 {
                out.push_str(c["text"].as_str().unwrap_or(""));
            }
            if !c["finish_reason"].is_null() {
                finishes += 1;
            }
        }
    }
    assert_eq!(finishes, choices, "one finish_reason per choice: {text}");
    out
}

/// The real binary, serving on 127.0.0.1:<free port>; killed on drop if still running.
struct Proc {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Proc {
    fn spawn(config: &str, tenants: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cfg_path = dir.path().join("config.toml");
        std::fs::write(&cfg_path, config).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvserve"));
        cmd.arg("serve")
            .arg("--config")
            .arg(&cfg_path)
            .arg("--model")
            .arg(model_path())
            .args(["--port", "0", "--device", "cpu"]);
        if let Some(t) = tenants {
            let p = dir.path().join("tenants.toml");
            std::fs::write(&p, t).unwrap();
            cmd.arg("--tenants").arg(p);
        }
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        let mut child = cmd.stdout(Stdio::piped()).stderr(stderr).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        // Keeps draining stdout so the server never writes into a closed pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(a) = line.strip_prefix("kvserve: listening on http://") {
                    let _ = tx.send(a.parse::<SocketAddr>().unwrap());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| {
                let log =
                    std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default();
                panic!("the server did not start listening: {log}")
            });
        Self { child, addr, dir }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// Waits up to `limit` for the process to exit.
    fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `VmRSS` (or another `/proc/<pid>/status` field) in bytes.
fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .map_or(0, |kib: u64| kib * 1024)
}

fn sigterm(pid: u32) {
    let ok = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -TERM {pid}");
}

// ---------------------------------------------------------------------------------------------
// Item 3: overload.

const KEYS: [&str; 3] = ["sk-load-a", "sk-load-b", "sk-load-c"];
/// KV budget of the overload server, and the overhead above it its RSS may grow by under load
/// (connections, buffered events, per-step activations, allocator slack): docs/http.md.
const LOAD_KV_BYTES: u64 = 32 << 20;
const RSS_OVERHEAD: u64 = 64 << 20;

/// What one request of the load got.
#[derive(Debug)]
enum Outcome {
    /// 200 and a complete answer (stream with [DONE], or a JSON completion), with finish_reason.
    Done,
    /// 429/503 before any body: status, Retry-After, error code, seconds to the response.
    Refused(u16, u64, String, f64),
    /// 200 stream ended by an error frame (a queue timeout after the headers went out).
    RefusedInStream(String),
}

async fn load_request(url: String, i: usize) -> Outcome {
    let (key, stream) = (KEYS[i % 3], (i / 3).is_multiple_of(2));
    let body = json!({"prompt": format!("Request {i}: say something about the number {i}."),
        "max_tokens": 6, "ignore_eos": true, "temperature": 0, "stream": stream});
    let t0 = Instant::now();
    let resp = client()
        .post(url)
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let status = resp.status().as_u16();
    if status != 200 {
        let retry = resp
            .headers()
            .get("retry-after")
            .unwrap_or_else(|| panic!("{status} without Retry-After"))
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap();
        let v: Value = resp.json().await.unwrap();
        let code = v["error"]["code"].as_str().unwrap().to_string();
        assert!(v["error"]["message"].is_string() && v["error"]["type"].is_string());
        if status == 429 {
            assert_ne!(key, KEYS[2], "the unlimited tenant is never rate limited");
        }
        return Outcome::Refused(status, retry, code, secs);
    }
    let text = resp.text().await.unwrap();
    if !stream {
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
        return Outcome::Done;
    }
    let frames = sse_payloads(&text);
    if let Some(err) = frames.iter().find(|f| f.starts_with("{\"error\"")) {
        let v: Value = serde_json::from_str(err).unwrap();
        assert_eq!(frames.last().map(String::as_str), Some("[DONE]"));
        return Outcome::RefusedInStream(v["error"]["code"].as_str().unwrap().to_string());
    }
    check_complete_stream(&text, 1);
    Outcome::Done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_at_ten_times_capacity_is_refused_fast_and_leaks_nothing() {
    // Capacity: 4 running + 8 waiting = 12 requests. Tenants a and b may have 3 requests in
    // flight each (429 past that); tenant c is unlimited and floods the engine's queue (503).
    let config = format!(
        "[server]\ndrain_timeout_secs = 10\n[kv]\ncache_bytes = {LOAD_KV_BYTES}\n\
         [engine]\nmax_running = 4\nmax_waiting = 8\nmax_queue_ms = 10000\n"
    );
    let tenants: String = [("a", 3), ("b", 3), ("c", 0)]
        .iter()
        .zip(KEYS)
        .map(|((id, max), key)| {
            format!(
                "[[tenant]]\nid = \"{id}\"\napi_keys_sha256 = [\"{}\"]\nmax_concurrent = {max}\n",
                hash_key(key)
            )
        })
        .collect();
    let mut srv = Proc::spawn(&config, Some(&tenants));
    let pid = srv.pid();
    // The baseline is a warmed-up server: the first forward pass allocates the backend's
    // working memory (~3 MiB on the CPU backend; 120 MiB when the KV arenas still took huge
    // pages, docs/cpu-memory.md), which is not load.
    let warm = client()
        .post(srv.url("/v1/completions"))
        .bearer_auth(KEYS[2])
        .json(&json!({"prompt": "Warm up", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(warm.status(), 200);
    let base = proc_status_bytes(pid, "VmRSS:");
    assert!(base > 0);
    // Sample the server's RSS every 10 ms from now until the load is over.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(Ordering::Acquire) {
                peak = peak.max(proc_status_bytes(pid, "VmRSS:"));
                std::thread::sleep(Duration::from_millis(10));
            }
            peak
        })
    };
    // 120 requests = 10× capacity, 40 per tenant. Tenants a and b send theirs at once; the
    // flood of c follows 50 ms later. Sent together, c's could fill all 12 places before a or
    // b had 3 requests in flight, and then a and b got 503 instead of their 429 (seen once).
    let t_load = Instant::now();
    let tasks: Vec<_> = (0..120)
        .map(|i| {
            let url = srv.url("/v1/completions");
            tokio::spawn(async move {
                if i % 3 == 2 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                load_request(url, i).await
            })
        })
        .collect();
    let outcomes = tokio::time::timeout(Duration::from_secs(90), async {
        let mut v = Vec::new();
        for t in tasks {
            v.push(t.await.unwrap());
        }
        v
    })
    .await
    .expect("every request got an answer within 90 s");
    let load_secs = t_load.elapsed().as_secs_f64();

    let done = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Done))
        .count();
    let mut refusal_secs: Vec<f64> = Vec::new();
    let (mut n429, mut n503, mut in_stream) = (0, 0, 0);
    for o in &outcomes {
        match o {
            Outcome::Done => {}
            Outcome::Refused(status, retry, code, secs) => {
                assert!(*retry >= 1);
                match status {
                    429 => {
                        assert_eq!(code, "rate_limit_exceeded");
                        n429 += 1;
                    }
                    503 => {
                        assert!(
                            ["overloaded", "queue_timeout"].contains(&code.as_str()),
                            "{code}"
                        );
                        n503 += 1;
                    }
                    s => panic!("unexpected status {s} ({code})"),
                }
                refusal_secs.push(*secs);
            }
            Outcome::RefusedInStream(code) => {
                assert_eq!(code, "queue_timeout");
                in_stream += 1;
            }
        }
    }
    refusal_secs.sort_by(f64::total_cmp);
    let p50 = refusal_secs[refusal_secs.len() / 2];
    let max = *refusal_secs.last().unwrap();
    eprintln!(
        "overload: 120 requests in {load_secs:.1} s: {done} completed, {n429} × 429, {n503} × 503, \
         {in_stream} queue timeouts in-stream; refusal latency p50 {:.0} ms, max {:.0} ms",
        p50 * 1e3,
        max * 1e3
    );
    assert!(
        done >= 4,
        "at least the running batch's worth completed ({done})"
    );
    assert!(
        n429 > 0,
        "tenants over max_concurrent were refused with 429"
    );
    assert!(n503 > 0, "requests past the queue were refused with 503");
    assert_eq!(done + n429 + n503 + in_stream, 120);
    // Measured: refusals answer in milliseconds; 2 s is the generous bound the issue states.
    assert!(max < 2.0, "a refusal took {max:.2} s");

    // After the load: the pool returns to all free, through /metrics.
    let t0 = Instant::now();
    let m = loop {
        let m = client()
            .get(srv.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if pool_is_free(&m) {
            break m;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "pool not free: {m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The server counted the refusals it sent.
    let rejected = |reason| {
        metric(
            &m,
            "kvserve_request_rejections_total",
            &[("reason", reason)],
        ) as usize
    };
    assert_eq!(rejected("rate_limit"), n429);
    assert_eq!(
        rejected("overloaded") + rejected("queue_timeout"),
        n503 + in_stream
    );
    stop.store(true, Ordering::Release);
    let peak = sampler.join().unwrap();
    let hwm = proc_status_bytes(pid, "VmHWM:");
    eprintln!(
        "overload: server RSS {:.1} MiB warmed up, peak {:.1} MiB under load (+{:.1} MiB; VmHWM {:.1} MiB); \
         bound: KV budget {} MiB + {} MiB",
        base as f64 / 1048576.0,
        peak as f64 / 1048576.0,
        peak.saturating_sub(base) as f64 / 1048576.0,
        hwm as f64 / 1048576.0,
        LOAD_KV_BYTES >> 20,
        RSS_OVERHEAD >> 20
    );
    assert!(
        peak <= base + LOAD_KV_BYTES + RSS_OVERHEAD,
        "RSS grew by {} MiB",
        (peak - base) >> 20
    );
    // No crash: still healthy, and a clean exit on SIGTERM.
    let h = client().get(srv.url("/health")).send().await.unwrap();
    assert_eq!(h.status(), 200);
    sigterm(pid);
    let status = tokio::task::block_in_place(|| srv.wait_exit(Duration::from_secs(20)));
    assert!(
        status.is_some_and(|s| s.success()),
        "exit {status:?}: {}",
        srv.stderr()
    );
}

// ---------------------------------------------------------------------------------------------
// Item 4: faults.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_clients_hanging_up_mid_stream_free_every_block() {
    let s = server::start(None, more_kv).await;
    let before = s.state.engine.stats().tokens_generated;
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let url = s.url("/v1/completions");
            tokio::spawn(async move {
                let body = json!({"prompt": format!("Story {i}: once upon a time"),
                    "max_tokens": 1000, "ignore_eos": true, "stream": true, "temperature": 0});
                let mut resp = client().post(url).json(&body).send().await.unwrap();
                assert_eq!(resp.status(), 200);
                // Hang up after 0..=4 token frames (0: as soon as the headers arrive, often
                // while the request still waits for admission).
                let want = i % 5;
                let mut got = 0;
                while got < want {
                    let c = resp.chunk().await.unwrap().expect("stream still open");
                    got += String::from_utf8_lossy(&c).matches("data: ").count();
                }
                drop(resp);
            })
        })
        .collect();
    tokio::time::timeout(Duration::from_secs(90), async {
        for t in tasks {
            t.await.unwrap();
        }
    })
    .await
    .expect("all 100 clients got their frames");
    s.assert_all_free_everywhere().await;
    let generated = s.state.engine.stats().tokens_generated - before;
    eprintln!("disconnects: 100 streams aborted after {generated} generated tokens in all");
    assert!(
        generated < 100 * 100,
        "the streams were aborted, not run to max_tokens ({generated} tokens)"
    );
    // The engine keeps serving.
    let (st, v) = s
        .complete(&json!({"prompt": "Hello", "max_tokens": 4, "temperature": 0}))
        .await;
    assert_eq!(st, 200, "{v}");
    assert!(v["choices"][0]["finish_reason"].is_string());
    s.assert_all_free_everywhere().await;
    s.shutdown().await;
}

/// The CPU backend, except that a forward pass whose batch holds `POISON` faults (`Fault`).
struct PoisonBackend {
    inner: CpuBackend,
    fault: Fault,
    /// Forward passes that hit the poison, and those among them that carried other tokens too.
    hits: Arc<AtomicUsize>,
    mixed: Arc<AtomicUsize>,
    /// Set when the poison lost the device.
    lost: Option<Arc<AtomicBool>>,
}

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    /// The forward pass panics, as a device error inside an infallible backend op does (the
    /// CUDA backend panics on a failed call).
    Panic,
    /// It panics and the device is lost, as after a sticky CUDA error: from then on every
    /// forward pass panics and `device_status` fails.
    LoseDevice,
    /// It stops for this long before going on, as a device that stops answering.
    Stall(Duration),
}

impl PoisonBackend {
    fn new(fault: Fault) -> Self {
        Self {
            inner: CpuBackend::new(),
            fault,
            hits: Arc::default(),
            mixed: Arc::default(),
            lost: (fault == Fault::LoseDevice).then(Arc::default),
        }
    }

    fn is_lost(&self) -> bool {
        self.lost
            .as_ref()
            .is_some_and(|l| l.load(Ordering::Acquire))
    }
}

/// A token no greedy completion of the test prompts produces.
const POISON: u32 = 49_000;

impl Backend for PoisonBackend {
    type Buf = <CpuBackend as Backend>::Buf;
    type Matrix = <CpuBackend as Backend>::Matrix;
    type KvStore = <CpuBackend as Backend>::KvStore;

    fn name(&self) -> String {
        self.inner.name()
    }
    fn device_status(&self) -> Result<(), String> {
        match self.is_lost() {
            true => Err("injected fault: the device is lost".into()),
            false => Ok(()),
        }
    }
    fn upload_matrix(&self, parts: &[&HostTensor<'_>]) -> Result<Self::Matrix, BackendError> {
        self.inner.upload_matrix(parts)
    }
    fn matrix_format(&self, m: &Self::Matrix) -> (&'static str, usize) {
        self.inner.matrix_format(m)
    }
    fn upload(&self, data: &[f32]) -> Self::Buf {
        self.inner.upload(data)
    }
    fn alloc(&self, len: usize) -> Self::Buf {
        self.inner.alloc(len)
    }
    fn read(&self, buf: &Self::Buf, offset: usize, out: &mut [f32]) {
        self.inner.read(buf, offset, out)
    }
    fn take_host(&self, buf: Self::Buf, len: usize) -> Vec<f32> {
        self.inner.take_host(buf, len)
    }
    fn argmax_rows(&self, x: &Self::Buf, rows: std::ops::Range<usize>, width: usize) -> Vec<u32> {
        self.inner.argmax_rows(x, rows, width)
    }
    fn draw_rows(
        &self,
        x: &Self::Buf,
        rows: std::ops::Range<usize>,
        width: usize,
        draws: &[(f32, f64)],
    ) -> Vec<u32> {
        self.inner.draw_rows(x, rows, width, draws)
    }
    fn gather_rows(&self, x: &Self::Buf, rows: &[usize], width: usize) -> Self::Buf {
        self.inner.gather_rows(x, rows, width)
    }
    fn embed(&self, table: &Self::Matrix, ids: &[u32], out: &mut Self::Buf) {
        if self.is_lost() {
            panic!("injected fault: the device is lost");
        }
        if ids.contains(&POISON) {
            if let Fault::Stall(t) = self.fault {
                std::thread::sleep(t);
                return self.inner.embed(table, ids, out);
            }
            if let Some(l) = &self.lost {
                l.store(true, Ordering::Release);
            }
            self.hits.fetch_add(1, Ordering::AcqRel);
            if ids.iter().any(|&t| t != POISON) {
                self.mixed.fetch_add(1, Ordering::AcqRel);
            }
            panic!("injected fault: poison token in the batch");
        }
        self.inner.embed(table, ids, out)
    }
    fn rms_norm(&self, x: &Self::Buf, w: &Self::Buf, eps: f32, rows: usize, out: &mut Self::Buf) {
        self.inner.rms_norm(x, w, eps, rows, out)
    }
    fn matmul(&self, x: &Self::Buf, rows: usize, w: &Self::Matrix, out: &mut Self::Buf) {
        self.inner.matmul(x, rows, w, out)
    }
    fn add_bias(&self, x: &mut Self::Buf, bias: &Self::Buf, rows: usize) {
        self.inner.add_bias(x, bias, rows)
    }
    fn add_rms_norm(
        &self,
        x: &mut Self::Buf,
        y: &Self::Buf,
        weight: &Self::Buf,
        eps: f32,
        rows: usize,
        out: &mut Self::Buf,
    ) {
        self.inner.add_rms_norm(x, y, weight, eps, rows, out)
    }
    fn add(&self, x: &mut Self::Buf, y: &Self::Buf, len: usize) {
        self.inner.add(x, y, len)
    }
    fn silu_mul(&self, gate_up: &Self::Buf, rows: usize, inter: usize, out: &mut Self::Buf) {
        self.inner.silu_mul(gate_up, rows, inter, out)
    }
    fn kv_bytes_per_block(&self, layers: usize, block_size: usize, shape: AttnShape) -> usize {
        self.inner.kv_bytes_per_block(layers, block_size, shape)
    }
    fn new_kv_store(
        &self,
        layers: usize,
        num_blocks: usize,
        block_size: usize,
        shape: AttnShape,
    ) -> Self::KvStore {
        self.inner
            .new_kv_store(layers, num_blocks, block_size, shape)
    }
    #[allow(clippy::too_many_arguments)]
    fn rope_and_store(
        &self,
        qkv: &mut Self::Buf,
        rows: usize,
        positions: &[u32],
        slots: &[u32],
        shape: AttnShape,
        rope: &RopeParams,
        store: &mut Self::KvStore,
        layer: usize,
    ) {
        self.inner
            .rope_and_store(qkv, rows, positions, slots, shape, rope, store, layer)
    }
    fn attention(
        &self,
        qkv: &Self::Buf,
        seqs: &[AttnSeq<'_>],
        shape: AttnShape,
        store: &Self::KvStore,
        layer: usize,
        out: &mut Self::Buf,
    ) {
        self.inner.attention(qkv, seqs, shape, store, layer, out)
    }
    fn copy_blocks(&self, store: &mut Self::KvStore, copies: &[(u32, u32)]) {
        self.inner.copy_blocks(store, copies)
    }
    fn supports_policy(&self, policy: &KvPolicy) -> bool {
        self.inner.supports_policy(policy)
    }
    fn kv_sealed_bytes_per_block(
        &self,
        layers: usize,
        block_size: usize,
        shape: AttnShape,
        policy: &KvPolicy,
    ) -> usize {
        self.inner
            .kv_sealed_bytes_per_block(layers, block_size, shape, policy)
    }
    fn seal(&self, store: &mut Self::KvStore, layer: usize, seals: &[Seal]) {
        self.inner.seal(store, layer, seals)
    }
    fn release_exact(&self, store: &mut Self::KvStore, blocks: &[u32]) {
        self.inner.release_exact(store, blocks)
    }
    fn attach_latent_keys(&self, store: &mut Self::KvStore, keys: &[Arc<LatentKeys>]) {
        self.inner.attach_latent_keys(store, keys)
    }
}

/// Streams `prompt` greedily; `first` fires at the first token frame; returns the text.
async fn good_stream(url: String, prompt: String, first: oneshot::Sender<()>) -> String {
    let body = json!({"prompt": prompt, "max_tokens": 48, "ignore_eos": true,
        "stream": true, "temperature": 0});
    let mut resp = client().post(url).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut text = String::new();
    let mut first = Some(first);
    while let Some(c) = resp.chunk().await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&c));
        if text.contains("\"text\"") {
            if let Some(f) = first.take() {
                let _ = f.send(());
            }
        }
    }
    check_complete_stream(&text, 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_forward_pass_fails_only_its_own_request() {
    let backend = PoisonBackend::new(Fault::Panic);
    let (hits, mixed) = (backend.hits.clone(), backend.mixed.clone());
    let cfg = server::config(more_kv);
    let tenancy = Tenancy::open(&cfg.tenants);
    let server = tokio::task::block_in_place(|| Server::start_on(&cfg, tenancy, backend)).unwrap();
    let s = server::serve(server).await;
    let prompts = [
        "The quick brown fox",
        "In the beginning there was",
        "My favourite recipe for soup is",
    ];
    let run = |with_poison: bool| {
        let url = s.url("/v1/completions");
        async move {
            let mut firsts = Vec::new();
            let mut tasks = Vec::new();
            for p in prompts {
                let (tx, rx) = oneshot::channel();
                firsts.push(rx);
                tasks.push(tokio::spawn(good_stream(url.clone(), p.to_string(), tx)));
            }
            let mut poison = None;
            if with_poison {
                // Every good stream is decoding: the poison's prefill joins their batch.
                for rx in firsts {
                    let _ = rx.await;
                }
                let resp = client()
                    .post(url.clone())
                    .json(&json!({"prompt": [POISON, POISON, POISON, POISON], "max_tokens": 8}))
                    .send()
                    .await
                    .unwrap();
                let status = resp.status().as_u16();
                poison = Some((status, resp.json::<Value>().await.unwrap()));
            }
            let mut texts = Vec::new();
            for t in tasks {
                texts.push(t.await.unwrap());
            }
            (texts, poison)
        }
    };
    let (reference, _) = tokio::time::timeout(Duration::from_secs(60), run(false))
        .await
        .unwrap();
    assert_eq!(hits.load(Ordering::Acquire), 0);
    let (texts, poison) = tokio::time::timeout(Duration::from_secs(60), run(true))
        .await
        .unwrap();
    let (status, body) = poison.unwrap();
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["code"], "internal_error");
    assert_eq!(body["error"]["message"], "internal server error");
    assert!(
        mixed.load(Ordering::Acquire) >= 1,
        "the poison failed a batch it shared with other sequences"
    );
    assert!(hits.load(Ordering::Acquire) >= 2, "then failed again alone");
    assert_eq!(
        texts, reference,
        "the other sequences' greedy output equals the fault-free run"
    );
    // The engine loop survived and keeps serving; nothing leaked.
    let (st, v) = s
        .complete(&json!({"prompt": "Hello", "max_tokens": 4, "temperature": 0}))
        .await;
    assert_eq!(st, 200, "{v}");
    s.assert_all_free_everywhere().await;
    s.shutdown().await;
}

/// A failure that leaves the device unusable (`Backend::device_status` fails after it) stops
/// the engine for good: see [`engine_failure`]. (The binary's exit after
/// `server.failure_exit_secs` is in tests/cuda_emulated.rs, on an emulated GPU that loses its
/// context.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_device_fails_every_request_in_flight_and_turns_health_to_503() {
    let cause = engine_failure(Fault::LoseDevice, 60).await;
    assert!(cause.contains("the device is lost"), "{cause}");
}

/// A step that runs past `engine.step_timeout_secs` (a device that stopped answering) trips the
/// watchdog, which fails the engine the same way while the step still hangs: see
/// [`engine_failure`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_past_its_timeout_fails_every_request_in_flight() {
    let cause = engine_failure(Fault::Stall(Duration::from_secs(6)), 1).await;
    assert!(
        cause.contains("past engine.step_timeout_secs = 1"),
        "{cause}"
    );
}

/// Two streams decode, then a poison request brings `fault`: every request in flight ends with
/// 503 `engine_failed` (the streams with an error frame and `[DONE]`, none left hanging), later
/// ones are refused the same way, and `/health`, `/ready` and `kvserve_engine_healthy` say so.
/// Returns the failure's cause.
async fn engine_failure(fault: Fault, step_timeout_secs: u64) -> String {
    let backend = PoisonBackend::new(fault);
    let cfg = server::config(|c| {
        more_kv(c);
        c.engine.step_timeout_secs = step_timeout_secs;
    });
    let tenancy = Tenancy::open(&cfg.tenants);
    let server = tokio::task::block_in_place(|| Server::start_on(&cfg, tenancy, backend)).unwrap();
    let s = server::serve(server).await;
    assert_eq!(s.get("/health", None).await.0, 200);
    let url = s.url("/v1/completions");
    let mut firsts = Vec::new();
    let streams: Vec<_> = ["The quick brown fox", "In the beginning there was"]
        .into_iter()
        .map(|p| {
            let (tx, rx) = oneshot::channel::<()>();
            firsts.push(rx);
            let url = url.clone();
            tokio::spawn(async move {
                let body = json!({"prompt": p, "max_tokens": 400, "ignore_eos": true,
                    "stream": true, "temperature": 0});
                let mut resp = client().post(url).json(&body).send().await.unwrap();
                assert_eq!(resp.status(), 200);
                let (mut text, mut first) = (String::new(), Some(tx));
                while let Some(c) = resp.chunk().await.unwrap() {
                    text.push_str(&String::from_utf8_lossy(&c));
                    if text.contains("\"text\"") {
                        if let Some(f) = first.take() {
                            let _ = f.send(());
                        }
                    }
                }
                sse_payloads(&text)
            })
        })
        .collect();
    for rx in firsts {
        let _ = rx.await;
    }
    let poison = json!({"prompt": [POISON, POISON, POISON, POISON], "max_tokens": 8});
    let t0 = Instant::now();
    let (status, body) = s.post("/v1/completions", None, &poison).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "engine_failed", "{body}");
    if let Fault::Stall(t) = fault {
        // Answered while the step still hangs, not when it returns.
        assert!(t0.elapsed() < t, "answered after {:?}", t0.elapsed());
    }
    for t in streams {
        let frames = tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("the stream ended")
            .unwrap();
        assert_eq!(
            frames.last().map(String::as_str),
            Some("[DONE]"),
            "{frames:?}"
        );
        let error: Value = serde_json::from_str(&frames[frames.len() - 2]).unwrap();
        assert_eq!(error["error"]["code"], "engine_failed", "{frames:?}");
        assert!(
            frames.iter().all(|f| !f.contains("finish_reason\":\"")),
            "no choice finished: {frames:?}"
        );
    }
    let (status, body) = s
        .post(
            "/v1/completions",
            None,
            &json!({"prompt": "Hello", "max_tokens": 4}),
        )
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "engine_failed", "{body}");
    for path in ["/health", "/ready"] {
        let (status, body) = s.get(path, None).await;
        assert_eq!(
            (status, body.as_str()),
            (503, r#"{"status":"failed"}"#),
            "{path}"
        );
    }
    let (_, metrics) = s.get("/metrics", None).await;
    assert!(
        metrics.contains("\nkvserve_engine_healthy 0\n"),
        "{metrics}"
    );
    let cause = s.state.engine.failure().expect("the engine failed");
    // The engine thread ends (after a stall, once its step returns) and the server stops.
    s.shutdown().await;
    cause
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_every_in_flight_stream_and_exits_zero() {
    const DRAIN_SECS: u64 = 30;
    let config =
        format!("[server]\ndrain_timeout_secs = {DRAIN_SECS}\n[kv]\ncache_bytes = 67108864\n");
    let mut srv = Proc::spawn(&config, None);
    let url = srv.url("/v1/completions");
    let mut firsts = Vec::new();
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let (tx, rx) = oneshot::channel::<()>();
            firsts.push(rx);
            let url = url.clone();
            tokio::spawn(async move {
                let body = json!({"prompt": format!("Count to {i}:"), "max_tokens": 24,
                    "ignore_eos": true, "stream": true, "temperature": 0,
                    "stream_options": {"include_usage": true}});
                let mut resp = client().post(url).json(&body).send().await.unwrap();
                assert_eq!(resp.status(), 200);
                let mut text = String::new();
                let mut tx = Some(tx);
                while let Some(c) = resp.chunk().await.unwrap() {
                    text.push_str(&String::from_utf8_lossy(&c));
                    if let Some(t) = tx.take_if(|_| text.contains("\"text\"")) {
                        let _ = t.send(());
                    }
                }
                text
            })
        })
        .collect();
    for rx in firsts {
        tokio::time::timeout(Duration::from_secs(60), rx)
            .await
            .unwrap()
            .unwrap();
    }
    let t_term = Instant::now();
    sigterm(srv.pid());
    // Once the signal is handled the listener is closed: new requests are refused.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let refused = client()
        .post(&url)
        .json(&json!({"prompt": "x", "max_tokens": 1}))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    match refused {
        Err(e) => assert!(e.is_connect(), "{e}"),
        Ok(r) => assert_eq!(r.status(), 503),
    }
    for t in tasks {
        let text = tokio::time::timeout(Duration::from_secs(DRAIN_SECS), t)
            .await
            .expect("stream finished within the drain timeout")
            .unwrap();
        let frames = sse_payloads(&text);
        let usage: Value = serde_json::from_str(&frames[frames.len() - 2]).unwrap();
        assert_eq!(usage["usage"]["completion_tokens"], 24, "{text}");
        check_complete_stream(&text, 1);
        assert!(text.contains("\"finish_reason\":\"length\""), "{text}");
    }
    let status = tokio::task::block_in_place(|| {
        srv.wait_exit(Duration::from_secs(DRAIN_SECS).saturating_sub(t_term.elapsed()))
    });
    let secs = t_term.elapsed().as_secs_f64();
    eprintln!("sigterm: 6 streams drained, exit {status:?} {secs:.1} s after the signal");
    assert!(
        status.is_some_and(|s| s.success()),
        "exit 0 within the drain timeout: {status:?}: {}",
        srv.stderr()
    );
}

// ---------------------------------------------------------------------------------------------
// Item 4: slow clients.

/// Reads (blocking) until the peer closes (EOF or reset) or `limit` passes; returns the bytes
/// and whether the peer closed.
fn read_until_closed(r: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    let t0 = Instant::now();
    loop {
        let left = limit.saturating_sub(t0.elapsed());
        if left.is_zero() {
            return (out, false);
        }
        r.set_read_timeout(Some(left)).unwrap();
        match r.read(&mut buf) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return (out, false)
            }
            Err(_) => return (out, true),
        }
    }
}

/// Connects, sends `head`, then one byte of `drip` every 200 ms (at most 40) while reading
/// until the server closes (≤ 8 s). Returns what the server sent, whether it closed, and when.
fn trickle(addr: SocketAddr, head: &[u8], drip: u8) -> (Vec<u8>, bool, f64) {
    let t0 = Instant::now();
    let mut r = TcpStream::connect(addr).unwrap();
    let mut w = r.try_clone().unwrap();
    w.write_all(head).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            for _ in 0..40 {
                std::thread::sleep(Duration::from_millis(200));
                if stop.load(Ordering::Acquire) || w.write_all(&[drip]).is_err() {
                    break;
                }
            }
        })
    };
    let (got, closed) = read_until_closed(&mut r, Duration::from_secs(8));
    let secs = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Release);
    writer.join().unwrap();
    (got, closed, secs)
}

fn raw_post(body: &Value) -> Vec<u8> {
    let b = body.to_string();
    format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{b}",
        b.len()
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_hold_no_kv_blocks() {
    let cfg = server::config(|c| {
        more_kv(c);
        c.server.header_read_timeout_secs = 1;
        c.server.body_read_timeout_secs = 1;
        c.server.write_stall_timeout_secs = 1;
        c.server.max_top_logprobs = 20;
        c.server.max_n = 16;
    });
    let tenancy = Tenancy::open(&cfg.tenants);
    let server = tokio::task::block_in_place(|| Server::start(&cfg, tenancy)).unwrap();
    // Small fixed socket buffers (accepted sockets inherit the listener's), so that a client
    // that stops reading stalls the server's writes after kilobytes, not the megabytes Linux
    // autotuning allows (see docs/http.md): the mechanism is the same, only sooner.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_send_buffer_size(16 << 10).unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let s = server::serve_on(server, sock.listen(1024).unwrap());
    let addr = s.addr;

    // (i) Slowloris: ten connections send a header byte every 200 ms and never finish.
    let lorises: Vec<_> = (0..10)
        .map(|_| {
            std::thread::spawn(move || {
                let head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ";
                let (got, closed, secs) = trickle(addr, head, b'a');
                (closed, got.len(), secs)
            })
        })
        .collect();
    // The server keeps serving meanwhile.
    let (st, v) = s
        .complete(&json!({"prompt": "Hi", "max_tokens": 2, "temperature": 0}))
        .await;
    assert_eq!(st, 200, "{v}");
    let mut worst: f64 = 0.0;
    for l in lorises {
        let (closed, bytes, secs) = l.join().unwrap();
        assert!(closed, "slowloris connection still open after {secs:.1} s");
        assert_eq!(bytes, 0, "no response to headers that never ended");
        worst = worst.max(secs);
    }
    eprintln!("slowloris: 10 connections closed, the last after {worst:.2} s (timeout 1 s)");
    assert!(
        worst < 5.0,
        "cut off by the 1 s header timeout ({worst:.2} s)"
    );

    // (ii) A body trickled at 5 bytes/s: 408 with the OpenAI error envelope.
    let head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 200\r\n\r\n{";
    let (got, closed, secs) = tokio::task::spawn_blocking(move || trickle(addr, head, b' '))
        .await
        .unwrap();
    let resp = String::from_utf8_lossy(&got);
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    let body: Value = serde_json::from_str(resp.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "request_timeout", "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(closed, "the connection is closed after the 408");
    eprintln!("slow body: 408 after {secs:.2} s (timeout 1 s)");
    assert!(secs < 5.0);

    // (iii) A long stream the client never reads: the socket fills, the write stalls, the
    // connection is cut and the request aborted long before max_tokens.
    let before = s.state.engine.stats().tokens_generated;
    let mut conn = {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(16 << 10).unwrap();
        let c = sock.connect(addr).await.unwrap().into_std().unwrap();
        c.set_nonblocking(false).unwrap();
        c
    };
    let n = 4;
    let max_tokens = 400;
    conn.write_all(&raw_post(
        &json!({"prompt": "Write a very long story.", "n": n,
        "max_tokens": max_tokens, "ignore_eos": true, "stream": true, "temperature": 0,
        "logprobs": 20}),
    ))
    .unwrap();
    let t0 = Instant::now();
    while s.state.engine.stats().scheduler.running == 0 {
        assert!(t0.elapsed() < Duration::from_secs(30), "never admitted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.assert_all_free_everywhere().await;
    let cut_secs = t0.elapsed().as_secs_f64();
    let generated = s.state.engine.stats().tokens_generated - before;
    let (got, closed) =
        tokio::task::block_in_place(|| read_until_closed(&mut conn, Duration::from_secs(10)));
    let text = String::from_utf8_lossy(&got);
    eprintln!(
        "never-reading client: cut off and its blocks freed {cut_secs:.1} s after admission, \
         {generated} of {} tokens generated, {} bytes had been buffered",
        n * max_tokens,
        got.len()
    );
    assert!(closed, "the server closed the stalled connection");
    assert!(!text.contains("[DONE]"), "the stream was cut, not finished");
    assert!(
        (generated as usize) < n * max_tokens / 2,
        "aborted long before max_tokens ({generated} tokens)"
    );

    // (iv) A short stream the client does not read yet: it finishes and frees its blocks while
    // the client is still connected (the engine never waits on a client); the client then
    // reads the whole stream.
    let mut conn = TcpStream::connect(addr).unwrap();
    let before = s.state.engine.stats().tokens_generated;
    conn.write_all(&raw_post(
        &json!({"prompt": "Hello there", "max_tokens": 12,
        "ignore_eos": true, "stream": true, "temperature": 0}),
    ))
    .unwrap();
    let t0 = Instant::now();
    while s.state.engine.stats().tokens_generated - before < 12 {
        assert!(t0.elapsed() < Duration::from_secs(30), "never finished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.assert_all_free_everywhere().await;
    let (got, _) =
        tokio::task::block_in_place(|| read_until_closed(&mut conn, Duration::from_millis(1500)));
    let text = String::from_utf8_lossy(&got);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    assert!(body.contains("data: [DONE]"), "{text}");
    assert!(body.contains("\"finish_reason\":\"length\""), "{text}");

    // The server still serves, and nothing leaked.
    let (st, v) = s
        .complete(&json!({"prompt": "Hi", "max_tokens": 2, "temperature": 0}))
        .await;
    assert_eq!(st, 200, "{v}");
    s.assert_all_free_everywhere().await;
    s.shutdown().await;
}
