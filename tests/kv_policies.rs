//! KV policies on the forward pass (tiny random-weight model, block size 4):
//! - a sealed policy gives bit-identical logits whether the prompt runs as one chunk, in
//!   chunks, or token by token (prefill reads earlier blocks sealed and its own block exact,
//!   exactly as decode and a prefix-cache hit do);
//! - compressed policies stay close to exact KV, ordered by how much they keep;
//! - a window hides old blocks (dropped table entries are never read), quest with a budget
//!   covering the context equals dense attention and with a small one reads fewer blocks;
//! - `mhc:R` is refused without a projection of rank R, seals like every other format once
//!   calibrated (`kvserve calibrate` on the model's own tokens), and its error shrinks with R.

mod common;

use common::{write_tiny_model, TinySpec};
use kvserve::backend::cpu::CpuBackend;
use kvserve::backend::Backend;
use kvserve::calibrate::{calibrate, Allocation, CalibrateOptions};
use kvserve::kv::policy::KvPolicy;
use kvserve::model::llama::{Llama, LogitsFor, SeqStep};
use kvserve::model::loader;

const BS: usize = 4;

fn model() -> (tempfile::TempDir, Llama<CpuBackend>) {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinySpec {
        hidden: 128,
        inter: 96,
        layers: 3,
        heads: 4,
        kv_heads: 2,
        head_dim: 32,
        ..TinySpec::default()
    };
    write_tiny_model(dir.path(), spec, 11);
    let files = loader::open(dir.path()).unwrap();
    let m = Llama::load(
        files.config.clone(),
        files.weights.as_ref(),
        CpuBackend::new(),
    )
    .unwrap();
    (dir, m)
}

fn tokens(n: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 37 + 5) % 290) as u32).collect()
}

/// A scrambled table of `n` blocks out of 64.
fn table(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 23 + 7) % 64).collect()
}

/// Logits of every position, computing `toks` in chunks of `chunk` under `policy`.
fn logits_in_chunks(
    m: &Llama<CpuBackend>,
    toks: &[u32],
    chunk: usize,
    policy: KvPolicy,
) -> Vec<Vec<f32>> {
    let mut store = m.new_kv_store(64, BS);
    let t = table(toks.len().div_ceil(BS));
    let vocab = m.config().vocab_size;
    let mut rows = Vec::new();
    for start in (0..toks.len()).step_by(chunk) {
        let end = (start + chunk).min(toks.len());
        let step = SeqStep {
            tokens: &toks[start..end],
            start_pos: start,
            block_table: &t,
            logits: LogitsFor::All,
            policy,
        };
        let out = m.forward(&[step], &mut store).unwrap().remove(0);
        rows.extend(out.chunks(vocab).map(<[f32]>::to_vec));
    }
    rows
}

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let max = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
    x.iter().map(|&v| v as f64 - lse).collect()
}

/// Mean KL(reference ‖ other) over positions.
fn kl(reference: &[Vec<f32>], other: &[Vec<f32>]) -> f64 {
    let mut sum = 0.0;
    for (a, b) in reference.iter().zip(other) {
        let (la, lb) = (log_softmax(a), log_softmax(b));
        sum += la
            .iter()
            .zip(&lb)
            .map(|(p, q)| p.exp() * (p - q))
            .sum::<f64>();
    }
    sum / reference.len() as f64
}

#[test]
fn sealed_prefill_equals_chunked_and_token_by_token_decode() {
    let (_d, m) = model();
    let toks = tokens(37);
    for name in [
        "bf16",
        "int8",
        "kivi4",
        "kivi2",
        "k8v4",
        "int8+window:8",
        "kivi4+window:5",
    ] {
        let p = KvPolicy::parse(name).unwrap();
        let one = logits_in_chunks(&m, &toks, toks.len(), p);
        for chunk in [1, 3, 8] {
            let other = logits_in_chunks(&m, &toks, chunk, p);
            assert!(one == other, "{name}: chunk {chunk} differs from one chunk");
        }
    }
}

/// The largest |logit − exact logit| over every position of `toks` under policy `name`. A
/// random tiny model barely depends on its KV (KL ~1e-17), so logits are compared directly.
fn deviation(m: &Llama<CpuBackend>, toks: &[u32], exact: &[Vec<f32>], name: &str) -> f32 {
    let rows = logits_in_chunks(m, toks, 16, KvPolicy::parse(name).unwrap());
    let mut worst = 0f32;
    for (a, b) in exact.iter().zip(&rows) {
        for (x, y) in a.iter().zip(b) {
            assert!(y.is_finite(), "{name}");
            worst = worst.max((x - y).abs());
        }
    }
    worst
}

#[test]
fn compressed_policies_stay_close_to_exact_in_order_of_precision() {
    let (_d, m) = model();
    let toks = tokens(48);
    let exact = logits_in_chunks(&m, &toks, 16, KvPolicy::EXACT);
    let dev = |name: &str| deviation(&m, &toks, &exact, name);
    let (bf16, int8, kivi4, kivi2) = (dev("bf16"), dev("int8"), dev("kivi4"), dev("kivi2"));
    let k8v4 = dev("k8v4");
    eprintln!("max |Δlogit| vs exact: bf16 {bf16:.2e} int8 {int8:.2e} k8v4 {k8v4:.2e} kivi4 {kivi4:.2e} kivi2 {kivi2:.2e}");
    assert!(bf16 > 0.0, "bf16 sealing must change something");
    assert!(
        bf16 < int8 && int8 < kivi4 && kivi4 < kivi2,
        "{bf16} {int8} {kivi4} {kivi2}"
    );
    assert!(int8 < k8v4 && k8v4 < kivi2, "{int8} {k8v4} {kivi2}");
    // Positions 0..3 see only their own block, which is exact.
    let int8_rows = logits_in_chunks(&m, &toks, 16, KvPolicy::parse("int8").unwrap());
    assert_eq!(exact[..BS], int8_rows[..BS]);
}

#[test]
fn a_window_never_reads_dropped_blocks() {
    let (_d, m) = model();
    let toks = tokens(40);
    let p = KvPolicy::parse("int8+window:8").unwrap();
    let full = logits_in_chunks(&m, &toks, 1, p);
    // Same computation with the blocks the window dropped marked as gone: identical logits
    // (and no out-of-range read).
    let mut store = m.new_kv_store(64, BS);
    let mut t = table(toks.len().div_ceil(BS));
    let keep = p.window_blocks(BS).unwrap();
    let vocab = m.config().vocab_size;
    for pos in 0..toks.len() {
        let step = SeqStep {
            tokens: &toks[pos..pos + 1],
            start_pos: pos,
            block_table: &t,
            logits: LogitsFor::All,
            policy: p,
        };
        let out = m.forward(&[step], &mut store).unwrap().remove(0);
        assert_eq!(out, full[pos], "position {pos}");
        assert_eq!(out.len(), vocab);
        // What the pool does after each commit: drop blocks the next position cannot see.
        let first_kept = ((pos + 1) / BS + 1).saturating_sub(keep);
        for e in t.iter_mut().take(first_kept).skip(1) {
            *e = u32::MAX;
        }
    }
    // Without the window, the sequence reads everything: different logits late in the text.
    let plain = logits_in_chunks(&m, &toks, 1, KvPolicy::parse("int8").unwrap());
    assert_eq!(plain[..12], full[..12], "inside the window nothing differs");
    assert!(plain[39] != full[39]);
    // A dropped block the window *can* see is a clear error, not a read out of bounds.
    let mut bad = table(toks.len().div_ceil(BS));
    bad[9] = u32::MAX;
    let step = SeqStep {
        tokens: &toks[39..40],
        start_pos: 39,
        block_table: &bad,
        logits: LogitsFor::Last,
        policy: p,
    };
    assert!(m.forward(&[step], &mut m.new_kv_store(64, BS)).is_err());
}

#[test]
fn quest_reads_fewer_blocks_only_when_the_budget_is_short() {
    let (_d, m) = model();
    let toks = tokens(64);
    let dense = logits_in_chunks(&m, &toks, 1, KvPolicy::parse("kivi4").unwrap());
    let wide = logits_in_chunks(&m, &toks, 1, KvPolicy::parse("kivi4+quest:64").unwrap());
    assert!(
        dense == wide,
        "a budget covering the context is dense attention"
    );
    let narrow = logits_in_chunks(&m, &toks, 1, KvPolicy::parse("kivi4+quest:12").unwrap());
    // Prefill of a chunk is dense, decode selects: identical while the context fits the
    // budget, different after.
    assert_eq!(dense[..12], narrow[..12]);
    assert!(dense[63] != narrow[63]);
    assert!(narrow.iter().flatten().all(|v| v.is_finite()));
    assert!(kl(&dense[12..], &narrow[12..]).is_finite());
}

#[test]
fn cpu_backend_serves_every_policy_and_weighs_it() {
    let (_d, m) = model();
    let be = m.backend();
    let cfg = m.config();
    let shape = m.attn_shape();
    let exact = m.kv_bytes_per_block(BS);
    let bytes = |name: &str| {
        let p = KvPolicy::parse(name).unwrap();
        assert!(be.supports_policy(&p));
        be.kv_sealed_bytes_per_block(cfg.num_layers, BS, shape, &p)
    };
    // With 4-token blocks the per-channel key scales of kivi4 cost more than int8 keys.
    let (bf16, int8, kivi4, kivi2) = (bytes("bf16"), bytes("int8"), bytes("kivi4"), bytes("kivi2"));
    assert_eq!(bf16 * 2, exact, "bf16 is half of exact f32");
    assert!(
        int8 < bf16 && kivi2 < kivi4 && kivi4 < bf16,
        "{int8} {kivi4} {kivi2}"
    );
    assert!(bytes("kivi4+quest:8") > kivi4, "key bounds cost bytes");
}

/// Gives `m` an `mhc` projection of rank `rank`, calibrated on its own token stream.
fn with_mhc(m: &mut Llama<CpuBackend>, rank: u16) {
    let opts = CalibrateOptions {
        rank,
        ctx: 128,
        max_tokens: 640,
        allocation: Allocation::Energy,
    };
    let cal = calibrate(m, &tokens(640), &opts).unwrap();
    m.attach_latent_keys(cal.keys).unwrap();
}

#[test]
fn mhc_needs_its_projection_seals_like_every_format_and_improves_with_rank() {
    let (_d, mut m) = model();
    let toks = tokens(37);
    let p16 = KvPolicy::parse("mhc:16").unwrap();
    assert!(!m.serves_policy(&p16));
    let t = table(toks.len().div_ceil(BS));
    let step = SeqStep {
        tokens: &toks,
        start_pos: 0,
        block_table: &t,
        logits: LogitsFor::Last,
        policy: p16,
    };
    let err = m
        .forward(&[step], &mut m.new_kv_store(64, BS))
        .unwrap_err()
        .to_string();
    assert!(err.contains("mhc:16+int8"), "{err}");

    for r in [8, 16, 32, 64] {
        with_mhc(&mut m, r);
    }
    assert!(m.serves_policy(&p16));
    for name in ["mhc:16", "mhc:16+kivi4", "mhc:8+bf16+window:8"] {
        let p = KvPolicy::parse(name).unwrap();
        let one = logits_in_chunks(&m, &toks, toks.len(), p);
        for chunk in [1, 3, 8] {
            let other = logits_in_chunks(&m, &toks, chunk, p);
            assert!(one == other, "{name}: chunk {chunk} differs from one chunk");
        }
    }

    // Quest over mhc blocks (key bounds from the reconstructed, rotated keys): a budget
    // covering the context reads exactly what dense attention reads.
    let dense = logits_in_chunks(&m, &toks, 1, KvPolicy::parse("mhc:32").unwrap());
    let quest = logits_in_chunks(&m, &toks, 1, KvPolicy::parse("mhc:32+quest:64").unwrap());
    assert!(dense == quest);

    // 2 KV heads × 32 = 64 channels: rank 64 keeps the whole key space (only the bf16
    // rounding of the latent remains), lower ranks lose more.
    let toks = tokens(48);
    let exact = logits_in_chunks(&m, &toks, 16, KvPolicy::EXACT);
    let [r8, r16, r32, r64, bf16] = [
        "mhc:8+bf16",
        "mhc:16+bf16",
        "mhc:32+bf16",
        "mhc:64+bf16",
        "bf16",
    ]
    .map(|name| deviation(&m, &toks, &exact, name));
    eprintln!("max |Δlogit| vs exact: mhc r8 {r8:.2e} r16 {r16:.2e} r32 {r32:.2e} r64 {r64:.2e}, bf16 {bf16:.2e}");
    assert!(r64 < r32 && r32 < r16 && r16 < r8, "{r8} {r16} {r32} {r64}");
    assert!(r64 < 20.0 * bf16, "full rank {r64} vs bf16 {bf16}");
}
