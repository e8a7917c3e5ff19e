//! The decode split sweep: decode attention at fixed split lengths, one shape at a time, so one
//! GPU run calibrates `backend/cuda/split.rs` (its wave model and its two cost constants). Each
//! row is 16 calls back to back at one length; the rows of the model's pick and of the rule
//! before 2026-12-01 (about four CTAs per multiprocessor, blind to waves) say so.

use super::speed::time;
use super::{measure, Row};
use kvserve::backend::cuda::split::{decode_split, launch_cost, MAX_SPLIT, MIN_SPLIT, SPLIT_STEP};
use kvserve::backend::cuda::CudaBackend;

/// Split lengths every shape is timed at (the picks are added when not among them).
const LENGTHS: [usize; 7] = [128, 256, 384, 512, 704, 896, 1024];

/// The split length of the rule before 2026-12-01: enough splits for ~4 CTAs per
/// multiprocessor, within `MIN_SPLIT..=MAX_SPLIT`.
fn rule_before(ctx: usize, ctas: usize, sms: usize) -> usize {
    let want = (4 * sms).div_ceil(ctas.max(1)).max(1);
    ctx.div_ceil(want)
        .next_multiple_of(SPLIT_STEP)
        .clamp(MIN_SPLIT, MAX_SPLIT)
}

/// Times `call` (one decode attention call over `seqs` sequences of `ctx` positions, 8 KV heads
/// of 64 under a group of 4 in the exact format, reading `bytes`) at each split length, 16
/// calls back to back, and leaves the backend's own pick in place afterwards.
pub fn sweep(
    gpu: &CudaBackend,
    (seqs, ctx): (usize, usize),
    bytes: f64,
    copy: f64,
    mut call: impl FnMut(),
    rows: &mut Vec<Row>,
) {
    let slots = gpu.decode_resident_ctas(0, 4, 64);
    let ctas = seqs * 8;
    let pick = decode_split(ctx, seqs, 8, slots).0;
    let before = rule_before(ctx, ctas, gpu.multiprocessors());
    let mut lengths = LENGTHS.to_vec();
    lengths.extend([pick, before]);
    lengths.sort_unstable();
    lengths.dedup();
    let layers = 16;
    for len in lengths {
        gpu.set_decode_split(len);
        let s = time(gpu, 10, || {
            for _ in 0..layers {
                call()
            }
        }) / layers as f64;
        let bw = bytes / s / 1e9;
        let mark = match (len == pick, len == before) {
            (true, true) => "; the pick, as before",
            (true, false) => "; the pick",
            (false, true) => "; the rule before 12-01",
            _ => "",
        };
        rows.push(measure(
            &format!("decode {seqs} x {ctx}, splits of {len}"),
            bw,
            "GB/s",
            &format!(
                "{:.1}% of copy; {} splits, {} CTAs on {slots} slots; model cost {}{mark}",
                100.0 * bw / copy,
                ctx.div_ceil(len),
                ctas * ctx.div_ceil(len),
                launch_cost(ctas, ctx, len, slots),
            ),
        ));
    }
    gpu.set_decode_split(0);
}
