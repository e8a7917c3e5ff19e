//! Element-wise and row-wise ops of the CPU backend, written to follow Hugging Face Llama's
//! float32 math step by step: RMSNorm, SiLU·up, RoPE (with a cos/sin table cached by position),
//! softmax. Attention itself lives in `attention.rs`.
//!
//! Large batches (prefill) split rows across threads (`parallel::for_each`); small ones run
//! inline, where a fork/join would cost more than the op.

use super::parallel::{self, SendPtr};
use super::simd;
use crate::backend::{AttnShape, RopeParams};

/// Below this many elements an op runs on the calling thread.
const PAR_MIN: usize = 64 * 1024;

/// Calls `f(first_row, row_count)` over blocks of `rows` rows of `width` elements: inline when
/// small, else in parallel with ≥ `PAR_MIN / 4` elements per block. `f` must touch only its rows.
fn row_blocks(rows: usize, width: usize, f: impl Fn(usize, usize) + Sync) {
    if rows * width < PAR_MIN {
        return f(0, rows);
    }
    let per = (PAR_MIN / 4).div_ceil(width.max(1)).max(1);
    parallel::for_each(rows.div_ceil(per), |b| f(b * per, per.min(rows - b * per)));
}

/// `LlamaRMSNorm`: `variance = mean(x²)` in f32, `x * (1 / sqrt(variance + eps))`, then
/// `weight * that` (torch's order: the product with the weight comes last).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, rows: usize, out: &mut [f32]) {
    let w = weight.len();
    let (x, out) = (&x[..rows * w], &mut out[..rows * w]);
    let outp = SendPtr(out.as_mut_ptr());
    row_blocks(rows, w, |r0, n| {
        // SAFETY: each block writes only its own rows r0..r0+n of `out`.
        let out = unsafe { std::slice::from_raw_parts_mut(outp.get().add(r0 * w), n * w) };
        for (xr, or) in x[r0 * w..(r0 + n) * w]
            .chunks_exact(w)
            .zip(out.chunks_exact_mut(w))
        {
            let inv = 1.0 / (mean_sq(xr) + eps).sqrt();
            for ((o, &xv), &g) in or.iter_mut().zip(xr).zip(weight) {
                *o = g * (xv * inv);
            }
        }
    });
}

/// `mean(x²)` with 8 partial f32 sums (torch's vectorized reduction also keeps lane sums; the
/// compiler vectorizes this loop with plain SSE2).
fn mean_sq(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            acc[l] += c[l] * c[l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    for &v in tail {
        s += v * v;
    }
    s / x.len() as f32
}

/// `x[..len] += y[..len]`.
pub fn add(x: &mut [f32], y: &[f32], len: usize) {
    for (a, &b) in x[..len].iter_mut().zip(&y[..len]) {
        *a += b;
    }
}

/// Adds `bias` to each of the first `rows` rows of `x`.
pub fn add_bias(x: &mut [f32], bias: &[f32], rows: usize) {
    for row in x[..rows * bias.len()].chunks_exact_mut(bias.len()) {
        add(row, bias, bias.len());
    }
}

/// `out[r, j] = silu(g) * u` with `silu(g) = g / (1 + exp(-g))` (torch's formula, f32), for a
/// fused `[gate | up]` row of width `2 * inter`.
pub fn silu_mul(gate_up: &[f32], rows: usize, inter: usize, out: &mut [f32]) {
    let simd = simd::avx2_fma();
    let (gu, out) = (&gate_up[..rows * 2 * inter], &mut out[..rows * inter]);
    let outp = SendPtr(out.as_mut_ptr());
    row_blocks(rows, inter, |r0, n| {
        // SAFETY: each block writes only its own rows r0..r0+n of `out`.
        let out = unsafe { std::slice::from_raw_parts_mut(outp.get().add(r0 * inter), n * inter) };
        let gu = &gu[r0 * 2 * inter..(r0 + n) * 2 * inter];
        for (g, o) in gu.chunks_exact(2 * inter).zip(out.chunks_exact_mut(inter)) {
            silu_row(&g[..inter], &g[inter..], o, simd);
        }
    });
}

fn silu_row(g: &[f32], u: &[f32], out: &mut [f32], simd: bool) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: AVX2/FMA checked by the caller; the kernel stays inside the three slices.
        done = unsafe { x86::silu_mul(g, u, out) };
    }
    let _ = simd;
    for j in done..out.len() {
        let s = g[j] / (1.0 + simd::exp_scalar(-g[j]));
        out[j] = s * u[j];
    }
}

/// `x[..] = softmax(x[..])` in f32 the way torch's CPU kernel does it: subtract the max,
/// `exp`, sum, multiply by `1 / sum`.
pub fn softmax(x: &mut [f32], simd: bool) {
    if x.is_empty() {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: AVX2/FMA checked by the caller.
        return unsafe { x86::softmax(x) };
    }
    let _ = simd;
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut acc = [0f32; 8];
    for (i, v) in x.iter_mut().enumerate() {
        *v = simd::exp_scalar(*v - max);
        acc[i % 8] += *v;
    }
    let sum = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// cos/sin of `pos · inv_freq[i]` for positions `0..len`, for one set of rope parameters.
/// Computing them costs `head_dim` transcendentals per position, so they are computed once per
/// position and shared by all heads, layers and sequences.
#[derive(Debug)]
pub struct RopeTable {
    inv_freq: Vec<f32>,
    scaling: f32,
    len: usize,
    /// `[len, half]`, already multiplied by `attention_scaling`.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    pub fn new(rope: &RopeParams, len: usize) -> Self {
        let half = rope.inv_freq.len();
        let (mut cos, mut sin) = (
            Vec::with_capacity(len * half),
            Vec::with_capacity(len * half),
        );
        for pos in 0..len {
            for &f in &rope.inv_freq {
                // torch: `inv_freq.float() @ position_ids.float()` is a K = 1 matmul, i.e. one
                // f32 product; cos/sin of that f32 angle, then `* attention_scaling` in f32.
                let angle = (f * pos as f32) as f64;
                cos.push(angle.cos() as f32 * rope.attention_scaling);
                sin.push(angle.sin() as f32 * rope.attention_scaling);
            }
        }
        RopeTable {
            inv_freq: rope.inv_freq.clone(),
            scaling: rope.attention_scaling,
            len,
            cos,
            sin,
        }
    }

    /// Whether this table serves `rope` for positions `< len`.
    pub fn serves(&self, rope: &RopeParams, len: usize) -> bool {
        self.len >= len
            && self.scaling.to_bits() == rope.attention_scaling.to_bits()
            && self.inv_freq.len() == rope.inv_freq.len()
            && self
                .inv_freq
                .iter()
                .zip(&rope.inv_freq)
                .all(|(a, b)| a.to_bits() == b.to_bits())
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Rotates the q and k heads of `rows` fused `[q | k | v]` rows in place (HF `rotate_half`:
    /// pair `i` is `(x[i], x[i + d/2])`). Every position must be `< self.len()`.
    pub fn apply(&self, qkv: &mut [f32], rows: usize, positions: &[u32], shape: AttnShape) {
        let width = shape.qkv_width();
        let qkv = SendPtr(qkv[..rows * width].as_mut_ptr());
        row_blocks(rows, width, |r0, n| {
            // SAFETY: each block rotates only its own rows r0..r0+n.
            let block =
                unsafe { std::slice::from_raw_parts_mut(qkv.get().add(r0 * width), n * width) };
            for (row, &pos) in block.chunks_exact_mut(width).zip(&positions[r0..r0 + n]) {
                self.apply_row(row, pos as usize, shape);
            }
        });
    }

    /// Rotates one head (`head_dim` floats) to position `pos`, exactly as [`Self::apply`] does.
    pub fn rotate_head(&self, head: &mut [f32], pos: usize) {
        let half = head.len() / 2;
        debug_assert!(pos < self.len && half == self.inv_freq.len());
        if pos >= self.len || half != self.inv_freq.len() {
            return;
        }
        let cos = &self.cos[pos * half..(pos + 1) * half];
        let sin = &self.sin[pos * half..(pos + 1) * half];
        let (lo, hi) = head.split_at_mut(half);
        for i in 0..half {
            let (a, b) = (lo[i], hi[i]);
            lo[i] = a * cos[i] + -b * sin[i];
            hi[i] = b * cos[i] + a * sin[i];
        }
    }

    /// The inverse of [`Self::rotate_head`] (up to f32 rounding): rotates back by `−angle` and
    /// undoes `attention_scaling`.
    pub fn unrotate_head(&self, head: &mut [f32], pos: usize) {
        let half = head.len() / 2;
        debug_assert!(pos < self.len && half == self.inv_freq.len());
        if pos >= self.len || half != self.inv_freq.len() {
            return;
        }
        let s2 = self.scaling * self.scaling;
        let cos = &self.cos[pos * half..(pos + 1) * half];
        let sin = &self.sin[pos * half..(pos + 1) * half];
        let (lo, hi) = head.split_at_mut(half);
        for i in 0..half {
            let (a, b) = (lo[i], hi[i]);
            lo[i] = (a * cos[i] + b * sin[i]) / s2;
            hi[i] = (b * cos[i] - a * sin[i]) / s2;
        }
    }

    fn apply_row(&self, row: &mut [f32], pos: usize, shape: AttnShape) {
        let (d, half) = (shape.head_dim, shape.head_dim / 2);
        debug_assert!(pos < self.len && half == self.inv_freq.len());
        if pos >= self.len || half != self.inv_freq.len() {
            return;
        }
        let cos = &self.cos[pos * half..(pos + 1) * half];
        let sin = &self.sin[pos * half..(pos + 1) * half];
        let rotated = (shape.num_heads + shape.num_kv_heads) * d;
        for head in row[..rotated].chunks_exact_mut(d) {
            let (lo, hi) = head.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (lo[i], hi[i]);
                // `q * cos + rotate_half(q) * sin`, two products then one add, as torch does
                // (separate kernels, no fused multiply-add). Both halves use the same cos/sin.
                lo[i] = a * cos[i] + -b * sin[i];
                hi[i] = b * cos[i] + a * sin[i];
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::simd::x86::{exp8, hsum};
    use std::arch::x86_64::*;

    /// Vectorized SiLU·up over the multiple-of-8 prefix; returns how many elements it did.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) -> usize {
        let n8 = out.len().min(g.len()).min(u.len()) & !7;
        let one = _mm256_set1_ps(1.0);
        let sign = _mm256_set1_ps(-0.0);
        for j in (0..n8).step_by(8) {
            let gv = _mm256_loadu_ps(g.as_ptr().add(j));
            let e = exp8(_mm256_xor_ps(gv, sign));
            let s = _mm256_div_ps(gv, _mm256_add_ps(one, e));
            let uv = _mm256_loadu_ps(u.as_ptr().add(j));
            _mm256_storeu_ps(out.as_mut_ptr().add(j), _mm256_mul_ps(s, uv));
        }
        n8
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn softmax(x: &mut [f32]) {
        let n = x.len();
        let n8 = n & !7;
        let p = x.as_mut_ptr();
        let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
        for j in (0..n8).step_by(8) {
            mv = _mm256_max_ps(mv, _mm256_loadu_ps(p.add(j)));
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), mv);
        let max = lanes
            .iter()
            .chain(&x[n8..])
            .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let (maxv, mut acc) = (_mm256_set1_ps(max), _mm256_setzero_ps());
        for j in (0..n8).step_by(8) {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(j)), maxv));
            _mm256_storeu_ps(p.add(j), e);
            acc = _mm256_add_ps(acc, e);
        }
        let mut sum = hsum(acc);
        if n8 < n {
            // Tail through the same vector exp (padded with -inf → 0) so every element of a
            // row sees one exp implementation.
            let mut t = [f32::NEG_INFINITY; 8];
            t[..n - n8].copy_from_slice(&x[n8..]);
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(t.as_ptr()), maxv));
            _mm256_storeu_ps(t.as_mut_ptr(), e);
            x[n8..].copy_from_slice(&t[..n - n8]);
            sum += t[..n - n8].iter().sum::<f32>();
        }
        let inv = _mm256_set1_ps(1.0 / sum);
        for j in (0..n8).step_by(8) {
            _mm256_storeu_ps(p.add(j), _mm256_mul_ps(_mm256_loadu_ps(p.add(j)), inv));
        }
        let inv = 1.0 / sum;
        for v in &mut x[n8..] {
            *v *= inv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f32, b: f64, rel: f64) -> bool {
        (a as f64 - b).abs() <= rel * b.abs().max(1e-30) + 1e-37
    }

    #[test]
    fn rms_norm_matches_formula() {
        let (w, rows) = (67, 3);
        let x: Vec<f32> = (0..rows * w)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let g: Vec<f32> = (0..w).map(|i| 0.5 + i as f32 / 100.0).collect();
        let mut out = vec![0f32; rows * w];
        rms_norm(&x, &g, 1e-5, rows, &mut out);
        for r in 0..rows {
            let xr = &x[r * w..(r + 1) * w];
            let ms = xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / w as f64;
            let inv = 1.0 / (ms + 1e-5).sqrt();
            for i in 0..w {
                assert!(close(
                    out[r * w + i],
                    g[i] as f64 * xr[i] as f64 * inv,
                    1e-6
                ));
            }
        }
    }

    #[test]
    fn silu_mul_both_paths() {
        let (inter, rows) = (37, 2);
        let gu: Vec<f32> = (0..rows * 2 * inter)
            .map(|i| (i as f32 - 70.0) / 5.0)
            .collect();
        for simd in [false, simd::avx2_fma()] {
            let mut out = vec![0f32; rows * inter];
            for (g, o) in gu.chunks_exact(2 * inter).zip(out.chunks_exact_mut(inter)) {
                silu_row(&g[..inter], &g[inter..], o, simd);
            }
            for r in 0..rows {
                for j in 0..inter {
                    let (g, u) = (
                        gu[r * 2 * inter + j] as f64,
                        gu[r * 2 * inter + inter + j] as f64,
                    );
                    assert!(close(out[r * inter + j], g / (1.0 + (-g).exp()) * u, 1e-6));
                }
            }
        }
        // Extremes behave like torch: large negative gate → -0, large positive → g.
        let mut o = [0f32; 8];
        silu_row(&[-200.0; 8], &[1.0; 8], &mut o, simd::avx2_fma());
        assert!(o.iter().all(|&v| v == 0.0));
        silu_row(&[200.0; 8], &[1.0; 8], &mut o, simd::avx2_fma());
        assert!(o.iter().all(|&v| v == 200.0));
    }

    #[test]
    fn softmax_both_paths() {
        for n in [1, 5, 8, 13, 64, 77] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 23) as f32 - 11.0).collect();
            let max = x.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let sum: f64 = x.iter().map(|&v| (v as f64 - max).exp()).sum();
            for simd in [false, simd::avx2_fma()] {
                let mut y = x.clone();
                softmax(&mut y, simd);
                for i in 0..n {
                    assert!(
                        close(y[i], (x[i] as f64 - max).exp() / sum, 2e-6),
                        "n{n} i{i}"
                    );
                }
            }
        }
    }

    #[test]
    fn rope_rotate_half_layout() {
        let shape = AttnShape {
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 8,
        };
        let inv_freq: Vec<f32> = (0..4)
            .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / 8.0))
            .collect();
        let rope = RopeParams {
            inv_freq: inv_freq.clone(),
            attention_scaling: 1.0,
        };
        let table = RopeTable::new(&rope, 16);
        assert!(table.serves(&rope, 16) && !table.serves(&rope, 17));
        let width = shape.qkv_width();
        let orig: Vec<f32> = (0..2 * width).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut qkv = orig.clone();
        table.apply(&mut qkv, 2, &[0, 11], shape);
        assert_eq!(&qkv[..width], &orig[..width], "position 0 is the identity");
        let (row, orow) = (&qkv[width..], &orig[width..]);
        for h in 0..3 {
            for i in 0..4 {
                let th = (inv_freq[i] * 11.0) as f64;
                let (a, b) = (orow[h * 8 + i] as f64, orow[h * 8 + 4 + i] as f64);
                assert!(close(row[h * 8 + i], a * th.cos() - b * th.sin(), 1e-6));
                assert!(close(row[h * 8 + 4 + i], b * th.cos() + a * th.sin(), 1e-6));
            }
        }
        assert_eq!(&row[24..], &orow[24..], "v is untouched");
        // One head rotated alone matches the fused rows; un-rotation inverts it.
        let mut head = orow[8..16].to_vec();
        table.rotate_head(&mut head, 11);
        assert_eq!(&head[..], &row[8..16]);
        table.unrotate_head(&mut head, 11);
        for (a, b) in head.iter().zip(&orow[8..16]) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }
}
