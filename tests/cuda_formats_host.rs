//! The device KV format code (kernels/kv_formats.cuh, kernels/kv_seal.cu) compiled for the host
//! with g++ (tests/cuda_host/shim.h stands in for the CUDA built-ins, one thread per CTA) and run
//! against the CPU backend's codec and latent projection: every sealed format must encode to the
//! very same bytes and decode to the very same f32 bits, and mhc's latent encoder and key
//! reconstruction (un-RoPE, project, rebuild, RoPE) must match the CPU's. This executes the
//! format logic (bit packing, f16 rounding directions, parameter layout, operation order) without
//! a GPU; the PTX f16 conversions and everything warp-level are not covered here (they run in
//! `scripts/gpu-check.sh` on a GPU).

use half::bf16;
use kvserve::backend::codec::Codec;
use kvserve::backend::cpu::ops::RopeTable;
use kvserve::backend::cuda::compile::expand;
use kvserve::backend::latent::{LatentKeys, LatentLayer};
use kvserve::backend::RopeParams;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds the harness once per test process.
fn harness() -> &'static Path {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = std::env::temp_dir().join(format!("kvserve-host-kernels-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let seal = std::fs::read_to_string(root.join("kernels/kv_seal.cu")).unwrap();
        std::fs::write(dir.join("kv_seal_expanded.cu"), expand(&seal)).unwrap();
        let bin = dir.join("harness");
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
        let out = Command::new(&cxx)
            .args([
                "-std=c++17",
                "-O1",
                "-ffp-contract=off",
                "-fno-strict-aliasing",
                "-I",
            ])
            .arg(&dir)
            .arg("-o")
            .arg(&bin)
            .arg(root.join("tests/cuda_host/harness.cpp"))
            .output()
            .unwrap_or_else(|e| panic!("{cxx} (a C++17 compiler with _Float16) is needed: {e}"));
        assert!(
            out.status.success(),
            "harness build failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        bin
    })
}

fn call(cmd: &str, input: &[u8]) -> Vec<u8> {
    let dir = harness().parent().unwrap();
    let tag = format!("{cmd}-{:?}", std::thread::current().id()).replace(['(', ')'], "");
    let (i, o) = (
        dir.join(format!("{tag}.in")),
        dir.join(format!("{tag}.out")),
    );
    std::fs::write(&i, input).unwrap();
    let st = Command::new(harness())
        .arg(cmd)
        .arg(&i)
        .arg(&o)
        .status()
        .unwrap();
    assert!(st.success(), "harness {cmd}: {st}");
    std::fs::read(&o).unwrap()
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
    let small = |rng: &mut ChaCha8Rng, n: usize, s: f32| -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-s..s)).collect()
    };
    let lk = LatentKeys {
        id: [1; 32],
        rank: rank as u16,
        kv_width: w,
        head_dim: d,
        layers: vec![LatentLayer {
            rank,
            mean: small(&mut rng, w, 0.5),
            down: small(&mut rng, rank * w, 0.2),
            up_t: small(&mut rng, rank * w, 0.3),
        }],
        rope: rope.clone(),
        max_positions: 4096,
    };
    lk.validate().unwrap();
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
