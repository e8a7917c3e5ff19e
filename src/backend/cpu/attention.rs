//! Causal GQA attention of the CPU backend over the paged KV store (`kv_store.rs`), for a batch
//! of sequences at once: decode rows and prefill chunks of different lengths in one call.
//!
//! Math (HF Llama eager, f32): `s_j = (q · k_j) * head_dim^-0.5`, `p = softmax(s)` (max
//! subtracted, multiplied by `1 / sum`), `out = Σ_j p_j v_j` summed in position order.
//! Every query is computed by the same per-query steps whatever the batch, the chunking, the
//! block size or the thread split: scores are independent dot products, and `p · V`
//! accumulates in position order through memory (an f32 store and reload is exact). So a row's
//! output is bit-identical alone or in any batch, and a paged sequence gives the same bits as
//! one contiguous block.
//!
//! Work split: each task owns one KV head of one sequence and a set of queries (the query heads
//! of its GQA group for up to `ROW_BLOCK` rows), and walks positions in tiles so that a tile of
//! K (then V) is read from memory once and reused from L1 by every query of the task. A tile
//! is cut at block boundaries into runs that are contiguous in the store (one block of one
//! head: `block_size × head_dim` floats). Tasks are the (sequence, row block, KV head) triples,
//! claimed dynamically, largest first. When there are fewer tasks than threads (decode of an
//! MQA model alone) and the context is long, the three steps run as separate parallel phases
//! instead: scores over position chunks, softmax over queries, `p · V` over (KV head, slice of
//! head_dim). (With 3 KV heads on 2 threads the per-head tasks measured 5–15% faster than the
//! phases, despite the 2:1 split, because the phases pay two more fork/joins and a round trip
//! of the scores.)
//!
//! The inner loops (scores of a run, `p · V` over a tile's runs) are in `attention_kernels.rs`.
//!
//! Safety of reads: before any kernel runs, each sequence's table is checked to cover its
//! positions with block ids `< num_blocks`; a sequence that fails (a caller bug: `kv` and the
//! model guarantee valid tables) trips a debug assertion and gets zero output in release. A
//! query reads only positions `< start_pos + i + 1` of its own table.

#[path = "attention_kernels.rs"]
mod kernels;
#[path = "attention_reads.rs"]
mod reads;

use super::kv_store::{CpuKvStore, KvView};
use super::ops::softmax;
use super::parallel;
use crate::backend::kv_policy::KvPolicy;
use crate::backend::{AttnSeq, AttnShape};
use kernels::{dots, pv, Run};
use reads::{quest_selection, task_tile, DECODED};
use std::cell::RefCell;

/// Positions per tile: 64 × 64 dims × 4 bytes = 16 KiB of K or V, comfortably in L1.
const TILE: usize = 64;
/// Query rows per prefill task (× the group's heads = queries sharing each K/V tile).
const ROW_BLOCK: usize = 16;
/// Below this much work (queries × positions × head_dim) the phase split is not worth its syncs.
const SPLIT_MIN_WORK: usize = 1 << 20;

/// One query: its q vector, where its output goes, how many positions it sees, its KV head,
/// its sequence's block table and policy.
#[derive(Clone, Copy)]
struct Query<'a> {
    q: *const f32,
    out: *mut f32,
    len: usize,
    g: usize,
    table: &'a [u32],
    policy: KvPolicy,
}

impl Query<'_> {
    /// The block this query's own position is in: always read exact (it is, or was when this
    /// position was decoded, the block being filled).
    fn own(&self, bs: usize) -> usize {
        (self.len - 1) / bs
    }

    /// Whether the window lets this query see logical block `bi` (the sink block 0 and the last
    /// `window_blocks` blocks up to its own).
    fn in_window(&self, bi: usize, bs: usize) -> bool {
        match self.policy.window_blocks(bs) {
            None => true,
            Some(w) => bi == 0 || bi + w > self.own(bs),
        }
    }
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
    /// Per-thread scores of a task: `[queries, positions]`.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Whether `seq`'s table covers positions `0..start_pos + rows` with valid block ids (a
/// windowed sequence's blocks that even its first row cannot see may be dropped).
fn table_ok(seq: &AttnSeq<'_>, kv: &KvView<'_>) -> bool {
    let bs = kv.block_size;
    let blocks = (seq.start_pos + seq.rows).div_ceil(bs);
    let first_own = seq.start_pos / bs;
    let dropped_ok = |bi: usize| {
        seq.policy
            .window_blocks(bs)
            .is_some_and(|w| bi != 0 && bi + w <= first_own)
    };
    seq.block_table.len() >= blocks
        && seq.block_table[..blocks]
            .iter()
            .enumerate()
            .all(|(bi, &b)| (b as usize) < kv.num_blocks || dropped_ok(bi))
}

/// Whether every sequence reads plain exact blocks with full visibility (the phase split only
/// handles that case).
fn all_plain(seqs: &[AttnSeq<'_>]) -> bool {
    seqs.iter()
        .all(|s| s.policy.codec.is_none() && s.policy.window.is_none() && s.policy.quest.is_none())
}

/// Calls `f(block, offset, p0, p1)` for each run of positions `p0..p1` inside `t0..t1` that
/// lies in one block: `block` from the table, `offset` = `p0`'s slot in it.
#[inline]
fn runs(
    table: &[u32],
    bs: usize,
    t0: usize,
    t1: usize,
    mut f: impl FnMut(u32, usize, usize, usize),
) {
    let mut p = t0;
    while p < t1 {
        let (bi, off) = (p / bs, p % bs);
        let end = ((bi + 1) * bs).min(t1);
        f(table[bi], off, p, end);
        p = end;
    }
}

/// Causal attention for the batch `seqs` whose fused `[q | k | v]` rows are stacked sequence
/// after sequence in `qkv`. Writes `[total rows, num_heads * head_dim]` into `out`.
pub fn attention(
    qkv: &[f32],
    seqs: &[AttnSeq<'_>],
    shape: AttnShape,
    store: &CpuKvStore,
    layer: usize,
    out: &mut [f32],
    simd: bool,
) {
    let AttnShape {
        num_heads,
        num_kv_heads,
        head_dim: d,
    } = shape;
    let total: usize = seqs.iter().map(|s| s.rows).sum();
    if total == 0 || num_heads == 0 {
        return;
    }
    assert!(
        num_kv_heads > 0 && num_heads % num_kv_heads == 0,
        "bad GQA shape {shape:?}"
    );
    // A store of another shape would make the kernels read past a q row: refuse it.
    assert_eq!(store.shape(), shape, "KV store shape");
    let (width, qw) = (shape.qkv_width(), shape.q_width());
    let (qkv, out) = (&qkv[..total * width], &mut out[..total * qw]);
    let group = num_heads / num_kv_heads;
    let kv = store.view(layer);
    // HF: `scaling = head_dim ** -0.5` (a Python double) multiplies the f32 scores.
    let scale = (d as f64).powf(-0.5) as f32;

    let mut queries: Vec<Query<'_>> = Vec::with_capacity(total * num_heads);
    // Each task: a range of `queries` sharing one sequence and one KV head, and its work.
    let mut tasks: Vec<(usize, usize, usize)> = Vec::new();
    let outp = out.as_mut_ptr();
    let mut r0 = 0;
    for seq in seqs {
        let rows = r0..r0 + seq.rows;
        r0 += seq.rows;
        if !table_ok(seq, &kv) {
            debug_assert!(false, "block table does not cover {seq:?}");
            out[rows.start * qw..rows.end * qw].fill(0.0);
            continue;
        }
        // Quest picks blocks for decode rows only (a sequence of one row): a prompt chunk reads
        // everything its window shows, whatever the row blocks it is cut into.
        let policy = if seq.rows == 1 {
            seq.policy
        } else {
            KvPolicy {
                quest: None,
                ..seq.policy
            }
        };
        for b0 in rows.clone().step_by(ROW_BLOCK) {
            let b1 = (b0 + ROW_BLOCK).min(rows.end);
            for g in 0..num_kv_heads {
                let first = queries.len();
                let mut work = 0;
                for r in b0..b1 {
                    let len = seq.start_pos + (r - rows.start) + 1;
                    for h in g * group..(g + 1) * group {
                        queries.push(Query {
                            q: qkv[r * width + h * d..].as_ptr(),
                            // SAFETY (pointer arithmetic): r < total and h < num_heads keep it
                            // inside `out`.
                            out: unsafe { outp.add(r * qw + h * d) },
                            len,
                            g,
                            table: seq.block_table,
                            policy,
                        });
                        work += len;
                    }
                }
                tasks.push((first, queries.len(), work));
            }
        }
    }
    let work: usize = tasks.iter().map(|t| t.2).sum::<usize>() * d;
    if tasks.len() < rayon::current_num_threads() && work >= SPLIT_MIN_WORK && all_plain(seqs) {
        return split_phases(&queries, kv, scale, simd);
    }
    // Largest first, so that a long prefill chunk does not start last.
    tasks.sort_by_key(|t| std::cmp::Reverse(t.2));
    let (queries, tasks) = (Ptr(&queries), Ptr(&tasks));
    parallel::for_each(tasks.get().len(), |t| {
        let (a, b, _) = tasks.get()[t];
        SCORES.with_borrow_mut(|scores| {
            // SAFETY: task t writes only the outputs of its own queries (rows of its block,
            // heads of one KV group of one sequence); all pointers are in bounds by
            // construction and every table was checked by `table_ok`.
            unsafe { attend(&queries.get()[a..b], kv, scale, scores, simd) }
        })
    });
}

/// All three steps for a set of queries of one sequence and one KV head.
///
/// Sealed blocks are decoded tile by tile into a per-thread scratch (once per tile for all the
/// task's queries); a query reads its own block exact. Positions a query does not see (window,
/// quest) score −∞ and are skipped in `p · V`.
///
/// # Safety
/// Every query's `q` must hold `head_dim` floats, `out` must hold `head_dim` writable floats,
/// and its table must cover `len` positions with valid blocks (except blocks it cannot see).
unsafe fn attend(qs: &[Query<'_>], kv: KvView<'_>, scale: f32, scores: &mut Vec<f32>, simd: bool) {
    let (d, bs) = (kv.head_dim, kv.block_size);
    let Some(first) = qs.first() else { return };
    let lmax = qs.iter().map(|q| q.len).max().unwrap_or(0);
    scores.resize(qs.len() * lmax, 0.0);
    // All queries of a task share one table, one KV head and one policy: a tile's runs are
    // found (and decoded) once, and the first query of a tile reads them from memory, the
    // others from L1.
    let (table, g) = (first.table, first.g);
    let plain = first.policy.window.is_none() && first.policy.quest.is_none();
    let sel = if plain {
        None
    } else {
        quest_selection(qs, &kv)
    };
    let sees = |q: &Query<'_>, bi: usize| {
        bi == q.own(bs) || (q.in_window(bi, bs) && sel.as_ref().is_none_or(|s| s[bi]))
    };
    let seen = |bi: usize| plain || qs.iter().any(|q| bi * bs < q.len && sees(q, bi));
    let mut tile = Vec::with_capacity(TILE / bs + 2);
    let mut qruns: Vec<Run> = Vec::with_capacity(TILE / bs + 2);
    DECODED.with_borrow_mut(|scratch| {
        scratch.resize(TILE * d, 0.0);
        for t0 in (0..lmax).step_by(TILE) {
            let t1 = (t0 + TILE).min(lmax);
            prefetch_tile(table, g, t0 + TILE, lmax, kv, |b, g, off| kv.k(b, g, off));
            task_tile(table, &kv, g, t0, t1, false, seen, scratch, &mut tile);
            for (qi, q) in qs.iter().enumerate() {
                let s = scores[qi * lmax..].as_mut_ptr();
                if !plain {
                    std::slice::from_raw_parts_mut(s.add(t0), t1.min(q.len).saturating_sub(t0))
                        .fill(f32::NEG_INFINITY);
                }
                for r in tile.iter().take_while(|r| r.p < q.len) {
                    if !plain && !sees(q, r.bi) {
                        continue;
                    }
                    let at = match r.decoded {
                        Some(dec) if r.bi != q.own(bs) => dec,
                        _ => r.exact,
                    };
                    dots(q.q, at, d, r.n.min(q.len - r.p), scale, s.add(r.p), simd);
                }
            }
        }
        for (qi, q) in qs.iter().enumerate() {
            softmax(&mut scores[qi * lmax..qi * lmax + q.len], simd);
        }
        for t0 in (0..lmax).step_by(TILE) {
            let t1 = (t0 + TILE).min(lmax);
            prefetch_tile(table, g, t0 + TILE, lmax, kv, |b, g, off| kv.v(b, g, off));
            task_tile(table, &kv, g, t0, t1, true, seen, scratch, &mut tile);
            for (qi, q) in qs.iter().enumerate() {
                qruns.clear();
                qruns.extend(
                    tile.iter()
                        .filter(|r| r.p < q.len && (plain || sees(q, r.bi)))
                        .map(|r| Run {
                            at: match r.decoded {
                                Some(dec) if r.bi != q.own(bs) => dec,
                                _ => r.exact,
                            },
                            p: r.p,
                            n: r.n,
                        }),
                );
                let p = scores[qi * lmax..].as_ptr();
                pv(p, &qruns, q.len, d, 0, d, q.out, t0 == 0, simd);
            }
        }
    });
}

/// Prefetches the K (or V, per `part`) runs of the tile starting at `t0` (clipped to `end`)
/// into L1. Blocks sit wherever the table says, so the hardware prefetcher, which follows
/// sequential streams within a 4 KiB page, starts cold at every block (one block of one head
/// is exactly 4 KiB for 16 × 64 f32). Asking one tile ahead (a tile of work covers the
/// latency), together with keeping `p · V` accumulators in registers across a tile's runs,
/// took decode over scrambled 16-token blocks from ~25–30% to ~1–5% slower than one
/// contiguous block (`bench_kernels attn`, shared VM).
#[inline]
fn prefetch_tile<'a>(
    table: &[u32],
    g: usize,
    t0: usize,
    end: usize,
    kv: KvView<'a>,
    part: impl Fn(u32, usize, usize) -> &'a [f32],
) {
    #[cfg(target_arch = "x86_64")]
    runs(
        table,
        kv.block_size,
        t0,
        (t0 + TILE).min(end),
        |b, off, p0, p1| {
            if b as usize >= kv.num_blocks || kv.sealed(b).is_some() {
                return; // dropped (window) or read decoded
            }
            let run = &part(b, g, off)[..(p1 - p0) * kv.head_dim];
            for line in run.chunks(16) {
                // SAFETY: prefetching is a hint that never faults; the address is in bounds anyway.
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                        line.as_ptr() as *const i8,
                    )
                };
            }
        },
    );
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (table, g, t0, end, kv, part);
}

/// Decode with a long context: the three steps as separate parallel phases, so that 2 cores
/// share even 1 KV head. Same per-query arithmetic as [`attend`]; tables already checked.
fn split_phases(qs: &[Query<'_>], kv: KvView<'_>, scale: f32, simd: bool) {
    let (d, bs) = (kv.head_dim, kv.block_size);
    let lmax = qs.iter().map(|q| q.len).max().unwrap_or(0);
    let mut scores = vec![0f32; qs.len() * lmax];
    let sp = Ptr(scores.as_mut_ptr());
    let chunks = lmax.div_ceil(4 * TILE).max(1);
    let qs_p = Ptr(qs);
    // Phase 1: scores over position chunks; chunk c writes scores[.., c's positions].
    parallel::for_each(chunks, |c| {
        for t0 in (c * 4 * TILE..((c + 1) * 4 * TILE).min(lmax)).step_by(TILE) {
            for (qi, q) in qs_p.get().iter().enumerate() {
                runs(q.table, bs, t0, (t0 + TILE).min(q.len), |b, off, p0, p1| {
                    let k = kv.k(b, q.g, off);
                    // SAFETY: disjoint positions per chunk; in bounds as in `attend`.
                    unsafe {
                        let s = sp.get().add(qi * lmax + p0);
                        dots(q.q, k.as_ptr(), d, p1 - p0, scale, s, simd)
                    }
                });
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
    // Phase 3: p · V over (queries of one KV head, slice of head_dim).
    let dslice = if d.is_multiple_of(32) { 32 } else { d };
    let nheads = qs.iter().map(|q| q.g + 1).max().unwrap_or(0);
    let sp = Ptr(scores.as_ptr());
    parallel::for_each(nheads * (d / dslice), |t| {
        let (g, d0) = (t / (d / dslice), (t % (d / dslice)) * dslice);
        for t0 in (0..lmax).step_by(TILE) {
            for (qi, q) in qs_p.get().iter().enumerate().filter(|(_, q)| q.g == g) {
                runs(q.table, bs, t0, (t0 + TILE).min(q.len), |b, off, p0, p1| {
                    let run = [Run {
                        at: kv.v(b, g, off).as_ptr(),
                        p: p0,
                        n: p1 - p0,
                    }];
                    // SAFETY: task t writes dims d0..d0+dslice of the outputs of KV head g's
                    // queries only.
                    unsafe {
                        let p = sp.get().add(qi * lmax);
                        pv(p, &run, q.len, d, d0, d0 + dslice, q.out, p0 == 0, simd)
                    }
                });
            }
        }
    });
}

#[cfg(test)]
#[path = "attention_tests.rs"]
mod tests;
