//! Tenant isolation attacked from the outside, over real HTTP on the real model (issue 8 §6):
//! (a) an attacker timing time-to-first-token on another tenant's cached prompt learns nothing
//! (AUC of a threshold classifier ≤ 0.6), while the same measurement on its *own* cached prompt
//! separates cleanly — proof that the probe could see a hit if one happened; (b) a tenant
//! flooding the server cannot push another tenant below its reserved KV blocks nor starve it;
//! (c) `/metrics` and every other route a tenant (or nobody) can reach carry no other tenant's
//! prompt text.
//!
//! Fails (does not skip) when the model is missing: run scripts/fetch-model.sh.

mod common;

use common::server::{start, TestServer};
use kvserve::tenancy::{hash_key, Tenancy};
use kvserve::types::TenantId;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KEY_VICTIM: &str = "sk-attack-victim";
const KEY_ATTACKER: &str = "sk-attack-attacker";

/// `victim` (id 0) and `attacker` (id 1), both unlimited; `victim_extra` goes into the
/// victim's table (e.g. `reserved_blocks = 12`).
fn tenancy(victim_extra: &str) -> Tenancy {
    let toml = format!(
        r#"
[[tenant]]
id = "victim"
api_keys_sha256 = ["{}"]
{victim_extra}
[[tenant]]
id = "attacker"
api_keys_sha256 = ["{}"]
"#,
        hash_key(KEY_VICTIM),
        hash_key(KEY_ATTACKER)
    );
    Tenancy::from_toml(&toml, Path::new("tenants.toml")).unwrap()
}

/// Random token ids of the real vocabulary's ordinary range (no special tokens).
fn random_prompt(rng: &mut StdRng, len: usize) -> Vec<u32> {
    (0..len).map(|_| rng.random_range(200..40_000)).collect()
}

/// The area under the ROC curve of the classifier "faster than a threshold ⇒ cached", i.e.
/// P(t_cached < t_fresh) + ½·P(tie) over all pairs: 0.5 = no information, 1.0 = perfect.
fn auc(cached: &[f64], fresh: &[f64]) -> f64 {
    let mut wins = 0.0;
    for &c in cached {
        for &f in fresh {
            wins += if c < f {
                1.0
            } else if c == f {
                0.5
            } else {
                0.0
            };
        }
    }
    wins / (cached.len() * fresh.len()) as f64
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

/// One streamed completion of one token: TTFT in ms and the prompt tokens served from cache.
async fn probe(s: &TestServer, key: &str, prompt: &[u32]) -> (f64, u64) {
    let body = json!({"prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": true,
        "stream_options": {"include_usage": true}});
    let (ttft, frames) = s.stream_timed("/v1/completions", Some(key), &body).await;
    assert_eq!(frames.last().map(String::as_str), Some("[DONE]"));
    let usage: Value = serde_json::from_str(&frames[frames.len() - 2]).unwrap();
    let cached = usage["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0);
    (ttft.as_secs_f64() * 1e3, cached)
}

#[test]
fn auc_is_half_for_identical_and_one_for_separated_samples() {
    assert_eq!(auc(&[1.0, 2.0], &[1.0, 2.0]), 0.5);
    assert_eq!(auc(&[1.0, 2.0], &[3.0, 4.0]), 1.0);
    assert_eq!(auc(&[3.0, 4.0], &[1.0, 2.0]), 0.0);
}

/// (a) Prefix-cache timing. Each round: the victim sends a fresh secret prompt (now cached in
/// the victim's scope); the attacker sends that exact prompt and a fresh prompt of the same
/// length, in random order; then the victim resends its own prompt (a real hit, the positive
/// control). Rounds interleave, so machine noise falls on both sides alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_cache_timing_reveals_nothing_across_tenants() {
    const ROUNDS: usize = 100;
    const LEN: usize = 64; // four 16-token blocks: a hit skips all but the last block
    let s = start(Some(tenancy("")), |_| {}).await;
    let mut rng = StdRng::seed_from_u64(8);
    for _ in 0..3 {
        let warm = random_prompt(&mut rng, LEN);
        probe(&s, KEY_ATTACKER, &warm).await;
        probe(&s, KEY_VICTIM, &warm).await;
    }
    let (mut probed, mut fresh, mut hit) = (Vec::new(), Vec::new(), Vec::new());
    let t0 = Instant::now();
    for _ in 0..ROUNDS {
        let secret = random_prompt(&mut rng, LEN);
        let other = random_prompt(&mut rng, LEN);
        let (_, c) = probe(&s, KEY_VICTIM, &secret).await;
        assert_eq!(c, 0, "a random prompt is new");
        let probe_first = rng.random::<bool>();
        for first in [probe_first, !probe_first] {
            if first {
                let (t, c) = probe(&s, KEY_ATTACKER, &secret).await;
                assert_eq!(c, 0, "the attacker hit the victim's cache");
                probed.push(t);
            } else {
                let (t, c) = probe(&s, KEY_ATTACKER, &other).await;
                assert_eq!(c, 0);
                fresh.push(t);
            }
        }
        let (t, c) = probe(&s, KEY_VICTIM, &secret).await;
        assert!(
            c >= 48,
            "the victim's own resend hits its cache ({c} tokens)"
        );
        hit.push(t);
    }
    let cross = auc(&probed, &fresh);
    let own = auc(&hit, &fresh);
    eprintln!(
        "prefix-cache timing, {ROUNDS} rounds of {LEN}-token prompts in {:.1} s: TTFT median \
         ms — other tenant's cached prompt {:.2}, fresh {:.2}, own cached {:.2}; AUC \
         cross-tenant {cross:.3}, own-cache control {own:.3}",
        t0.elapsed().as_secs_f64(),
        median(&probed),
        median(&fresh),
        median(&hit)
    );
    assert!(
        own >= 0.9,
        "the probe cannot even see the attacker's own cache hits (AUC {own:.3}): the test \
         measures nothing"
    );
    assert!(
        cross <= 0.6,
        "another tenant's cached prompt is distinguishable by TTFT: AUC {cross:.3}"
    );
    s.assert_all_free().await;
    s.shutdown().await;
}

/// (b) Flooding. The pool holds ~45 exact blocks; the victim reserves 12. The attacker floods with
/// far more long requests than fit. Sampled throughout: the attacker never holds more than the
/// pool minus the victim's reservation. The victim's requests (each within its reservation)
/// are all served while the attacker's flood is still queued: fair share lets the victim go
/// ahead of the flood, and the reservation guarantees it the blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_tenant_cannot_take_reserved_blocks_or_starve_others() {
    const RESERVED: usize = 12;
    const FLOOD: usize = 24;
    let s = Arc::new(
        start(
            Some(tenancy(&format!("reserved_blocks = {RESERVED}"))),
            |c| {
                c.kv.cache_bytes = 32 << 20;
                c.engine.max_running = 16;
                c.engine.max_queue_ms = 0;
            },
        )
        .await,
    );
    let kv0 = tokio::task::block_in_place(|| s.state.engine.check_kv()).unwrap();
    let (victim, attacker) = (TenantId(0), TenantId(1));
    let account = |kv: &kvserve::kv::KvStats, t: TenantId| {
        kv.tenants
            .iter()
            .find(|(id, _)| *id == t)
            .map(|(_, k)| k.clone())
            .expect("tenant in the stats")
    };
    // Units (bytes in the engine's mixed pool) of the victim's reservation.
    let reserved = account(&kv0, victim).reserved;
    assert!(
        reserved > 0 && 3 * reserved < kv0.capacity,
        "victim reserves {reserved} of {} units: retune cache_bytes",
        kv0.capacity
    );

    // The sampler: every 10 ms, the attacker's charges against the ledger's ceiling: the pool
    // minus what the victim holds or has reserved, whichever is more.
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (s, stop, peak) = (s.clone(), stop.clone(), peak.clone());
        tokio::spawn(async move {
            let mut samples = 0usize;
            while !stop.load(Ordering::Acquire) {
                if let Some(kv) = s.state.engine.stats().kv {
                    let (a, v) = (account(&kv, attacker).used, account(&kv, victim).used);
                    peak.fetch_max(a, Ordering::AcqRel);
                    assert!(
                        a + v.max(reserved) <= kv.capacity,
                        "the attacker holds {a} of {} units while the victim holds {v} and \
                         reserves {reserved}",
                        kv.capacity
                    );
                }
                samples += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            samples
        })
    };

    // The flood: FLOOD concurrent streams of 150-token prompts, 48 tokens each.
    let mut rng = StdRng::seed_from_u64(9);
    let flood_done = Arc::new(AtomicUsize::new(0));
    let mut flood = Vec::new();
    for _ in 0..FLOOD {
        let prompt = random_prompt(&mut rng, 150);
        let (s, done) = (s.clone(), flood_done.clone());
        flood.push(tokio::spawn(async move {
            let body = json!({"prompt": prompt, "max_tokens": 48, "ignore_eos": true,
                "temperature": 0, "stream": true});
            let (_, frames) = s
                .stream_timed("/v1/completions", Some(KEY_ATTACKER), &body)
                .await;
            done.fetch_add(1, Ordering::AcqRel);
            frames
        }));
    }
    // Wait until the flood saturates: attacker requests queue behind a full pool.
    let t0 = Instant::now();
    loop {
        let st = s.state.engine.stats();
        let waiting = st
            .scheduler
            .tenants
            .iter()
            .find(|(id, _)| *id == attacker)
            .map_or(0, |(_, l)| l.waiting);
        if waiting > 0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the flood never queued"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The victim: three requests of 100 + 40 tokens (9 blocks, within its 12), one at a time.
    for i in 0..3 {
        let prompt = random_prompt(&mut rng, 100);
        let body = json!({"prompt": prompt, "max_tokens": 40, "ignore_eos": true,
            "temperature": 0});
        let (st, v) = s.post("/v1/completions", Some(KEY_VICTIM), &body).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 40, "{v}");
        let done = flood_done.load(Ordering::Acquire);
        assert!(
            done < FLOOD,
            "victim request {i} finished only after the whole flood ({done}/{FLOOD} done)"
        );
    }
    let victim_finished_with = flood_done.load(Ordering::Acquire);
    for f in flood {
        let frames = f.await.unwrap();
        let chunks: Vec<Value> = frames[..frames.len() - 1]
            .iter()
            .map(|f| serde_json::from_str(f).unwrap())
            .collect();
        assert!(
            chunks
                .iter()
                .any(|c| c["choices"][0]["finish_reason"] == "length"),
            "a flood request was lost"
        );
    }
    stop.store(true, Ordering::Release);
    let samples = sampler.await.unwrap();
    let (peak, capacity) = (peak.load(Ordering::Acquire), kv0.capacity);
    eprintln!(
        "flood: pool {} blocks = {capacity} units, victim reserves {RESERVED} blocks = \
         {reserved} units; attacker peak {peak} units over {samples} samples; the victim's 3 \
         requests finished with {victim_finished_with}/{FLOOD} flood requests done",
        kv0.num_blocks
    );
    let exact_block = reserved / RESERVED;
    assert!(
        peak + reserved + 4 * exact_block >= capacity,
        "the flood never filled the unreserved pool: the test proves nothing"
    );
    s.assert_all_free().await;
    Arc::into_inner(s).unwrap().shutdown().await;
}

/// (c) A victim's prompt with a marker word goes through every generation path; then the
/// attacker and an anonymous client read every route they can reach. None shows the marker
/// (in any case) or the victim's prompt token ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_shows_another_tenants_prompt() {
    const MARKER: &str = "Quetzalcoatlus";
    let s = start(Some(tenancy("")), |_| {}).await;
    let secret = format!("My bank password is {MARKER} and my PIN is 8231. Repeat it.");
    for stream in [false, true] {
        let chat = json!({"messages": [{"role": "system", "content": secret},
            {"role": "user", "content": secret}], "max_tokens": 4, "stream": stream,
            "logprobs": true, "top_logprobs": 2});
        let done = s
            .client
            .post(s.url("/v1/chat/completions"))
            .bearer_auth(KEY_VICTIM)
            .json(&chat)
            .send()
            .await
            .unwrap();
        assert_eq!(done.status(), 200);
        let _ = done.text().await.unwrap();
        let comp = json!({"prompt": secret, "max_tokens": 4, "stream": stream, "echo": true});
        let (st, _) = s.post("/v1/completions", Some(KEY_VICTIM), &comp).await;
        assert!(st == 200, "completions {st}");
    }
    // What the victim's prompt tokenizes to, so id sequences can be looked for too.
    let (_, tok) = s
        .post("/tokenize", Some(KEY_VICTIM), &json!({"prompt": MARKER}))
        .await;
    let ids: Vec<String> = tok["tokens"]
        .as_array()
        .unwrap_or_else(|| panic!("tokenize: {tok}"))
        .iter()
        .map(|t| t.to_string())
        .collect();
    assert!(!ids.is_empty());
    let id_run = ids.join(",");

    let lower = MARKER.to_lowercase();
    for key in [Some(KEY_ATTACKER), None] {
        for path in [
            "/metrics",
            "/v1/models",
            "/v1/kv_policies",
            "/health",
            "/ready",
            "/openapi.json",
            "/v1/completions",
            "/admin",
            "/debug",
        ] {
            let (_, body) = s.get(path, key).await;
            assert!(
                !body.to_lowercase().contains(&lower) && !body.contains(&id_run),
                "GET {path} as {key:?} shows the victim's prompt: {body:.400}"
            );
        }
        // Stateless routes answer about the caller's own input only.
        for (path, body) in [
            ("/detokenize", json!({"tokens": [1, 2, 3]})),
            ("/tokenize", json!({"prompt": "hello"})),
        ] {
            let (_, v) = s.post(path, key, &body).await;
            assert!(
                !v.to_string().to_lowercase().contains(&lower),
                "{path}: {v}"
            );
        }
    }
    // The attacker's own streams never carry the victim's text either (no cross-tenant reuse
    // of a cached continuation).
    let body = json!({"prompt": "Repeat the password:", "max_tokens": 8, "temperature": 0,
        "stream": true});
    let (_, frames) = s
        .stream_timed("/v1/completions", Some(KEY_ATTACKER), &body)
        .await;
    assert!(!frames.concat().to_lowercase().contains(&lower));
    s.assert_all_free().await;
    s.shutdown().await;
}
