//! Tests of `attention.rs`: against a naive f64 reference, chunked vs one-shot prefill
//! (bit-identical), the GQA head mapping, and the phase split.

use super::*;
use crate::backend::cpu::simd;
use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, RopeParams};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random(n: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.5f32..1.5)).collect()
}

/// Naive f64 attention for row `i` of `qkv` at `start + i`, reading K/V from the cache.
fn reference(
    qkv: &[f32],
    rows: usize,
    start: usize,
    shape: AttnShape,
    cache: &CpuCache,
    layer: usize,
) -> Vec<f64> {
    let AttnShape {
        num_heads,
        num_kv_heads,
        head_dim: d,
    } = shape;
    let (width, kvw, group) = (
        shape.qkv_width(),
        shape.kv_width(),
        num_heads / num_kv_heads,
    );
    let kv = &cache.layers[layer];
    let mut out = vec![0f64; rows * shape.q_width()];
    for i in 0..rows {
        for h in 0..num_heads {
            let g = h / group;
            let q = &qkv[i * width + h * d..][..d];
            let len = start + i + 1;
            let s: Vec<f64> = (0..len)
                .map(|j| {
                    (0..d)
                        .map(|t| q[t] as f64 * kv.k[j * kvw + g * d + t] as f64)
                        .sum::<f64>()
                        / (d as f64).sqrt()
                })
                .collect();
            let m = s.iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
            for t in 0..d {
                out[i * shape.q_width() + h * d + t] = (0..len)
                    .map(|j| (s[j] - m).exp() / z * kv.v[j * kvw + g * d + t] as f64)
                    .sum();
            }
        }
    }
    out
}

fn assert_close(got: &[f32], want: &[f64]) {
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= 2e-5 * (1.0 + w.abs()),
            "[{i}] {g} vs {w}"
        );
    }
}

fn shapes() -> [AttnShape; 4] {
    [
        AttnShape {
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
        },
        AttnShape {
            num_heads: 4,
            num_kv_heads: 4,
            head_dim: 16,
        },
        AttnShape {
            num_heads: 6,
            num_kv_heads: 2,
            head_dim: 12,
        }, // head_dim not a multiple of 8
        AttnShape {
            num_heads: 8,
            num_kv_heads: 1,
            head_dim: 40,
        },
    ]
}

#[test]
fn prefill_matches_f64_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for shape in shapes() {
        for simd in [false, simd::avx2_fma()] {
            for (rows, start) in [(1, 0), (7, 0), (37, 0), (5, 90), (1, 150)] {
                let mut cache = CpuCache::new(2, 200, shape);
                // Fill earlier positions directly, then this chunk's rows through `store`.
                let (kvw, width) = (shape.kv_width(), shape.qkv_width());
                let pre = random(start * kvw * 2, &mut rng);
                cache.layers[1].k[..start * kvw].copy_from_slice(&pre[..start * kvw]);
                cache.layers[1].v[..start * kvw].copy_from_slice(&pre[start * kvw..]);
                let qkv = random(rows * width, &mut rng);
                let pos: Vec<u32> = (start..start + rows).map(|p| p as u32).collect();
                cache.store(1, &qkv, rows, &pos, shape);
                let mut out = vec![f32::NAN; rows * shape.q_width()];
                attention(&qkv, rows, start, shape, &cache, 1, &mut out, simd);
                assert_close(&out, &reference(&qkv, rows, start, shape, &cache, 1));
            }
        }
    }
}

#[test]
fn three_chunks_equal_one_shot() {
    // Prefill 5 rows, then decode 1 and 1, through the backend (RoPE + store + attention):
    // every output row must be bit-identical to a one-shot prefill of all 7 rows.
    let b = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for shape in shapes() {
        let width = shape.qkv_width();
        let half = shape.head_dim / 2;
        let rope = RopeParams {
            inv_freq: (0..half)
                .map(|i| 1.0 / 10000f32.powf(i as f32 / half as f32))
                .collect(),
            attention_scaling: 1.0,
        };
        let qkv = random(7 * width, &mut rng);
        let qw = shape.q_width();
        let pos: Vec<u32> = (0..7).collect();
        let mut one = b.new_cache(1, 16, shape);
        let mut x = qkv.clone();
        b.rope_and_store(&mut x, 7, &pos, shape, &rope, &mut one, 0);
        let mut want = vec![0f32; 7 * qw];
        b.attention(&x, 7, 0, shape, &one, 0, &mut want);

        let mut cache = b.new_cache(1, 16, shape);
        let mut got = Vec::new();
        for (start, rows) in [(0, 5), (5, 1), (6, 1)] {
            let mut x = qkv[start * width..(start + rows) * width].to_vec();
            b.rope_and_store(
                &mut x,
                rows,
                &pos[start..start + rows],
                shape,
                &rope,
                &mut cache,
                0,
            );
            let mut out = vec![0f32; rows * qw];
            b.attention(&x, rows, start, shape, &cache, 0, &mut out);
            got.extend(out);
        }
        assert_eq!(got, want, "{shape:?}");
        assert_eq!(cache.layers[0].k, one.layers[0].k);
        assert_eq!(cache.layers[0].v, one.layers[0].v);
    }
}

#[test]
fn gqa_maps_query_head_to_kv_head() {
    // V of KV head g is the constant g + 1 everywhere; query head h must read KV head
    // h / (num_heads / num_kv_heads).
    for (heads, kv_heads) in [(9, 3), (8, 2), (4, 4), (6, 1)] {
        let shape = AttnShape {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: 8,
        };
        let mut cache = CpuCache::new(1, 8, shape);
        let kvw = shape.kv_width();
        for p in 0..8 {
            for g in 0..kv_heads {
                for t in 0..8 {
                    cache.layers[0].k[p * kvw + g * 8 + t] = ((p * 3 + g + t) % 5) as f32 * 0.1;
                    cache.layers[0].v[p * kvw + g * 8 + t] = (g + 1) as f32;
                }
            }
        }
        for simd in [false, simd::avx2_fma()] {
            let qkv: Vec<f32> = (0..shape.qkv_width())
                .map(|i| (i % 7) as f32 * 0.2)
                .collect();
            let mut out = vec![0f32; shape.q_width()];
            attention(&qkv, 1, 7, shape, &cache, 0, &mut out, simd);
            for h in 0..heads {
                let g = h / (heads / kv_heads);
                for t in 0..8 {
                    assert!(
                        (out[h * 8 + t] - (g + 1) as f32).abs() < 1e-5,
                        "head {h} → kv {g}"
                    );
                }
            }
        }
    }
}

#[test]
fn long_context_decode_split_matches_block_path() {
    // The three-phase split (`split_phases`, used when KV heads are fewer than threads) must
    // agree bit for bit with the per-KV-head block path (`attend`) used otherwise.
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let shape = AttnShape {
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
    };
    let len = 4200;
    let mut cache = CpuCache::new(1, len, shape);
    cache.layers[0].k = random(len * shape.kv_width(), &mut rng);
    cache.layers[0].v = random(len * shape.kv_width(), &mut rng);
    let qkv = random(shape.qkv_width(), &mut rng);
    assert!(shape.num_heads * len * shape.head_dim >= SPLIT_MIN_WORK);
    for simd in [false, simd::avx2_fma()] {
        let kv = &cache.layers[0];
        let mut split = vec![0f32; shape.q_width()];
        let qs: Vec<Query> = (0..4)
            .map(|h| Query {
                q: qkv[h * 64..].as_ptr(),
                out: split[h * 64..].as_mut_ptr(),
                len,
            })
            .collect();
        split_phases(&qs, |qi| qi / 2, kv, 128, 64, 0.125, simd);
        let mut block = vec![0f32; shape.q_width()];
        let mut scores = Vec::new();
        for g in 0..2 {
            let qs: Vec<Query> = (2 * g..2 * g + 2)
                .map(|h| Query {
                    q: qkv[h * 64..].as_ptr(),
                    out: block[h * 64..].as_mut_ptr(),
                    len,
                })
                .collect();
            // SAFETY: pointers into live vectors of the right sizes.
            unsafe {
                attend(
                    &qs,
                    kv.k.as_ptr().add(g * 64),
                    kv.v.as_ptr().add(g * 64),
                    128,
                    64,
                    0.125,
                    &mut scores,
                    simd,
                )
            };
        }
        assert_eq!(split, block);
        let mut public = vec![0f32; shape.q_width()];
        attention(&qkv, 1, len - 1, shape, &cache, 0, &mut public, simd);
        assert_eq!(public, block);
        if simd {
            assert_close(&split, &reference(&qkv, 1, len - 1, shape, &cache, 0));
        }
    }
}
