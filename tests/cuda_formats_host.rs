//! The KV formats' device code run on the host: g++ compiles kernels/kv_seal.cu and quest.cu as
//! plain C++ (tests/cuda_host/shim.h stands in for the CUDA built-ins; a grid runs CTA by CTA
//! with one OS thread per CUDA thread, real barriers and warp shuffles), and the results are
//! checked against the CPU backend:
//! - every sealed format encodes to the very same bytes and decodes to the very same f32 bits as
//!   the CPU codec; mhc's latent encoder and key rebuild equal the CPU's bit for bit;
//! - quest's key bounds (`seal_bounds_<fmt>`) equal the CPU's for every format.
//!
//! The attention kernels: `cuda_attention_host.rs`; norms, token picks and few-row products:
//! `cuda_ops_host.rs`. Not covered without a GPU: the PTX f16 conversions (the shim uses
//! `_Float16`), the GPU's memory model and real concurrency, speed (`scripts/gpu-check.sh` does
//! those on a GPU).

#[path = "cuda_host/host_build.rs"]
mod host_build;
#[path = "cuda_host/host_run.rs"]
mod host_run;
#[path = "cuda_host/kv_image.rs"]
mod kv_image;

use host_run::{call, f32s, Bytes};
use kv_image::{random_latent, values, write_bounds, write_sealed};

use half::bf16;
use kvserve::backend::codec::{Codec, MhcValues};
use kvserve::backend::cpu::kv_store::CpuKvStore;
use kvserve::backend::cpu::ops::RopeTable;
use kvserve::backend::cuda::store::{format_index, SealedLayout};
use kvserve::backend::{AttnShape, RopeParams, Seal};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

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
