//! The attention kernels run on the host (g++ builds of kernels/attention.cu and prefill.cu under
//! tests/cuda_host/shim.h, as in `cuda_formats_host.rs`): decode (split-K + reduction) and
//! prefill attention over a device-layout image of the KV (exact and sealed slabs, slot-pair
//! tables) equal the CPU's attention within 1e-4 for every policy: sealed history, a block
//! sealed within the step (read exact by its own queries), prompt chunks after sealed prefixes,
//! windows with dropped blocks, quest's block selection (ties included).
//!
//! `KV_ONLY=<policy>` (e.g. `kivi4+quest:128`) runs one policy (`KV_BS=8`: in blocks of 8),
//! `KV_DEBUG=1` prints the rows that differ.

#[path = "cuda_host/host_build.rs"]
mod host_build;
#[path = "cuda_host/host_run.rs"]
mod host_run;
#[path = "cuda_host/kv_image.rs"]
mod kv_image;

use host_run::{call, f32s, Bytes, NO};
use kv_image::{random_latent, values, write_bounds, write_sealed};

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
use kvserve::backend::latent::LatentKeys;
use kvserve::backend::{AttnSeq, AttnShape, Backend, RopeParams, Seal};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

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
        // log2 of a power-of-two block size, else -1 (as the backend passes it).
        if bs.is_power_of_two() {
            bs.trailing_zeros()
        } else {
            u32::MAX
        },
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
    // Blocks of 6 tokens, not a multiple of the sealed decode's 4 positions per step: every
    // position finds its own block (and kivi4's per-channel keys their block's parameters).
    let odd_blocks: Vec<KvPolicy> = if std::env::var("KV_ONLY").is_err() {
        vec![
            KvPolicy::format(Codec::Kivi4),
            KvPolicy::format(Codec::K8v4),
        ]
    } else {
        Vec::new()
    };
    let runs = cases
        .into_iter()
        .map(|p| (p, bs, shape(8, 2, 64)))
        .chain(small_blocks.into_iter().map(|p| (p, 8, shape(8, 2, 64))))
        .chain(odd_blocks.into_iter().map(|p| (p, 6, shape(8, 2, 64))))
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
