//! How long a context split of the decode attention kernel is: the split length that finishes a
//! launch soonest on the device's CTA slots (multiprocessors × resident CTAs of the kernel).
//!
//! Why a model and not a fixed CTA count: the grid is (KV heads, rows, splits), and its CTAs run
//! in waves of `slots`. The rule before 2026-12-01 aimed at ~4 CTAs per multiprocessor, blind to
//! waves. At 128 rows × 4096 positions on an H200 (8 KV heads, 132 SMs, 6 resident CTAs of
//! `paged_decode_g4_bf16`: 792 slots) it made 4 splits of 1024, 4096 CTAs: 5.17 waves, the sixth
//! 17 % full, so ~14 % of the launch had idle slots. At 32 × 4096 it made 1024 CTAs, 1.29 waves
//! (~35 % idle). Those two shapes measured 73.6 % and 57 % of copy bandwidth (docs/cuda.md),
//! ~85–88 % of copy per full wave either way.
//!
//! The model: every CTA costs its positions plus [`CTA_OVERHEAD`] (loading the queries, the
//! softmax between the K and V passes, the reduction across thread groups, the partial's
//! write), each split beyond the first adds [`MERGE_PER_SPLIT`] to the merge, CTAs start in
//! launch order (split 0 of every (row, head) first) on the slot that frees first. Pure integer
//! code, unit-tested; the constants are estimates until `gpu-check`'s split sweep (every
//! length at each shape, the model's pick marked) has measured them on a GPU.

use std::collections::BTreeMap;

/// Smallest and largest decode split (positions); multiples of [`SPLIT_STEP`]. The largest
/// bounds the kernel's shared memory (`group × split` scores).
pub const MIN_SPLIT: usize = 64;
pub const MAX_SPLIT: usize = 1024;
/// Split lengths are multiples of this (the kernel's steps of up to 8 positions stay within one
/// split, and quest's and the window's block tests see whole steps).
pub const SPLIT_STEP: usize = 64;
/// Fixed cost of one decode CTA, in positions streamed (an estimate: ~3 µs of one CTA's latency
/// chain, of which other CTAs on the multiprocessor hide most).
pub const CTA_OVERHEAD: usize = 64;
/// Cost of one more split in the merge, in positions (the merging CTA reads each split's max,
/// sum and output serially).
pub const MERGE_PER_SPLIT: usize = 4;

/// `(split_len, splits)` for `n` decode rows of at most `max_ctx` positions over `kv_heads`
/// heads on `slots` resident CTAs: the length in `MIN_SPLIT..=MAX_SPLIT` (a multiple of
/// `SPLIT_STEP`, no longer than the context needs) with the least [`launch_cost`], the longest
/// of equals (fewer partials to merge).
pub fn decode_split(max_ctx: usize, n: usize, kv_heads: usize, slots: usize) -> (usize, usize) {
    let ctx = max_ctx.max(1);
    let ctas = (n * kv_heads).max(1);
    let mut best = (usize::MAX, MIN_SPLIT);
    for len in (MIN_SPLIT..=MAX_SPLIT).step_by(SPLIT_STEP) {
        let cost = launch_cost(ctas, ctx, len, slots);
        if cost <= best.0 {
            best = (cost, len);
        }
        if len >= ctx {
            break; // longer splits are the same single split
        }
    }
    (best.1, ctx.div_ceil(best.1))
}

/// The model's time for `ctas` (row, head) pairs of `ctx` positions cut into splits of `len` on
/// `slots` resident CTAs (`slots` 0 counts as 1): the last CTA's end plus the merge.
pub fn launch_cost(ctas: usize, ctx: usize, len: usize, slots: usize) -> usize {
    let splits = ctx.div_ceil(len);
    let cost: Vec<usize> = (0..splits)
        .map(|z| len.min(ctx - z * len) + CTA_OVERHEAD)
        .collect();
    makespan(ctas, &cost, slots.max(1)) + (splits - 1) * MERGE_PER_SPLIT
}

/// When the last of `ctas × cost.len()` CTAs ends: `ctas` CTAs of `cost[z]` for each split `z`
/// in turn, each started on the slot that frees first. The leading splits of equal cost run in
/// whole rounds of `slots` (closed form); the rest are placed on slots kept as (free time → how
/// many), so a wave of equal CTAs is one step, not one per CTA.
pub fn makespan(ctas: usize, cost: &[usize], slots: usize) -> usize {
    let Some(&c0) = cost.first() else { return 0 };
    let equal = cost.iter().take_while(|&&c| c == c0).count();
    let (rounds, rest) = ((equal * ctas) / slots, (equal * ctas) % slots);
    let mut free = BTreeMap::from([(rounds * c0, slots - rest)]);
    if rest > 0 {
        free.insert((rounds + 1) * c0, rest);
    }
    for &c in &cost[equal..] {
        let mut left = ctas;
        while left > 0 {
            let (t, k) = free.pop_first().expect("slots > 0");
            let take = k.min(left);
            if k > take {
                free.insert(t, k - take);
            }
            *free.entry(t + c).or_insert(0) += take;
            left -= take;
        }
    }
    free.keys().next_back().copied().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_ctas_run_in_whole_waves() {
        // 10 CTAs of 5 on 4 slots: 3 waves.
        assert_eq!(makespan(10, &[5], 4), 15);
        assert_eq!(makespan(8, &[5], 4), 10);
        assert_eq!(makespan(3, &[5], 4), 5);
        // Two splits of 3 CTAs on 4 slots: the second split's CTAs start on the idle slot and
        // on the first to free: 5 + 5, and the third waits for another.
        assert_eq!(makespan(3, &[5, 5], 4), 10);
        // A short last split fills the gaps the full ones leave: 6 CTAs of 5 on 4 slots end
        // at 10, two slots idle from 5; the 3 short ones (2) take those and one more.
        assert_eq!(makespan(3, &[5, 5, 2], 4), 10);
        assert_eq!(makespan(3, &[5, 5, 5], 4), 15);
        assert_eq!(makespan(0, &[5], 4), 0);
    }

    #[test]
    fn the_split_fills_whole_waves_on_the_h200() {
        let slots = 132 * 6;
        // 128 rows × 4096: 4 splits of 1024 (4096 CTAs, 5.17 waves) was the rule before;
        // 5 splits (896 × 4 and 512: 5120 CTAs, the short ones filling the last wave's gaps)
        // cost ~9 % less in the model.
        assert_eq!(decode_split(4096, 128, 8, slots), (896, 5));
        let (old, new) = (
            launch_cost(1024, 4096, 1024, slots),
            launch_cost(1024, 4096, 896, slots),
        );
        assert!(new * 100 < old * 92, "{new} vs {old}");
        // 32 rows: 4 splits were 1024 CTAs, 1.29 waves; 6 splits make 1536, under 2 waves.
        assert_eq!(decode_split(4096, 32, 8, slots), (704, 6));
        assert!(
            launch_cost(256, 4096, 704, slots) * 100 < launch_cost(256, 4096, 1024, slots) * 75
        );
        // One sequence of 32768: as many splits as the slots hold, not more (no second wave
        // of tiny CTAs, no merge over hundreds of partials).
        let (len, splits) = decode_split(32768, 1, 8, slots);
        assert!(
            8 * splits <= slots && 8 * splits > slots / 2,
            "{len} {splits}"
        );
    }

    #[test]
    fn splits_cover_the_context_within_bounds() {
        for ctx in [1, 10, 63, 64, 65, 700, 4096, 5000, 32768, 100_000] {
            for n in [1, 3, 64, 128, 1000] {
                for slots in [1, 132, 792] {
                    let (len, splits) = decode_split(ctx, n, 8, slots);
                    assert!((MIN_SPLIT..=MAX_SPLIT).contains(&len), "{ctx} {n} {slots}");
                    assert_eq!(len % SPLIT_STEP, 0);
                    assert!(len * splits >= ctx && len * (splits - 1) < ctx);
                    // No longer than the context needs.
                    assert!(len < ctx + SPLIT_STEP || len == MIN_SPLIT);
                }
            }
        }
        // A context that fits one short split is one split.
        assert_eq!(decode_split(10, 1, 1, 792), (64, 1));
    }

    #[test]
    fn equal_costs_go_to_the_longest_split() {
        // On one slot every CTA runs after the other, so the cost depends only on the number of
        // splits: 1500 positions need 2, and every length from 768 to 1024 makes 2 at the same
        // cost. The longest wins (the shorter ones only lengthen the last split's tail).
        let two: Vec<usize> = (MIN_SPLIT..=MAX_SPLIT)
            .step_by(SPLIT_STEP)
            .filter(|&len| 1500usize.div_ceil(len) == 2)
            .collect();
        assert_eq!((two[0], two.len()), (768, 5));
        assert!(two
            .iter()
            .all(|&len| launch_cost(1, 1500, len, 1) == launch_cost(1, 1500, 768, 1)));
        assert_eq!(decode_split(1500, 1, 1, 1), (1024, 2));
        // The rule in general: the pick is the longest of the cheapest lengths it may take.
        for ctx in [100, 1500, 3000, 4096, 9000] {
            for (n, slots) in [(1, 1), (2, 3), (5, 792), (128, 792)] {
                let lens = (MIN_SPLIT..=MAX_SPLIT)
                    .step_by(SPLIT_STEP)
                    .take_while(|&len| len < ctx + SPLIT_STEP);
                let best = lens
                    .clone()
                    .map(|len| launch_cost(n * 8, ctx, len, slots))
                    .min();
                let longest = lens
                    .filter(|&len| Some(launch_cost(n * 8, ctx, len, slots)) == best)
                    .max();
                assert_eq!(
                    Some(decode_split(ctx, n, 8, slots).0),
                    longest,
                    "{ctx} {n} {slots}"
                );
            }
        }
    }
}
