//! Speed of the kernels: device-to-device copy bandwidth (the ceiling), paged decode and prompt
//! attention, the sealed formats, the few-row products and token selection (engine tokens/s:
//! `engine_speed.rs`).

use super::{measure, Row};
use anyhow::Result;
use cudarc::driver::CudaSlice;
use kvserve::backend::cuda::parity::random_vec;
use kvserve::backend::cuda::store::CudaKvStore;
use kvserve::backend::cuda::CudaBackend;
use kvserve::backend::{AttnSeq, AttnShape, Backend, RopeParams};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

/// The middle of `v` (the upper middle of an even count).
pub(super) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median seconds of `f` over `reps` runs after 3 warm-ups, the device synchronised around each.
pub(super) fn time(gpu: &CudaBackend, reps: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    gpu.synchronize();
    let mut t = Vec::new();
    for _ in 0..reps {
        let t0 = Instant::now();
        f();
        gpu.synchronize();
        t.push(t0.elapsed().as_secs_f64());
    }
    median(t)
}

/// Copy bandwidth, then decode attention bandwidth with the default kernels and with each
/// `-D NAME=VALUE` of `variants` (kernels recompiled with that one define: the A/B of a
/// compile-time knob such as `DECODE_UNROLL` or `KV_LOAD_GENERIC`).
pub fn bandwidth(gpu: &CudaBackend, variants: &[(&str, u32)], rows: &mut Vec<Row>) -> Result<()> {
    // The ceiling: a 2 GiB device-to-device copy, counting bytes read plus written.
    let n = 1usize << 29;
    let src = gpu.upload(&random_vec(&mut ChaCha8Rng::seed_from_u64(3), n, 1.0));
    let mut dst = gpu.alloc(n);
    let s = time(gpu, 10, || {
        gpu.stream()
            .memcpy_dtod(&src, &mut dst)
            .expect("memcpy_dtod")
    });
    let copy = 2.0 * (n * 4) as f64 / s / 1e9;
    rows.push(measure(
        "device-to-device copy (2 GiB)",
        copy,
        "GB/s",
        "read + written",
    ));
    drop((src, dst));

    decode(gpu, copy, "", rows);
    prefill(gpu, rows);
    formats(gpu, Some(copy), rows);
    for &(name, value) in variants {
        let variant = CudaBackend::with_defines(gpu.info().clone(), &[(name, value)])?;
        decode(&variant, copy, &format!(", {name}={value}"), rows);
    }
    Ok(())
}

/// The compile-time variants the decode bandwidth section times beside the default kernels:
/// K/V read by plain (generic, L1-allocating) loads instead of `ld.global.nc.L1::no_allocate`
/// (kernels/kv_formats.cuh, `ld_kv16`), the A/B of 2026-12-01's load path.
pub const DECODE_VARIANTS: [(&str, u32); 1] = [("KV_LOAD_GENERIC", 1)];

/// The 1B shape's attention: 32 query heads over 8 KV heads of 64.
const SHAPE: AttnShape = AttnShape {
    num_heads: 32,
    num_kv_heads: 8,
    head_dim: 64,
};

/// A store of `seqs` sequences of `ctx` positions in consecutive blocks of 16, every layer
/// filled with random (not zero) K/V, 16384 rows per launch; with the tables and one query row
/// per sequence (`[seqs, qkv width]`).
fn filled_store(
    gpu: &CudaBackend,
    layers: usize,
    seqs: usize,
    ctx: usize,
) -> (CudaKvStore, Vec<Vec<u32>>, CudaSlice<f32>) {
    let (shape, bs) = (SHAPE, 16usize);
    let blocks_per = ctx.div_ceil(bs);
    let nblocks = seqs * blocks_per;
    let mut store = gpu.new_kv_store(layers, nblocks, bs, shape);
    let rope = RopeParams {
        inv_freq: vec![1e-3; 32],
        attention_scaling: 1.0,
    };
    let chunk = 16_384usize;
    let qkv = gpu.upload(&random_vec(
        &mut ChaCha8Rng::seed_from_u64(4),
        chunk * shape.qkv_width(),
        1.0,
    ));
    let total = nblocks * bs;
    for layer in 0..layers {
        for c0 in (0..total).step_by(chunk) {
            let n = chunk.min(total - c0);
            let slots: Vec<u32> = (c0..c0 + n).map(|s| s as u32).collect();
            let pos: Vec<u32> = slots.iter().map(|&s| s % ctx as u32).collect();
            let mut q = gpu.gather_rows(&qkv, &(0..n).collect::<Vec<_>>(), shape.qkv_width());
            gpu.rope_and_store(&mut q, n, &pos, &slots, shape, &rope, &mut store, layer);
        }
    }
    let tables = (0..seqs)
        .map(|s| ((s * blocks_per) as u32..((s + 1) * blocks_per) as u32).collect())
        .collect();
    let q = gpu.gather_rows(&qkv, &(0..seqs).collect::<Vec<_>>(), shape.qkv_width());
    (store, tables, q)
}

/// One decode row per block table, at the last of `ctx` positions.
fn decode_rows(
    tables: &[Vec<u32>],
    ctx: usize,
    policy: kvserve::kv::policy::KvPolicy,
) -> Vec<AttnSeq<'_>> {
    tables
        .iter()
        .map(|t| AttnSeq {
            rows: 1,
            start_pos: ctx - 1,
            block_table: t,
            policy,
        })
        .collect()
}

/// Paged decode attention, one layer of the 1B shape: K and V of every context read once.
fn decode(gpu: &CudaBackend, copy: f64, label: &str, rows: &mut Vec<Row>) {
    let shape = SHAPE;
    for &(seqs, ctx) in &[(128usize, 4096usize), (32, 4096), (8, 8192), (1, 32768)] {
        let (store, tables, q) = filled_store(gpu, 1, seqs, ctx);
        let attn = decode_rows(&tables, ctx, kvserve::kv::policy::KvPolicy::EXACT);
        let mut out = gpu.alloc(seqs * shape.q_width());
        let s = time(gpu, 20, || {
            gpu.attention(&q, &attn, shape, &store, 0, &mut out)
        });
        // As a forward pass calls it: layer after layer with no synchronisation in between, so
        // the host's planning of one call overlaps the device's work on the one before.
        let layers = 16;
        let s_seq = time(gpu, 10, || {
            for _ in 0..layers {
                gpu.attention(&q, &attn, shape, &store, 0, &mut out)
            }
        }) / layers as f64;
        // The A/B of the split merge: in the decode launch (default) or a second launch.
        let s_two = label.is_empty().then(|| {
            gpu.set_fused_merge(false);
            let s = time(gpu, 10, || {
                for _ in 0..layers {
                    gpu.attention(&q, &attn, shape, &store, 0, &mut out)
                }
            }) / layers as f64;
            gpu.set_fused_merge(true);
            s
        });
        let bytes = (seqs * ctx * shape.kv_width() * 2 * 2) as f64;
        if label.is_empty() {
            super::split_sweep::sweep(
                gpu,
                (seqs, ctx),
                bytes,
                copy,
                || gpu.attention(&q, &attn, shape, &store, 0, &mut out),
                rows,
            );
        }
        let mut timings = vec![
            (bytes / s, "one call, synchronised"),
            (bytes / s_seq, "16 calls back to back"),
        ];
        if let Some(s_two) = s_two {
            timings.push((
                bytes / s_two,
                "16 calls back to back, splits merged by a second launch",
            ));
        }
        for (bw, how) in timings {
            let bw = bw / 1e9;
            rows.push(measure(
                &format!("decode attention {seqs} seqs x {ctx} ctx{label}, {how}"),
                bw,
                "GB/s",
                &format!(
                    "{:.1}% of copy; {:.3} ms per layer call",
                    100.0 * bw / copy,
                    bytes / bw / 1e6
                ),
            ));
        }
    }
}

/// Prompt-chunk attention (the tensor-core prefill kernel), one layer of the 1B shape over a
/// 4096-position sequence: the whole prompt as one chunk, and its last 512 positions as a chunk
/// after the rest (chunked prefill). Counts 4 · heads · head_dim flops per (query, visible key).
fn prefill(gpu: &CudaBackend, rows: &mut Vec<Row>) {
    let shape = SHAPE;
    let ctx = 4096usize;
    let (store, tables, _) = filled_store(gpu, 1, 1, ctx);
    let qkv = gpu.upload(&random_vec(
        &mut ChaCha8Rng::seed_from_u64(6),
        ctx * shape.qkv_width(),
        1.0,
    ));
    for chunk in [ctx, 512] {
        let start = ctx - chunk;
        let attn = [AttnSeq {
            rows: chunk,
            start_pos: start,
            block_table: &tables[0],
            policy: kvserve::kv::policy::KvPolicy::EXACT,
        }];
        let mut out = gpu.alloc(chunk * shape.q_width());
        let s = time(gpu, 10, || {
            gpu.attention(&qkv, &attn, shape, &store, 0, &mut out)
        });
        let pairs: usize = (start..ctx).map(|p| p + 1).sum();
        let flops = (4 * shape.num_heads * shape.head_dim * pairs) as f64;
        rows.push(measure(
            &format!("prefill attention, {chunk} queries at {start}..{ctx}"),
            flops / s / 1e12,
            "TFLOP/s",
            &format!("{:.3} ms per layer call", s * 1e3),
        ));
    }
}

/// Decode attention over sealed blocks, one layer of the 1B shape past quest's dense layers,
/// 32 sequences of 4096 positions: time per call of each KV format against exact bf16 in the
/// same run, and the sealed bytes each call reads per second (quest: the own block and the
/// `budget / 16 - 1` best ranked of each sequence, plus every block's key bounds; a window: the
/// sink block and the window's blocks, the rest skipped without a load).
pub fn formats(gpu: &CudaBackend, copy: Option<f64>, rows: &mut Vec<Row>) {
    use kvserve::backend::Seal;
    use kvserve::kv::policy::{KvPolicy, QUEST_DENSE_LAYERS};
    let shape = SHAPE;
    let (bs, seqs, ctx, layers) = (16usize, 32usize, 4096usize, QUEST_DENSE_LAYERS + 1);
    let (layer, blocks_per) = (layers - 1, ctx / bs);
    let nblocks = seqs * blocks_per;
    let mut exact_ms = None;
    for name in [
        "bf16",
        "int8",
        "k8v4",
        "kivi4",
        "kivi2",
        "kivi4+quest:512",
        "bf16+quest:512",
        "int8+window:512",
    ] {
        let policy = KvPolicy::parse(name).expect("a known policy");
        let (mut store, tables, q) = filled_store(gpu, layers, seqs, ctx);
        let seals: Vec<Seal> = policy
            .codec
            .into_iter()
            .flat_map(|codec| {
                (0..nblocks as u32).map(move |b| Seal {
                    block: b,
                    pos: (b as usize % blocks_per * bs) as u32,
                    codec,
                    bounds: policy.stores_bounds(),
                })
            })
            .collect();
        if !seals.is_empty() {
            for l in 0..layers {
                gpu.seal(&mut store, l, &seals);
            }
            let all: Vec<u32> = (0..nblocks as u32).collect();
            gpu.release_exact(&mut store, &all);
        }
        let attn = decode_rows(&tables, ctx, policy);
        let mut out = gpu.alloc(seqs * shape.q_width());
        let s = time(gpu, 20, || {
            gpu.attention(&q, &attn, shape, &store, layer, &mut out)
        });
        let block = gpu.kv_sealed_bytes_per_block(1, bs, shape, &policy);
        // Quest: its budget; a window: the sink block and the window's blocks.
        let read_blocks = match (policy.quest, policy.window_blocks(bs)) {
            (Some(b), _) => b as usize / bs,
            (None, Some(w)) => w + 1,
            (None, None) => blocks_per,
        }
        .min(blocks_per);
        let bounds = if policy.stores_bounds() {
            blocks_per * shape.kv_width() * 4
        } else {
            0
        };
        let bytes = (seqs * (read_blocks * block + bounds)) as f64;
        let exact = *exact_ms.get_or_insert(s);
        rows.push(measure(
            &format!("decode attention {seqs} seqs x {ctx} ctx, {policy}"),
            s * 1e3,
            "ms",
            &format!(
                "{:.2}x the bf16 call; {:.0} GB/s of stored KV read{}",
                exact / s,
                bytes / s / 1e9,
                copy.map_or(String::new(), |c| format!(
                    " ({:.1}% of copy)",
                    100.0 * bytes / s / 1e9 / c
                ))
            ),
        ));
    }
}

/// The matrix products of a decode step, on the 1B shape's largest weights (gate_up `[16384,
/// 2048]`, down `[2048, 8192]`): the few-row kernel against cuBLAS with split hi/lo activations,
/// at 1, 2, 4 and 8 rows, 16 calls back to back as a forward pass issues them. Weight bytes read
/// per second (each weight once per call). Then the token selection of 128 rows on the device
/// (greedy, temperature draw) against reading the rows to the host.
pub fn products(gpu: &CudaBackend, rows: &mut Vec<Row>) -> Result<()> {
    use half::bf16;
    use kvserve::backend::cuda::kernels::{GEMV_DEFAULT_ROWS, GEMV_DEFAULT_SLICES, GEMV_MAX_ROWS};
    use kvserve::model::tensor::{HostData, HostTensor};
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for (name, n, k) in [("gate_up", 16_384usize, 2048usize), ("down", 2048, 8192)] {
        let data: Vec<bf16> = random_vec(&mut rng, n * k, 0.02)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let w = gpu.upload_matrix(&[&HostTensor {
            name: name.into(),
            shape: vec![n, k],
            data: HostData::Bf16(std::borrow::Cow::Owned(data)),
        }])?;
        for m in [1usize, 2, 4, 8] {
            let x = gpu.upload(&random_vec(&mut rng, m * k, 1.0));
            let mut out = gpu.alloc(m * n);
            let mut per_call = |gemv: bool| {
                gpu.set_gemv_max_rows(if gemv { GEMV_MAX_ROWS } else { 0 });
                let s = time(gpu, 10, || {
                    for _ in 0..16 {
                        gpu.matmul(&x, m, &w, &mut out);
                    }
                }) / 16.0;
                gpu.set_gemv_max_rows(GEMV_DEFAULT_ROWS);
                s
            };
            let (few, blas) = (per_call(true), per_call(false));
            // The same kernel with k split over 2 and 4 warps per column group.
            let split: Vec<(usize, f64)> = [2usize, 4]
                .into_iter()
                .map(|slices| {
                    gpu.set_gemv_slices(slices);
                    let s = per_call(true);
                    gpu.set_gemv_slices(GEMV_DEFAULT_SLICES);
                    (slices, s)
                })
                .collect();
            let bytes = (n * k * 2) as f64;
            let mut timings = vec![
                (
                    "gemv".to_string(),
                    few,
                    format!("{:.2}x the cuBLAS hi+lo time", few / blas),
                ),
                ("cuBLAS hi+lo".to_string(), blas, String::new()),
            ];
            timings.extend(split.into_iter().map(|(slices, s)| {
                (
                    format!("gemv, k over {slices} warps"),
                    s,
                    format!(
                        "{:.2}x the cuBLAS hi+lo time, {:.2}x the gemv row's",
                        s / blas,
                        s / few
                    ),
                )
            }));
            for (how, s, note) in timings {
                rows.push(measure(
                    &format!("matmul {m} rows x {name} [{n}x{k}], {how}"),
                    bytes / s / 1e9,
                    "GB/s",
                    &format!("{:.1} µs per call, 16 back to back; {note}", s * 1e6),
                ));
            }
            if name == "gate_up" {
                // The MLP's product and SiLU·up in one launch against the two launches.
                let inter = n / 2;
                let mut act = gpu.alloc(m * inter);
                let fused = time(gpu, 10, || {
                    for _ in 0..16 {
                        gpu.matmul_silu_mul(&x, m, &w, inter, &mut out, &mut act);
                    }
                }) / 16.0;
                let two = time(gpu, 10, || {
                    for _ in 0..16 {
                        gpu.matmul(&x, m, &w, &mut out);
                        gpu.silu_mul(&out, m, inter, &mut act);
                    }
                }) / 16.0;
                rows.push(measure(
                    &format!("matmul {m} rows x {name} [{n}x{k}] with SiLU·up, gemv_silu"),
                    bytes / fused / 1e9,
                    "GB/s",
                    &format!(
                        "{:.1} µs per call, 16 back to back; {:.2}x the time of gemv then silu_mul",
                        fused * 1e6,
                        fused / two
                    ),
                ));
            }
        }
    }
    // Token selection for 128 rows of a 32,000 vocabulary: on the device (one index per row
    // back) against bringing the rows to the host.
    let (n, vocab) = (128usize, 32_000usize);
    let logits = gpu.upload(&random_vec(&mut rng, n * vocab, 6.0));
    let draws: Vec<(f32, f64)> = (0..n).map(|i| (1.0, (i as f64 * 0.37) % 1.0)).collect();
    let mut host = vec![0f32; n * vocab];
    let argmax = time(gpu, 20, || drop(gpu.argmax_rows(&logits, 0..n, vocab)));
    let draw = time(gpu, 20, || {
        drop(gpu.draw_rows(&logits, 0..n, vocab, &draws))
    });
    let read = time(gpu, 20, || gpu.read(&logits, 0, &mut host));
    for (what, s) in [
        ("argmax_rows", argmax),
        ("draw_rows", draw),
        ("read the rows to the host", read),
    ] {
        rows.push(measure(
            &format!("{what}, {n} rows x {vocab}"),
            s * 1e6,
            "µs",
            "synchronised call",
        ));
    }
    Ok(())
}
