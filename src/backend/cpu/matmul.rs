//! Weight matrices ([`CpuMatrix`]) and `out = x · Wᵀ` with f32 accumulation, batch-invariant.
//!
//! **Determinism contract.** Every output element is computed as
//! `acc = 0; for k in 0..K { acc = fma(x[r, k], W[n, k], acc) }`: one fused multiply-add per
//! `k`, in `k` order, whatever the number of rows, the tile that holds the element or the
//! thread split. A row's result therefore never depends on the other rows of the step: a
//! sequence gives the same bits alone or batched with others, decoded token by token or
//! recomputed as a prompt (preemption by recompute), and the scalar twin (`f32::mul_add`)
//! gives the same bits as the AVX2 kernel.
//!
//! **Layout.** Weights stay in their stored 16-bit format (decode is memory-bandwidth bound:
//! every weight byte is read once per token, so widening to f32 would double the bytes), packed
//! for an outer-product kernel: output features in groups of [`GROUP`] = 32, each group stored
//! `[K][32]` (feature-minor: one 64-byte line of bf16 per `k`), groups one after another; the
//! last group is only as wide as the remaining features rounded up to 16 (zero padding).
//! Vector lanes run over output features and `x[r, k]` is broadcast, so no horizontal sums are
//! needed and the accumulation order is the plain sequence over `k` above.
//!
//! **Kernels.** A tile is `R ≤ 6` activation rows × `S ≤ 2` sub-panels of 16 features (two
//! vectors each) of one group, over all of `K`: `2·R·S ≤ 12` accumulators in registers, the
//! weights widened in registers (a shift for bf16). Rows are cut into balanced tiles (8 = 4 + 4).
//! Few rows (decode, `≤ SMALL_ROWS`): tasks are runs of whole groups, so each thread streams one
//! contiguous range of weights, with software prefetch (the hardware prefetcher stops at page
//! boundaries): 1 row streams 1 KiB ahead; from 2 rows, the passes over a group (row tiles ×
//! sub-panels) prefetch the next group a slice each (`PfPlan`), so that its DRAM reads overlap
//! all of the compute instead of stalling the first pass (`bench_kernels dram`, whole model
//! from DRAM: ×1.1–1.4 at 2–32 rows, and 16 rows from DRAM as fast as from L2/L3). Many rows
//! (prompts): tasks are one group × `ROW_CHUNK` rows. Tasks are claimed dynamically.
//! `bench_kernels` on the Zen 3 VM: at or above the previous streaming-kernel + `gemm`-crate
//! pair at every row count (it replaced them; the `gemm` path was not batch-invariant).
//!
//! Weights live in huge-page memory (`arena.rs`).

use super::arena::WeightBuf;
use super::parallel::{self, SendPtr};
use super::simd::{self, WElem};

#[path = "matmul_pack.rs"]
mod pack;
use pack::group_width;
pub use pack::{CpuMatrix, WData};

/// Output features per packed group.
pub const GROUP: usize = 32;
/// Output features per sub-panel (two 8-lane vectors).
const SUB: usize = 16;
/// Activation rows per tile in the prompt regime.
const TILE_ROWS: usize = 6;
/// Above this many rows, tasks also split rows (in chunks of `ROW_CHUNK`).
const SMALL_ROWS: usize = 32;
const ROW_CHUNK: usize = 96;

/// Benchmark switch: `false` turns off the next-group prefetch of the 2..=`SMALL_ROWS` regime
/// (the previous kernel), so `bench_kernels` can compare both in one run. Not for production.
#[doc(hidden)]
pub static GROUP_PREFETCH: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// `out[r, n] = Σ_k x[r, k] · W[n, k]` for `r < rows` (see the determinism contract). `x`
/// holds at least `rows × w.cols` floats and `out` at least `rows × w.rows`.
pub fn matmul(x: &[f32], rows: usize, w: &CpuMatrix, out: &mut [f32]) {
    matmul_with(x, rows, w, out, simd::avx2_fma());
}

/// [`matmul`] with the kernel choice explicit (`simd = false`: the scalar twin).
pub fn matmul_with(x: &[f32], rows: usize, w: &CpuMatrix, out: &mut [f32], simd: bool) {
    let (n, k) = (w.rows, w.cols);
    let (x, out) = (&x[..rows * k], &mut out[..rows * n]);
    match &w.data {
        WData::Bf16(d) => matmul_t(x, rows, d, n, k, out, simd),
        WData::F16(d) => matmul_t(x, rows, d, n, k, out, simd),
        WData::F32(d) => matmul_t(x, rows, d, n, k, out, simd),
        WData::Quant(kind, d) => quant::matmul(x, rows, *kind, d, n, k, out, simd),
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
    let subs = n.div_ceil(SUB);
    assert!(x.len() >= m * k && out.len() >= m * n && w.len() >= subs * SUB * k);
    let outp = SendPtr(out.as_mut_ptr());
    // Few rows from 2 up: each task streams its groups with prefetch (see `PfPlan`).
    let stream = simd
        && (2..=SMALL_ROWS).contains(&m)
        && GROUP_PREFETCH.load(std::sync::atomic::Ordering::Relaxed);
    for_each_task(m, n, k, |cols, rows| {
        // SAFETY: each task writes only rows `rows` × features of sub-panels `cols` of `out`,
        // and the assert above bounds every read and write.
        unsafe { range(x, w, n, k, outp, cols, rows, simd, stream) }
    });
}

/// Runs `task(cols, rows)` over the product's tasks, in parallel: disjoint blocks of
/// sub-panels `cols` × rows `rows` that together cover the `m × n` output once.
///
/// Few rows: columns only, about 4 tasks per thread (slack for an uneven VM at a few µs per
/// call), and none below ~64 KiB of weights, where a fork/join costs more than it saves. Tasks
/// are whole groups, so that each streams one contiguous range of weights. Many rows: one group
/// × `ROW_CHUNK` rows. Shared by the float and the quantized products.
pub(super) fn for_each_task(
    m: usize,
    n: usize,
    k: usize,
    task: impl Fn(std::ops::Range<usize>, std::ops::Range<usize>) + Sync,
) {
    let subs = n.div_ceil(SUB);
    let per = GROUP / SUB;
    let (cstep, rstep) = if m <= SMALL_ROWS {
        let chunks = if n * k < 32 * 1024 {
            1
        } else {
            4 * rayon::current_num_threads()
        };
        (subs.div_ceil(per).div_ceil(chunks) * per, m)
    } else {
        (per, ROW_CHUNK)
    };
    let (ctasks, rtasks) = (subs.div_ceil(cstep), m.div_ceil(rstep));
    parallel::for_each(ctasks * rtasks, |t| {
        let (c, r) = (t / rtasks, t % rtasks);
        task(
            c * cstep..((c + 1) * cstep).min(subs),
            r * rstep..((r + 1) * rstep).min(m),
        );
    });
}

/// Sub-panels `cols` × rows `rows` of the product, group by group.
///
/// # Safety
/// `x` holds `rows.end` rows of `k`, `w` the packed matrix of `n` features, `out` `rows.end`
/// rows of `n`; nothing else writes this block of `out`.
#[allow(clippy::too_many_arguments)]
unsafe fn range<T: WElem>(
    x: &[f32],
    w: &[T],
    n: usize,
    k: usize,
    out: SendPtr<f32>,
    cols: std::ops::Range<usize>,
    rows: std::ops::Range<usize>,
    simd: bool,
    stream: bool,
) {
    let per = GROUP / SUB;
    let size = std::mem::size_of::<T>();
    let mut s = cols.start;
    while s < cols.end {
        let g = s / per;
        let (s0, s1) = (s - g * per, (cols.end - g * per).min(per));
        let col0 = g * GROUP + s0 * SUB;
        let t = Tile {
            x: x.as_ptr().add(rows.start * k),
            ldx: k,
            // Sub-panel s0 of group g, at k = 0.
            w: w.as_ptr().add(g * GROUP * k + s0 * SUB),
            ldw: group_width(n, g),
            k,
            out: out.get().add(rows.start * n + col0),
            ldo: n,
        };
        let valid = (n - col0).min((s1 - s0) * SUB);
        let mut pf = PfPlan::NONE;
        if stream {
            // Whole groups here (`cstep` is a multiple of `per`): `t.w` is the group's start.
            let own = (t.w as *const u8, group_width(n, g) * k * size);
            let next = ((g + 1) * per < cols.end).then(|| {
                let p = w.as_ptr().add((g + 1) * GROUP * k) as *const u8;
                (p, group_width(n, g + 1) * k * size)
            });
            pf = PfPlan::new(rows.len(), s1 - s0, k, own, next, s == cols.start);
        }
        row_tiles(t, rows.len(), s1 - s0, valid, simd, &mut pf);
        s = (g + 1) * per;
    }
}

/// `rows` rows from `t` on, in tiles of up to `TILE_ROWS` rows of balanced sizes (8 rows run
/// as 4 + 4, not 6 + 2: a 2-row tile leaves half the accumulator registers idle).
unsafe fn row_tiles<T: WElem>(
    t: Tile<T>,
    rows: usize,
    subs: usize,
    valid: usize,
    simd: bool,
    pf: &mut PfPlan,
) {
    let tiles = rows.div_ceil(TILE_ROWS);
    let mut r = 0;
    for i in 0..tiles {
        let rb = rows / tiles + usize::from(i < rows % tiles);
        let t = Tile {
            x: t.x.add(r * t.ldx),
            out: t.out.add(r * t.ldo),
            ..t
        };
        r += rb;
        #[cfg(target_arch = "x86_64")]
        if simd {
            avx2::tiles(t, rb, subs, valid, pf);
            continue;
        }
        let _ = (simd, &pf);
        scalar(t, rb, valid);
    }
}

/// Software prefetch for one group's passes in the 2..=`SMALL_ROWS` regime. A group is
/// computed in several passes over all of `K` (row tiles × sub-panels); only the first pulls
/// it from DRAM, at the compute pace of one tile, with the hardware prefetcher stopping at
/// every page. So the passes of group `g` prefetch group `g + 1` (the task's next weights, one
/// contiguous stream), a slice each, a line every few `k`: the DRAM reads overlap all of the
/// compute instead of stalling one pass. The first group of a task has nothing before it: its
/// first pass prefetches its own lines `PREFETCH_BYTES` ahead (the decode stream), the other
/// passes the next group. A group done in one pass (2 rows) streams its own lines ahead.
/// Prefetching changes no arithmetic.
#[derive(Clone, Copy)]
struct PfPlan {
    /// Prefetch for the next pass: `(address, k per step, lines per step)`, taken once.
    own: Option<Pf>,
    /// The next group's stream: the next pass's start, bytes per pass, and its rate.
    next: Option<(Pf, usize)>,
}

/// One pass's prefetches: from `at` on, `lines` consecutive 64-byte lines every `step` `k`.
#[derive(Clone, Copy)]
struct Pf {
    at: *const u8,
    step: usize,
    lines: usize,
}

/// Ahead of the own stream (the decode kernel's distance).
const PREFETCH_BYTES: usize = 1024;

impl PfPlan {
    const NONE: PfPlan = PfPlan {
        own: None,
        next: None,
    };

    /// Plan for a group of `subs` sub-panels × `rows` rows over `k`: `own` and `next` are the
    /// group's and the next group's (start, bytes); `first`: the task's first group.
    fn new(
        rows: usize,
        subs: usize,
        k: usize,
        own: (*const u8, usize),
        next: Option<(*const u8, usize)>,
        first: bool,
    ) -> PfPlan {
        if k == 0 {
            return PfPlan::NONE;
        }
        // Passes, as `avx2::tiles` runs them: 1 per tile of ≤ 2 rows, else one per sub-panel.
        let tiles = rows.div_ceil(TILE_ROWS);
        let passes: usize = (0..tiles)
            .map(|i| rows / tiles + usize::from(i < rows % tiles))
            .map(|rb| if rb <= 2 { 1 } else { subs })
            .sum();
        // `bytes` over `passes` passes of `k` steps: a rate of whole lines per step.
        let rate = |at: *const u8, bytes: usize, passes: usize| {
            let per_pass = bytes.div_ceil(64).div_ceil(passes);
            let (step, lines) = if per_pass >= k {
                (1, per_pass.div_ceil(k))
            } else {
                (k / per_pass, 1)
            };
            (Pf { at, step, lines }, k.div_ceil(step) * lines * 64)
        };
        let own_stream = rate(own.0.wrapping_add(PREFETCH_BYTES), own.1, 1).0;
        if passes == 1 {
            return PfPlan {
                own: Some(own_stream),
                next: None,
            };
        }
        let rest = passes - usize::from(first);
        PfPlan {
            own: first.then_some(own_stream),
            next: next.map(|(at, bytes)| rate(at, bytes, rest)),
        }
    }

    /// The prefetches of the next pass, if any.
    fn take(&mut self) -> Option<Pf> {
        if let Some(p) = self.own.take() {
            return Some(p);
        }
        let (p, adv) = self.next.as_mut()?;
        let cur = *p;
        p.at = p.at.wrapping_add(*adv);
        Some(cur)
    }
}

/// One block of work: `rows × valid` outputs at `out` (row stride `ldo`) from rows of `x`
/// (stride `ldx`) and the packed weights at `w` (stride `ldw` per `k`).
struct Tile<T> {
    x: *const f32,
    ldx: usize,
    w: *const T,
    ldw: usize,
    k: usize,
    out: *mut f32,
    ldo: usize,
}

/// The scalar twin: the same fused multiply-add sequence per element, so the same bits.
impl<T> Clone for Tile<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Tile<T> {}

unsafe fn scalar<T: WElem>(t: Tile<T>, rows: usize, valid: usize) {
    for r in 0..rows {
        for c in 0..valid {
            let mut acc = 0f32;
            for kk in 0..t.k {
                let wv = (*t.w.add(kk * t.ldw + c)).to_f32();
                acc = (*t.x.add(r * t.ldx + kk)).mul_add(wv, acc);
            }
            *t.out.add(r * t.ldo + c) = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
// Register-blocked kernels index `acc[r][v]` explicitly: clearer than iterator chains here.
#[allow(clippy::needless_range_loop)]
mod avx2 {
    use super::super::simd::x86::load8;
    use super::super::simd::WElem;
    use super::{Pf, PfPlan, Tile, PREFETCH_BYTES, SUB};
    use std::arch::x86_64::*;

    /// `rows` (≤ 6) × `subs` (≤ 2: one group) sub-panels, split into register tiles.
    #[target_feature(enable = "avx2,fma,f16c")]
    /// `pf` gives each pass (one `tile` call) its prefetches.
    pub(super) unsafe fn tiles<T: WElem>(
        t: Tile<T>,
        rows: usize,
        subs: usize,
        valid: usize,
        pf: &mut PfPlan,
    ) {
        let at = |s: usize| Tile {
            w: t.w.add(s * SUB),
            out: t.out.add(s * SUB),
            ..t
        };
        let v = |s: usize| valid.saturating_sub(s * SUB);
        match (rows, subs) {
            (1, 2) => tile::<T, 1, 2>(t, valid, None),
            (1, _) => tile::<T, 1, 1>(t, valid, None),
            (2, 2) => tile::<T, 2, 2>(t, valid, pf.take()),
            (2, _) => tile::<T, 2, 1>(t, valid, pf.take()),
            _ => {
                for s in 0..subs {
                    let p = pf.take();
                    match rows {
                        3 => tile::<T, 3, 1>(at(s), v(s), p),
                        4 => tile::<T, 4, 1>(at(s), v(s), p),
                        5 => tile::<T, 5, 1>(at(s), v(s), p),
                        _ => tile::<T, 6, 1>(at(s), v(s), p),
                    }
                }
            }
        }
    }

    /// `R` rows × `S` sub-panels over all of `K`; stores the first `valid` features.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<T: WElem, const R: usize, const S: usize>(
        t: Tile<T>,
        valid: usize,
        pf: Option<Pf>,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; 6];
        let size = std::mem::size_of::<T>();
        // `pf`: `lines` lines every `step` k (addresses may run past the matrix: prefetches
        // never fault, and wrapping_add keeps the address computation defined).
        let (step, lines, mut at) = match pf {
            Some(p) => (p.step, p.lines, p.at),
            None => (t.k.max(1), 0, std::ptr::null()),
        };
        let mut k0 = 0;
        while k0 < t.k {
            let k1 = (k0 + step).min(t.k);
            for l in 0..lines {
                _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(l * 64) as *const i8);
            }
            at = at.wrapping_add(lines * 64);
            for kk in k0..k1 {
                let wk = t.w.add(kk * t.ldw);
                if R == 1 {
                    // The decode stream: prefetch this k-row's lines PREFETCH_BYTES ahead (may run
                    // past the matrix: prefetches never fault, and wrapping_add keeps the address
                    // computation defined).
                    let ahead = (wk as *const u8).wrapping_add(PREFETCH_BYTES);
                    for l in (0..S * SUB * size).step_by(64) {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(l) as *const i8);
                    }
                }
                if R == 1 {
                    // Load and use each weight vector at once: 8 accumulators + 1 broadcast + 1 weight
                    // vector stay in registers (loading all 8 first would spill one accumulator).
                    let b = _mm256_broadcast_ss(&*t.x.add(kk));
                    for s in 0..S {
                        acc[s][0] = _mm256_fmadd_ps(b, load8(wk.add(s * SUB)), acc[s][0]);
                        acc[s][1] = _mm256_fmadd_ps(b, load8(wk.add(s * SUB + 8)), acc[s][1]);
                    }
                } else {
                    let b: [__m256; R] =
                        std::array::from_fn(|r| _mm256_broadcast_ss(&*t.x.add(r * t.ldx + kk)));
                    for s in 0..S {
                        let (w0, w1) = (load8(wk.add(s * SUB)), load8(wk.add(s * SUB + 8)));
                        for r in 0..R {
                            acc[r * S + s][0] = _mm256_fmadd_ps(b[r], w0, acc[r * S + s][0]);
                            acc[r * S + s][1] = _mm256_fmadd_ps(b[r], w1, acc[r * S + s][1]);
                        }
                    }
                }
            }
            k0 = k1;
        }
        for r in 0..R {
            let o = t.out.add(r * t.ldo);
            if valid >= S * SUB {
                for s in 0..S {
                    _mm256_storeu_ps(o.add(s * SUB), acc[r * S + s][0]);
                    _mm256_storeu_ps(o.add(s * SUB + 8), acc[r * S + s][1]);
                }
            } else {
                // The matrix's last, partial sub-panel: only `valid` features exist in `out`.
                let mut tmp = [0f32; 4 * SUB];
                for s in 0..S {
                    _mm256_storeu_ps(tmp.as_mut_ptr().add(s * SUB), acc[r * S + s][0]);
                    _mm256_storeu_ps(tmp.as_mut_ptr().add(s * SUB + 8), acc[r * S + s][1]);
                }
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), o, valid);
            }
        }
    }
}

#[path = "matmul_quant.rs"]
mod quant;
#[doc(hidden)]
pub use quant::REGISTER_ROWS as QUANT_REGISTER_ROWS;

#[cfg(test)]
#[path = "matmul_tests.rs"]
mod tests;
