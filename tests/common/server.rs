//! An in-process kvserve on the real model, listening on 127.0.0.1:0, for HTTP tests: start,
//! requests (plain, streaming, timed), the engine's KV invariants, drain and stop.

use kvserve::config::Config;
use kvserve::server::Server;
use kvserve::tenancy::Tenancy;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// The default model, fetched by `scripts/fetch-model.sh`. Missing is a failure, not a skip.
pub fn model_path() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct");
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-model.sh first",
        p.display()
    );
    p
}

/// A served test server; [`TestServer::shutdown`] drains and stops it. A test file with requests
/// of its own adds them in its own `impl TestServer` block (each test file is its own crate).
pub struct TestServer {
    pub addr: SocketAddr,
    pub state: Arc<kvserve::http::AppState>,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<std::io::Result<()>>,
    server: Option<Server>,
}

/// The config every test server starts from: the real model and a 64 MiB KV pool, then
/// `tweak`. Public for tests that build their `Server` themselves (a custom backend, their own
/// listener).
pub fn config(tweak: impl FnOnce(&mut Config)) -> Config {
    let mut cfg = Config::default();
    cfg.model.path = model_path();
    cfg.kv.cache_bytes = 64 << 20;
    tweak(&mut cfg);
    cfg
}

/// Starts the server on [`config`]`(tweak)` and serves it on 127.0.0.1:0.
/// `tenancy` `None`: one open tenant.
pub async fn start(tenancy: Option<Tenancy>, tweak: impl FnOnce(&mut Config)) -> TestServer {
    let cfg = config(tweak);
    let tenancy = tenancy.unwrap_or_else(|| Tenancy::open(&cfg.tenants));
    let server = tokio::task::block_in_place(|| Server::start(&cfg, tenancy)).unwrap();
    serve(server).await
}

/// Serves an already started `Server` on 127.0.0.1:0: for one the test built itself (e.g.
/// `Server::start_on` with a fault-injecting backend).
pub async fn serve(server: Server) -> TestServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    serve_on(server, listener)
}

/// Serves `server` on a listener the test set up itself (e.g. with small socket buffers).
pub fn serve_on(server: Server, listener: tokio::net::TcpListener) -> TestServer {
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let state = server.state.clone();
    let done = tokio::spawn(kvserve::http::serve(listener, state.clone(), async move {
        let _ = rx.await;
    }));
    TestServer {
        addr,
        state,
        client: reqwest::Client::new(),
        stop: Some(tx),
        done,
        server: Some(server),
    }
}

/// The `data:` payloads of an SSE body, in order (keep-alive comments dropped).
pub fn sse_payloads(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter(|f| !f.trim().is_empty() && !f.starts_with(':'))
        .map(|f| {
            f.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("bad frame {f:?}"))
                .to_string()
        })
        .collect()
}

impl TestServer {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// POST `body` as JSON; status and JSON body (a non-JSON body as a string).
    pub async fn post(&self, path: &str, key: Option<&str>, body: &Value) -> (u16, Value) {
        let mut r = self.client.post(self.url(path)).json(body);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, v)
    }

    /// GET `path`: status and body text.
    pub async fn get(&self, path: &str, key: Option<&str>) -> (u16, String) {
        let mut r = self.client.get(self.url(path));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        let resp = r.send().await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }

    /// Sends a streaming request and returns the time until the first frame that carries
    /// generated text (time to first token as a client sees it), then the whole stream's
    /// payloads.
    pub async fn stream_timed(
        &self,
        path: &str,
        key: Option<&str>,
        body: &Value,
    ) -> (Duration, Vec<String>) {
        let t0 = Instant::now();
        let mut r = self.client.post(self.url(path)).json(body);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        let mut resp = r.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut text = String::new();
        let mut first = None;
        while let Some(c) = resp.chunk().await.unwrap() {
            text.push_str(&String::from_utf8_lossy(&c));
            if first.is_none() && (text.contains("\"text\"") || text.contains("\"content\"")) {
                first = Some(t0.elapsed());
            }
        }
        let first = first.unwrap_or_else(|| panic!("no token frame in the stream: {text:.600}"));
        (first, sse_payloads(&text))
    }

    /// Waits until the engine is idle and checks every KV block is free (none leaked) and the
    /// pool's invariants hold.
    pub async fn assert_all_free(&self) {
        let t0 = Instant::now();
        loop {
            let st = self.state.engine.stats();
            let kv = tokio::task::block_in_place(|| self.state.engine.check_kv()).unwrap();
            if st.scheduler.running == 0 && st.scheduler.waiting == 0 && kv.used == 0 {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "blocks still in use: {kv:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops accepting, drains in-flight requests, stops the engine.
    pub async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(60), &mut self.done)
            .await
            .expect("server drained")
            .unwrap()
            .unwrap();
        let server = self.server.take().unwrap();
        tokio::task::block_in_place(|| server.shutdown());
    }
}
