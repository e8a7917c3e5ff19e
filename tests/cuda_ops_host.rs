//! The dense kernels run on the host (g++ builds of kernels/norm.cu, sampling.cu and gemv.cu
//! under tests/cuda_host/shim.h, as in `cuda_formats_host.rs`), against the CPU backend:
//! - the norms, plain and fused with the residual add, equal the CPU's within float rounding;
//! - the greedy token (`argmax_f32`) is the CPU's for every row, ties and NaN included;
//! - the dense temperature draw (`sampling.cu: draw_dense_f32`) picks the CPU's very token for
//!   every row and uniform (so a seeded stream is the same on either backend);
//! - the few-row products (`gemv.cu`), plain and with SiLU·up or RoPE + KV write fused, equal
//!   the CPU backend's f32 products within float rounding, for every row count the backend
//!   sends them and widths that are not multiples of a warp step.

#[path = "cuda_host/host_build.rs"]
mod host_build;
#[path = "cuda_host/host_run.rs"]
mod host_run;

use host_run::{call, f32s, Bytes};

use half::bf16;
use kvserve::backend::cpu::CpuBackend;
use kvserve::backend::cuda::parity::max_rel_err;
use kvserve::backend::Backend;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

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
