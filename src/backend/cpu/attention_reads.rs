//! What `attention.rs` reads besides exact runs: sealed blocks decoded tile by tile into a
//! per-thread L1 scratch (inside the attention loop, once for every query of a KV head's group),
//! and the `quest` block selection for decode.

use super::super::kv_store::KvView;
use super::{runs, Query};
use crate::backend::kv_policy::QUEST_DENSE_LAYERS;
use std::cell::RefCell;

/// A run of one tile in one block: where it sits, and its decoded copy if the block is sealed.
#[derive(Clone, Copy)]
pub(super) struct TileRun {
    /// Logical block index.
    pub bi: usize,
    /// Exact data (the block's own queries read it), `None` when no query of the task sees it.
    pub exact: *const f32,
    /// Sealed blocks: the run decoded into the task's scratch tile.
    pub decoded: Option<*const f32>,
    pub p: usize,
    pub n: usize,
}

thread_local! {
    /// Per-thread decoded tile of sealed K or V runs: `[TILE, head_dim]`.
    pub(super) static DECODED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The runs of positions `t0..t1` of KV head `g`, K or V: blocks no query of the task sees are
/// left out (they may be dropped), sealed blocks are decoded into `scratch` (indexed from `t0`).
#[allow(clippy::too_many_arguments)]
pub(super) fn task_tile(
    table: &[u32],
    kv: &KvView<'_>,
    g: usize,
    t0: usize,
    t1: usize,
    values: bool,
    seen: impl Fn(usize) -> bool,
    scratch: &mut [f32],
    out: &mut Vec<TileRun>,
) {
    let (bs, d) = (kv.block_size, kv.head_dim);
    out.clear();
    runs(table, bs, t0, t1, |b, off, p0, p1| {
        let bi = p0 / bs;
        if !seen(bi) {
            return;
        }
        let exact = if values {
            kv.v(b, g, off)
        } else {
            kv.k(b, g, off)
        }
        .as_ptr();
        let decoded = kv.sealed(b).map(|_| {
            let dst = &mut scratch[(p0 - t0) * d..(p1 - t0) * d];
            if values {
                kv.decode_v(b, g, off, off + p1 - p0, dst);
            } else {
                kv.decode_k(b, g, off, off + p1 - p0, bi * bs, dst);
            }
            dst.as_ptr()
        });
        out.push(TileRun {
            bi,
            exact,
            decoded,
            p: p0,
            n: p1 - p0,
        });
    });
}

/// Quest: for a decode task (every query at the same position) under `quest:B` past the dense
/// layers, the logical blocks to attend — the query's own block plus the sealed blocks with the
/// highest upper bound of `q·k` (max over the task's query heads of Σ_c max(q_c·min_c,
/// q_c·max_c)) until B tokens. `None`: attend to everything visible.
pub(super) fn quest_selection(qs: &[Query<'_>], kv: &KvView<'_>) -> Option<Vec<bool>> {
    let first = qs.first()?;
    let budget = first.policy.quest? as usize;
    let (bs, d) = (kv.block_size, kv.head_dim);
    if kv.layer() < QUEST_DENSE_LAYERS || qs.iter().any(|q| q.len != first.len) {
        return None;
    }
    let own = first.own(bs);
    let visible: Vec<usize> = (0..=own).filter(|&bi| first.in_window(bi, bs)).collect();
    if visible.len() * bs <= budget {
        return None;
    }
    let (mut lo, mut hi) = (vec![0f32; d], vec![0f32; d]);
    let mut scored: Vec<(f32, usize)> = Vec::with_capacity(visible.len());
    let mut sel = vec![false; own + 1];
    sel[own] = true;
    for &bi in visible.iter().filter(|&&bi| bi != own) {
        let b = first.table[bi];
        if !kv.key_bounds(b, first.g, &mut lo, &mut hi) {
            sel[bi] = true; // no bounds (not sealed): cannot rank it, keep it
            continue;
        }
        let mut best = f32::NEG_INFINITY;
        for q in qs {
            // SAFETY: every query's q holds head_dim floats (`attend`'s contract).
            let qv = unsafe { std::slice::from_raw_parts(q.q, d) };
            let ub: f32 = (0..d).map(|c| (qv[c] * lo[c]).max(qv[c] * hi[c])).sum();
            best = best.max(ub);
        }
        scored.push((best, bi));
    }
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut tokens = bs; // the own block
    for (_, bi) in scored {
        if tokens + bs > budget {
            break;
        }
        sel[bi] = true;
        tokens += bs;
    }
    Some(sel)
}
