//! The sampler's passes over a vocabulary-wide row: the max-relative weights and their sums,
//! top-k, the gathers of candidates, the nucleus and the dense draw. Each is O(V) with no sort
//! of the vocabulary, written as plain loops over groups of `L` lanes that the compiler
//! vectorizes, the hot ones compiled a second time for AVX2 (`avx2_twin!`: the same operations
//! in the same order, so the same bits). The policy (which passes a request needs, in which
//! order, the RNG) is the parent module's, [`super::Sampler`].

#[cfg(test)]
use crate::backend::cpu::draw::block_weights_portable;
#[cfg(test)]
use crate::backend::cpu::draw::{block_weights, draw_dense};
pub(super) use crate::backend::cpu::draw::{exp_nonpos, BLOCK};
use crate::backend::cpu::simd::avx2_twin;
use crate::types::TokenId;
use std::cmp::Ordering;

/// Lanes of the vectorizable reductions.
pub(super) const L: usize = 8;
/// Up to this k, top-k is one scan with a sorted buffer; above, a quickselect.
pub(super) const SCAN_TOP_K: usize = 64;

/// NaN-safe key: NaN sorts as `-inf`.
#[inline]
pub(super) fn key(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else {
        x
    }
}

/// Descending by value, then ascending by id.
#[inline]
pub(super) fn desc(a: &(TokenId, f32), b: &(TokenId, f32)) -> Ordering {
    key(b.1).total_cmp(&key(a.1)).then(a.0.cmp(&b.0))
}

avx2_twin!(
    /// `sum(exp(x - m))`: f32 lanes within a block, f64 across blocks.
    pub(super) fn sum_exp(xs: &[f32], m: f32) -> f64 => sum_exp_portable
);
avx2_twin!(
    /// Replaces each `x` by its weight `exp((x - m) * s)`, pushes the per-`BLOCK` sums to
    /// `blocks` and returns the total.
    pub(super) fn weights_in_place(xs: &mut [f32], m: f32, s: f32, blocks: &mut Vec<f64>) -> f64
        => weights_in_place_portable
);

#[inline(always)]
pub(super) fn sum_exp_portable(xs: &[f32], m: f32) -> f64 {
    // Plain loops: an iterator `fold` with a closure here was compiled out of line, without the
    // AVX2 twin's target features, and ran 4 lanes wide.
    let mut total = 0.0f64;
    for block in xs.chunks(BLOCK) {
        let chunks = block.chunks_exact(L);
        let mut tail = 0.0f32;
        for &x in chunks.remainder() {
            tail += exp_nonpos(x - m);
        }
        let mut acc = [0.0f32; L];
        for c in chunks {
            for j in 0..L {
                acc[j] += exp_nonpos(c[j] - m);
            }
        }
        total += f64::from(acc.iter().sum::<f32>() + tail);
    }
    total
}

#[inline(always)]
pub(super) fn weights_in_place_portable(
    xs: &mut [f32],
    m: f32,
    s: f32,
    blocks: &mut Vec<f64>,
) -> f64 {
    blocks.clear();
    for block in xs.chunks_mut(BLOCK) {
        let mut acc = [0.0f32; L];
        let mut chunks = block.chunks_exact_mut(L);
        for c in &mut chunks {
            for j in 0..L {
                c[j] = exp_nonpos((c[j] - m) * s);
                acc[j] += c[j];
            }
        }
        let mut sum: f32 = acc.iter().sum();
        for x in chunks.into_remainder() {
            *x = exp_nonpos((*x - m) * s);
            sum += *x;
        }
        blocks.push(f64::from(sum));
    }
    blocks.iter().sum()
}

/// The `k` largest of `xs` as (id, value), descending, ties by lower id (NaN as `-inf`).
pub(super) fn top_k_into(xs: &[f32], k: usize, out: &mut Vec<(TokenId, f32)>) {
    out.clear();
    let k = k.min(xs.len());
    if k == 0 {
        return;
    }
    if k > SCAN_TOP_K {
        out.extend(xs.iter().enumerate().map(|(i, &x)| (i as TokenId, key(x))));
        if k < out.len() {
            out.select_nth_unstable_by(k - 1, desc);
            out.truncate(k);
        }
        out.sort_unstable_by(desc);
        return;
    }
    // One scan; almost every value fails the threshold test against the current k-th, most
    // of them a group of `L` at a time (NaN fails `>` as it should: it counts as -inf).
    for_groups(xs, |first, c| {
        if out.len() == k && !any_lane(c, |x| x > out[k - 1].1) {
            return;
        }
        for (j, &x) in c.iter().enumerate() {
            let x = key(x);
            if out.len() == k && x <= out[k - 1].1 {
                continue;
            }
            let pos = out.partition_point(|c| c.1 >= x);
            if out.len() == k {
                out.pop();
            }
            out.insert(pos, ((first + j) as TokenId, x));
        }
    });
}

/// Calls `f(index of the group's first value, group)` for each group of `L` values of `xs`,
/// then once for the shorter tail: whole groups let the compiler unroll and vectorize the
/// per-group tests.
#[inline(always)]
pub(super) fn for_groups(xs: &[f32], mut f: impl FnMut(usize, &[f32])) {
    let groups = xs.chunks_exact(L);
    let tail = groups.remainder();
    for (g, c) in groups.enumerate() {
        f(g * L, c);
    }
    if !tail.is_empty() {
        f(xs.len() - tail.len(), tail);
    }
}

/// Whether any value of `c` passes `test`, evaluated on every lane (no early exit), so that
/// it compiles to a vector compare.
#[inline(always)]
pub(super) fn any_lane(c: &[f32], test: impl Fn(f32) -> bool) -> bool {
    c.iter().fold(false, |any, &x| any | test(x))
}

/// Nucleus truncation of the candidates (unnormalized weights, all > 0, of a distribution
/// whose total mass is `total`); returns the kept mass. The nucleus comes out in no
/// particular (but deterministic) order.
///
/// The caller may first drop weights below `eps = (1 - top_p) / (2 V)` of the total: together
/// they hold less than `(1 - top_p) / 2` of the mass, so the descending cumulative sum reaches
/// `top_p` before any of them. That leaves a few hundred tokens on peaked distributions and
/// thousands on flat ones (5–14k of SmolLM2's 49,152 at temperature 1, top-p 0.95).
///
/// So first a histogram: the mass in each bucket of weights (the top bits of an f32 order
/// positive floats; 4 buckets per power of two), heaviest bucket first, finds the bucket in
/// which the cumulative mass reaches `top_p`. Every candidate in a heavier bucket is in the
/// nucleus and every one in a lighter bucket is out, with no ordering at all; only the
/// crossing bucket is ordered, by quickselect (halving the range with
/// `select_nth_unstable`), O(n) rather than a sort.
pub(super) fn apply_top_p(cand: &mut Vec<(TokenId, f32)>, top_p: f32, total: f64) -> f64 {
    const SHIFT: u32 = 21;
    let bucket = |w: f32| (w.to_bits() >> SHIFT) as usize;
    let mass = |c: &[(TokenId, f32)]| c.iter().map(|c| f64::from(c.1)).sum::<f64>();
    let mut need = f64::from(top_p.max(0.0)) * total;
    let mut hist = [0.0f64; 1 << (31 - SHIFT)];
    for c in cand.iter() {
        debug_assert!(c.1 > 0.0, "apply_top_p: weight {}", c.1);
        hist[bucket(c.1)] += f64::from(c.1);
    }
    let mut crossing = None;
    for (b, &h) in hist.iter().enumerate().rev() {
        if h > 0.0 {
            if h >= need {
                crossing = Some(b);
                break;
            }
            need -= h;
        }
    }
    let Some(crossing) = crossing else {
        // Round-off: the candidates' mass fell short of `top_p` of the total; keep them all.
        return mass(cand);
    };
    // cand[..lo]: heavier buckets; cand[lo..hi]: the crossing bucket; the rest goes.
    let mut lo = 0;
    for i in 0..cand.len() {
        if bucket(cand[i].1) > crossing {
            cand.swap(i, lo);
            lo += 1;
        }
    }
    let mut hi = lo;
    for i in lo..cand.len() {
        if bucket(cand[i].1) == crossing {
            cand.swap(i, hi);
            hi += 1;
        }
    }
    cand.truncate(hi);
    // Invariant: cand[..lo] is in the nucleus and outranks cand[lo..hi]; cand[hi..] is out;
    // `need` is the mass still to cover.
    while hi - lo > 64 {
        let mid = lo + (hi - lo) / 2;
        cand[lo..hi].select_nth_unstable_by(mid - lo, desc);
        let m = mass(&cand[lo..mid]);
        if m >= need {
            hi = mid;
        } else {
            need -= m;
            lo = mid;
        }
    }
    cand[lo..hi].sort_unstable_by(desc);
    let mut keep = hi;
    for (i, c) in cand[lo..hi].iter().enumerate() {
        need -= f64::from(c.1);
        if need <= 0.0 {
            keep = lo + i + 1;
            break;
        }
    }
    cand.truncate(keep.max(1));
    mass(cand)
}

/// The (id, weight) pairs of the weights `ws` that are positive and at least `cut`, in id
/// order, into `cand`; groups of `L` whose largest weight falls short are passed over whole.
pub(super) fn gather_at_least(ws: &[f32], cut: f32, cand: &mut Vec<(TokenId, f32)>) {
    cand.clear();
    cand.reserve(ws.len());
    let kept = |w: f32| w > 0.0 && w >= cut;
    let out = cand.spare_capacity_mut();
    let mut n = 0;
    for_groups(ws, |first, c| {
        if !any_lane(c, kept) {
            return;
        }
        // Written whether kept or not, the count advancing only when kept: no branch to
        // mispredict on rows where a good share of the values pass.
        for (j, &w) in c.iter().enumerate() {
            out[n].write(((first + j) as TokenId, w));
            n += usize::from(kept(w));
        }
    });
    // SAFETY: out[..n] were written above; n <= ws.len() <= the reserved spare capacity.
    unsafe { cand.set_len(n) };
}

/// The top-p nucleus of the weights `ws` (of total mass `total`) into `cand`; returns its mass.
///
/// Only weights >= `eps` can be in the nucleus (see [`apply_top_p`]), but on flat
/// rows that keeps thousands of tokens. The nucleus is a set of heaviest tokens, so the gather
/// starts above a high cut: if the tokens above it weigh `top_p` of the total, the nucleus is
/// among them; else the cut is lowered (16x at a time), down to `eps`.
pub(super) fn gather_nucleus(
    ws: &[f32],
    top_p: f32,
    total: f64,
    cand: &mut Vec<(TokenId, f32)>,
) -> f64 {
    let p = f64::from(top_p.max(0.0));
    let eps = ((1.0 - p) / (2.0 * ws.len() as f64) * total) as f32;
    let mut cut: f32 = 1.0 / 64.0;
    loop {
        gather_at_least(ws, cut.max(eps), cand);
        let mass: f64 = cand.iter().map(|c| f64::from(c.1)).sum();
        if cut <= eps || mass >= p * total {
            break;
        }
        cut /= 16.0;
    }
    apply_top_p(cand, top_p, total)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::backend::cpu::argmax::{max_lanes, max_lanes_portable};

    /// Deterministic pseudo-random logits (no RNG crate involved).
    pub(in crate::engine::sampler) fn logits(n: usize, salt: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| {
                let h = (i.wrapping_mul(2_654_435_761) ^ salt.wrapping_mul(40_503)) % 10_007;
                h as f32 / 1000.0 - 5.0
            })
            .collect()
    }

    /// The nucleus by definition: every token with weight > 0, heaviest first (ties: lower id),
    /// up to and including the one where the cumulative mass reaches `top_p` of `total` (the
    /// sum of `w`; given, so that both sides round it the same way).
    pub(in crate::engine::sampler) fn ref_nucleus(
        w: &[f32],
        top_p: f32,
        total: f64,
    ) -> Vec<TokenId> {
        let mut all: Vec<(TokenId, f32)> = w
            .iter()
            .enumerate()
            .filter(|c| *c.1 > 0.0)
            .map(|(i, &w)| (i as TokenId, w))
            .collect();
        all.sort_by(desc);
        let mut cum = 0.0;
        let n = 1 + all
            .iter()
            .take_while(|c| {
                cum += f64::from(c.1);
                cum < f64::from(top_p) * total
            })
            .count();
        let mut ids: Vec<TokenId> = all[..n.min(all.len())].iter().map(|c| c.0).collect();
        ids.sort_unstable();
        ids
    }

    #[test]
    fn avx2_twins_give_the_portable_bits() {
        let mut l = logits(49_157, 4); // not a multiple of 8 or of BLOCK
        l[17] = f32::NAN;
        l[40_000] = f32::NEG_INFINITY;
        let m = max_lanes(&l);
        assert_eq!(m.to_bits(), max_lanes_portable(&l).to_bits());
        assert_eq!(sum_exp(&l, m).to_bits(), sum_exp_portable(&l, m).to_bits());
        let (mut a, mut b) = (l.clone(), l.clone());
        let (mut ba, mut bb) = (Vec::new(), Vec::new());
        let ta = weights_in_place(&mut a, m, 1.3, &mut ba);
        let tb = weights_in_place_portable(&mut b, m, 1.3, &mut bb);
        assert_eq!(ta.to_bits(), tb.to_bits());
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        assert_eq!(ba, bb);
        // The read-only block sums are the in-place pass's, bit for bit.
        let (mut bc, mut bd) = (Vec::new(), Vec::new());
        assert_eq!(block_weights(&l, m, 1.3, &mut bc).to_bits(), ta.to_bits());
        block_weights_portable(&l, m, 1.3, &mut bd);
        assert_eq!(bc, ba);
        assert_eq!(bd, ba);
    }

    #[test]
    fn vector_exp_and_top_k_helpers_match_references() {
        let mut x = 0.0f32;
        while x > -87.0 {
            let rel = (f64::from(exp_nonpos(x)) - f64::from(x).exp()).abs() / f64::from(x).exp();
            assert!(rel < 3e-7, "exp({x}): {rel}");
            x -= 0.0137;
        }
        for x in [f32::NEG_INFINITY, f32::NAN, -100.0] {
            assert_eq!(exp_nonpos(x), 0.0);
        }
        let l = logits(3000, 13); // values repeat: many ties
        let mut reference: Vec<(TokenId, f32)> = l
            .iter()
            .enumerate()
            .map(|(i, &x)| (i as TokenId, x))
            .collect();
        reference.sort_by(desc);
        let mut out = Vec::new();
        for k in [1, 7, SCAN_TOP_K, SCAN_TOP_K + 1, 500] {
            top_k_into(&l, k, &mut out);
            assert_eq!(out, reference[..k], "k = {k}");
        }
        // Nucleus by quickselect equals the sorted-prefix definition.
        for top_p in [0.05f32, 0.5, 0.9, 0.999] {
            let mut cand: Vec<(TokenId, f32)> = l
                .iter()
                .enumerate()
                .map(|(i, &x)| (i as TokenId, (x / 2.0).exp()))
                .collect();
            let total = cand.iter().map(|c| f64::from(c.1)).sum::<f64>();
            let mut cum = 0.0;
            let n = 1 + reference
                .iter()
                .take_while(|c| {
                    cum += f64::from((c.1 / 2.0).exp());
                    cum < f64::from(top_p) * total
                })
                .count();
            apply_top_p(&mut cand, top_p, total);
            cand.sort_by(desc);
            let ids: Vec<TokenId> = cand.iter().map(|c| c.0).collect();
            let want: Vec<TokenId> = reference[..n].iter().map(|c| c.0).collect();
            assert_eq!(ids, want, "top_p = {top_p}");
        }
    }

    #[test]
    fn gathered_nucleus_is_the_sorted_prefix_on_flat_and_peaked_rows() {
        for (r, row) in nucleus_rows().iter().enumerate() {
            for t in [1.0f32, 0.5] {
                let mut w = row.clone();
                let total = weights_in_place(&mut w, max_lanes(row), 1.0 / t, &mut Vec::new());
                for top_p in [0.0f32, 0.05, 0.5, 0.9, 0.95, 0.999] {
                    let mut cand = Vec::new();
                    let mass = gather_nucleus(&w, top_p, total, &mut cand);
                    let mut ids: Vec<TokenId> = cand.iter().map(|c| c.0).collect();
                    ids.sort_unstable();
                    let want = ref_nucleus(&w, top_p, total);
                    let case = format!("row {r}, T {t}, top_p {top_p}");
                    assert_eq!(ids.len(), want.len(), "{case}");
                    assert!(ids == want, "{case}: other tokens");
                    let want_mass: f64 = want.iter().map(|&i| f64::from(w[i as usize])).sum();
                    assert!((mass - want_mass).abs() <= 1e-9 * want_mass, "row {r}");
                }
            }
        }
    }

    #[test]
    fn dense_draw_lands_where_the_cumulative_sum_says() {
        let mut l = logits(49_157, 5);
        l[300] = f32::NAN;
        l[301] = f32::NEG_INFINITY;
        l[49_156] = f32::NEG_INFINITY; // the last block ends on a token without weight
        let (m, s) = (max_lanes(&l), 1.0 / 0.8);
        let weight = |x: f32| exp_nonpos((x - m) * s);
        let mut blocks = Vec::new();
        let total = block_weights(&l, m, s, &mut blocks);
        let mut cum = Vec::with_capacity(l.len());
        let mut acc = 0.0f64;
        for &x in &l {
            acc += f64::from(weight(x));
            cum.push(acc);
        }
        for k in 0..500 {
            let u = total * (k as f64 + 0.5) / 500.0;
            let want = cum.partition_point(|&c| c <= u) as TokenId;
            assert_eq!(draw_dense(&l, &blocks, u, weight), want, "u = {u}");
        }
    }

    #[test]
    fn group_skipping_scans_match_plain_filters() {
        let mut l = logits(49_157, 8); // a tail of 5 after the groups of 8
        l[12] = f32::NAN;
        l[49_155] = 5.5; // the largest, in the tail
        let mut w = l.clone();
        weights_in_place(&mut w, max_lanes(&l), 1.0, &mut Vec::new());
        for cut in [0.0f32, 1e-30, 1e-4, 0.3, 1.0] {
            let mut got = Vec::new();
            gather_at_least(&w, cut, &mut got);
            let want: Vec<(TokenId, f32)> = w
                .iter()
                .enumerate()
                .filter(|c| *c.1 > 0.0 && *c.1 >= cut)
                .map(|(i, &w)| (i as TokenId, w))
                .collect();
            assert_eq!(got, want, "cut {cut}");
        }
        let mut sorted: Vec<(TokenId, f32)> = l
            .iter()
            .enumerate()
            .map(|(i, &x)| (i as TokenId, key(x)))
            .collect();
        sorted.sort_by(desc);
        for k in [1, 5, SCAN_TOP_K] {
            let mut out = Vec::new();
            top_k_into(&l, k, &mut out);
            assert_eq!(out, sorted[..k], "k = {k}");
        }
        // NaN and -inf only: the lowest ids, as -inf.
        let mut out = Vec::new();
        top_k_into(&[f32::NAN, f32::NEG_INFINITY, f32::NAN], 2, &mut out);
        assert_eq!(out, [(0, f32::NEG_INFINITY), (1, f32::NEG_INFINITY)]);
    }

    /// Rows whose nuclei range from one token to tens of thousands: uniform logits over a span
    /// of 10 (at temperature 1 and 0.5), one dominant token, and many ties.
    fn nucleus_rows() -> Vec<Vec<f32>> {
        let mut peaked = logits(49_157, 9);
        peaked[31_000] = 12.0;
        peaked[7] = 9.0;
        let mut masked = logits(1000, 2);
        for x in masked.iter_mut().step_by(3) {
            *x = f32::NEG_INFINITY;
        }
        masked[5] = f32::NAN;
        vec![logits(49_157, 3), peaked, logits(3000, 13), masked]
    }
}
