//! Weight matrices ([`CpuMatrix`]) and `out = x · Wᵀ` with f32 accumulation.
//!
//! Weights stay in their stored 16-bit format: decode is memory-bandwidth bound (every weight
//! byte is read once per token), so widening them to f32 would double the bytes per token.
//! Two regimes:
//! - few rows (decode, `rows ≤ SMALL_ROWS`): a hand-written AVX2+FMA kernel streams each weight
//!   row once, widens bf16/f16 → f32 in registers and multiplies it with up to 4 activation rows
//!   at a time; rayon splits the output features into a few contiguous chunks per thread.
//! - many rows (prefill): each rayon task widens a panel of weight rows to f32 in a per-thread
//!   scratch and hands it to the `gemm` crate (single-threaded inside the task).
//!
//! Both have scalar twins (used when AVX2/FMA are absent) that agree within float rounding.

use super::simd::{self, WElem};
use crate::error::BackendError;
use crate::model::tensor::{HostData, HostTensor};
use half::{bf16, f16};
use rayon::prelude::*;
use std::cell::RefCell;

/// At or below this many activation rows the streaming kernel beats widening panels for gemm
/// (measured with `bench_kernels`: the crossover on Zen 3 is between 8 and 16 rows).
pub const SMALL_ROWS: usize = 8;

/// Weight data in its stored format.
#[derive(Debug, Clone)]
pub enum WData {
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
    F32(Vec<f32>),
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
        let data = if same(|d| matches!(d, HostData::F32(_))) {
            WData::F32(parts.iter().flat_map(|p| p.data.to_f32()).collect())
        } else if matches!(first.data, HostData::F16(_)) {
            let mut v = Vec::with_capacity(rows * cols);
            for p in parts {
                match &p.data {
                    HostData::F16(d) => v.extend_from_slice(d),
                    HostData::F32(d) => v.extend(d.iter().map(|&x| f16::from_f32(x))),
                    HostData::Bf16(d) => v.extend(d.iter().map(|x| f16::from_f32(x.to_f32()))),
                }
            }
            WData::F16(v)
        } else {
            let mut v = Vec::with_capacity(rows * cols);
            for p in parts {
                match &p.data {
                    HostData::Bf16(d) => v.extend_from_slice(d),
                    other => v.extend(other.to_bf16()),
                }
            }
            WData::Bf16(v)
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

/// A raw output pointer shared by tasks that write disjoint columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks holding an `OutPtr` write disjoint element ranges (see each use).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}
impl OutPtr {
    /// Closures call this rather than read `.0`: edition-2021 closures would capture the bare
    /// field and lose the `Send`/`Sync` wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// The streaming path, parallel over contiguous chunks of output features. Few chunks (2 per
/// thread) keep the fork/join overhead at a few microseconds per call while leaving slack for
/// an uneven VM; chunk bounds are multiples of 8 so the 4-row weight blocks stay aligned.
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
        (2 * threads).min(n.div_ceil(8))
    };
    let step = n.div_ceil(chunks).next_multiple_of(8);
    let outp = OutPtr(out.as_mut_ptr());
    let run = |c: usize| {
        let (n0, n1) = (c * step, ((c + 1) * step).min(n));
        if n0 < n1 {
            // SAFETY: chunk `c` writes only columns n0..n1 of each of the m output rows, and the
            // asserts above bound every read and write.
            unsafe { matvec_range(x, m, w, n, k, outp, n0, n1, simd) }
        }
    };
    if chunks == 1 {
        run(0);
    } else {
        (0..chunks).into_par_iter().with_max_len(1).for_each(run);
    }
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
    out: OutPtr,
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
mod avx2 {
    use super::super::simd::x86::{hsum, load8};
    use super::super::simd::WElem;
    use std::arch::x86_64::*;

    /// Weight rows per block when more than 4 activation rows share it: the block (16 rows ×
    /// K × 2 bytes ≤ 48 KiB for K = 1536) stays in L1/L2 while each group of ≤ 4 rows passes.
    const WBLOCK: usize = 16;

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
                match rg {
                    1 => rows::<T, 1, 4>(xr, w, k, o, n, b0, b1),
                    2 => rows::<T, 2, 4>(xr, w, k, o, n, b0, b1),
                    3 => rows::<T, 3, 2>(xr, w, k, o, n, b0, b1),
                    _ => rows::<T, 4, 2>(xr, w, k, o, n, b0, b1),
                }
                r0 += rg;
            }
            b0 = b1;
        }
    }

    /// `R` activation rows against weight rows `j0..j1`, `NB` weight rows at a time (then one at
    /// a time for the remainder). Accumulators: `R × NB` vectors, ≤ 8, plus `R` x vectors.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows<T: WElem, const R: usize, const NB: usize>(
        x: *const f32,
        w: *const T,
        k: usize,
        out: *mut f32,
        ldo: usize,
        j0: usize,
        j1: usize,
    ) {
        let mut j = j0;
        while j + NB <= j1 {
            block::<T, R, NB>(x, w.add(j * k), k, out.add(j), ldo);
            j += NB;
        }
        while j < j1 {
            block::<T, R, 1>(x, w.add(j * k), k, out.add(j), ldo);
            j += 1;
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block<T: WElem, const R: usize, const NB: usize>(
        x: *const f32,
        w: *const T,
        k: usize,
        out: *mut f32,
        ldo: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); NB]; R];
        let k8 = k & !7;
        let mut kk = 0;
        while kk < k8 {
            let xv: [__m256; R] = std::array::from_fn(|r| _mm256_loadu_ps(x.add(r * k + kk)));
            for j in 0..NB {
                let wv = load8(w.add(j * k + kk));
                for r in 0..R {
                    acc[r][j] = _mm256_fmadd_ps(wv, xv[r], acc[r][j]);
                }
            }
            kk += 8;
        }
        for r in 0..R {
            for j in 0..NB {
                let mut s = hsum(acc[r][j]);
                for t in k8..k {
                    s += *x.add(r * k + t) * (*w.add(j * k + t)).to_f32();
                }
                *out.add(r * ldo + j) = s;
            }
        }
    }
}

thread_local! {
    /// Per-thread f32 panel for the prefill path (reused across calls; grows to the largest
    /// `panel × K` seen, ≤ 1.5 MiB for the default model).
    static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Rows of W per gemm task in the prefill path: big enough that packing X once per panel is
/// amortized, small enough that the widened panel stays near L2 and that there are at least
/// 4 panels per thread for balance.
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
    let outp = OutPtr(out.as_mut_ptr());
    (0..n.div_ceil(panel))
        .into_par_iter()
        .with_max_len(1)
        .for_each(|p| {
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

/// Variant B of the prefill path: widen big slabs of W (≤ 8 MiB of f32) in parallel, then one
/// `gemm` call per slab that parallelizes internally.
pub fn gemm_slabs<T: WElem>(x: &[f32], m: usize, w: &[T], n: usize, k: usize, out: &mut [f32]) {
    let slab = ((2usize << 20) / k.max(1)).max(16);
    let threads = rayon::current_num_threads();
    let mut buf = Vec::new();
    for n0 in (0..n).step_by(slab) {
        let n1 = (n0 + slab).min(n);
        let wp = &w[n0 * k..n1 * k];
        let panel: &[f32] = match as_f32(wp) {
            Some(f) => f,
            None => {
                buf.resize(wp.len(), 0.0);
                buf.par_chunks_mut(64 * 1024)
                    .zip(wp.par_chunks(64 * 1024))
                    .for_each(|(o, s)| widen(s, o));
                &buf
            }
        };
        // SAFETY: as in `gemm_par`, for the whole slab.
        unsafe {
            gemm::gemm(
                m,
                n1 - n0,
                k,
                out.as_mut_ptr().add(n0),
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
                gemm::Parallelism::Rayon(threads),
            );
        }
    }
}

/// `Some` when the weights already are f32 (no widening needed).
fn as_f32<T: WElem>(w: &[T]) -> Option<&[f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: T is f32 (checked by TypeId), so the cast is the identity.
        .then(|| unsafe { std::slice::from_raw_parts(w.as_ptr() as *const f32, w.len()) })
}

#[cfg(test)]
mod tests {
    use super::*;
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

    #[test]
    fn all_paths_match_f64_reference() {
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
        ];
        for (i, &(m, n, k)) in shapes.iter().enumerate() {
            for kind in 0..3u8 {
                let wt = tensor("w", n, k, &mut rng, kind);
                let w = CpuMatrix::from_parts(&[&wt]).unwrap();
                let wf = wf32(&w);
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0f32..2.0)).collect();
                let want = reference(&x, m, &wf, n, k);
                let mut out = vec![f32::NAN; m * n];
                matmul(&x, m, &w, &mut out);
                check(&out, &want, &x, m, &wf, n, k);
                // Force each path explicitly, whatever the row count.
                let paths: &[bool] = if simd::avx2_fma() {
                    &[false, true]
                } else {
                    &[false]
                };
                for &s in paths {
                    out.fill(f32::NAN);
                    match &w.data {
                        WData::Bf16(d) => matvec_par(&x, m, d, n, k, &mut out, s),
                        WData::F16(d) => matvec_par(&x, m, d, n, k, &mut out, s),
                        WData::F32(d) => matvec_par(&x, m, d, n, k, &mut out, s),
                    }
                    check(&out, &want, &x, m, &wf, n, k);
                }
                out.fill(f32::NAN);
                match &w.data {
                    WData::Bf16(d) => gemm_par(&x, m, d, n, k, &mut out),
                    WData::F16(d) => gemm_par(&x, m, d, n, k, &mut out),
                    WData::F32(d) => gemm_par(&x, m, d, n, k, &mut out),
                }
                check(&out, &want, &x, m, &wf, n, k);
                let _ = i;
            }
        }
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
}
