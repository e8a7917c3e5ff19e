//! The inner kernels of `attention.rs`: scores (`q · k_j` for a run of positions) and `p · V`
//! (over the runs of a tile), each with an AVX2+FMA version and a scalar twin. Runs are the
//! pieces of a tile that are contiguous in the paged store (one block of one KV head).

/// Positions `p..p + n` of one sequence, contiguous in the store at `at` (`head_dim` apart):
/// the part of one block that a tile covers.
#[derive(Clone, Copy)]
pub(super) struct Run {
    pub at: *const f32,
    pub p: usize,
    pub n: usize,
}

/// `s[j] = (q · k_j) * scale` for `j < n`, `k_j` at `k + j * d`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn dots(
    q: *const f32,
    k: *const f32,
    d: usize,
    n: usize,
    scale: f32,
    s: *mut f32,
    simd: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if simd && d.is_multiple_of(8) {
        return x86::dots(q, k, d, d, 0, n, scale, s);
    }
    let _ = simd;
    let q = std::slice::from_raw_parts(q, d);
    for j in 0..n {
        let kj = std::slice::from_raw_parts(k.add(j * d), d);
        let mut acc = [0f32; 8];
        for (t, (&a, &b)) in q.iter().zip(kj).enumerate() {
            acc[t % 8] += a * b;
        }
        let dot = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
        *s.add(j) = dot * scale;
    }
}

/// `out[d0..d1] (+)= Σ_j p[j] · v_j[d0..d1]` over the positions `j < limit` of `runs` (`p` is
/// the scores row from position 0; `v_j` of run `r` at `r.at + (j - r.p) * d`), in order of
/// `j`, starting from zero when `init`. The output stays in registers across runs, so a tile
/// cut into blocks costs no extra loads and stores of it.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn pv(
    p: *const f32,
    runs: &[Run],
    limit: usize,
    d: usize,
    d0: usize,
    d1: usize,
    out: *mut f32,
    init: bool,
    simd: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if simd && (d1 - d0).is_multiple_of(8) && d0.is_multiple_of(8) {
        return x86::pv(p, runs, limit, d, d0, d1, out, init);
    }
    let _ = simd;
    let o = std::slice::from_raw_parts_mut(out.add(d0), d1 - d0);
    if init {
        o.fill(0.0);
    }
    for r in runs.iter().take_while(|r| r.p < limit) {
        for j in 0..r.n.min(limit - r.p) {
            let pj = *p.add(r.p + j);
            let vj = std::slice::from_raw_parts(r.at.add(j * d + d0), d1 - d0);
            for (a, &b) in o.iter_mut().zip(vj) {
                *a += pj * b;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Run;
    use crate::backend::cpu::simd::x86::hsum4;
    use std::arch::x86_64::*;

    /// Four positions per step: four independent accumulators, one q load per 4 FMAs, and one
    /// combined horizontal reduction (`hsum4`) per 4 scores. `d % 8 == 0`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dots(
        q: *const f32,
        k: *const f32,
        stride: usize,
        d: usize,
        j0: usize,
        j1: usize,
        scale: f32,
        s: *mut f32,
    ) {
        let sc = _mm_set1_ps(scale);
        let mut j = j0;
        while j + 4 <= j1 {
            let kp: [*const f32; 4] = std::array::from_fn(|i| k.add((j + i) * stride));
            let mut acc = [_mm256_setzero_ps(); 4];
            for t in (0..d).step_by(8) {
                let qv = _mm256_loadu_ps(q.add(t));
                for i in 0..4 {
                    acc[i] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kp[i].add(t)), acc[i]);
                }
            }
            _mm_storeu_ps(
                s.add(j),
                _mm_mul_ps(hsum4(acc[0], acc[1], acc[2], acc[3]), sc),
            );
            j += 4;
        }
        while j < j1 {
            // Same lane order as the 4-wide step (hsum4 with the other three slots unused).
            let kp = k.add(j * stride);
            let mut acc = _mm256_setzero_ps();
            for t in (0..d).step_by(8) {
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(t)), _mm256_loadu_ps(kp.add(t)), acc);
            }
            let z = _mm256_setzero_ps();
            *s.add(j) = _mm_cvtss_f32(hsum4(acc, z, z, z)) * scale;
            j += 1;
        }
    }

    /// Accumulates `p[j] · v_j` into `out[d0..d1]` over `runs` (from zero when `init`), up to
    /// 64 dims per pass with the accumulators in registers (one load + store of `out` per
    /// call, not per position or per run).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn pv(
        p: *const f32,
        runs: &[Run],
        limit: usize,
        stride: usize,
        d0: usize,
        d1: usize,
        out: *mut f32,
        init: bool,
    ) {
        let mut c = d0;
        while c < d1 {
            let step = match (d1 - c) / 8 {
                8.. => chunk::<8>(p, runs, limit, stride, c, out, init),
                4..=7 => chunk::<4>(p, runs, limit, stride, c, out, init),
                2..=3 => chunk::<2>(p, runs, limit, stride, c, out, init),
                _ => chunk::<1>(p, runs, limit, stride, c, out, init),
            };
            c += step;
        }
    }

    /// Dims `c..c + 8·NV`; returns `8·NV`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn chunk<const NV: usize>(
        p: *const f32,
        runs: &[Run],
        limit: usize,
        stride: usize,
        c: usize,
        out: *mut f32,
        init: bool,
    ) -> usize {
        let o = out.add(c);
        let mut acc: [__m256; NV] = if init {
            [_mm256_setzero_ps(); NV]
        } else {
            std::array::from_fn(|i| _mm256_loadu_ps(o.add(8 * i)))
        };
        for r in runs.iter().take_while(|r| r.p < limit) {
            for j in 0..r.n.min(limit - r.p) {
                let pj = _mm256_set1_ps(*p.add(r.p + j));
                let vj = r.at.add(j * stride + c);
                for (i, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj.add(8 * i)), *a);
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(o.add(8 * i), *a);
        }
        8 * NV
    }
}
