//! The CPU server's memory follows its KV pool (docs/cpu-memory.md), on the real model: rounds
//! of distinct prompts fill and evict a 32 MiB pool's prefix cache under `kivi2`, then `bf16`
//! (which evicts about five `kivi2` blocks for each block it stores), then `kivi2` again. After
//! each round the process's RSS may exceed its RSS before the first request by the pool's used +
//! cached bytes and a fixed margin at most. Before freed blocks gave their pages back and the
//! KV arenas left huge pages, the server held 2.3–3.1× its pool.
//!
//! Fails (does not skip) when the model is missing: run scripts/fetch-model.sh.

mod common;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

/// What the process may hold above its pool: a step's working buffers, the exact tail blocks
/// of the last step's sequences, the HTTP side (measured: 9–12 MiB with a 64 MiB pool).
const MARGIN: u64 = 24 << 20;
const POOL: u64 = 32 << 20;
const PROMPT: usize = 496;

fn rss_self() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib * 1024
}

/// used + cached bytes of the pool, from `/metrics`.
fn pool_bytes(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("kvserve_kv_cache_bytes{state=\"used\"}")
                || l.starts_with("kvserve_kv_cache_bytes{state=\"cached\"}")
        })
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap() as u64)
        .sum()
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rss_follows_the_kv_pool_through_mixed_policy_eviction() {
    let srv = common::server::start(None, |c| c.kv.cache_bytes = POOL).await;
    let base = rss_self();
    let get = |path: &str| {
        let url = srv.url(path);
        async move {
            reqwest::get(url)
                .await
                .unwrap()
                .error_for_status()
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    let list: Value = serde_json::from_str(&get("/v1/kv_policies").await).unwrap();
    let per_token = |name: &str| {
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["bytes_per_token"].as_f64())
            .unwrap_or_else(|| panic!("{name} is not listed"))
    };
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for policy in ["kivi2", "bf16", "kivi2"] {
        // Prompts whose sealed KV is 1.25× the pool, so the cache fills and evicts.
        let n = (1.25 * POOL as f64 / per_token(policy)) as usize / PROMPT;
        let prompts: Vec<Vec<u32>> = (0..n)
            .map(|_| (0..PROMPT).map(|_| rng.random_range(200..49_000)).collect())
            .collect();
        for batch in prompts.chunks(4) {
            let bodies: Vec<Value> = batch
                .iter()
                .map(|p| json!({"prompt": p, "max_tokens": 1, "kv_policy": policy}))
                .collect();
            let sends = bodies
                .iter()
                .map(|body| srv.post("/v1/completions", None, body));
            for (status, v) in futures_util::future::join_all(sends).await {
                assert_eq!(status, 200, "{v}");
            }
        }
        let (rss, pool) = (rss_self(), pool_bytes(&get("/metrics").await));
        eprintln!(
            "after {n} {policy} prompts: RSS +{:.1} MiB, pool used+cached {:.1} MiB",
            rss.saturating_sub(base) as f64 / 1048576.0,
            pool as f64 / 1048576.0
        );
        assert!(pool > POOL / 2, "the round filled the pool ({pool} bytes)");
        assert!(
            rss <= base + pool + MARGIN,
            "{policy}: RSS grew by {} MiB over a pool of {} MiB in use",
            (rss - base) >> 20,
            pool >> 20
        );
    }
    srv.shutdown().await;
}
