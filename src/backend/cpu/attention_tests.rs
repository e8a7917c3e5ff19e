//! Tests of `attention.rs`: against a naive f64 reference through shuffled block tables,
//! batch invariance (a sequence alone vs inside a mixed batch, bit for bit), block size
//! invariance (paged vs one contiguous block, bit for bit), chunked vs one-shot prefill, the GQA
//! head mapping, the phase split, and invalid tables.

use super::*;
use crate::backend::cpu::simd;
use crate::backend::cpu::CpuBackend;
use crate::backend::kv_policy::KvPolicy;
use crate::backend::{Backend, KvGeometry, RopeParams};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random(n: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.5f32..1.5)).collect()
}

/// A shuffled table of `n` distinct blocks out of `0..pool`.
fn shuffled_table(n: usize, pool: usize, rng: &mut ChaCha8Rng) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..pool as u32).collect();
    ids.shuffle(rng);
    ids.truncate(n);
    ids
}

/// Writes random K/V for positions `0..len` of `table` in `layer` (all heads).
fn fill(store: &mut CpuKvStore, layer: usize, table: &[u32], len: usize, rng: &mut ChaCha8Rng) {
    let (bs, shape) = (store.block_size(), store.shape());
    let slots: Vec<u32> = (0..len)
        .map(|p| table[p / bs] * bs as u32 + (p % bs) as u32)
        .collect();
    store.store(layer, &random(len * shape.qkv_width(), rng), len, &slots);
}

/// Naive f64 attention for row `i` of `qkv` at `start + i`, reading K/V through `table`.
fn reference(
    qkv: &[f32],
    rows: usize,
    start: usize,
    table: &[u32],
    store: &CpuKvStore,
    layer: usize,
) -> Vec<f64> {
    let shape = store.shape();
    let AttnShape {
        num_heads,
        num_kv_heads,
        head_dim: d,
    } = shape;
    let (width, group, bs) = (
        shape.qkv_width(),
        num_heads / num_kv_heads,
        store.block_size(),
    );
    let kv = store.layer(layer);
    let at = |j: usize, g: usize| store.index(table[j / bs] as usize, g, j % bs);
    let mut out = vec![0f64; rows * shape.q_width()];
    for i in 0..rows {
        for h in 0..num_heads {
            let g = h / group;
            let q = &qkv[i * width + h * d..][..d];
            let len = start + i + 1;
            let s: Vec<f64> = (0..len)
                .map(|j| {
                    (0..d)
                        .map(|t| q[t] as f64 * kv.k[at(j, g) + t] as f64)
                        .sum::<f64>()
                        / (d as f64).sqrt()
                })
                .collect();
            let m = s.iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
            for t in 0..d {
                out[i * shape.q_width() + h * d + t] = (0..len)
                    .map(|j| (s[j] - m).exp() / z * kv.v[at(j, g) + t] as f64)
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

fn seq(rows: usize, start_pos: usize, table: &[u32]) -> AttnSeq<'_> {
    AttnSeq {
        rows,
        start_pos,
        block_table: table,
        policy: KvPolicy::EXACT,
    }
}

#[test]
fn paged_prefill_and_decode_match_f64_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for shape in shapes() {
        for simd in [false, simd::avx2_fma()] {
            for bs in [16usize, 7] {
                for (rows, start) in [(1usize, 0usize), (7, 0), (37, 0), (5, 90), (1, 150)] {
                    let len = start + rows;
                    let pool = 200usize.div_ceil(bs) + 3;
                    let table = shuffled_table(len.div_ceil(bs), pool, &mut rng);
                    let mut store = CpuKvStore::new(2, pool, bs, shape);
                    fill(&mut store, 1, &table, len, &mut rng);
                    let qkv = random(rows * shape.qkv_width(), &mut rng);
                    let mut out = vec![f32::NAN; rows * shape.q_width()];
                    let s = [seq(rows, start, &table)];
                    attention(&qkv, &s, shape, &store, 1, &mut out, simd);
                    assert_close(&out, &reference(&qkv, rows, start, &table, &store, 1));
                }
            }
        }
    }
}

#[test]
fn batch_and_block_size_do_not_change_a_single_bit() {
    // Four sequences (a long prefill chunk, decode rows, a mid-sequence chunk) in one call vs
    // each alone; and each alone with block size 16 and a shuffled table vs one contiguous
    // block holding the whole sequence.
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for shape in shapes() {
        for simd in [false, simd::avx2_fma()] {
            let cases = [(40usize, 0usize), (1, 130), (1, 17), (9, 55)];
            let (bs, pool) = (16usize, 40usize);
            let mut ids: Vec<u32> = (0..pool as u32).collect();
            ids.shuffle(&mut rng);
            let mut paged = CpuKvStore::new(1, pool, bs, shape);
            let mut tables = Vec::new();
            let mut contig = Vec::new();
            let mut qkvs = Vec::new();
            for &(rows, start) in &cases {
                let len = start + rows;
                let table: Vec<u32> = ids.drain(..len.div_ceil(bs)).collect();
                // The same K/V rows written into both layouts.
                let kv = random(len * shape.qkv_width(), &mut rng);
                let slots: Vec<u32> = (0..len)
                    .map(|p| table[p / bs] * bs as u32 + (p % bs) as u32)
                    .collect();
                paged.store(0, &kv, len, &slots);
                let mut one = CpuKvStore::new(1, 1, len, shape);
                one.store(0, &kv, len, &(0..len as u32).collect::<Vec<_>>());
                tables.push(table);
                contig.push(one);
                qkvs.push(random(rows * shape.qkv_width(), &mut rng));
            }
            let qw = shape.q_width();
            let batch: Vec<AttnSeq<'_>> = cases
                .iter()
                .zip(&tables)
                .map(|(&(rows, start), t)| seq(rows, start, t))
                .collect();
            let all_q: Vec<f32> = qkvs.concat();
            let mut together = vec![f32::NAN; all_q.len() / shape.qkv_width() * qw];
            attention(&all_q, &batch, shape, &paged, 0, &mut together, simd);
            let mut at = 0;
            for (i, s) in batch.iter().enumerate() {
                let mut alone = vec![f32::NAN; s.rows * qw];
                attention(&qkvs[i], &[*s], shape, &paged, 0, &mut alone, simd);
                assert_eq!(
                    &together[at..at + s.rows * qw],
                    &alone[..],
                    "{shape:?} seq {i}"
                );
                let mut flat = vec![f32::NAN; s.rows * qw];
                let one = [seq(s.rows, s.start_pos, &[0])];
                attention(&qkvs[i], &one, shape, &contig[i], 0, &mut flat, simd);
                assert_eq!(flat, alone, "{shape:?} seq {i}: contiguous vs paged");
                at += s.rows * qw;
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
        // Block size 3, table [4, 0, 2]: slots of positions 0..7.
        let table = [4u32, 0, 2];
        let slots: Vec<u32> = pos
            .iter()
            .map(|&p| table[p as usize / 3] * 3 + p % 3)
            .collect();
        let mut one = b.new_kv_store(1, 5, 3, shape);
        let mut x = qkv.clone();
        b.rope_and_store(&mut x, 7, &pos, &slots, shape, &rope, &mut one, 0);
        let mut want = vec![0f32; 7 * qw];
        b.attention(&x, &[seq(7, 0, &table)], shape, &one, 0, &mut want);

        let mut store = b.new_kv_store(1, 5, 3, shape);
        let mut got = Vec::new();
        for (start, rows) in [(0, 5), (5, 1), (6, 1)] {
            let r = start..start + rows;
            let mut x = qkv[start * width..(start + rows) * width].to_vec();
            b.rope_and_store(
                &mut x,
                rows,
                &pos[r.clone()],
                &slots[r],
                shape,
                &rope,
                &mut store,
                0,
            );
            let mut out = vec![0f32; rows * qw];
            b.attention(&x, &[seq(rows, start, &table)], shape, &store, 0, &mut out);
            got.extend(out);
        }
        assert_eq!(got, want, "{shape:?}");
        assert_eq!(&store.layer(0).k[..], &one.layer(0).k[..]);
        assert_eq!(&store.layer(0).v[..], &one.layer(0).v[..]);
    }
}

#[test]
fn bf16_kv_stores_what_the_device_stores() {
    // `with_bf16_kv` stores each rotated key and value rounded to bf16 and leaves the queries
    // as they are; the plain backend stores f32.
    let (plain, rounding) = (CpuBackend::new(), CpuBackend::with_bf16_kv());
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let shape = AttnShape {
        num_heads: 6,
        num_kv_heads: 2,
        head_dim: 8,
    };
    let rope = RopeParams {
        inv_freq: (0..4).map(|i| 1.0 / 100f32.powi(i)).collect(),
        attention_scaling: 1.0,
    };
    let qkv = random(5 * shape.qkv_width(), &mut rng);
    let (pos, slots): (Vec<u32>, Vec<u32>) = ((3..8).collect(), vec![1, 2, 3, 4, 5]);
    let (mut a, mut b) = (qkv.clone(), qkv.clone());
    let mut sa = plain.new_kv_store(1, 2, 4, shape);
    let mut sb = rounding.new_kv_store(1, 2, 4, shape);
    plain.rope_and_store(&mut a, 5, &pos, &slots, shape, &rope, &mut sa, 0);
    rounding.rope_and_store(&mut b, 5, &pos, &slots, shape, &rope, &mut sb, 0);
    let round = |v: &[f32]| -> Vec<f32> {
        v.iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect()
    };
    let (la, lb) = (sa.layer(0), sb.layer(0));
    assert_eq!(round(&la.k), lb.k.to_vec());
    assert_eq!(round(&la.v), lb.v.to_vec());
    assert_ne!(
        la.k.to_vec(),
        lb.k.to_vec(),
        "f32 keys are not all bf16 already"
    );
    for (ra, rb) in a.chunks(shape.qkv_width()).zip(b.chunks(shape.qkv_width())) {
        assert_eq!(
            ra[..shape.q_width()],
            rb[..shape.q_width()],
            "queries untouched"
        );
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
        let mut store = CpuKvStore::new(1, 4, 2, shape);
        for b in 0..4 {
            for g in 0..kv_heads {
                for off in 0..2 {
                    let at = store.index(b, g, off);
                    let l = store.layer_mut(0);
                    for t in 0..8 {
                        l.k[at + t] = ((b * 2 + off) * 3 + g + t) as f32 % 5.0 * 0.1;
                        l.v[at + t] = (g + 1) as f32;
                    }
                }
            }
        }
        for simd in [false, simd::avx2_fma()] {
            let qkv: Vec<f32> = (0..shape.qkv_width())
                .map(|i| (i % 7) as f32 * 0.2)
                .collect();
            let mut out = vec![0f32; shape.q_width()];
            let table = [3, 1, 0, 2];
            attention(&qkv, &[seq(1, 7, &table)], shape, &store, 0, &mut out, simd);
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
    // The three-phase split (`split_phases`, used when tasks are fewer than threads) must agree
    // bit for bit with the per-KV-head block path (`attend`) used otherwise.
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let shape = AttnShape {
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
    };
    let (len, bs) = (4200usize, 16usize);
    let pool = len.div_ceil(bs) + 5;
    let table = shuffled_table(len.div_ceil(bs), pool, &mut rng);
    let mut store = CpuKvStore::new(1, pool, bs, shape);
    fill(&mut store, 0, &table, len, &mut rng);
    let qkv = random(shape.qkv_width(), &mut rng);
    assert!(shape.num_heads * len * shape.head_dim >= SPLIT_MIN_WORK);
    let kv = store.view(0);
    for simd in [false, simd::avx2_fma()] {
        let queries = |out: &mut Vec<f32>| -> Vec<Query<'_>> {
            (0..4)
                .map(|h| Query {
                    q: qkv[h * 64..].as_ptr(),
                    out: out[h * 64..].as_mut_ptr(),
                    len,
                    g: h / 2,
                    table: &table,
                    policy: KvPolicy::EXACT,
                })
                .collect()
        };
        let mut split = vec![0f32; shape.q_width()];
        split_phases(&queries(&mut split), kv, 0.125, simd);
        let mut block = vec![0f32; shape.q_width()];
        let qs = queries(&mut block);
        let mut scores = Vec::new();
        for g in 0..2 {
            // SAFETY: pointers into live vectors of the right sizes; the table covers `len`.
            unsafe { attend(&qs[2 * g..2 * g + 2], kv, 0.125, &mut scores, simd) };
        }
        assert_eq!(split, block);
        let mut public = vec![0f32; shape.q_width()];
        let s = [seq(1, len - 1, &table)];
        attention(&qkv, &s, shape, &store, 0, &mut public, simd);
        assert_eq!(public, block);
        if simd {
            assert_close(&split, &reference(&qkv, 1, len - 1, &table, &store, 0));
        }
    }
}

#[test]
fn invalid_tables_give_zero_rows_in_release_and_leave_others_intact() {
    if cfg!(debug_assertions) {
        return; // the debug assertion is the intended behaviour there
    }
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let shape = shapes()[0];
    let mut store = CpuKvStore::new(1, 4, 4, shape);
    fill(&mut store, 0, &[0, 1, 2, 3], 16, &mut rng);
    let qkv = random(3 * shape.qkv_width(), &mut rng);
    let qw = shape.q_width();
    let good = [seq(1, 5, &[2, 3])];
    let mut want = vec![0f32; qw];
    attention(
        &qkv[..shape.qkv_width()],
        &good,
        shape,
        &store,
        0,
        &mut want,
        true,
    );
    // Too short a table, then a block id past the pool: both zero; the valid one unchanged.
    let batch = [good[0], seq(1, 9, &[0, 1]), seq(1, 0, &[7])];
    let mut out = vec![f32::NAN; 3 * qw];
    attention(&qkv, &batch, shape, &store, 0, &mut out, true);
    assert_eq!(&out[..qw], &want[..]);
    assert!(out[qw..].iter().all(|&v| v == 0.0));
}

#[test]
fn quest_picks_blocks_for_decode_rows_only() {
    // A 17-row prompt chunk after a long sealed prefix, past the dense layers: its row blocks are
    // 16 rows and 1 row, and the 1-row block must not be read like a decode row (a prompt chunk
    // reads everything, however it is cut). A decode row does get quest's selection.
    use crate::backend::codec::Codec;
    use crate::backend::kv_policy::QUEST_DENSE_LAYERS;
    use crate::backend::Seal;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let shape = AttnShape {
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 32,
    };
    let (bs, layer, start, rows) = (16usize, QUEST_DENSE_LAYERS, 320usize, 17usize);
    let layers = layer + 1;
    let len = start + rows;
    let table = shuffled_table(len.div_ceil(bs), 40, &mut rng);
    let mut store = CpuKvStore::new(layers, 40, bs, shape);
    fill(&mut store, layer, &table, len, &mut rng);
    let seals: Vec<Seal> = (0..start / bs)
        .map(|bi| Seal {
            block: table[bi],
            pos: (bi * bs) as u32,
            codec: Codec::Kivi4,
            bounds: true,
        })
        .collect();
    for l in 0..layers {
        store.seal(l, &seals);
    }
    let qkv = random(rows * shape.qkv_width(), &mut rng);
    let run = |policy: &str, rows: usize, start: usize| {
        let s = [AttnSeq {
            policy: KvPolicy::parse(policy).unwrap(),
            ..seq(rows, start, &table)
        }];
        let mut out = vec![f32::NAN; rows * shape.q_width()];
        attention(&qkv, &s, shape, &store, layer, &mut out, false);
        out
    };
    assert!(run("kivi4+quest:32", rows, start) == run("kivi4", rows, start));
    // The last row of the chunk alone is a decode row: it reads 3 of its 22 blocks (its own,
    // the full unsealed one, the best ranked).
    let last = start + rows - 1;
    assert!(run("kivi4+quest:32", 1, last) != run("kivi4", 1, last));
}
