//! Weight matrices ([`CpuMatrix`]) and `out = x · Wᵀ` with f32 accumulation.
//!
//! Weights stay in their stored 16-bit format: decode is memory-bandwidth bound (every weight
//! byte is read once per token), so widening them to f32 would double the bytes per token.
//! Two regimes:
//! - few rows (decode, `rows ≤ SMALL_ROWS`): a hand-written AVX2+FMA kernel streams each weight
//!   row once (one sequential stream per thread, software prefetch 1 KiB ahead), widens
//!   bf16/f16 → f32 in registers and multiplies it with up to 4 activation rows at a time; the
//!   output features are split into contiguous chunks claimed dynamically by the threads.
//! - many rows (prefill): each task widens a panel of weight rows to f32 in a per-thread
//!   scratch and hands it to the `gemm` crate (single-threaded inside the task).
//!
//! Weights live in huge-page memory (`arena.rs`).
//!
//! Both have scalar twins (used when AVX2/FMA are absent) that agree within float rounding.

use super::arena::WeightBuf;
use super::parallel::{self, SendPtr};
use super::simd::{self, WElem};
use crate::error::BackendError;
use crate::model::tensor::{HostData, HostTensor};
use half::{bf16, f16};
use std::cell::RefCell;

/// At or below this many activation rows the streaming kernel beats widened panels + gemm
/// (`bench_kernels cross` on the Zen 3 VM: streaming wins by 1.3–6× up to 32 rows, ties at 48,
/// loses from 64).
pub const SMALL_ROWS: usize = 32;

/// Weight data in its stored format.
#[derive(Debug, Clone)]
pub enum WData {
    Bf16(WeightBuf<bf16>),
    F16(WeightBuf<f16>),
    F32(WeightBuf<f32>),
}

/// A weight matrix `[rows = out_features, cols = in_features]`, row-major.
#[derive(Debug, Clone)]
pub struct CpuMatrix {
    pub rows: usize,
    pub cols: usize,
    pub data: WData,
}

impl CpuMatrix {
    /// Stacks 2-D parts along rows. All parts of one dtype keep it (f32 stays f32). Mixed parts
    /// take the first part's dtype when that is bf16 or f16, else bf16 (a theoretical case:
    /// loaders hand out one dtype per checkpoint; f32 → bf16 rounds to nearest even).
    pub fn from_parts(parts: &[&HostTensor<'_>]) -> Result<Self, BackendError> {
        let first = parts
            .first()
            .ok_or_else(|| BackendError::Shape("upload_matrix: no parts".into()))?;
        let cols = *first.shape.get(1).unwrap_or(&0);
        let mut rows = 0;
        for p in parts {
            if p.shape.len() != 2 || p.shape[1] != cols || p.data.len() != p.numel() {
                return Err(BackendError::Shape(format!(
                    "upload_matrix: `{}` has shape {:?} ({} elements), expected [_, {cols}]",
                    p.name,
                    p.shape,
                    p.data.len()
                )));
            }
            rows += p.shape[0];
        }
        let same = |f: fn(&HostData<'_>) -> bool| parts.iter().all(|p| f(&p.data));
        // Each part is converted straight into its rows of the (huge-page) destination.
        fn stack<T: Copy>(
            parts: &[&HostTensor<'_>],
            len: usize,
            conv: impl Fn(&HostData<'_>, &mut [T]),
        ) -> WeightBuf<T> {
            WeightBuf::build(len, |dst| {
                let mut off = 0;
                for p in parts {
                    conv(&p.data, &mut dst[off..off + p.data.len()]);
                    off += p.data.len();
                }
            })
        }
        let len = rows * cols;
        let data = if same(|d| matches!(d, HostData::F32(_))) {
            WData::F32(stack(parts, len, |d, o| {
                if let HostData::F32(v) = d {
                    o.copy_from_slice(v)
                }
            }))
        } else if matches!(first.data, HostData::F16(_)) {
            WData::F16(stack(parts, len, |d, o| match d {
                HostData::F16(v) => o.copy_from_slice(v),
                HostData::F32(v) => o
                    .iter_mut()
                    .zip(v.iter())
                    .for_each(|(o, &x)| *o = f16::from_f32(x)),
                HostData::Bf16(v) => o
                    .iter_mut()
                    .zip(v.iter())
                    .for_each(|(o, x)| *o = f16::from_f32(x.to_f32())),
            }))
        } else {
            WData::Bf16(stack(parts, len, |d, o| match d {
                HostData::Bf16(v) => o.copy_from_slice(v),
                HostData::F32(v) => o
                    .iter_mut()
                    .zip(v.iter())
                    .for_each(|(o, &x)| *o = bf16::from_f32(x)),
                HostData::F16(v) => o
                    .iter_mut()
                    .zip(v.iter())
                    .for_each(|(o, x)| *o = bf16::from_f32(x.to_f32())),
            }))
        };
        Ok(CpuMatrix { rows, cols, data })
    }

    /// Bytes of weight data (what one decode step streams).
    pub fn bytes(&self) -> usize {
        let elem = match self.data {
            WData::F32(_) => 4,
            _ => 2,
        };
        self.rows * self.cols * elem
    }

    /// Widens row `r` into `out` (`cols` floats).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let range = r * self.cols..(r + 1) * self.cols;
        match &self.data {
            WData::Bf16(d) => widen(&d[range], out),
            WData::F16(d) => widen(&d[range], out),
            WData::F32(d) => out.copy_from_slice(&d[range]),
        }
    }
}

fn widen<T: WElem>(src: &[T], out: &mut [f32]) {
    for (o, s) in out.iter_mut().zip(src) {
        *o = s.to_f32();
    }
}

/// `out[r, n] = Σ_k x[r, k] · W[n, k]` for `r < rows`. `x` holds at least `rows × w.cols`
/// floats and `out` at least `rows × w.rows`.
pub fn matmul(x: &[f32], rows: usize, w: &CpuMatrix, out: &mut [f32]) {
    let simd = simd::avx2_fma();
    let (n, k) = (w.rows, w.cols);
    let (x, out) = (&x[..rows * k], &mut out[..rows * n]);
    match &w.data {
        WData::Bf16(d) => matmul_t(x, rows, d, n, k, out, simd),
        WData::F16(d) => matmul_t(x, rows, d, n, k, out, simd),
        WData::F32(d) => matmul_t(x, rows, d, n, k, out, simd),
    }
}

fn matmul_t<T: WElem>(
    x: &[f32],
    m: usize,
    w: &[T],
    n: usize,
    k: usize,
    out: &mut [f32],
    simd: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if m <= SMALL_ROWS {
        matvec_par(x, m, w, n, k, out, simd);
    } else {
        gemm_par(x, m, w, n, k, out);
    }
}

/// The streaming path, parallel over contiguous chunks of output features claimed dynamically
/// (4 per thread: slack for an uneven VM at a few µs of overhead per call). Chunk bounds are
/// multiples of 8 rows.
pub fn matvec_par<T: WElem>(
    x: &[f32],
    m: usize,
    w: &[T],
    n: usize,
    k: usize,
    out: &mut [f32],
    simd: bool,
) {
    assert!(x.len() >= m * k && out.len() >= m * n && w.len() >= n * k);
    let threads = rayon::current_num_threads();
    // Below ~64 KiB of weights a fork/join costs more than it saves.
    let chunks = if n * k < 32 * 1024 {
        1
    } else {
        (4 * threads).min(n.div_ceil(8))
    };
    let step = n.div_ceil(chunks).next_multiple_of(8);
    let outp = SendPtr(out.as_mut_ptr());
    parallel::for_each(n.div_ceil(step), |c| {
        let (n0, n1) = (c * step, ((c + 1) * step).min(n));
        // SAFETY: chunk `c` writes only columns n0..n1 of each of the m output rows, and the
        // assert above bounds every read and write.
        unsafe { matvec_range(x, m, w, n, k, outp, n0, n1, simd) }
    });
}

/// Output columns `n0..n1` of the streaming path.
///
/// # Safety
/// `x`, `w` and `out` (row stride `n`) must hold `m` rows; nothing else may write those columns.
#[allow(clippy::too_many_arguments)]
unsafe fn matvec_range<T: WElem>(
    x: &[f32],
    m: usize,
    w: &[T],
    n: usize,
    k: usize,
    out: SendPtr<f32>,
    n0: usize,
    n1: usize,
    simd: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        return avx2::matvec_range(x.as_ptr(), m, w.as_ptr(), n, k, out.0, n0, n1);
    }
    let _ = simd;
    for r in 0..m {
        let xr = &x[r * k..(r + 1) * k];
        for j in n0..n1 {
            *out.0.add(r * n + j) = dot_scalar(xr, &w[j * k..(j + 1) * k]);
        }
    }
}

/// Scalar dot product with 8 partial sums (the same shape the AVX2 kernel uses).
fn dot_scalar<T: WElem>(x: &[f32], w: &[T]) -> f32 {
    let mut acc = [0f32; 8];
    let k8 = x.len() / 8 * 8;
    for (xc, wc) in x[..k8].chunks_exact(8).zip(w[..k8].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += xc[l] * wc[l].to_f32();
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    for t in k8..x.len() {
        s += x[t] * w[t].to_f32();
    }
    s
}

#[cfg(target_arch = "x86_64")]
// Register-blocked kernels index `acc[r][u]` explicitly: clearer than iterator chains here.
#[allow(clippy::needless_range_loop)]
mod avx2 {
    use super::super::simd::x86::{hsum, load8};
    use super::super::simd::WElem;
    use std::arch::x86_64::*;

    /// Weight rows per block when more than 4 activation rows share it: the block (16 rows ×
    /// K × 2 bytes ≤ 48 KiB for K = 1536) stays in L1/L2 while each group of ≤ 4 rows passes.
    const WBLOCK: usize = 16;
    /// Software prefetch distance along the weight stream. The hardware prefetcher stops at
    /// page boundaries; 1 KiB ahead measured best (12 → 14–18 GB/s per core on Zen 3).
    const PREFETCH_BYTES: usize = 1024;

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn matvec_range<T: WElem>(
        x: *const f32,
        m: usize,
        w: *const T,
        n: usize,
        k: usize,
        out: *mut f32,
        n0: usize,
        n1: usize,
    ) {
        let block = if m <= 4 { n1 - n0 } else { WBLOCK };
        let mut b0 = n0;
        while b0 < n1 {
            let b1 = (b0 + block).min(n1);
            let mut r0 = 0;
            while r0 < m {
                let rg = (m - r0).min(4);
                let (xr, o) = (x.add(r0 * k), out.add(r0 * n));
                for j in b0..b1 {
                    let (wj, oj) = (w.add(j * k), o.add(j));
                    match rg {
                        1 => row::<T, 1, 4>(xr, wj, k, oj, n),
                        2 => row::<T, 2, 4>(xr, wj, k, oj, n),
                        3 => row::<T, 3, 2>(xr, wj, k, oj, n),
                        _ => row::<T, 4, 2>(xr, wj, k, oj, n),
                    }
                }
                r0 += rg;
            }
            b0 = b1;
        }
    }

    /// One weight row against `R` activation rows: `U` independent accumulators per activation
    /// row along K (`R × U ≤ 8` vectors) so the FMA latency chain never limits the stream.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn row<T: WElem, const R: usize, const U: usize>(
        x: *const f32,
        w: *const T,
        k: usize,
        out: *mut f32,
        ldo: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); U]; R];
        let step = 8 * U;
        let bytes = step * std::mem::size_of::<T>();
        let mut kk = 0;
        while kk + step <= k {
            // Prefetch the line(s) PREFETCH_BYTES ahead (may run past the matrix: prefetches
            // never fault, and wrapping_add keeps the address computation defined).
            let ahead =
                (w as *const u8).wrapping_add(kk * std::mem::size_of::<T>() + PREFETCH_BYTES);
            for l in (0..bytes).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(l) as *const i8);
            }
            for u in 0..U {
                let wv = load8(w.add(kk + 8 * u));
                for r in 0..R {
                    let xv = _mm256_loadu_ps(x.add(r * k + kk + 8 * u));
                    acc[r][u] = _mm256_fmadd_ps(wv, xv, acc[r][u]);
                }
            }
            kk += step;
        }
        while kk + 8 <= k {
            let wv = load8(w.add(kk));
            for r in 0..R {
                acc[r][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.add(r * k + kk)), acc[r][0]);
            }
            kk += 8;
        }
        for r in 0..R {
            let mut v = acc[r][0];
            for u in 1..U {
                v = _mm256_add_ps(v, acc[r][u]);
            }
            let mut s = hsum(v);
            for t in kk..k {
                s += *x.add(r * k + t) * (*w.add(t)).to_f32();
            }
            *out.add(r * ldo) = s;
        }
    }
}

thread_local! {
    /// Per-thread f32 panel for the prefill path (reused across calls; grows to the largest
    /// `panel × K` seen, ≤ 1.5 MiB for the default model).
    static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Rows of W per gemm task in the prefill path: big enough that packing X once per panel is
/// amortized, small enough that the widened panel stays near L2 and that there are about
/// 4 panels per thread for balance. (One `gemm` call over whole slabs with the crate's own
/// rayon parallelism measured 5–25% slower.)
fn panel_rows(n: usize, k: usize, threads: usize) -> usize {
    let max_rows = ((512 * 1024) / (4 * k)).clamp(64, 512);
    let by_balance = n.div_ceil(4 * threads);
    by_balance.clamp(16, max_rows).next_multiple_of(16)
}

/// The prefill path: parallel over panels of weight rows, each widened to f32 and multiplied
/// by the `gemm` crate (which does its own runtime CPU dispatch, so this path is portable).
pub fn gemm_par<T: WElem>(x: &[f32], m: usize, w: &[T], n: usize, k: usize, out: &mut [f32]) {
    assert!(x.len() >= m * k && out.len() >= m * n && w.len() >= n * k);
    let panel = panel_rows(n, k, rayon::current_num_threads());
    let outp = SendPtr(out.as_mut_ptr());
    parallel::for_each(n.div_ceil(panel), |p| {
        let (n0, n1) = (p * panel, ((p + 1) * panel).min(n));
        let wp = &w[n0 * k..n1 * k];
        let run = |panel: &[f32]| {
            // SAFETY: panel p writes only columns n0..n1 of the m output rows (row stride n);
            // x is m × k (row stride k); the panel is (n1 - n0) rows of k, read as the k × nb
            // right-hand side with row stride 1 and column stride k.
            unsafe {
                gemm::gemm(
                    m,
                    n1 - n0,
                    k,
                    outp.get().add(n0),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    panel.as_ptr(),
                    k as isize,
                    1,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            }
        };
        if let Some(f) = as_f32(wp) {
            run(f);
        } else {
            PANEL.with_borrow_mut(|buf| {
                buf.resize(wp.len(), 0.0);
                widen(wp, buf);
                run(buf);
            });
        }
    });
}

/// `Some` when the weights already are f32 (no widening needed).
fn as_f32<T: WElem>(w: &[T]) -> Option<&[f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: T is f32 (checked by TypeId), so the cast is the identity.
        .then(|| unsafe { std::slice::from_raw_parts(w.as_ptr() as *const f32, w.len()) })
}

#[cfg(test)]
#[path = "matmul_tests.rs"]
mod tests;
