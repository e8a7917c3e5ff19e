//! SIMD primitives for the CPU backend: runtime feature detection (checked once, cached), the
//! weight element formats the kernels read (bf16 / f16 / f32) and the AVX2+FMA helpers shared
//! by the kernels (widening loads, horizontal sums, a vectorized `exp`).
//!
//! Binaries are built for generic x86-64, so every AVX2 function carries
//! `#[target_feature(enable = "avx2,fma,f16c")]` and is only called after [`avx2_fma`] said yes.
//! Every kernel also has a portable scalar twin that gives the same result within float
//! rounding; setting `KVSERVE_CPU_NO_SIMD=1` forces the scalar twins (for debugging).

use half::{bf16, f16};
use std::sync::OnceLock;

/// True when the CPU has AVX2, FMA and F16C (every AVX2 CPU since Haswell / Zen 1 has all
/// three) and `KVSERVE_CPU_NO_SIMD` is not set.
pub fn avx2_fma() -> bool {
    static DETECTED: OnceLock<bool> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        if std::env::var_os("KVSERVE_CPU_NO_SIMD").is_some_and(|v| v != "0") {
            return false;
        }
        detect()
    })
}

/// Compiles a portable function a second time for AVX2 (8 lanes per instruction where the
/// generic x86-64 build has SSE's 4), taken when the CPU has it: the same operations in the
/// same order (Rust never contracts to FMA), so the same bits either way. For plain loops the
/// compiler vectorizes (the sampler's vocabulary passes, the greedy argmax).
macro_rules! avx2_twin {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty => $portable:ident) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            if crate::backend::cpu::simd::avx2_fma() {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    $portable($($arg),*)
                }
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                return unsafe { avx2($($arg),*) };
            }
            $portable($($arg),*)
        }
    };
}
pub(crate) use avx2_twin;

#[cfg(target_arch = "x86_64")]
fn detect() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> bool {
    false
}

/// Which format a weight element has; lets one generic kernel pick its widening load at
/// monomorphization time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElemKind {
    Bf16,
    F16,
    F32,
}

/// A weight element the matmul kernels can read. Conversion to f32 is exact for all three.
pub trait WElem: Copy + Send + Sync + 'static {
    const KIND: ElemKind;
    fn to_f32(self) -> f32;
}

impl WElem for bf16 {
    const KIND: ElemKind = ElemKind::Bf16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // bf16 is the top half of an f32: widening is a shift, exactly.
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

impl WElem for f16 {
    const KIND: ElemKind = ElemKind::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

impl WElem for f32 {
    const KIND: ElemKind = ElemKind::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

/// Scalar `exp` used by every scalar twin (libm `expf`, correctly rounded in practice).
#[inline(always)]
pub fn exp_scalar(x: f32) -> f32 {
    x.exp()
}

#[cfg(target_arch = "x86_64")]
pub mod x86 {
    //! AVX2+FMA(+F16C) helpers. Callers must have checked [`super::avx2_fma`].
    use super::{ElemKind, WElem};
    use std::arch::x86_64::*;

    /// Loads 8 consecutive weight elements at `p` and widens them to f32 lanes.
    ///
    /// # Safety
    /// `p..p+8` must be readable; the CPU must support AVX2, FMA and F16C.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn load8<T: WElem>(p: *const T) -> __m256 {
        match T::KIND {
            ElemKind::Bf16 => {
                // Zero-extend u16 → u32, shift into the high half: the exact bf16 → f32 widening.
                let h = _mm_loadu_si128(p as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            }
            ElemKind::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
            ElemKind::F32 => _mm256_loadu_ps(p as *const f32),
        }
    }

    /// Sum of the 8 lanes (fixed pairwise order, so results are deterministic).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA (check [`super::avx2_fma`]).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Horizontal sums of four vectors at once: lane `i` of the result is `hsum(v_i)`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA (check [`super::avx2_fma`]).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn hsum4(a: __m256, b: __m256, c: __m256, d: __m256) -> __m128 {
        let ab = _mm256_hadd_ps(a, b);
        let cd = _mm256_hadd_ps(c, d);
        let abcd = _mm256_hadd_ps(ab, cd);
        _mm_add_ps(
            _mm256_castps256_ps128(abcd),
            _mm256_extractf128_ps::<1>(abcd),
        )
    }

    /// Vectorized `exp` (Cephes `expf` scheme: Cody-Waite range reduction by ln 2, degree-6
    /// polynomial, exponent by integer add). Error ≤ 2 ulp over the normal range, the same class
    /// as the SLEEF `expf` (1 ulp) that torch's vectorized CPU softmax and SiLU use.
    /// Inputs below ln(f32::MIN_POSITIVE) give 0 and above ln(f32::MAX) give +inf, as torch does.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA (check [`super::avx2_fma`]).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn exp8(x: __m256) -> __m256 {
        const HI: f32 = 88.722_84; // ln(f32::MAX)
        const LO: f32 = -87.336_55; // ln(f32::MIN_POSITIVE): keeps 2^n a normal number
        let too_big = _mm256_cmp_ps::<_CMP_GT_OQ>(x, _mm256_set1_ps(HI));
        let too_small = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(LO));
        let xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(LO)), _mm256_set1_ps(HI));
        // n = round(x / ln 2); r = x - n ln 2 in two steps (ln 2 = C1 + C2, C1 exact in 9 bits).
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(xc, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), xc);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.398_2e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.333_452e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166_579_6e-2));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.666_666_5e-1));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5));
        let r2 = _mm256_mul_ps(r, r);
        let y = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
        // 2^n: n is in [-126, 128]; n = 128 only when x ≈ HI, where y < 1 keeps the product
        // finite except at the true overflow boundary (handled by `too_big`). Split 2^n into
        // 2^(n/2)·2^(n-n/2) so both factors are normal numbers.
        let ni = _mm256_cvtps_epi32(n);
        let n1 = _mm256_srai_epi32::<1>(ni);
        let n2 = _mm256_sub_epi32(ni, n1);
        let bias = _mm256_set1_epi32(127);
        let s1 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(n1, bias)));
        let s2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(n2, bias)));
        let res = _mm256_mul_ps(_mm256_mul_ps(y, s1), s2);
        let res = _mm256_blendv_ps(res, _mm256_set1_ps(f32::INFINITY), too_big);
        _mm256_blendv_ps(res, _mm256_setzero_ps(), too_small)
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::x86::*;
    use super::*;
    use half::bf16;
    use std::arch::x86_64::{__m256, _mm256_loadu_ps, _mm256_storeu_ps, _mm_storeu_ps};

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp8_matches_libm_within_2_ulp() {
        if !avx2_fma() {
            return;
        }
        let mut worst = 0;
        let mut x = -87.0f32;
        while x < 88.5 {
            let xs: [f32; 8] = std::array::from_fn(|i| x + i as f32 * 0.001_37);
            let mut got = [0f32; 8];
            // SAFETY: AVX2/FMA checked above; arrays hold 8 floats.
            unsafe { _mm256_storeu_ps(got.as_mut_ptr(), exp8(_mm256_loadu_ps(xs.as_ptr()))) };
            for i in 0..8 {
                let want = (xs[i] as f64).exp() as f32;
                if want.is_finite() {
                    worst = worst.max(ulps(got[i], want));
                }
            }
            x += 0.0173;
        }
        assert!(worst <= 2, "worst error {worst} ulp");
        let special = [
            -1000.0f32,
            -88.0,
            f32::NEG_INFINITY,
            0.0,
            89.0,
            f32::INFINITY,
            -0.0,
            1.0,
        ];
        let mut got = [0f32; 8];
        // SAFETY: as above.
        unsafe { _mm256_storeu_ps(got.as_mut_ptr(), exp8(_mm256_loadu_ps(special.as_ptr()))) };
        assert_eq!(got[0], 0.0);
        assert_eq!(got[2], 0.0);
        assert_eq!(got[3], 1.0);
        assert_eq!(got[4], f32::INFINITY);
        assert_eq!(got[5], f32::INFINITY);
        assert_eq!(got[6], 1.0);
        assert!(ulps(got[7], std::f32::consts::E) <= 1);
    }

    #[test]
    fn widening_loads_are_exact() {
        if !avx2_fma() {
            return;
        }
        let vals = [1.5f32, -2.25, 65504.0, 1e-3, -0.0, 3.140625, 1e-7, -7.0];
        let b: Vec<bf16> = vals.iter().map(|&v| bf16::from_f32(v)).collect();
        let h: Vec<f16> = vals.iter().map(|&v| f16::from_f32(v)).collect();
        let (mut gb, mut gh) = ([0f32; 8], [0f32; 8]);
        // SAFETY: AVX2/FMA/F16C checked above; 8 elements each.
        unsafe {
            _mm256_storeu_ps(gb.as_mut_ptr(), load8(b.as_ptr()));
            _mm256_storeu_ps(gh.as_mut_ptr(), load8(h.as_ptr()));
        }
        for i in 0..8 {
            assert_eq!(gb[i].to_bits(), b[i].to_f32().to_bits());
            assert_eq!(gh[i].to_bits(), h[i].to_f32().to_bits());
            assert_eq!(WElem::to_f32(b[i]).to_bits(), b[i].to_f32().to_bits());
        }
    }

    #[test]
    fn hsum4_matches_hsum() {
        if !avx2_fma() {
            return;
        }
        let v: [[f32; 8]; 4] = std::array::from_fn(|i| std::array::from_fn(|j| (i * 8 + j) as f32));
        let mut out = [0f32; 4];
        // SAFETY: AVX2 checked above.
        unsafe {
            let l: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(v[i].as_ptr()));
            _mm_storeu_ps(out.as_mut_ptr(), hsum4(l[0], l[1], l[2], l[3]));
            for i in 0..4 {
                assert_eq!(out[i], hsum(l[i]));
            }
        }
    }
}
