//! Causal GQA attention of the CPU backend over its contiguous KV cache (`cache.rs`).
//!
//! Math (HF Llama eager, f32): `s_j = (q · k_j) * head_dim^-0.5`, `p = softmax(s)` (max
//! subtracted, multiplied by `1 / sum`), `out = Σ_j p_j v_j` summed in position order.
//! Every query is computed by the same per-query steps whatever the chunking or the thread
//! split, so a cache filled in several chunks gives bit-identical results to one big prefill.
//!
//! Work split: each task owns one KV head and a set of queries (the query heads of its GQA group
//! for some rows), and walks positions in tiles so that a tile of K (then V) is read from memory
//! once and reused from L1 by every query of the task. Prefill and decode run one task per
//! (row block, KV head). When there are fewer such tasks than threads (decode of an MQA model)
//! and the context is long, the three steps run as separate parallel phases instead: scores
//! over position chunks, softmax over queries, `p · V` over (KV head, slice of head_dim). (With
//! 3 KV heads on 2 threads the per-head tasks measured 5–15% faster than the phases, despite
//! the 2:1 split, because the phases pay two more fork/joins and a round trip of the scores.)

use super::cache::{CpuCache, LayerKv};
use super::ops::softmax;
use super::parallel;
use crate::backend::AttnShape;
use std::cell::RefCell;

/// Positions per tile: 64 × 64 dims × 4 bytes = 16 KiB of K or V, comfortably in L1.
const TILE: usize = 64;
/// Query rows per prefill task (× the group's heads = queries sharing each K/V tile).
const ROW_BLOCK: usize = 16;
/// Below this much work (queries × positions × head_dim) the phase split is not worth its syncs.
const SPLIT_MIN_WORK: usize = 1 << 20;

/// One query: its q vector, where its output goes, and how many positions it sees.
#[derive(Clone, Copy)]
struct Query {
    q: *const f32,
    out: *mut f32,
    len: usize,
}

/// Raw pointers moved into parallel chunks.
#[derive(Clone, Copy)]
struct Ptr<T>(T);
// SAFETY: every task writes a disjoint set of elements (stated at each use).
unsafe impl<T> Send for Ptr<T> {}
unsafe impl<T> Sync for Ptr<T> {}
impl<T: Copy> Ptr<T> {
    /// Closures must call this rather than read `.0`: edition-2021 closures capture the field
    /// itself, which would bypass the `Send`/`Sync` wrapper.
    fn get(self) -> T {
        self.0
    }
}

thread_local! {
    /// Per-thread scores of a prefill task: `[queries, positions]`.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Causal attention for `rows` fused `[q | k | v]` rows, row `i` at position `start_pos + i`.
/// Writes `[rows, num_heads * head_dim]` into `out`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    qkv: &[f32],
    rows: usize,
    start_pos: usize,
    shape: AttnShape,
    cache: &CpuCache,
    layer: usize,
    out: &mut [f32],
    simd: bool,
) {
    let AttnShape {
        num_heads,
        num_kv_heads,
        head_dim: d,
    } = shape;
    if rows == 0 || num_heads == 0 {
        return;
    }
    assert!(
        num_kv_heads > 0 && num_heads % num_kv_heads == 0,
        "bad GQA shape {shape:?}"
    );
    let (width, qw) = (shape.qkv_width(), shape.q_width());
    let (qkv, out) = (&qkv[..rows * width], &mut out[..rows * qw]);
    let group = num_heads / num_kv_heads;
    let cap = cache.capacity;
    debug_assert!(start_pos + rows <= cap, "attention past capacity {cap}");
    let kv = &cache.layers[layer];
    // HF: `scaling = head_dim ** -0.5` (a Python double) multiplies the f32 scores.
    let scale = (d as f64).powf(-0.5) as f32;
    let outp = out.as_mut_ptr();
    let query = |i: usize, h: usize| Query {
        q: qkv[i * width + h * d..].as_ptr(),
        // SAFETY (pointer arithmetic): i < rows and h < num_heads keep it inside `out`.
        out: unsafe { outp.add(i * qw + h * d) },
        // Positions 0..=start+i, clamped to what the cache holds.
        len: (start_pos + i + 1).min(cap),
    };
    let kvw = shape.kv_width();
    let work = rows * num_heads * (start_pos + rows) * d;
    if rows * num_kv_heads < rayon::current_num_threads() && work >= SPLIT_MIN_WORK {
        let qs: Vec<Query> = (0..rows)
            .flat_map(|i| (0..num_heads).map(move |h| (i, h)))
            .map(|(i, h)| query(i, h))
            .collect();
        // Query `i * num_heads + h` uses KV head h / group.
        return split_phases(&qs, |qi| (qi % num_heads) / group, kv, kvw, d, scale, simd);
    }
    let blocks = rows.div_ceil(ROW_BLOCK);
    let tasks: Vec<Vec<Query>> = (0..blocks * num_kv_heads)
        .map(|t| {
            let (b, g) = (t / num_kv_heads, t % num_kv_heads);
            let rows_b = b * ROW_BLOCK..((b + 1) * ROW_BLOCK).min(rows);
            rows_b
                .flat_map(|i| (g * group..(g + 1) * group).map(move |h| (i, h)))
                .map(|(i, h)| query(i, h))
                .collect()
        })
        .collect();
    let tasks = Ptr(&tasks);
    let body = |t: usize| {
        let g = t % num_kv_heads;
        let qs = &tasks.get()[t];
        SCORES.with_borrow_mut(|scores| {
            // SAFETY: task t writes only the outputs of its own queries (rows of its block,
            // heads of KV group g); all pointers are in bounds by construction.
            unsafe {
                attend(
                    qs,
                    kv.k.as_ptr().add(g * d),
                    kv.v.as_ptr().add(g * d),
                    kvw,
                    d,
                    scale,
                    scores,
                    simd,
                )
            }
        })
    };
    parallel::for_each(tasks.get().len(), body);
}

/// All three steps for a set of queries sharing one KV head (`k`, `v` point at that head of
/// position 0; `stride` floats between positions).
///
/// # Safety
/// Every query's `q` must hold `d` floats, `out` must hold `d` writable floats, and `k`/`v`
/// must hold `len` positions.
#[allow(clippy::too_many_arguments)]
unsafe fn attend(
    qs: &[Query],
    k: *const f32,
    v: *const f32,
    stride: usize,
    d: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    simd: bool,
) {
    let lmax = qs.iter().map(|q| q.len).max().unwrap_or(0);
    scores.resize(qs.len() * lmax, 0.0);
    for t0 in (0..lmax).step_by(TILE) {
        for (qi, q) in qs.iter().enumerate() {
            let t1 = (t0 + TILE).min(q.len);
            if t0 < t1 {
                let s = &mut scores[qi * lmax..];
                dots(q.q, k, stride, d, t0, t1, scale, s.as_mut_ptr(), simd);
            }
        }
    }
    for (qi, q) in qs.iter().enumerate() {
        softmax(&mut scores[qi * lmax..qi * lmax + q.len], simd);
    }
    for t0 in (0..lmax).step_by(TILE) {
        for (qi, q) in qs.iter().enumerate() {
            let t1 = (t0 + TILE).min(q.len);
            if t0 < t1 {
                pv(
                    scores.as_ptr().add(qi * lmax),
                    v,
                    stride,
                    t0,
                    t1,
                    0,
                    d,
                    q.out,
                    simd,
                );
            }
        }
    }
}

/// Decode with a long context: the three steps as separate parallel phases, so that 2 cores
/// share even 1 KV head. Same per-query arithmetic as [`attend`].
fn split_phases(
    qs: &[Query],
    kv_head: impl Fn(usize) -> usize + Sync,
    kv: &LayerKv,
    stride: usize,
    d: usize,
    scale: f32,
    simd: bool,
) {
    let lmax = qs.iter().map(|q| q.len).max().unwrap_or(0);
    let mut scores = vec![0f32; qs.len() * lmax];
    let sp = Ptr(scores.as_mut_ptr());
    let chunks = lmax.div_ceil(4 * TILE).max(1);
    let qs_p = Ptr(qs);
    // Phase 1: scores over position chunks; chunk c writes scores[.., c's positions].
    parallel::for_each(chunks, |c| {
        for t0 in (c * 4 * TILE..((c + 1) * 4 * TILE).min(lmax)).step_by(TILE) {
            for (qi, q) in qs_p.get().iter().enumerate() {
                let t1 = (t0 + TILE).min(q.len);
                if t0 < t1 {
                    let kh = kv.k[kv_head(qi) * d..].as_ptr();
                    // SAFETY: disjoint positions per chunk; in bounds as in `attend`.
                    unsafe {
                        dots(
                            q.q,
                            kh,
                            stride,
                            d,
                            t0,
                            t1,
                            scale,
                            sp.get().add(qi * lmax),
                            simd,
                        )
                    }
                }
            }
        }
    });
    // Phase 2: softmax per query.
    parallel::for_each(qs.len(), |qi| {
        // SAFETY: query qi's scores row is touched by this chunk only.
        let s =
            unsafe { std::slice::from_raw_parts_mut(sp.get().add(qi * lmax), qs_p.get()[qi].len) };
        softmax(s, simd);
    });
    // Phase 3: p · V over (query set of one KV head, slice of head_dim).
    let dslice = if d.is_multiple_of(32) { 32 } else { d };
    let nheads = (0..qs.len()).map(&kv_head).max().map_or(0, |m| m + 1);
    let sp = Ptr(scores.as_ptr());
    parallel::for_each(nheads * (d / dslice), |t| {
        let (g, d0) = (t / (d / dslice), (t % (d / dslice)) * dslice);
        let vh = kv.v[g * d..].as_ptr();
        for t0 in (0..lmax).step_by(TILE) {
            for (qi, q) in qs_p
                .get()
                .iter()
                .enumerate()
                .filter(|(qi, _)| kv_head(*qi) == g)
            {
                let t1 = (t0 + TILE).min(q.len);
                if t0 < t1 {
                    // SAFETY: task t writes dims d0..d0+dslice of the outputs of KV head g's
                    // queries only.
                    unsafe {
                        pv(
                            sp.get().add(qi * lmax),
                            vh,
                            stride,
                            t0,
                            t1,
                            d0,
                            d0 + dslice,
                            q.out,
                            simd,
                        )
                    }
                }
            }
        }
    });
}

/// `s[j] = (q · k_j) * scale` for `j` in `j0..j1`.
#[allow(clippy::too_many_arguments)]
unsafe fn dots(
    q: *const f32,
    k: *const f32,
    stride: usize,
    d: usize,
    j0: usize,
    j1: usize,
    scale: f32,
    s: *mut f32,
    simd: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if simd && d.is_multiple_of(8) {
        return x86::dots(q, k, stride, d, j0, j1, scale, s);
    }
    let _ = simd;
    let q = std::slice::from_raw_parts(q, d);
    for j in j0..j1 {
        let kj = std::slice::from_raw_parts(k.add(j * stride), d);
        let mut acc = [0f32; 8];
        for (t, (&a, &b)) in q.iter().zip(kj).enumerate() {
            acc[t % 8] += a * b;
        }
        let dot = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
        *s.add(j) = dot * scale;
    }
}

/// `out[d0..d1] (+)= Σ_{j in j0..j1} p[j] · v_j[d0..d1]`, starting from zero when `j0 == 0`.
#[allow(clippy::too_many_arguments)]
unsafe fn pv(
    p: *const f32,
    v: *const f32,
    stride: usize,
    j0: usize,
    j1: usize,
    d0: usize,
    d1: usize,
    out: *mut f32,
    simd: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if simd && (d1 - d0).is_multiple_of(8) && d0.is_multiple_of(8) {
        return x86::pv(p, v, stride, j0, j1, d0, d1, out);
    }
    let _ = simd;
    let o = std::slice::from_raw_parts_mut(out.add(d0), d1 - d0);
    if j0 == 0 {
        o.fill(0.0);
    }
    for j in j0..j1 {
        let pj = *p.add(j);
        let vj = std::slice::from_raw_parts(v.add(j * stride + d0), d1 - d0);
        for (a, &b) in o.iter_mut().zip(vj) {
            *a += pj * b;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::simd::x86::hsum4;
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

    /// Accumulates `p[j] · v_j` into `out[d0..d1]` for `j0..j1`, up to 64 dims per pass with
    /// the accumulators in registers (one load + store of `out` per tile, not per position).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn pv(
        p: *const f32,
        v: *const f32,
        stride: usize,
        j0: usize,
        j1: usize,
        d0: usize,
        d1: usize,
        out: *mut f32,
    ) {
        let mut c = d0;
        while c < d1 {
            match (d1 - c) / 8 {
                8.. => chunk::<8>(p, v, stride, j0, j1, c, out),
                4..=7 => chunk::<4>(p, v, stride, j0, j1, c, out),
                2..=3 => chunk::<2>(p, v, stride, j0, j1, c, out),
                _ => chunk::<1>(p, v, stride, j0, j1, c, out),
            }
            c += match (d1 - c) / 8 {
                8.. => 64,
                4..=7 => 32,
                2..=3 => 16,
                _ => 8,
            };
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn chunk<const NV: usize>(
        p: *const f32,
        v: *const f32,
        stride: usize,
        j0: usize,
        j1: usize,
        c: usize,
        out: *mut f32,
    ) {
        let o = out.add(c);
        let mut acc: [__m256; NV] = if j0 == 0 {
            [_mm256_setzero_ps(); NV]
        } else {
            std::array::from_fn(|i| _mm256_loadu_ps(o.add(8 * i)))
        };
        for j in j0..j1 {
            let pj = _mm256_set1_ps(*p.add(j));
            let vj = v.add(j * stride + c);
            for (i, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj.add(8 * i)), *a);
            }
        }
        for (i, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(o.add(8 * i), *a);
        }
    }
}

#[cfg(test)]
#[path = "attention_tests.rs"]
mod tests;
