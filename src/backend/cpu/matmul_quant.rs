//! Quantized weight matrices (`Q4_1`, `Q8_0`, as a GGUF file stores them) in the product of
//! [`super`], under the same determinism contract: each weight is its exact dequantized f32
//! (`d·q + m` or `d·q`: an f16 scale times a 4- or 8-bit integer is exact in f32, so the one
//! rounding is the add), and every output is `fma(x[r, k], W[n, k], acc)` over `k` in order.
//! A quantized matrix therefore gives the same bits as an f32 matrix of its dequantized values,
//! at any row count, in any tile, SIMD or scalar.
//!
//! **Why.** Decode streams every weight once per token, so its speed is bytes per weight:
//! `Q4_1` is 0.625 bytes (20 per block of 32), `Q8_0` 1.0625, bf16 2. The dequantized values
//! are also the file's own, where bf16 rounds them.
//!
//! **Layout.** The groups of 32 output features of the float layout, each split along `K` into
//! blocks of 32: per (group, block), the group's scales (`d[width]` f16, then `m[width]` for
//! `Q4_1`) and then, per `k`, the group's quants. `Q4_1` packs a sub-panel of 16 features into
//! 8 bytes per `k`: byte `j` holds feature `j` in its low nibble and feature `j + 8` in its high
//! one, so a mask and a shift give the two 8-lane vectors. `Q8_0` stores the features' bytes in
//! order. Padding features have zero scales and quants.
//!
//! **Kernels.** Up to [`REGISTER_ROWS`] = 8 rows (small decode batches): the weights are
//! widened in registers, a block's scales loaded once per 32 `k`, the next blocks prefetched;
//! tiles of up to 6 rows, one or two rows taking both sub-panels of a group at once. More rows:
//! a task widens its group once into an f32 panel (`[K][width]`, L2-resident) and runs the
//! float kernels on it, so the widening is paid once per group (and chunk of 96 prompt rows),
//! not once per row tile.

use super::parallel::SendPtr;
use super::{group_width, row_tiles, PfPlan, Tile, GROUP, SUB, TILE_ROWS};
use crate::error::BackendError;
use crate::model::tensor::{HostData, HostTensor, QuantKind};
use half::f16;
use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Products of up to this many rows widen the weights in registers; more rows go through an
/// f32 panel. `bench_kernels quant` on the Zen 3 VM (whole model from DRAM, against bf16):
/// in registers ×1.81 / ×1.87 / ×1.26 / ×0.97 at 1 / 2 / 4 / 8 rows, where the panel gave
/// ×0.93 / ×1.04 / ×0.74 / ×0.75; at 16 / 32 rows the panel ×0.89 / ×1.22, registers ×0.66 /
/// ×0.72 (each tile re-widens what the panel widens once). A switch for that benchmark.
#[doc(hidden)]
pub static REGISTER_ROWS: AtomicUsize = AtomicUsize::new(8);

/// Weights along `K` per block.
const KB: usize = QuantKind::BLOCK;

/// Bytes one feature takes in one block (its scales and 32 quants).
fn feature_block_bytes(kind: QuantKind) -> usize {
    kind.block_bytes()
}

/// Byte offset of (group `g`, block `b`) in a packed matrix of `rows` features and `nb` blocks.
#[inline]
fn block_offset(kind: QuantKind, rows: usize, nb: usize, g: usize, b: usize) -> usize {
    let fb = feature_block_bytes(kind);
    g * GROUP * nb * fb + b * group_width(rows, g) * fb
}

/// Byte offset of the quants of row `kk` of a block of width `wg`, from the block's start.
#[inline]
fn quant_row(kind: QuantKind, wg: usize, kk: usize) -> usize {
    match kind {
        QuantKind::Q4_1 => 4 * wg + kk * wg / 2,
        QuantKind::Q8_0 => 2 * wg + kk * wg,
    }
}

/// The quant of feature `f` (within its group) at row `kk` of a block at `blk`.
#[inline]
fn quant_at(kind: QuantKind, blk: &[u8], wg: usize, kk: usize, f: usize) -> f32 {
    let row = &blk[quant_row(kind, wg, kk)..];
    match kind {
        QuantKind::Q4_1 => {
            let (s, j) = (f / SUB, f % SUB);
            (row[s * 8 + j % 8] >> (4 * (j / 8)) & 0x0f) as f32
        }
        QuantKind::Q8_0 => row[f] as i8 as f32,
    }
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32()
}

/// The exact value of feature `f`, row `kk` of a block (`d·q + m`, `d·q`).
#[inline]
fn weight_at(kind: QuantKind, blk: &[u8], wg: usize, kk: usize, f: usize) -> f32 {
    let q = quant_at(kind, blk, wg, kk, f);
    match kind {
        QuantKind::Q4_1 => q * f16_at(blk, f) + f16_at(blk, wg + f),
        QuantKind::Q8_0 => q * f16_at(blk, f),
    }
}

/// Packs quantized parts (all of `kind`, `cols` a multiple of 32) stacked along rows.
pub(super) fn pack(
    parts: &[&HostTensor<'_>],
    kind: QuantKind,
    rows: usize,
    cols: usize,
) -> Result<super::WeightBuf<u8>, BackendError> {
    if !cols.is_multiple_of(KB) {
        return Err(BackendError::Shape(format!(
            "{} matrix with {cols} columns: not whole blocks of {KB}",
            kind.name()
        )));
    }
    let nb = cols / KB;
    let bb = kind.block_bytes();
    let len = rows.next_multiple_of(SUB) * nb * feature_block_bytes(kind);
    Ok(super::WeightBuf::build(len, |dst| {
        let mut n = 0;
        for p in parts {
            let HostData::Quant(q) = &p.data else {
                unreachable!("checked by the caller")
            };
            for src_row in q.blocks.chunks_exact(nb * bb).take(p.shape[0]) {
                let (g, f) = (n / GROUP, n % GROUP);
                let wg = group_width(rows, g);
                for (b, src) in src_row.chunks_exact(bb).enumerate() {
                    let at = block_offset(kind, rows, nb, g, b);
                    let blk = &mut dst[at..at + wg * bb];
                    blk[2 * f..2 * f + 2].copy_from_slice(&src[0..2]);
                    match kind {
                        QuantKind::Q4_1 => {
                            blk[2 * (wg + f)..2 * (wg + f) + 2].copy_from_slice(&src[2..4]);
                            let (s, j) = (f / SUB, f % SUB);
                            for kk in 0..KB {
                                let q = src[4 + kk % 16] >> (4 * (kk / 16)) & 0x0f;
                                blk[quant_row(kind, wg, kk) + s * 8 + j % 8] |= q << (4 * (j / 8));
                            }
                        }
                        QuantKind::Q8_0 => {
                            for kk in 0..KB {
                                blk[quant_row(kind, wg, kk) + f] = src[2 + kk];
                            }
                        }
                    }
                }
                n += 1;
            }
        }
    }))
}

/// Row `r` (output feature `r`) widened into `out` (`cols` floats): embedding lookups.
pub(super) fn row_f32(kind: QuantKind, d: &[u8], rows: usize, r: usize, out: &mut [f32]) {
    let nb = out.len() / KB;
    let (g, f) = (r / GROUP, r % GROUP);
    let wg = group_width(rows, g);
    for (b, o) in out.chunks_exact_mut(KB).enumerate().take(nb) {
        let at = block_offset(kind, rows, nb, g, b);
        let blk = &d[at..at + wg * kind.block_bytes()];
        for (kk, o) in o.iter_mut().enumerate() {
            *o = weight_at(kind, blk, wg, kk, f);
        }
    }
}

thread_local! {
    /// A task's f32 panel of one group (`[K][width]`), reused across calls.
    static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Widens sub-panels `subs` of group `g` into `panel` (`[k][width]`, only those sub-panels'
/// columns written).
#[allow(clippy::too_many_arguments)]
fn widen_group(
    kind: QuantKind,
    w: &[u8],
    n: usize,
    k: usize,
    g: usize,
    subs: std::ops::Range<usize>,
    panel: &mut [f32],
    simd: bool,
) {
    let nb = k / KB;
    let wg = group_width(n, g);
    for b in 0..nb {
        let at = block_offset(kind, n, nb, g, b);
        let blk = &w[at..at + wg * kind.block_bytes()];
        let dst = &mut panel[b * KB * wg..(b + 1) * KB * wg];
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: `simd` means AVX2+FMA+F16C were detected; `blk` and `dst` hold a whole
            // block of width `wg`, and `subs` lies within it.
            unsafe { avx2::widen_block(kind, blk, wg, subs.clone(), dst) };
            continue;
        }
        let _ = simd;
        for kk in 0..KB {
            for f in subs.start * SUB..subs.end * SUB {
                dst[kk * wg + f] = weight_at(kind, blk, wg, kk, f);
            }
        }
    }
}

/// `out = x · Wᵀ` for a quantized `W` of `n` features × `k` inputs (see the module docs).
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul(
    x: &[f32],
    m: usize,
    kind: QuantKind,
    w: &[u8],
    n: usize,
    k: usize,
    out: &mut [f32],
    simd: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let subs = n.div_ceil(SUB);
    let nb = k / KB;
    assert!(
        k.is_multiple_of(KB)
            && x.len() >= m * k
            && out.len() >= m * n
            && w.len() >= subs * SUB * nb * feature_block_bytes(kind)
    );
    let outp = SendPtr(out.as_mut_ptr());
    super::for_each_task(m, n, k, |cols, rows| {
        // SAFETY: each task writes only rows `rows` × features of sub-panels `cols` of `out`,
        // and the assert above bounds every read and write.
        unsafe { range(x, kind, w, n, k, outp, cols, rows, simd) }
    });
}

/// Sub-panels `cols` × rows `rows` of the product, group by group.
///
/// # Safety
/// As [`super::range`]: `x`, `w` and `out` hold the whole product; nothing else writes this
/// block of `out`.
#[allow(clippy::too_many_arguments)]
unsafe fn range(
    x: &[f32],
    kind: QuantKind,
    w: &[u8],
    n: usize,
    k: usize,
    out: SendPtr<f32>,
    cols: std::ops::Range<usize>,
    rows: std::ops::Range<usize>,
    simd: bool,
) {
    let per = GROUP / SUB;
    let nb = k / KB;
    let mut s = cols.start;
    while s < cols.end {
        let g = s / per;
        let (s0, s1) = (s - g * per, (cols.end - g * per).min(per));
        let col0 = g * GROUP + s0 * SUB;
        let valid = (n - col0).min((s1 - s0) * SUB);
        let wg = group_width(n, g);
        let xr = x.as_ptr().add(rows.start * k);
        let o = out.get().add(rows.start * n + col0);
        #[cfg(target_arch = "x86_64")]
        if simd && rows.len() <= REGISTER_ROWS.load(Ordering::Relaxed) {
            // Decode batches: straight from the blocks, in balanced tiles of up to 6 rows (as
            // `row_tiles` cuts them), the weights widened in registers once per tile.
            let blocks = w.as_ptr().add(block_offset(kind, n, nb, g, 0));
            let tiles = rows.len().div_ceil(TILE_ROWS);
            let mut r = 0;
            for i in 0..tiles {
                let rb = rows.len() / tiles + usize::from(i < rows.len() % tiles);
                let t = avx2::QTile {
                    kind,
                    x: xr.add(r * k),
                    ldx: k,
                    blocks,
                    wg,
                    nb,
                    s0,
                    out: o.add(r * n),
                    ldo: n,
                };
                avx2::tile_rows(t, rb, s1 - s0, valid);
                r += rb;
            }
            s = (g + 1) * per;
            continue;
        }
        PANEL.with_borrow_mut(|panel| {
            panel.resize(k * GROUP, 0.0);
            widen_group(kind, w, n, k, g, s0..s1, panel, simd);
            let t = Tile {
                x: xr,
                ldx: k,
                w: panel.as_ptr().add(s0 * SUB),
                ldw: wg,
                k,
                out: o,
                ldo: n,
            };
            let mut pf = PfPlan::NONE;
            row_tiles(t, rows.len(), s1 - s0, valid, simd, &mut pf);
        });
        s = (g + 1) * per;
    }
}

#[cfg(target_arch = "x86_64")]
// Register-blocked kernels index `acc[r][v]` explicitly: clearer than iterator chains here.
#[allow(clippy::needless_range_loop)]
mod avx2 {
    use super::{quant_row, QuantKind, KB, SUB};
    use std::arch::x86_64::*;

    /// One or two rows × the sub-panels of one group, straight from the blocks.
    #[derive(Clone, Copy)]
    pub(super) struct QTile {
        pub kind: QuantKind,
        /// Rows of `x`, `ldx` apart, from `k = 0`.
        pub x: *const f32,
        pub ldx: usize,
        /// The group's block 0.
        pub blocks: *const u8,
        /// Features in the group, blocks along `K`, first sub-panel.
        pub wg: usize,
        pub nb: usize,
        pub s0: usize,
        /// Output of feature `s0 · 16` in row 0, rows `ldo` apart.
        pub out: *mut f32,
        pub ldo: usize,
    }

    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `t` addresses a whole product as [`super::range`] does.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile_rows(t: QTile, rows: usize, subs: usize, valid: usize) {
        if t.kind == QuantKind::Q4_1 {
            rows_of::<true>(t, rows, subs, valid)
        } else {
            rows_of::<false>(t, rows, subs, valid)
        }
    }

    /// Up to 2 rows take both sub-panels in one pass; 3 to 6 rows one pass per sub-panel
    /// (2·R accumulators).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows_of<const Q4: bool>(t: QTile, rows: usize, subs: usize, valid: usize) {
        match (rows, subs) {
            (1, 1) => tile::<Q4, 1, 1>(t, valid),
            (1, _) => tile::<Q4, 1, 2>(t, valid),
            (2, 1) => tile::<Q4, 2, 1>(t, valid),
            (2, _) => tile::<Q4, 2, 2>(t, valid),
            _ => {
                for s in 0..subs {
                    let ts = QTile {
                        s0: t.s0 + s,
                        out: t.out.add(s * SUB),
                        ..t
                    };
                    let v = valid.saturating_sub(s * SUB);
                    match rows {
                        3 => tile::<Q4, 3, 1>(ts, v),
                        4 => tile::<Q4, 4, 1>(ts, v),
                        5 => tile::<Q4, 5, 1>(ts, v),
                        _ => tile::<Q4, 6, 1>(ts, v),
                    }
                }
            }
        }
    }

    /// A block's scales for sub-panel `s`: `d` (and `m` for `Q4_1`) as two 8-lane vectors.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scales(blk: *const u8, wg: usize, s: usize, q4: bool) -> [[__m256; 2]; 2] {
        let at = |i: usize| _mm256_cvtph_ps(_mm_loadu_si128(blk.add(2 * i) as *const __m128i));
        let f = s * SUB;
        let m = if q4 {
            [at(wg + f), at(wg + f + 8)]
        } else {
            [_mm256_setzero_ps(); 2]
        };
        [[at(f), at(f + 8)], m]
    }

    /// The 16 exact weights of sub-panel `s` at quant row `row` (two 8-lane vectors).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn weights(row: *const u8, s: usize, q4: bool, sc: &[[__m256; 2]; 2]) -> [__m256; 2] {
        if q4 {
            let v = _mm_loadl_epi64(row.add(s * 8) as *const __m128i);
            let mask = _mm_set1_epi8(0x0f);
            let lo = _mm_and_si128(v, mask);
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), mask);
            let q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
            let q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
            // d·q is exact, so the fused multiply-add rounds exactly as `d·q + m`.
            [
                _mm256_fmadd_ps(q0, sc[0][0], sc[1][0]),
                _mm256_fmadd_ps(q1, sc[0][1], sc[1][1]),
            ]
        } else {
            let p = row.add(s * SUB);
            let q0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)));
            let q1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                p.add(8) as *const __m128i
            )));
            [_mm256_mul_ps(q0, sc[0][0]), _mm256_mul_ps(q1, sc[0][1])]
        }
    }

    /// Widens sub-panels `subs` of one block into `dst` (`[32][wg]` f32).
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `blk` holds a whole block of width `wg`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn widen_block(
        kind: QuantKind,
        blk: &[u8],
        wg: usize,
        subs: std::ops::Range<usize>,
        dst: &mut [f32],
    ) {
        let q4 = kind == QuantKind::Q4_1;
        assert!(blk.len() >= wg * kind.block_bytes() && dst.len() >= KB * wg);
        assert!(subs.end * SUB <= wg);
        let p = blk.as_ptr();
        for s in subs {
            let sc = scales(p, wg, s, q4);
            for kk in 0..KB {
                let w = weights(p.add(quant_row(kind, wg, kk)), s, q4, &sc);
                let o = dst.as_mut_ptr().add(kk * wg + s * SUB);
                _mm256_storeu_ps(o, w[0]);
                _mm256_storeu_ps(o.add(8), w[1]);
            }
        }
    }

    /// `R` rows × `S` sub-panels over all of `K`; stores the first `valid` features.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<const Q4: bool, const R: usize, const S: usize>(t: QTile, valid: usize) {
        let mut acc = [[_mm256_setzero_ps(); 2]; 6];
        let bytes = t.wg * t.kind.block_bytes();
        for b in 0..t.nb {
            let blk = t.blocks.add(b * bytes);
            let sc: [[[__m256; 2]; 2]; S] =
                std::array::from_fn(|s| scales(blk, t.wg, t.s0 + s, Q4));
            // The stream: the block two ahead, a line per `k` (may run past the matrix:
            // prefetches never fault, and wrapping_add keeps the address defined).
            let ahead = blk.wrapping_add(2 * bytes);
            for kk in 0..KB {
                if kk * 64 < bytes {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(kk * 64) as *const i8);
                }
                let xk = b * KB + kk;
                let bx: [__m256; R] =
                    std::array::from_fn(|r| _mm256_broadcast_ss(&*t.x.add(r * t.ldx + xk)));
                let row = blk.add(quant_row(t.kind, t.wg, kk));
                for s in 0..S {
                    let w = weights(row, t.s0 + s, Q4, &sc[s]);
                    for r in 0..R {
                        acc[r * S + s][0] = _mm256_fmadd_ps(bx[r], w[0], acc[r * S + s][0]);
                        acc[r * S + s][1] = _mm256_fmadd_ps(bx[r], w[1], acc[r * S + s][1]);
                    }
                }
            }
        }
        for r in 0..R {
            let o = t.out.add(r * t.ldo);
            let mut tmp = [0f32; 2 * SUB];
            for s in 0..S {
                _mm256_storeu_ps(tmp.as_mut_ptr().add(s * SUB), acc[r * S + s][0]);
                _mm256_storeu_ps(tmp.as_mut_ptr().add(s * SUB + 8), acc[r * S + s][1]);
            }
            std::ptr::copy_nonoverlapping(tmp.as_ptr(), o, valid.min(S * SUB));
        }
    }
}

#[cfg(test)]
#[path = "matmul_quant_tests.rs"]
mod tests;
