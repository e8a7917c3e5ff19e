//! Tests of `matmul.rs`: both kernels (AVX2, scalar twin) against a naive f64 reference on odd
//! shapes and all three weight dtypes, bit-identical to each other; batch invariance (a row's
//! bits do not depend on the other rows); packing and part stacking rules.

use super::*;
use crate::model::tensor::{HostData, HostTensor};
use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::borrow::Cow;

fn reference(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f64> {
    let mut out = vec![0f64; m * n];
    for r in 0..m {
        for j in 0..n {
            out[r * n + j] = (0..k)
                .map(|t| x[r * k + t] as f64 * w[j * k + t] as f64)
                .sum();
        }
    }
    out
}

/// Float-rounding tolerance for a length-k f32 dot product: relative to Σ|x·w|.
fn check(got: &[f32], want: &[f64], x: &[f32], m: usize, w: &[f32], n: usize, k: usize) {
    for r in 0..m {
        for j in 0..n {
            let mag: f64 = (0..k)
                .map(|t| (x[r * k + t] as f64 * w[j * k + t] as f64).abs())
                .sum();
            let err = (got[r * n + j] as f64 - want[r * n + j]).abs();
            assert!(
                err <= 1e-6 * (k as f64).sqrt() * mag + 1e-30,
                "r{r} n{j} k{k}: err {err} mag {mag}"
            );
        }
    }
}

fn tensor(
    name: &str,
    rows: usize,
    cols: usize,
    rng: &mut ChaCha8Rng,
    kind: u8,
) -> HostTensor<'static> {
    let v: Vec<f32> = (0..rows * cols)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let data = match kind {
        0 => HostData::Bf16(Cow::Owned(v.iter().map(|&x| bf16::from_f32(x)).collect())),
        1 => HostData::F16(Cow::Owned(v.iter().map(|&x| f16::from_f32(x)).collect())),
        _ => HostData::F32(Cow::Owned(v)),
    };
    HostTensor {
        name: name.into(),
        shape: vec![rows, cols],
        data,
    }
}

fn wf32(m: &CpuMatrix) -> Vec<f32> {
    let mut out = vec![0f32; m.rows * m.cols];
    for r in 0..m.rows {
        m.row_f32(r, &mut out[r * m.cols..(r + 1) * m.cols]);
    }
    out
}

fn kernels() -> &'static [bool] {
    if simd::avx2_fma() {
        &[false, true]
    } else {
        &[false]
    }
}

#[test]
fn both_kernels_match_f64_reference_and_each_other() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let shapes = [
        (1, 1, 1),
        (1, 7, 13),
        (2, 9, 8),
        (3, 33, 61),
        (4, 17, 576),
        (5, 40, 100),
        (8, 31, 17),
        (9, 70, 129),
        (33, 45, 67),
        (64, 130, 576),
        (7, 200, 0),
    ];
    for &(m, n, k) in &shapes {
        for kind in 0..3u8 {
            let wt = tensor("w", n, k, &mut rng, kind);
            let w = CpuMatrix::from_parts(&[&wt]).unwrap();
            let wf = wf32(&w);
            assert_eq!(
                wf,
                wt.data
                    .to_f32()
                    .iter()
                    .map(|&v| round(v, kind))
                    .collect::<Vec<_>>()
            );
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            let want = reference(&x, m, &wf, n, k);
            let mut outs = Vec::new();
            for &s in kernels() {
                let mut out = vec![f32::NAN; m * n];
                matmul_with(&x, m, &w, &mut out, s);
                check(&out, &want, &x, m, &wf, n, k);
                outs.push(out);
            }
            assert!(
                outs.windows(2).all(|p| p[0] == p[1]),
                "kernels differ ({m}, {n}, {k})"
            );
        }
    }
}

fn round(v: f32, kind: u8) -> f32 {
    match kind {
        0 => bf16::from_f32(v).to_f32(),
        1 => f16::from_f32(v).to_f32(),
        _ => v,
    }
}

#[test]
fn a_row_gives_the_same_bits_alone_and_in_any_batch() {
    // Rows 0..m computed together (every tile shape, the row-split regime above 32 rows) vs
    // each row alone (the decode tile).
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let (n, k) = (200, 300);
    let w = CpuMatrix::from_parts(&[&tensor("w", n, k, &mut rng, 0)]).unwrap();
    for &s in kernels() {
        for m in [2, 3, 5, 6, 7, 13, 33, 100] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            let mut all = vec![f32::NAN; m * n];
            matmul_with(&x, m, &w, &mut all, s);
            for r in 0..m {
                let mut one = vec![f32::NAN; n];
                matmul_with(&x[r * k..(r + 1) * k], 1, &w, &mut one, s);
                assert_eq!(&all[r * n..(r + 1) * n], &one[..], "m {m} row {r}");
            }
        }
    }
}

#[test]
fn packing_puts_features_in_groups_of_32() {
    // 38 features: group 0 is 32 wide, group 1 is 16 wide (6 real + 10 zero padding).
    assert_eq!(GROUP, 32);
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let t = tensor("w", 38, 3, &mut rng, 2);
    let m = CpuMatrix::from_parts(&[&t]).unwrap();
    let WData::F32(d) = &m.data else {
        panic!("f32 stays f32")
    };
    assert_eq!(d.len(), 48 * 3);
    let src = t.data.to_f32();
    assert_eq!(d[32 + 5], src[5 * 3 + 1]); // W[5, 1]
    assert_eq!(d[32 * 3 + 16 * 2 + 3], src[35 * 3 + 2]); // W[35, 2]
    assert_eq!(d[32 * 3 + 16 * 2 + 6], 0.0); // padding
}

#[test]
fn large_output_splits_across_threads() {
    // Big enough to take the parallel chunked path with an odd N.
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (n, k) = (1001, 97);
    let wt = tensor("w", n, k, &mut rng, 0);
    let w = CpuMatrix::from_parts(&[&wt]).unwrap();
    let wf = wf32(&w);
    for m in [1, 6] {
        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let mut out = vec![f32::NAN; m * n];
        matmul(&x, m, &w, &mut out);
        check(&out, &reference(&x, m, &wf, n, k), &x, m, &wf, n, k);
    }
}

#[test]
fn stacking_parts_and_dtypes() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (a, b) = (
        tensor("a", 3, 5, &mut rng, 0),
        tensor("b", 2, 5, &mut rng, 0),
    );
    let m = CpuMatrix::from_parts(&[&a, &b]).unwrap();
    assert_eq!((m.rows, m.cols), (5, 5));
    assert!(matches!(m.data, WData::Bf16(_)));
    let mut row = vec![0f32; 5];
    m.row_f32(3, &mut row);
    assert_eq!(row, b.data.to_f32()[..5]);
    m.row_f32(4, &mut row);
    assert_eq!(row, b.data.to_f32()[5..10]);
    // Mixed: first part f16 → f16; first part f32 with a bf16 part → bf16; all f32 → f32.
    let (h, f) = (
        tensor("h", 1, 5, &mut rng, 1),
        tensor("f", 1, 5, &mut rng, 2),
    );
    assert!(matches!(
        CpuMatrix::from_parts(&[&h, &a]).unwrap().data,
        WData::F16(_)
    ));
    assert!(matches!(
        CpuMatrix::from_parts(&[&f, &a]).unwrap().data,
        WData::Bf16(_)
    ));
    assert!(matches!(
        CpuMatrix::from_parts(&[&f, &f]).unwrap().data,
        WData::F32(_)
    ));
    let bad = tensor("bad", 2, 4, &mut rng, 0);
    assert!(CpuMatrix::from_parts(&[&a, &bad]).is_err());
    assert!(CpuMatrix::from_parts(&[]).is_err());
}

#[test]
fn few_rows_streaming_path_matches_scalar_and_single_rows() {
    // 2..=32 rows over a matrix big enough for several tasks of several groups each (the
    // next-group prefetch path), with a 16-wide last group: the same bits as the scalar twin
    // and as each row alone.
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let (n, k) = (1000, 131);
    for kind in [0u8, 2] {
        let w = CpuMatrix::from_parts(&[&tensor("w", n, k, &mut rng, kind)]).unwrap();
        for m in [2, 3, 4, 7, 8, 12, 16, 25, 32] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            let mut outs = Vec::new();
            for &s in kernels() {
                let mut out = vec![f32::NAN; m * n];
                matmul_with(&x, m, &w, &mut out, s);
                outs.push(out);
            }
            assert!(
                outs.windows(2).all(|p| p[0] == p[1]),
                "kernels differ, m {m}"
            );
            for r in [0, m / 2, m - 1] {
                let mut one = vec![f32::NAN; n];
                matmul(&x[r * k..(r + 1) * k], 1, &w, &mut one);
                assert_eq!(&outs[0][r * n..(r + 1) * n], &one[..], "m {m} row {r}");
            }
        }
    }
}

#[test]
fn prefetch_plan_covers_the_next_group() {
    // Summed over a group's passes, the next group's prefetches reach all of its lines.
    for &(rows, subs, k, bytes) in &[
        (2, 2, 576, 576 * 64),
        (3, 2, 576, 576 * 64),
        (16, 2, 576, 576 * 64),
        (32, 2, 1536, 1536 * 64),
        (13, 1, 131, 131 * 32),
        (16, 2, 97, 97 * 128),
        (5, 2, 1, 64),
    ] {
        for first in [false, true] {
            let next = 1usize << 20;
            let own = 1usize << 10;
            let mut plan = PfPlan::new(
                rows,
                subs,
                k,
                (own as *const u8, bytes),
                Some((next as *const u8, bytes)),
                first,
            );
            let tiles = rows.div_ceil(TILE_ROWS);
            let passes: usize = (0..tiles)
                .map(|i| rows / tiles + usize::from(i < rows % tiles))
                .map(|rb| if rb <= 2 { 1 } else { subs })
                .sum();
            let mut reach = 0;
            for p in 0..passes {
                let Some(pf) = plan.take() else {
                    panic!("pass {p} of {passes} has no prefetch")
                };
                let end = pf.at as usize + k.div_ceil(pf.step) * pf.lines * 64;
                if pf.at as usize >= next {
                    assert_eq!(pf.at as usize, next + reach, "contiguous slices");
                    reach = end - next;
                } else {
                    // The own stream: a group prefetched ahead of its own loads.
                    assert_eq!(pf.at as usize, own + PREFETCH_BYTES);
                    assert!(end - own >= bytes);
                }
            }
            if passes > 1 {
                assert!(reach >= bytes, "{rows} {subs} {k}: {reach} < {bytes}");
            }
        }
    }
}
