//! The device kernels run on the host: g++ compiles kernels/kv_seal.cu, attention.cu, prefill.cu,
//! quest.cu, norm.cu and sampling.cu as plain C++ (tests/cuda_host/shim.h stands in for the CUDA built-ins; `launch` runs a grid
//! CTA by CTA with one OS thread per CUDA thread, real barriers and warp shuffles), and the
//! results are checked against the CPU backend:
//! - every sealed format encodes to the very same bytes and decodes to the very same f32 bits as
//!   the CPU codec; mhc's latent encoder and key rebuild equal the CPU's bit for bit;
//! - quest's key bounds (`seal_bounds_<fmt>`) equal the CPU's for every format;
//! - the norms, plain and fused with the residual add, equal the CPU's within float rounding;
//! - the dense temperature draw (`sampling.cu: draw_dense_f32`) picks the CPU's very token for
//!   every row and uniform (so a seeded stream is the same on either backend);
//! - the few-row products (`gemv.cu`) equal the CPU backend's f32 products within float
//!   rounding, for every row count the backend sends them and widths that are not multiples
//!   of a warp step;
//! - decode (split-K + reduction) and prefill attention over a device-layout image of the KV
//!   (exact and sealed slabs, slot-pair tables) equal the CPU's attention within 1e-4 for every
//!   policy: sealed history, a block sealed within the step (read exact by its own queries),
//!   prompt chunks after sealed prefixes, windows with dropped blocks, quest's block selection
//!   (ties included).
//!
//! Not covered without a GPU: the PTX f16 conversions (the shim uses `_Float16`), the GPU's
//! memory model and real concurrency, speed (`scripts/gpu-check.sh` does those on a GPU).
//! `KV_ONLY=<policy>` (e.g. `kivi4+quest:128`) runs one attention policy (`KV_BS=8`: in blocks of
//! 8), `KV_DEBUG=1` prints the rows that differ.

#[path = "cuda_host/host_build.rs"]
mod host_build;

use half::bf16;
use kvserve::backend::codec::{Codec, MhcValues};
use kvserve::backend::cpu::kv_store::CpuKvStore;
use kvserve::backend::cpu::ops::RopeTable;
use kvserve::backend::cpu::CpuBackend;
use kvserve::backend::cuda::kernels::prefill_queries;
use kvserve::backend::cuda::parity::max_rel_err;
use kvserve::backend::cuda::plan::plan;
use kvserve::backend::cuda::split::decode_split;
use kvserve::backend::cuda::store::{exact_block_bytes, format_index, SealedLayout};
use kvserve::backend::kv_policy::KvPolicy;
use kvserve::backend::latent::{LatentKeys, LatentLayer};
use kvserve::backend::{AttnSeq, AttnShape, Backend, RopeParams, Seal};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

/// Builds a harness (`tests/cuda_host/<cpp>`, which includes the kernel files it runs) once per
/// test process, into `host-kernels` in the tests' scratch folder (rebuilt by every run, as the
/// emulated device is). The harness sees every `kernels/` file through `-I`, with dynamic shared
/// memory turned into a global array of the harness (see shim.h).
fn build(cpp: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // The kernel copies are written once: harnesses build from them on several test threads.
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("host-kernels");
        host_build::host_kernels(&dir);
        dir
    });
    let bin = dir.join(cpp.trim_end_matches(".cpp"));
    let out = host_build::gxx(dir)
        .arg("-o")
        .arg(&bin)
        .arg(root.join("tests/cuda_host").join(cpp))
        .output()
        .unwrap_or_else(|e| panic!("g++ (C++20 with _Float16) is needed: {e}"));
    assert!(
        out.status.success(),
        "{cpp}: build failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    bin
}

fn call(cmd: &str, input: &[u8]) -> Vec<u8> {
    static SEAL: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    static ATTN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    static NORM: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    static ARGMAX: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    static GEMV: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let bin = match cmd {
        "attention" => ATTN.get_or_init(|| build("attention.cpp")),
        "norm" => NORM.get_or_init(|| build("norm.cpp")),
        "argmax" | "draw" => ARGMAX.get_or_init(|| build("sampling.cpp")),
        "gemv" => GEMV.get_or_init(|| build("gemv.cpp")),
        _ => SEAL.get_or_init(|| build("harness.cpp")),
    };
    let dir = bin.parent().unwrap();
    let tag = format!("{cmd}-{:?}", std::thread::current().id()).replace(['(', ')'], "");
    let (i, o) = (
        dir.join(format!("{tag}.in")),
        dir.join(format!("{tag}.out")),
    );
    std::fs::write(&i, input).unwrap();
    let st = Command::new(bin).arg(cmd).arg(&i).arg(&o).status().unwrap();
    assert!(st.success(), "harness {cmd}: {st}");
    let out = std::fs::read(&o).unwrap();
    // The inputs run to tens of MB: none is left behind.
    let _ = (std::fs::remove_file(&i), std::fs::remove_file(&o));
    out
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// bf16-representable normals, channels `outliers` ×20.
fn values(rng: &mut ChaCha8Rng, n: usize, d: usize, outliers: &[usize]) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let u: f32 = rng.random_range(f32::EPSILON..1.0);
            let v: f32 = rng.random_range(0.0..std::f32::consts::TAU);
            let x = (-2.0 * u.ln()).sqrt() * v.cos();
            let x = if outliers.contains(&(i % d)) {
                x * 20.0
            } else {
                x
            };
            bf16::from_f32(x).to_f32()
        })
        .collect()
}

/// A random `mhc` projection of nominal rank `rank` over keys of `kv_width` channels (heads of
/// `head_dim`), one layer per entry of `ranks`, rotating with `rope`.
fn random_latent(
    rng: &mut ChaCha8Rng,
    (kv_width, head_dim): (usize, usize),
    rank: u16,
    ranks: &[usize],
    rope: &RopeParams,
) -> LatentKeys {
    let mut small =
        |n: usize, s: f32| -> Vec<f32> { (0..n).map(|_| rng.random_range(-s..s)).collect() };
    let lk = LatentKeys {
        id: [1; 32],
        rank,
        kv_width,
        head_dim,
        layers: ranks
            .iter()
            .map(|&r| LatentLayer {
                rank: r,
                mean: small(kv_width, 0.5),
                down: small(r * kv_width, 0.2),
                up_t: small(r * kv_width, 0.3),
            })
            .collect(),
        rope: rope.clone(),
        max_positions: 4096,
    };
    lk.validate().unwrap();
    lk
}

/// The device format id of each run of a codec (kv_formats.cuh `FMT_*`) with the CPU codec
/// calls that produce it: (id, codec, keys?).
const RUNS: [(u32, Codec, bool); 6] = [
    (0, Codec::Bf16, true),
    (1, Codec::Int8, true),
    (2, Codec::Kivi4, false), // per-token 4-bit: kivi4's values
    (3, Codec::Kivi2, false),
    (4, Codec::Kivi4, true), // per-channel 4-bit: kivi4's keys
    (5, Codec::Kivi2, true),
];

fn check_runs(x: &[f32], bs: usize, d: usize, what: &str) {
    for (fmt, codec, keys) in RUNS {
        let mut input = Vec::new();
        for v in [fmt, bs as u32, d as u32] {
            input.extend(v.to_le_bytes());
        }
        for &v in x {
            input.extend(bf16::from_f32(v).to_le_bytes());
        }
        let out = call("run", &input);
        let n = if keys {
            codec.k_bytes(bs, d)
        } else {
            codec.v_bytes(bs, d)
        };
        let mut want = vec![0u8; n];
        let mut dec = vec![0f32; bs * d];
        if keys {
            codec.encode_k(x, bs, d, &mut want);
            codec.decode_k(&want, bs, d, 0, bs, &mut dec);
        } else {
            codec.encode_v(x, bs, d, &mut want);
            codec.decode_v(&want, bs, d, 0, bs, &mut dec);
        }
        let name = format!(
            "{} {} bs {bs} d {d} ({what})",
            codec.name(),
            if keys { "K" } else { "V" }
        );
        assert_eq!(out.len(), n + 8 * bs * d, "{name}: output size");
        if let Some(i) = (0..n).find(|&i| out[i] != want[i]) {
            panic!(
                "{name}: encoded byte {i} is {:#x}, the CPU codec wrote {:#x}",
                out[i], want[i]
            );
        }
        let (elem, vec8) = (f32s(&out[n..n + 4 * bs * d]), f32s(&out[n + 4 * bs * d..]));
        for (i, &w) in dec.iter().enumerate() {
            assert_eq!(
                elem[i].to_bits(),
                w.to_bits(),
                "{name}: run_elem {i}: {} vs {w}",
                elem[i]
            );
            assert_eq!(
                vec8[i].to_bits(),
                w.to_bits(),
                "{name}: run_8 {i}: {} vs {w}",
                vec8[i]
            );
        }
    }
}

#[test]
fn every_sealed_format_encodes_and_decodes_like_the_cpu_codec() {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    // d 64 and 128 (groups of 32), 48 (one group of 48), 8 with an odd block (2-bit codes
    // ending mid-byte, parameters at unaligned offsets).
    for (bs, d) in [(16, 64), (16, 128), (32, 48), (5, 8)] {
        let x = values(&mut rng, bs * d, d, &[3, d - 1]);
        check_runs(&x, bs, d, "outlier channels");
    }
    // Constants (zero scales), zeros, and non-finite / out-of-f16-range input.
    let (bs, d) = (16, 64);
    check_runs(&vec![0.0; bs * d], bs, d, "zeros");
    check_runs(&vec![-3.25; bs * d], bs, d, "constant");
    let mut x = values(&mut rng, bs * d, d, &[]);
    x[0] = f32::NAN;
    x[d + 5] = f32::INFINITY;
    x[2 * d + 7] = f32::NEG_INFINITY;
    x[3 * d + 9] = bf16::from_f32(1e30).to_f32();
    x[4 * d + 11] = bf16::from_f32(-1e30).to_f32();
    x[6 * d..7 * d].fill(f32::NAN);
    for t in 0..bs {
        x[t * d + 63] = f32::NAN;
    }
    check_runs(&x, bs, d, "NaN, inf, beyond f16");
}

#[test]
fn mhc_latent_encode_and_key_rebuild_match_the_cpu() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (kvh, d, bs, rank, pos0) = (3usize, 64usize, 16usize, 24usize, 1234usize);
    let w = kvh * d;
    let rope = RopeParams {
        inv_freq: (0..d / 2)
            .map(|i| 100_000f32.powf(-((2 * i) as f32) / d as f32))
            .collect(),
        attention_scaling: 1.0,
    };
    let lk = random_latent(&mut rng, (w, d), rank as u16, &[rank], &rope);
    // Rotated keys as the exact store holds them (bf16).
    let keys = values(&mut rng, bs * w, w, &[5]);
    let table = RopeTable::new(&rope, 4096);
    // CPU: un-rotate, project (kv_store.rs `seal`), rebuild and rotate (`decode_k`).
    let mut pre = keys.clone();
    for t in 0..bs {
        for h in 0..kvh {
            table.unrotate_head(&mut pre[t * w + h * d..t * w + (h + 1) * d], pos0 + t);
        }
    }
    let mut latent = vec![0u8; lk.latent_bytes(0, bs)];
    lk.encode(0, &pre, bs, &mut latent);
    let mut rebuilt = vec![0f32; kvh * bs * d];
    for h in 0..kvh {
        let out = &mut rebuilt[h * bs * d..(h + 1) * bs * d];
        lk.decode_head(0, &latent, h, 0, bs, out);
        for t in 0..bs {
            table.rotate_head(&mut out[t * d..(t + 1) * d], pos0 + t);
        }
    }

    let mut input = Vec::new();
    for v in [kvh, d, bs, rank, pos0] {
        input.extend((v as u32).to_le_bytes());
    }
    input.extend(rope.attention_scaling.to_le_bytes());
    for v in rope
        .inv_freq
        .iter()
        .chain(&lk.layers[0].mean)
        .chain(&lk.layers[0].down)
        .chain(&lk.layers[0].up_t)
    {
        input.extend(v.to_le_bytes());
    }
    for &k in &keys {
        input.extend(bf16::from_f32(k).to_le_bytes());
    }
    let out = call("latent", &input);
    assert_eq!(out.len(), latent.len() + 4 * rebuilt.len());
    assert_eq!(
        &out[..latent.len()],
        &latent[..],
        "latent bytes differ from the CPU's"
    );
    let got = f32s(&out[latent.len()..]);
    for (i, (&g, &want)) in got.iter().zip(&rebuilt).enumerate() {
        assert_eq!(
            g.to_bits(),
            want.to_bits(),
            "rebuilt key {i}: {g} vs {want}"
        );
    }
    // Not trivially equal: the projection loses part of the keys (rank 24 of 192).
    let err: f32 = (0..bs * kvh * d)
        .map(|i| {
            let (h, t, c) = (i / (bs * d), i / d % bs, i % d);
            (rebuilt[i] - keys[t * w + h * d + c]).abs()
        })
        .sum();
    assert!(err > 1.0, "rebuilt keys equal the stored ones: {err}");
}

/// Writes layer `l` of one block's sealed form into `block` (a whole sealed block of `lay`)
/// with the CPU codec: `k`, `v` are `[bs, kv_heads * d]` (rotated keys), `p0` the block's first
/// position (mhc un-rotates the keys to encode the latent). Key bounds are left as they are.
#[allow(clippy::too_many_arguments)]
fn write_sealed(
    block: &mut [u8],
    lay: &SealedLayout,
    l: usize,
    k: &[f32],
    v: &[f32],
    p0: usize,
    lat: Option<&LatentKeys>,
    rope: &RopeTable,
    (kvh, d, bs): (usize, usize, usize),
) {
    let (c, w) = (lay.codec, kvh * d);
    let base = lay.layer_at[l];
    if let Some(lk) = lat {
        let mut pre = k.to_vec();
        for t in 0..bs {
            for h in 0..kvh {
                rope.unrotate_head(&mut pre[t * w + h * d..t * w + (h + 1) * d], p0 + t);
            }
        }
        let n = lk.latent_bytes(l, bs);
        lk.encode(l, &pre, bs, &mut block[base..base + n]);
    }
    for h in 0..kvh {
        let run = |x: &[f32]| -> Vec<f32> {
            (0..bs)
                .flat_map(|t| x[t * w + h * d..t * w + (h + 1) * d].to_vec())
                .collect()
        };
        let at = base + lay.latent[l] + h * (lay.k_run + lay.v_run + lay.b_run);
        let (kb, vb) = (c.k_bytes(bs, d), c.v_bytes(bs, d));
        c.encode_k(&run(k), bs, d, &mut block[at..at + kb]);
        let at = at + lay.k_run;
        c.encode_v(&run(v), bs, d, &mut block[at..at + vb]);
    }
}

/// Writes the CPU store's key bounds of `block`, layer `l`, into the device image `dst` (one
/// sealed block of `lay`); false when the CPU keeps none for it.
fn write_bounds(
    dst: &mut [u8],
    lay: &SealedLayout,
    cpu: &CpuKvStore,
    block: u32,
    l: usize,
) -> bool {
    let (kvh, d) = (cpu.shape().num_kv_heads, cpu.shape().head_dim);
    let view = cpu.view(l);
    let (mut lo, mut hi) = (vec![0f32; d], vec![0f32; d]);
    for h in 0..kvh {
        if !view.key_bounds(block, h, &mut lo, &mut hi) {
            return false;
        }
        let at = lay.layer_at[l]
            + lay.latent[l]
            + h * (lay.k_run + lay.v_run + lay.b_run)
            + lay.k_run
            + lay.v_run;
        for (i, x) in lo.iter().chain(&hi).enumerate() {
            dst[at + 2 * i..at + 2 * i + 2].copy_from_slice(&half::f16::from_f32(*x).to_le_bytes());
        }
    }
    true
}

#[test]
fn quest_key_bounds_match_the_cpu_for_every_format() {
    let shape = AttnShape {
        num_heads: 6,
        num_kv_heads: 3,
        head_dim: 64,
    };
    let (kvh, d, bs, w, pos0) = (3usize, 64usize, 16usize, 192usize, 1232usize);
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let rope = RopeParams {
        inv_freq: (0..d / 2)
            .map(|i| 10_000f32.powf(-((2 * i) as f32) / d as f32))
            .collect(),
        attention_scaling: 1.0,
    };
    let table = Arc::new(RopeTable::new(&rope, 4096));
    let rank = 24;
    let lat = Arc::new(random_latent(&mut rng, (w, d), 24, &[rank], &rope));
    let mut codecs: Vec<Codec> = Codec::PLAIN.to_vec();
    codecs.extend(MhcValues::ALL.map(|values| Codec::Mhc { rank: 24, values }));
    for (case, codec) in codecs.into_iter().enumerate() {
        let mhc = codec.latent_rank().is_some();
        // Outlier channels; one case with NaN, ±inf and beyond-f16 keys.
        let mut k = values(&mut rng, bs * w, w, &[3, 70]);
        if case == 1 {
            k[5] = f32::NAN;
            k[w + 9] = f32::INFINITY;
            k[2 * w + 11] = f32::NEG_INFINITY;
            k[3 * w + 13] = bf16::from_f32(1e30).to_f32();
            k[4 * w + 13] = bf16::from_f32(-1e30).to_f32();
            for t in 0..bs {
                k[t * w + 100] = f32::NAN;
            }
        }
        let v = values(&mut rng, bs * w, w, &[]);
        let mut cpu = CpuKvStore::new(1, 4, bs, shape);
        if mhc {
            cpu.attach_latent(lat.clone(), table.clone());
        }
        let mut rows = vec![0f32; bs * shape.qkv_width()];
        for t in 0..bs {
            let r = &mut rows[t * shape.qkv_width()..(t + 1) * shape.qkv_width()];
            r[shape.q_width()..shape.q_width() + w].copy_from_slice(&k[t * w..(t + 1) * w]);
            r[shape.q_width() + w..].copy_from_slice(&v[t * w..(t + 1) * w]);
        }
        let block = 2u32;
        let slots: Vec<u32> = (0..bs as u32).map(|t| block * bs as u32 + t).collect();
        cpu.store(0, &rows, bs, &slots);
        let seal = Seal {
            block,
            pos: pos0 as u32,
            codec,
            bounds: true,
        };
        cpu.seal(0, &[seal]);
        let ranks = [rank];
        let lay = SealedLayout::new(codec, true, &ranks, 1, bs, shape);
        let mut image = vec![0u8; lay.block_bytes];
        let l = mhc.then_some(&*lat);
        write_sealed(&mut image, &lay, 0, &k, &v, pos0, l, &table, (kvh, d, bs));
        let mut want = image.clone();
        assert!(
            write_bounds(&mut want, &lay, &cpu, block, 0),
            "{}: no CPU bounds",
            codec.name()
        );
        let mut input = Bytes::default();
        for x in [
            format_index(Some(codec), true),
            kvh,
            d,
            bs,
            rank,
            pos0,
            lay.k_run,
            lay.v_run,
            lay.b_run,
            lay.latent[0],
        ] {
            input.u32(x as u32);
        }
        input.f32s(&[rope.attention_scaling]);
        input.f32s(&rope.inv_freq);
        input.f32s(&lat.layers[0].mean);
        input.f32s(&lat.layers[0].up_t);
        input.u64(image.len() as u64);
        input.0.extend(&image);
        let got = call("bounds", &input.0);
        assert_eq!(got.len(), want.len());
        // Compared as f16 values (NaN equal to NaN, -0 to +0); every byte outside the bounds
        // must be untouched.
        let f16_at = |b: &[u8], i: usize| half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
        let mut checked = 0;
        for h in 0..kvh {
            let at =
                lay.latent[0] + h * (lay.k_run + lay.v_run + lay.b_run) + lay.k_run + lay.v_run;
            for i in 0..2 * d {
                let (g, x) = (f16_at(&got, at + 2 * i), f16_at(&want, at + 2 * i));
                assert!(
                    g == x || (g.is_nan() && x.is_nan()),
                    "{} head {h} {} channel {}: device {g}, CPU {x}",
                    codec.name(),
                    if i < d { "min" } else { "max" },
                    i % d
                );
                checked += 1;
            }
            want[at..at + 4 * d].copy_from_slice(&got[at..at + 4 * d]);
        }
        assert_eq!(
            got,
            want,
            "{}: bytes outside the bounds changed",
            codec.name()
        );
        assert_eq!(checked, kvh * 2 * d);
    }
}

// ---- attention kernels (decode split-K + reduction, prefill) on the host ----

const NO: u32 = u32::MAX;

/// Little-endian byte writer for the harness input.
#[derive(Default)]
struct Bytes(Vec<u8>);
impl Bytes {
    fn u32(&mut self, v: u32) {
        self.0.extend(v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend(v.to_le_bytes());
    }
    fn f32s(&mut self, v: &[f32]) {
        for x in v {
            self.0.extend(x.to_le_bytes());
        }
    }
    fn u32s(&mut self, v: &[u32]) {
        for x in v {
            self.0.extend(x.to_le_bytes());
        }
    }
}

/// One policy through the CPU backend (the oracle) and through the device attention kernels
/// run on the host over a device-layout image of the same KV: a long decode row (many splits,
/// sealed history), a decode row whose block fills in this step (sealed and exact at once), a
/// prompt chunk after a sealed prefix (blocks sealed within the chunk: the two-pass tiles) and a
/// fresh prompt. Under a window, blocks the first row cannot see are dropped. Under quest (read
/// at layer 2, past the dense layers), 20 blocks of the long row hold the same, larger keys: they
/// rank first with equal bounds, so the budget cuts through ties. Blocks hold `bs` tokens.
/// Returns the max relative error of the device output.
fn attention_case(
    policy: KvPolicy,
    bs: usize,
    shape: AttnShape,
    lat: Option<Arc<LatentKeys>>,
    rope: &RopeParams,
) -> f64 {
    let (layers, layer, group) = (3usize, 2usize, shape.num_heads / shape.num_kv_heads);
    let (kvh, d) = (shape.num_kv_heads, shape.head_dim);
    let (w, width) = (shape.kv_width(), shape.qkv_width());
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    // (start, rows) per sequence.
    let spec = [(600usize, 1usize), (47, 1), (200, 20), (0, 45)];
    let wb = policy.window_blocks(bs);
    let nb = 256;
    let mut ids: Vec<u32> = (0..nb as u32).collect();
    ids.shuffle(&mut rng);
    let mut next = 0;
    let mut tables: Vec<Vec<u32>> = Vec::new();
    for &(start, rows) in &spec {
        let n = (start + rows).div_ceil(bs);
        let first_own = start / bs;
        let t: Vec<u32> = (0..n)
            .map(|bi| {
                let dropped = wb.is_some_and(|w| bi != 0 && bi + w <= first_own);
                next += 1;
                if dropped {
                    NO
                } else {
                    ids[next - 1]
                }
            })
            .collect();
        tables.push(t);
    }
    // K/V per (layer, block, token, channel of all heads), bf16-representable.
    let mut kv: std::collections::HashMap<(usize, u32), (Vec<f32>, Vec<f32>)> = Default::default();
    let mut cpu_store = CpuKvStore::new(layers, nb, bs, shape);
    let table = Arc::new(RopeTable::new(rope, 4096));
    if let Some(l) = &lat {
        cpu_store.attach_latent(l.clone(), table.clone());
    }
    let codec = policy.codec;
    let bounds = policy.stores_bounds();
    let sealed_on_gpu = codec.is_some_and(|c| c != Codec::Bf16 || bounds);
    let ties = bounds && codec.is_none_or(|c| c.latent_rank().is_none());
    let tie_keys: Vec<Vec<f32>> = (0..layers)
        .map(|_| {
            values(&mut rng, bs * w, w, &[7])
                .iter()
                .map(|x| bf16::from_f32(2.0 * x).to_f32())
                .collect()
        })
        .collect();
    // (block, first position, sealed before this step?) of every full block.
    let mut full: Vec<(u32, usize, bool)> = Vec::new();
    for (s, &(start, rows)) in spec.iter().enumerate() {
        let end = start + rows;
        for (bi, &b) in tables[s].iter().enumerate() {
            if b == NO {
                continue;
            }
            let p0 = bi * bs;
            let n = bs.min(end - p0);
            for (l, tie) in tie_keys.iter().enumerate() {
                let mut k = values(&mut rng, n * w, w, &[7]);
                if ties && s == 0 && (8..28).contains(&bi) {
                    k.copy_from_slice(tie);
                }
                let v = values(&mut rng, n * w, w, &[]);
                let mut rows_buf = vec![0f32; n * width];
                for t in 0..n {
                    let r = &mut rows_buf[t * width..(t + 1) * width];
                    r[shape.q_width()..shape.q_width() + w].copy_from_slice(&k[t * w..(t + 1) * w]);
                    r[shape.q_width() + w..].copy_from_slice(&v[t * w..(t + 1) * w]);
                }
                let slots: Vec<u32> = (0..n).map(|t| b * bs as u32 + t as u32).collect();
                cpu_store.store(l, &rows_buf, n, &slots);
                kv.insert((l, b), (k, v));
            }
            if n == bs {
                full.push((b, p0, p0 + bs <= start));
            }
        }
    }
    if let Some(c) = codec {
        let seals: Vec<Seal> = full
            .iter()
            .map(|&(block, p0, _)| Seal {
                block,
                pos: p0 as u32,
                codec: c,
                bounds,
            })
            .collect();
        for l in 0..layers {
            cpu_store.seal(l, &seals);
        }
        let earlier: Vec<u32> = full.iter().filter(|f| f.2).map(|f| f.0).collect();
        cpu_store.release_exact(&earlier);
    }
    // The step: q rows (k/v parts unused by attention).
    let rows: usize = spec.iter().map(|s| s.1).sum();
    // Full f32 queries (the stored K/V are bf16 values), as a model's are: the prefill kernel
    // splits them into bf16 high and low parts for the tensor cores.
    let qkv: Vec<f32> = values(&mut rng, rows * width, width, &[])
        .into_iter()
        .map(|x| x * rng.random_range(0.95..1.05))
        .collect();
    let seqs: Vec<AttnSeq<'_>> = spec
        .iter()
        .zip(&tables)
        .map(|(&(start, rows), t)| AttnSeq {
            rows,
            start_pos: start,
            block_table: t,
            policy,
        })
        .collect();
    let cpu = CpuBackend::new();
    let mut want = vec![0f32; rows * shape.q_width()];
    cpu.attention(&qkv, &seqs, shape, &cpu_store, layer, &mut want);

    // The device image: exact slab (slot = block id) and sealed slab, as the GPU store lays
    // them out.
    let exb = exact_block_bytes(layers, bs, shape);
    let plane = bs * w * 2;
    let mut ex = vec![0u8; nb * exb];
    let ranks: Vec<usize> = lat.as_ref().map_or(vec![0; layers], |l| {
        l.layers.iter().map(|x| x.rank).collect()
    });
    let layout = codec
        .filter(|_| sealed_on_gpu)
        .map(|c| SealedLayout::new(c, bounds, &ranks, layers, bs, shape));
    let mut se = vec![0u8; layout.as_ref().map_or(16, |l| nb * l.block_bytes)];
    let mut exact_present = vec![false; nb];
    let mut sealed_present = vec![false; nb];
    for (&(l, b), (k, v)) in &kv {
        let n = k.len() / w;
        let earlier = full.iter().any(|f| f.0 == b && f.2);
        let sealed = sealed_on_gpu && full.iter().any(|f| f.0 == b);
        if !(sealed && earlier) {
            exact_present[b as usize] = true;
            for (part, src) in [(0usize, k), (1, v)] {
                for h in 0..kvh {
                    for t in 0..n {
                        for c in 0..d {
                            let e = ((l * 2 + part) * kvh + h) * bs * d + t * d + c;
                            let at = b as usize * exb + 2 * e;
                            ex[at..at + 2].copy_from_slice(
                                &bf16::from_f32(src[t * w + h * d + c]).to_le_bytes(),
                            );
                        }
                    }
                }
            }
            let _ = plane;
        }
        if let (true, Some(lay)) = (sealed, &layout) {
            sealed_present[b as usize] = true;
            let p0 = full.iter().find(|f| f.0 == b).unwrap().1;
            let block = &mut se[b as usize * lay.block_bytes..(b as usize + 1) * lay.block_bytes];
            let geo = (kvh, d, bs);
            write_sealed(block, lay, l, k, v, p0, lat.as_deref(), &table, geo);
            if bounds {
                assert!(
                    write_bounds(block, lay, &cpu_store, b, l),
                    "no CPU bounds for {b}"
                );
            }
        }
    }
    let p = plan(&seqs, group, bs, prefill_queries(d), |_| true);
    let pairs: Vec<u32> = p
        .tables
        .iter()
        .flat_map(|&b| {
            let ok = |present: &Vec<bool>| b != NO && present[b as usize];
            [
                if ok(&exact_present) { b } else { NO },
                if ok(&sealed_present) { b } else { NO },
            ]
        })
        .collect();
    let n = p.decode_rows();
    // 16 multiprocessors of 4 resident CTAs.
    let (split, max_splits) = decode_split(p.max_ctx, n, kvh, 64);
    assert!(
        max_splits > 1,
        "the long row must cross splits (the merge is under test)"
    );
    let mut inb = Bytes::default();
    for v in [
        format_index(codec, bounds) as u32,
        shape.num_heads as u32,
        kvh as u32,
        d as u32,
        bs as u32,
        bs.trailing_zeros(),
        split as u32,
        max_splits as u32,
        n as u32,
        p.num_tiles() as u32,
        rows as u32,
        wb.unwrap_or(0) as u32,
        ranks[layer] as u32,
    ] {
        inb.u32(v);
    }
    inb.f32s(&[rope.attention_scaling]);
    let (seb, sel, kr, vr, lb) = layout.as_ref().map_or((0, 0, 0, 0, 0), |l| {
        (
            l.block_bytes,
            l.layer_at[layer],
            l.k_run,
            l.v_run,
            l.latent[layer],
        )
    });
    for v in [exb, layer * 2 * plane, plane, seb, sel] {
        inb.u64(v as u64);
    }
    for v in [kr, vr, lb] {
        inb.u32(v as u32);
    }
    for v in [pairs.len(), ex.len(), se.len()] {
        inb.u64(v as u64);
    }
    inb.f32s(&qkv);
    inb.u32s(&p.decode);
    inb.u32s(&p.tiles);
    inb.u32s(&pairs);
    inb.f32s(&rope.inv_freq);
    match &lat {
        Some(lk) => {
            inb.f32s(&lk.layers[layer].mean);
            inb.f32s(&lk.layers[layer].up_t);
        }
        None => inb.f32s(&vec![0.0; w]),
    }
    inb.0.extend(&ex);
    inb.0.extend(&se);
    inb.u32(layout.as_ref().map_or(0, |l| l.b_run as u32));
    inb.u32(policy.quest.unwrap_or(0));
    let got = f32s(&call("attention", &inb.0));
    assert_eq!(got.len(), want.len());
    if std::env::var("KV_DEBUG").is_ok() {
        let q = shape.q_width();
        for r in 0..rows {
            let e = max_rel_err(&got[r * q..(r + 1) * q], &want[r * q..(r + 1) * q]);
            if e > 1e-4 || e.is_nan() {
                eprintln!(
                    "  row {r}: {e:.2e} got {:?} want {:?}",
                    &got[r * q..r * q + 4],
                    &want[r * q..r * q + 4]
                );
            }
        }
    }
    max_rel_err(&got, &want)
}

/// Llama's RoPE frequencies (base 10,000) at `head_dim`.
fn rope_for(head_dim: usize) -> RopeParams {
    RopeParams {
        inv_freq: (0..head_dim / 2)
            .map(|i| 10_000f32.powf(-((2 * i) as f32) / head_dim as f32))
            .collect(),
        attention_scaling: 1.0,
    }
}

#[test]
fn attention_kernels_match_the_cpu_for_every_policy() {
    let rope = rope_for(64);
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let (w, ranks) = (128usize, [20usize, 28, 24]);
    let lat = Arc::new(random_latent(&mut rng, (w, 64), 24, &ranks, &rope));
    let mut cases: Vec<KvPolicy> = vec![KvPolicy::EXACT];
    // Blocks of 8 tokens: a decode warp's 16 positions (4 thread groups of 4) span two blocks,
    // so a window's edge, the sink block or quest's selection hides half of a warp's step (the
    // decode kernel skips only steps no lane of the warp reads).
    let mut small_blocks: Vec<KvPolicy> = Vec::new();
    if let Ok(only) = std::env::var("KV_ONLY") {
        cases.clear();
        cases.push(kvserve::kv::policy::KvPolicy::parse(&only).unwrap());
    }
    if std::env::var("KV_ONLY").is_err() {
        for p in ["bf16+window:100", "int8+window:64", "kivi4+quest:128"] {
            small_blocks.push(kvserve::kv::policy::KvPolicy::parse(p).unwrap());
        }
        cases.extend(Codec::PLAIN.map(KvPolicy::format));
        cases
            .extend(MhcValues::ALL.map(|values| KvPolicy::format(Codec::Mhc { rank: 24, values })));
        for (codec, window) in [(Codec::Int8, 64), (Codec::Bf16, 100), (Codec::Kivi4, 48)] {
            cases.push(KvPolicy {
                window: Some(window),
                ..KvPolicy::format(codec)
            });
        }
        // Quest: 128 tokens (the own block and 7 ranked ones) of the long row's 38 blocks.
        let mhc = Codec::Mhc {
            rank: 24,
            values: MhcValues::Kivi4,
        };
        for (codec, window) in [
            (Codec::Bf16, None),
            (Codec::Kivi4, None),
            (Codec::K8v4, None),
            (mhc, None),
            (Codec::Int8, Some(400)),
        ] {
            cases.push(KvPolicy {
                window,
                quest: Some(128),
                ..KvPolicy::format(codec)
            });
        }
    }
    let mut failures = Vec::new();
    let bs: usize = std::env::var("KV_BS").map_or(16, |b| b.parse().expect("KV_BS: a block size"));
    let shape = |num_heads, num_kv_heads, head_dim| AttnShape {
        num_heads,
        num_kv_heads,
        head_dim,
    };
    // Other shapes: the default model's (9 query heads over 3 KV heads: a prefill CTA's 63
    // queries end inside a warp's tile) and head_dim 256, where two prefill warps share a query
    // tile, each accumulating half of the output channels.
    let mut other_shapes = Vec::new();
    if std::env::var("KV_ONLY").is_err() {
        for (p, s) in [
            ("exact", shape(9, 3, 64)),
            ("kivi4+window:48", shape(9, 3, 64)),
            ("exact", shape(6, 2, 256)),
            ("int8", shape(6, 2, 256)),
        ] {
            let policy = match p {
                "exact" => KvPolicy::EXACT,
                p => kvserve::kv::policy::KvPolicy::parse(p).unwrap(),
            };
            other_shapes.push((policy, 16, s));
        }
    }
    let runs = cases
        .into_iter()
        .map(|p| (p, bs, shape(8, 2, 64)))
        .chain(small_blocks.into_iter().map(|p| (p, 8, shape(8, 2, 64))))
        .chain(other_shapes);
    for (policy, bs, shape) in runs {
        let l = policy
            .codec
            .and_then(Codec::latent_rank)
            .map(|_| lat.clone());
        let e = attention_case(policy, bs, shape, l, &rope_for(shape.head_dim));
        let (h, kvh, d) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
        let case = format!("{policy} (blocks of {bs}, {h}/{kvh} heads of {d})");
        eprintln!("{case}: max rel err {e:.2e}");
        if e > 1e-4 || e.is_nan() {
            failures.push(format!("{case}: {e:.2e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "device attention differs from the CPU: {failures:?}"
    );
}

/// The norms (`kernels/norm.cu`, 256 threads per row as the backend launches them) against the
/// CPU backend: the residual add fused with RMSNorm writes back exactly the CPU's sum and a norm
/// within float rounding of the CPU's (the block reduction sums in another order); the plain
/// norm likewise. Widths: the default model's 576 (not a multiple of the CTA) and 2048.
#[test]
fn norm_kernels_match_the_cpu() {
    let cpu = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for (rows, width) in [(3usize, 576usize), (5, 2048)] {
        let n = rows * width;
        let mut gen = |len: usize, scale: f32| -> Vec<f32> {
            (0..len).map(|_| rng.random_range(-scale..scale)).collect()
        };
        let (x, y, w) = (gen(n, 3.0), gen(n, 2.0), gen(width, 1.5));
        let eps = 1e-5f32;
        let mut inb = Bytes::default();
        inb.u32s(&[rows as u32, width as u32]);
        inb.f32s(&[eps]);
        inb.f32s(&x);
        inb.f32s(&y);
        inb.f32s(&w);
        let got = f32s(&call("norm", &inb.0));
        assert_eq!(got.len(), 3 * n);
        let (sum, fused, plain) = (&got[..n], &got[n..2 * n], &got[2 * n..]);
        let (mut want_sum, mut want_fused, mut want_plain) =
            (x.clone(), vec![0f32; n], vec![0f32; n]);
        cpu.add_rms_norm(&mut want_sum, &y, &w, eps, rows, &mut want_fused);
        cpu.rms_norm(&x, &w, eps, rows, &mut want_plain);
        assert!(
            sum.iter()
                .zip(&want_sum)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{rows}x{width}: the fused add's sum differs from the CPU's"
        );
        for (what, g, want) in [
            ("add_rms_norm", fused, &want_fused),
            ("rms_norm", plain, &want_plain),
        ] {
            let e = max_rel_err(g, want);
            eprintln!("{what} {rows}x{width}: max rel err {e:.2e}");
            assert!(e <= 1e-5, "{what} {rows}x{width}: {e:.2e}");
        }
    }
}

/// The greedy token (`kernels/sampling.cu`, 256 threads per row as the backend launches it)
/// against the CPU backend's `argmax_rows`, which the engine's sampler shares: rows with ties
/// across threads and warps, NaN, all `-inf`, `+inf`, and the vocabulary widths of the default
/// model and of a 1B-class model.
#[test]
fn argmax_kernel_matches_the_cpu() {
    let cpu = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for width in [49_152usize, 32_000, 1000, 7] {
        let mut x: Vec<f32> = (0..12 * width)
            .map(|_| rng.random_range(-8.0f32..8.0))
            .collect();
        let row = |r: usize| r * width..(r + 1) * width;
        let at = |r: usize, i: usize| r * width + i.min(width - 1);
        // Row 1: the maximum twice, in different threads and warps: the lower index wins.
        x[at(1, 700)] = 50.0;
        x[at(1, 300)] = 50.0;
        // Row 2: NaN above everything else counts as -inf.
        x[at(2, 5)] = f32::NAN;
        x[at(2, 600)] = 40.0;
        // Row 3: nothing above -inf (-inf and NaN only): 0.
        x[row(3)].iter_mut().enumerate().for_each(|(i, v)| {
            *v = if i % 3 == 0 {
                f32::NAN
            } else {
                f32::NEG_INFINITY
            }
        });
        // Row 4: +inf twice: the first.
        x[at(4, 900)] = f32::INFINITY;
        x[at(4, 901)] = f32::INFINITY;
        // Row 5: the maximum in the last element; row 6: in the first.
        x[at(5, width - 1)] = 60.0;
        x[at(6, 0)] = 60.0;
        // Row 7: -0.0 and 0.0 as the maximum of a row of negatives: the first of them.
        x[row(7)].iter_mut().for_each(|v| *v = -v.abs() - 1.0);
        x[at(7, 257)] = 0.0;
        x[at(7, 33)] = -0.0;
        // Row 8: one value per thread equal to the maximum (a tie in every thread).
        x[row(8)].iter_mut().step_by(97).for_each(|v| *v = 70.0);
        let mut inb = Bytes::default();
        inb.u32s(&[12, width as u32]);
        inb.f32s(&x);
        let got: Vec<u32> = call("argmax", &inb.0)
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let want = cpu.argmax_rows(&x, 0..12, width);
        assert_eq!(got, want, "width {width}");
        if width > 1000 {
            assert_eq!((want[1], want[2], want[3], want[4]), (300, 600, 0, 900));
            assert_eq!((want[5], want[6], want[7]), (width as u32 - 1, 0, 33));
        }
        // The CPU's rule, row by row.
        for (r, &w) in want.iter().enumerate() {
            assert_eq!(
                w as usize,
                kvserve::backend::cpu::argmax::argmax(&x[row(r)])
            );
        }
    }
}

/// A random `[n, k]` bf16 weight matrix scaled like a trained layer's (entries up to `1/√k`),
/// and the CPU backend's copy of it.
fn gemv_weights(
    cpu: &CpuBackend,
    rng: &mut ChaCha8Rng,
    n: usize,
    k: usize,
) -> (Vec<bf16>, <CpuBackend as Backend>::Matrix) {
    use kvserve::model::tensor::{HostData, HostTensor};
    let w: Vec<bf16> = (0..n * k)
        .map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0) / (k as f32).sqrt()))
        .collect();
    let wt = HostTensor {
        name: "w".into(),
        shape: vec![n, k],
        data: HostData::Bf16(std::borrow::Cow::Borrowed(&w)),
    };
    let wc = cpu.upload_matrix(&[&wt]).unwrap();
    (w, wc)
}

/// The start of a `gemv.cpp` input: the variant code, the sizes, `rows × k` random activations
/// (returned too) and the weights.
fn gemv_input(
    rng: &mut ChaCha8Rng,
    variant: u32,
    rows: usize,
    n: usize,
    k: usize,
    w: &[bf16],
) -> (Bytes, Vec<f32>) {
    let x: Vec<f32> = (0..rows * k)
        .map(|_| rng.random_range(-3.0f32..3.0))
        .collect();
    let mut inb = Bytes::default();
    inb.u32s(&[variant, rows as u32, n as u32, k as u32]);
    inb.f32s(&x);
    for v in w {
        inb.0.extend(v.to_bits().to_le_bytes());
    }
    (inb, x)
}

/// The few-row products (`kernels/gemv.cu`, launched with the backend's grid and the variant
/// `gemv_bound` picks) against the CPU backend's matmul with the same bf16 weights and f32 rows:
/// every row count up to `GEMV_MAX_ROWS` (3, 5, 6, 7 run in a larger variant with rows left
/// over), widths with a partial last warp step (576 = 2¼ steps, 8, 1032), output counts that end
/// inside a warp's columns (1, 3, 17, 1001), each with k whole in a warp and split over 2 and 4
/// warps (`set_gemv_slices`; column groups past the output in the last CTA). Nothing past the
/// output is written.
#[test]
fn gemv_kernel_matches_the_cpu_matmul() {
    use kvserve::backend::cuda::kernels::{gemv_bound, GEMV_MAX_ROWS};
    let cpu = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let shapes = [
        (576usize, 1001usize),
        (2048, 96),
        (8, 17),
        (1032, 3),
        (64, 1),
    ];
    for (i, &(k, n)) in shapes.iter().enumerate() {
        let (w, wc) = gemv_weights(&cpu, &mut rng, n, k);
        let row_counts: Vec<usize> = if i == 0 {
            (1..=GEMV_MAX_ROWS).collect()
        } else {
            vec![1, 3, GEMV_MAX_ROWS]
        };
        for (rows, slices) in row_counts
            .into_iter()
            .flat_map(|r| [(r, 1usize), (r, 2), (r, 4)])
        {
            let variant = gemv_bound(rows) as u32 + 256 * slices as u32;
            let (inb, x) = gemv_input(&mut rng, variant, rows, n, k, &w);
            let got = f32s(&call("gemv", &inb.0));
            assert_eq!(got.len(), rows * n + 16);
            assert!(
                got[rows * n..].iter().all(|v| v.is_nan()),
                "{rows}x{k}·{n} over {slices} slices: wrote past the output"
            );
            let mut want = vec![0f32; rows * n];
            cpu.matmul(&x, rows, &wc, &mut want);
            let e = max_rel_err(&got[..rows * n], &want);
            // Each output against an f64 sum of the same products, relative to the row's scale.
            let exact: Vec<f64> = (0..rows * n)
                .map(|o| {
                    let (r, j) = (o / n, o % n);
                    (0..k)
                        .map(|c| f64::from(x[r * k + c]) * f64::from(w[j * k + c].to_f32()))
                        .sum()
                })
                .collect();
            let scale = exact.iter().fold(0f64, |m, v| m.max(v.abs()));
            let err64 = |v: &[f32]| {
                v.iter()
                    .zip(&exact)
                    .fold(0f64, |m, (&g, &t)| m.max((f64::from(g) - t).abs()))
                    / scale
            };
            let (e64, cpu64) = (err64(&got[..rows * n]), err64(&want));
            eprintln!(
                "gemv {rows}x{k}·{n}ᵀ over {slices} slices: vs cpu {e:.2e}, vs f64 {e64:.2e} \
                 (cpu vs f64 {cpu64:.2e})"
            );
            // Against the CPU: its own rounding (its f32 sums run in another order; a split k
            // takes a third) plus the kernel's bound.
            assert!(
                e <= cpu64 + 2e-6 && e64 <= 2e-6,
                "{rows}x{k}·{n}ᵀ over {slices} slices: {e:.2e} / {e64:.2e} (cpu {cpu64:.2e})"
            );
        }
    }
}

/// The fused MLP product (`gemv_silu_r<R>_bf16`: the `[gate; up]` product and SiLU·up in one
/// launch, with the backend's grid and variant) against the CPU backend's matmul then
/// `silu_mul`: the default model's MLP (576 → 2 × 1536) in each row variant, and intermediate
/// widths that end inside a warp's pair of outputs (3, 17), k whole in a warp or split over 2 or
/// 4 warps in turn. Nothing past the output is written.
#[test]
fn gemv_silu_kernel_matches_the_cpu_matmul_and_silu() {
    use kvserve::backend::cuda::kernels::{gemv_bound, GEMV_MAX_ROWS};
    let cpu = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    for (i, &(k, inter)) in [(576usize, 1536usize), (64, 3), (1032, 17)]
        .iter()
        .enumerate()
    {
        let (w, wc) = gemv_weights(&cpu, &mut rng, 2 * inter, k);
        // Each variant once (3 and 5 with rows left over); the plain products' test covers
        // every row count.
        let row_counts = if i == 0 {
            vec![1, 2, 3, GEMV_MAX_ROWS]
        } else {
            vec![1, 5]
        };
        for (j, rows) in row_counts.into_iter().enumerate() {
            // k whole in a warp, or split over 2 or 4 warps, in turn.
            let slices = [1u32, 2, 4][j % 3];
            let variant = 16 + gemv_bound(rows) as u32 + 256 * slices;
            let (inb, x) = gemv_input(&mut rng, variant, rows, inter, k, &w);
            let got = f32s(&call("gemv", &inb.0));
            assert_eq!(got.len(), rows * inter + 16);
            assert!(
                got[rows * inter..].iter().all(|v| v.is_nan()),
                "{rows}x{k}·{inter}: wrote past the output"
            );
            let (mut gate_up, mut want) = (vec![0f32; rows * 2 * inter], vec![0f32; rows * inter]);
            cpu.matmul_silu_mul(&x, rows, &wc, inter, &mut gate_up, &mut want);
            let e = max_rel_err(&got[..rows * inter], &want);
            eprintln!("gemv_silu {rows}x{k}·{inter}: vs cpu {e:.2e}");
            assert!(e <= 5e-6, "{rows}x{k}·{inter}: {e:.2e}");
        }
    }
}

/// The fused attention-block product (`gemv_rope_r<R>_bf16`: the `[q; k; v]` product, RoPE and
/// the K/V write into the exact blocks in one launch, with the backend's grid and variant): its
/// rows against the CPU backend's matmul then `rope_and_store`, and (inside the harness) its rows
/// and every byte of the exact slab against the two launches it replaces, `gemv_r<R>_bf16` then
/// `rope_store_bf16`, bit for bit. The default model's attention (9 query heads over 3 KV heads
/// of 64, hidden 576) and a small shape (head_dim 16, a RoPE scaling of 1.3).
#[test]
fn gemv_rope_kernel_matches_the_cpu_product_and_rope() {
    use kvserve::backend::cuda::kernels::gemv_bound;
    use kvserve::backend::{AttnShape, Backend, RopeParams};
    let cpu = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(29);
    let cases = [
        (
            9usize,
            3usize,
            64usize,
            576usize,
            1.0f32,
            vec![1usize, 3, 8],
        ),
        (4, 2, 16, 64, 1.3, vec![2, 5]),
    ];
    for (heads, kvh, dim, k, scaling, row_counts) in cases {
        let shape = AttnShape {
            num_heads: heads,
            num_kv_heads: kvh,
            head_dim: dim,
        };
        let n = shape.qkv_width();
        let (w, wc) = gemv_weights(&cpu, &mut rng, n, k);
        let rope = RopeParams {
            inv_freq: (0..dim / 2)
                .map(|i| 10_000f32.powf(-((2 * i) as f32) / dim as f32))
                .collect(),
            attention_scaling: scaling,
        };
        let (bs, blocks) = (16usize, 8usize);
        for rows in row_counts {
            let variant = 32 + gemv_bound(rows) as u32;
            let (mut inb, x) = gemv_input(&mut rng, variant, rows, n, k, &w);
            let positions: Vec<u32> = (0..rows).map(|_| rng.random_range(0..4000u32)).collect();
            let mut all: Vec<u32> = (0..(blocks * bs) as u32).collect();
            all.shuffle(&mut rng);
            let slots = all[..rows].to_vec();
            inb.u32s(&[
                heads as u32,
                kvh as u32,
                dim as u32,
                bs as u32,
                blocks as u32,
            ]);
            inb.f32s(&[scaling]);
            inb.u32s(&positions);
            inb.u32s(&slots);
            inb.f32s(&rope.inv_freq);
            let got = f32s(&call("gemv", &inb.0));
            assert_eq!(got.len(), rows * n + 16);
            assert!(
                got[rows * n..].iter().all(|v| v.is_nan()),
                "{rows} rows: wrote past the output"
            );
            let mut want = vec![0f32; rows * n];
            let mut store = cpu.new_kv_store(1, blocks, bs, shape);
            cpu.matmul_rope_and_store(
                &x, rows, &wc, &mut want, &positions, &slots, shape, &rope, &mut store, 0,
            );
            let e = max_rel_err(&got[..rows * n], &want);
            eprintln!("gemv_rope {rows}x{k}·{n} ({heads}/{kvh} heads of {dim}): vs cpu {e:.2e}");
            assert!(e <= 5e-6, "{rows} rows, {heads}/{kvh}x{dim}: {e:.2e}");
        }
    }
}

/// The dense temperature draw (`kernels/sampling.cu: draw_dense_f32`, 256 threads per row as the
/// backend launches it) against the CPU backend's `draw_rows` (`backend::cpu::draw`, which the
/// engine's sampler shares): the same token for every row and uniform. Widths of a whole number
/// of blocks, a last block without and with a tail of fewer than 8 (1000, 1003) and a row of
/// only a tail (7); temperatures 0.05 … 1.7; uniforms 0, just below 1 and random; peaked and
/// flat rows, NaN and -inf entries, a row of nothing above -inf, rows with +inf.
#[test]
fn draw_kernel_matches_the_cpu() {
    let cpu = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    for width in [49_152usize, 32_000, 1003, 1000, 7] {
        let rows = 40usize;
        let mut x = Vec::with_capacity(rows * width);
        let mut draws = Vec::new();
        for r in 0..rows {
            let spread = [0.5f32, 4.0, 12.0, 30.0][r % 4];
            let mut row: Vec<f32> = (0..width)
                .map(|_| rng.random_range(-spread..spread))
                .collect();
            match r {
                // NaN and -inf entries among the rest.
                5 | 6 => row.iter_mut().step_by(3).for_each(|v| *v = f32::NAN),
                7 => row
                    .iter_mut()
                    .step_by(2)
                    .for_each(|v| *v = f32::NEG_INFINITY),
                // Nothing above -inf: the argmax rule's 0.
                8 => row.iter_mut().enumerate().for_each(|(i, v)| {
                    *v = if i % 2 == 0 {
                        f32::NAN
                    } else {
                        f32::NEG_INFINITY
                    }
                }),
                // +inf (twice): the first.
                9 => {
                    row[width / 2] = f32::INFINITY;
                    row[width - 1] = f32::INFINITY;
                }
                // One token far above the rest.
                10 => row[width / 3] = 80.0,
                _ => {}
            }
            let inv_t = 1.0 / [1.0f32, 0.7, 1.3, 0.05, 1.7][r % 5];
            let u01 = match r {
                0 => 0.0,
                1 => 1.0 - f64::EPSILON / 2.0,
                // Exactly on the start of the middle block: the walk must skip the blocks
                // before it whole (`u >= sum`), not stop at the last token of the one before.
                2 | 3 => {
                    let mut blocks = Vec::new();
                    let m = kvserve::backend::cpu::argmax::max_lanes(&row);
                    let total =
                        kvserve::backend::cpu::draw::block_weights(&row, m, inv_t, &mut blocks);
                    let cum: f64 = blocks[..blocks.len() / 2].iter().sum();
                    let mut u = cum / total;
                    while u * total < cum {
                        u = u.next_up();
                    }
                    u
                }
                _ => rng.random::<f64>(),
            };
            x.extend(row);
            draws.push((inv_t, u01));
        }
        let mut inb = Bytes::default();
        inb.u32s(&[rows as u32, width as u32]);
        inb.f32s(&x);
        inb.f32s(&draws.iter().map(|d| d.0).collect::<Vec<_>>());
        for d in &draws {
            inb.0.extend(d.1.to_le_bytes());
        }
        let res = call("draw", &inb.0);
        let (tokens, sums) = res.split_at(4 * rows);
        let got: Vec<u32> = tokens
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let want = cpu.draw_rows(&x, 0..rows, width, &draws);
        assert_eq!(got, want, "width {width}");
        // The block sums it drew on, bit for bit the CPU's (a token rarely shows a rounding
        // difference; these show every one).
        let nblocks = width.div_ceil(256);
        let sums: Vec<f64> = sums
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(sums.len(), rows * nblocks);
        let mut compared = 0;
        for (r, &(inv_t, _)) in draws.iter().enumerate() {
            let row = &x[r * width..(r + 1) * width];
            let m = kvserve::backend::cpu::argmax::max_lanes(row);
            if !m.is_finite() {
                continue;
            }
            let mut blocks = Vec::new();
            kvserve::backend::cpu::draw::block_weights(row, m, inv_t, &mut blocks);
            let dev = &sums[r * nblocks..(r + 1) * nblocks];
            assert!(
                dev.iter()
                    .zip(&blocks)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "width {width} row {r}: block sums differ: {:?} vs {:?}",
                &dev[..dev.len().min(4)],
                &blocks[..blocks.len().min(4)]
            );
            compared += 1;
        }
        assert!(
            compared >= rows - 2,
            "width {width}: {compared} rows compared"
        );
        assert_eq!(want[8], 0, "width {width}: nothing above -inf");
        assert_eq!(want[9] as usize, width / 2, "width {width}: the first +inf");
        // The draws spread over the row (not one fixed token).
        let distinct: std::collections::HashSet<u32> = want.iter().copied().collect();
        assert!(
            distinct.len() > rows / 2 || width < 100,
            "width {width}: {distinct:?}"
        );
    }
}
