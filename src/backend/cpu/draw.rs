//! The dense temperature draw: a token from a whole row of logits at temperature `T`, with
//! probability proportional to `exp((l - max) / T)`, given a uniform number in `[0, 1)`. One
//! definition for the engine's sampler (OpenAI's default request: temperature only) and for
//! [`crate::backend::Backend::draw_rows`], and the rule the CUDA kernel
//! (`kernels/sampling.cu: draw_dense_f32`) follows operation for operation: the same row and
//! uniform give the same token whichever computes it.
//!
//! The row is only read: its max, then the per-[`BLOCK`] sums of its weights (f32 in `L` lanes,
//! each lane summing every `L`-th weight of the block in order, the lanes then summed in order,
//! then f64 across blocks), and the draw walks the block sums and recomputes the weights of the
//! one block it lands in.

use super::argmax::{argmax, max_lanes};
use super::simd::avx2_twin;
use crate::types::TokenId;

/// Lanes of the block sums.
const L: usize = 8;
/// Elements per partial sum: at most 32 f32 terms per lane, then f64.
pub const BLOCK: usize = 256;

/// The token drawn from `xs` at temperature `1 / inv_t` by the uniform `u01` in `[0, 1)`;
/// `blocks` is scratch (the per-block sums). A row whose max is not finite (every value NaN or
/// `-inf`, or a `+inf`) gives its argmax.
pub fn draw_dense_row(xs: &[f32], inv_t: f32, u01: f64, blocks: &mut Vec<f64>) -> TokenId {
    let m = max_lanes(xs);
    if !m.is_finite() {
        return argmax(xs) as TokenId;
    }
    let total = block_weights(xs, m, inv_t, blocks);
    draw_dense(xs, blocks, u01 * total, |x| exp_nonpos((x - m) * inv_t))
}

avx2_twin!(
    /// The per-`BLOCK` sums of the weights `exp((x - m) * s)` (NaN and `-inf` weigh 0), pushed
    /// to `blocks`; returns the total. Nothing is written back: the draw recomputes the weights
    /// of the one block it lands in, so the row is only read.
    pub fn block_weights(xs: &[f32], m: f32, s: f32, blocks: &mut Vec<f64>) -> f64
        => block_weights_portable
);

#[inline(always)]
pub(crate) fn block_weights_portable(xs: &[f32], m: f32, s: f32, blocks: &mut Vec<f64>) -> f64 {
    blocks.clear();
    for block in xs.chunks(BLOCK) {
        let mut acc = [0.0f32; L];
        let chunks = block.chunks_exact(L);
        let tail = chunks.remainder();
        for c in chunks {
            for j in 0..L {
                acc[j] += exp_nonpos((c[j] - m) * s);
            }
        }
        let mut sum: f32 = acc.iter().sum();
        for &x in tail {
            sum += exp_nonpos((x - m) * s);
        }
        blocks.push(f64::from(sum));
    }
    blocks.iter().sum()
}

/// `exp(x)` for `x <= 0`; 0 below -87 and for NaN. Cephes' `expf` polynomial (~1e-7 relative
/// error), branch-free so loops vectorize.
#[inline(always)]
pub fn exp_nonpos(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let keep = x >= -87.0; // false for NaN
    let x = x.clamp(-87.0, 0.0); // NaN stays NaN and is zeroed below
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND; // round(x / ln2), in [-126, 0]
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4; // x - n ln2, ln2 split in two parts
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // The low bits of `t` hold n: 2^n is built with integer ops (a float->int cast would not
    // vectorize).
    let e = e * f32::from_bits(t.to_bits().wrapping_sub(0x4B40_0000 - 127) << 23);
    if keep {
        e
    } else {
        0.0
    }
}

/// The token at `u` (in `[0, total)`) on the cumulative weights of the whole row, `blocks`
/// holding the per-`BLOCK` sums: whole blocks are skipped on their sums, and only the block the
/// draw lands in has its weights recomputed.
pub fn draw_dense(xs: &[f32], blocks: &[f64], mut u: f64, weight: impl Fn(f32) -> f32) -> TokenId {
    for (b, &bs) in blocks.iter().enumerate() {
        if u >= bs {
            u -= bs;
            continue;
        }
        let start = b * BLOCK;
        let mut last = start;
        for (i, &x) in xs[start..xs.len().min(start + BLOCK)].iter().enumerate() {
            let w = weight(x);
            if w > 0.0 {
                last = start + i;
                u -= f64::from(w);
                if u < 0.0 {
                    return last as TokenId;
                }
            }
        }
        // The block's sum (in lane order) and this walk rounded differently: the draw is at
        // the block's end, on its last token with weight.
        return last as TokenId;
    }
    // Round-off put the draw past the last block (probability ~1e-16).
    argmax(xs) as TokenId
}
