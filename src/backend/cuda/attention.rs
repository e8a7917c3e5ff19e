//! Batched paged attention on the device: checks the batch, splits it by the kernels that read
//! each sequence's blocks (its policy's format, window and quest budget), plans each part
//! (`plan`: decode rows to the split-K decode kernel, prompt chunks to the tiled prefill
//! kernel), turns block ids into the (exact slot, sealed slot) pairs the kernels read, picks
//! quest's blocks for decode rows past the dense layers, and launches.

use super::kernels::{
    decode_smem, prefill_queries, prefill_smem, ATTN_THREADS, MAX_GROUP, PREFILL_MAX_DIM,
    QUEST_THREADS,
};
use super::plan::plan;
use super::split::{decode_split, MAX_SPLIT};
use super::store::format_index;
use super::*;
use crate::backend::kv_policy::QUEST_DENSE_LAYERS;
use cudarc::driver::CudaFunction;

/// Upload keys of each part's (slot tables, decode rows, prefill tiles), by the part's place in
/// the batch: parts come in the same order at every layer, so each keeps its uploads cached
/// across layers (a batch usually has one or two parts; later ones share the last keys).
const PART_KEYS: [[&str; 3]; 3] = [
    ["tables/0", "decode/0", "tiles/0"],
    ["tables/1", "decode/1", "tiles/1"],
    ["tables/2+", "decode/2+", "tiles/2+"],
];

/// The sequences that one set of launches serves: one codec (so one sealed slab: `mhc` ranks
/// share kernels but not slabs), with or without quest's key bounds, one window, one quest
/// budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Part {
    codec: Option<Codec>,
    bounds: bool,
    window: usize,
    quest: Option<u32>,
}

impl Part {
    fn of(s: &AttnSeq<'_>, bs: usize) -> Self {
        Part {
            codec: s.policy.codec,
            bounds: s.policy.stores_bounds(),
            window: s.policy.window_blocks(bs).unwrap_or(0),
            quest: s.policy.quest,
        }
    }

    /// The index of the kernels that read this part's blocks.
    fn fmt(&self) -> usize {
        format_index(self.codec, self.bounds)
    }
}

impl CudaBackend {
    /// [`Backend::attention`] (see the trait for the contract).
    pub(super) fn attention_impl(
        &self,
        qkv: &CudaSlice<f32>,
        seqs: &[AttnSeq<'_>],
        shape: AttnShape,
        store: &CudaKvStore,
        layer: usize,
        out: &mut CudaSlice<f32>,
    ) {
        let (h, kvh, d) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
        let group = h / kvh;
        assert!(
            h % kvh == 0 && group <= MAX_GROUP,
            "attention: {h} heads over {kvh} KV heads"
        );
        assert!(
            d % 8 == 0 && (32 % (d / 8) == 0) && d <= 256,
            "attention: head_dim {d}"
        );
        assert_eq!(store.shape, shape, "attention: store of another shape");
        let rows: usize = seqs.iter().map(|s| s.rows).sum();
        assert!(
            qkv.len() >= rows * shape.qkv_width() && out.len() >= rows * h * d,
            "attention: buffers too small"
        );
        let bs = store.block_size;
        for s in seqs {
            if s.policy.codec.is_some_and(|c| c.latent_rank().is_some()) {
                assert!(
                    d % 16 == 0,
                    "attention: mhc needs head_dim % 16 == 0, got {d}"
                );
            }
            // Blocks no row of the step can see under its window may be dropped.
            let needed = (s.start_pos + s.rows).div_ceil(bs);
            let first_own = s.start_pos / bs;
            let droppable = |bi: usize| {
                s.policy
                    .window_blocks(bs)
                    .is_some_and(|w| bi != 0 && bi + w <= first_own)
            };
            assert!(
                s.block_table.len() >= needed
                    && s.block_table[..needed]
                        .iter()
                        .enumerate()
                        .all(|(bi, &b)| (b as usize) < store.num_blocks || droppable(bi)),
                "attention: block table does not cover the sequence"
            );
        }
        if rows == 0 {
            return;
        }
        let mut parts: Vec<Part> = Vec::new();
        for s in seqs {
            let part = Part::of(s, bs);
            if !parts.contains(&part) {
                parts.push(part);
            }
        }
        for (i, part) in parts.into_iter().enumerate() {
            let in_part = |s: &AttnSeq<'_>| Part::of(s, bs) == part;
            let slab = part
                .codec
                .and_then(|c| store.existing_slab(c, part.bounds))
                .unwrap_or(0);
            let keys = PART_KEYS[i.min(PART_KEYS.len() - 1)];
            self.attention_part(
                qkv, seqs, shape, store, layer, out, part, slab, keys, &in_part,
            );
        }
    }

    /// The sequences of one part (`slab` where its sealed blocks are, 0 for none): decode rows
    /// (after quest's selection), then prefill tiles.
    #[allow(clippy::too_many_arguments)]
    fn attention_part(
        &self,
        qkv: &CudaSlice<f32>,
        seqs: &[AttnSeq<'_>],
        shape: AttnShape,
        store: &CudaKvStore,
        layer: usize,
        out: &mut CudaSlice<f32>,
        part: Part,
        slab: usize,
        [table_key, decode_key, tiles_key]: [&'static str; 3],
        in_part: &dyn Fn(&AttnSeq<'_>) -> bool,
    ) {
        let (h, kvh, d) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
        let group = h / kvh;
        let bs = store.block_size;
        let fmt = part.fmt();
        let p = plan(seqs, group, bs, prefill_queries(d), in_part);
        let mut pairs = Vec::with_capacity(2 * p.tables.len());
        store.slot_pairs(&p.tables, slab, &mut pairs);
        let tp = self.indices(table_key, &pairs);
        // mhc reconstructions are rotated with the projection's RoPE (the model's).
        let (freq, scaling) = if slab > 0 {
            self.latent_rope(store, part.codec)
        } else {
            (0, 1.0)
        };
        let mut kv = store.args(&self.stream, layer, slab, freq, scaling, part.window);
        let (qp, op) = (self.ptr(qkv), self.ptr(out));
        let scale = 1.0 / (d as f32).sqrt();
        let (hi, kvhi, di, bsi) = (h as i32, kvh as i32, d as i32, bs as i32);

        let n = p.decode_rows();
        if n > 0 {
            let (decode_fn, g_max) = self.k.decode_fn(fmt, group);
            assert!(
                d / 8 >= g_max,
                "decode attention: head_dim {d} too small for {group} query heads per KV head"
            );
            let bs_shift = if bs.is_power_of_two() {
                bs.trailing_zeros() as i32
            } else {
                -1
            };
            let (split, max_splits) =
                self.decode_split(decode_fn, (fmt, g_max, d), p.max_ctx, n, kvh);
            let mp = self.indices(decode_key, &p.decode);
            // Quest, past the dense layers: one bit per (row, KV head, logical block) read.
            // Without sealed blocks (or key bounds) nothing can be ranked: every block is read.
            let words = p.max_ctx.div_ceil(bs).div_ceil(32);
            let quest = match part.quest {
                Some(budget) if part.bounds && slab > 0 && layer >= QUEST_DENSE_LAYERS => {
                    Some(budget)
                }
                _ => None,
            };
            // Kept until the decode launch below is enqueued (freed in stream order after it).
            let _quest_buffers = quest.map(|budget| {
                let keys = self.scratch_buf::<u32>(n * kvh * words * 32);
                let sel = self.scratch_buf::<u32>(n * kvh * words);
                let (kp, sp) = (keys.ptr(), sel.ptr());
                kv.quest_words = words as u32;
                let budget = budget.min(i32::MAX as u32) as i32;
                let cfg = LaunchConfig {
                    grid_dim: (kvh as u32, n as u32, 1),
                    block_dim: (QUEST_THREADS, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: `meta` and `tables` as for the decode launch below; `keys` holds
                // `words * 32` entries and `sel` `words` per (row, KV head), every row's context
                // within `words * 32` blocks; `kv.quest_sel` is null here (not read).
                ok(
                    unsafe {
                        args!(
                            self.stream,
                            &self.k.quest_select,
                            &qp,
                            &mp,
                            &tp,
                            &kv,
                            &kp,
                            &sp,
                            &hi,
                            &kvhi,
                            &di,
                            &bsi,
                            &budget
                        )
                        .launch(cfg)
                    },
                    "quest_select",
                );
                kv.quest_sel = sp;
                (keys, sel)
            });
            let part_o = self.scratch_buf::<f32>(n * h * max_splits * d);
            let part_ml = self.scratch_buf::<f32>(n * h * max_splits * 2);
            let (pop, pmp, spi, msi) =
                (part_o.ptr(), part_ml.ptr(), split as i32, max_splits as i32);
            // With counters the kernel merges its splits itself (0: `decode_reduce` does).
            let counters = if self.fused_merge.load(std::sync::atomic::Ordering::Relaxed) {
                self.decode_counters(n * kvh)
            } else {
                0u64
            };
            let cfg = LaunchConfig {
                grid_dim: (kvh as u32, n as u32, max_splits as u32),
                block_dim: (ATTN_THREADS, 1, 1),
                shared_mem_bytes: decode_smem(group, d, split),
            };
            // SAFETY: `meta` describes `n` decode rows whose slot pairs (in `tables`) cover
            // their contexts (tables checked by the caller; every live slot has its chunk);
            // `part_*` hold `max_splits` splits of `split` positions per (row, head); shared
            // memory per `decode_smem`.
            ok(
                unsafe {
                    args!(
                        self.stream,
                        decode_fn,
                        &qp,
                        &mp,
                        &tp,
                        &kv,
                        &pop,
                        &pmp,
                        &op,
                        &counters,
                        &hi,
                        &kvhi,
                        &di,
                        &bsi,
                        &bs_shift,
                        &spi,
                        &msi,
                        &scale
                    )
                    .launch(cfg)
                },
                "paged_decode",
            );
            if counters == 0 {
                let cfg = LaunchConfig {
                    grid_dim: (n as u32, h as u32, 1),
                    block_dim: (d.next_multiple_of(32) as u32, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: reads the partials written just above; writes `n` rows of `out`.
                ok(
                    unsafe {
                        args!(
                            self.stream,
                            &self.k.decode_reduce,
                            &pop,
                            &pmp,
                            &mp,
                            &op,
                            &hi,
                            &di,
                            &spi,
                            &msi
                        )
                        .launch(cfg)
                    },
                    "decode_reduce",
                );
            }
        }
        let t = p.num_tiles();
        if t > 0 {
            assert!(
                d <= PREFILL_MAX_DIM && d % 16 == 0,
                "prefill attention: head_dim {d} is not a multiple of 16 up to {PREFILL_MAX_DIM}"
            );
            let tip = self.indices(tiles_key, &p.tiles);
            let cfg = LaunchConfig {
                grid_dim: (kvh as u32, t as u32, 1),
                block_dim: (ATTN_THREADS, 1, 1),
                shared_mem_bytes: prefill_smem(d),
            };
            // SAFETY: each tile holds ≤ prefill_queries(d) queries of one sequence whose slot pairs cover its
            // rows; the function's shared-memory limit was raised at load.
            ok(
                unsafe {
                    args!(
                        self.stream,
                        &self.k.prefill[fmt],
                        &qp,
                        &tip,
                        &tp,
                        &kv,
                        &op,
                        &hi,
                        &kvhi,
                        &di,
                        &bsi,
                        &scale
                    )
                    .launch(cfg)
                },
                "prefill",
            );
        }
    }

    /// `(split_len, splits)` of a decode launch of `decode_fn` (keyed by `key`: format, group
    /// bound, head dim) over `n` rows of at most `max_ctx` positions: the forced length when
    /// one is set, else [`decode_split`] on the kernel's resident CTAs.
    fn decode_split(
        &self,
        decode_fn: &CudaFunction,
        key: (usize, usize, usize),
        max_ctx: usize,
        n: usize,
        kvh: usize,
    ) -> (usize, usize) {
        let forced = self
            .decode_split_len
            .load(std::sync::atomic::Ordering::Relaxed);
        if forced > 0 {
            return (forced, max_ctx.max(1).div_ceil(forced));
        }
        let memo_key = (key.0, key.1, key.2, max_ctx, n, kvh);
        let mut memo = self.decode_split_memo.lock().expect("decode split memo");
        if let Some((k, split)) = *memo {
            if k == memo_key {
                return split;
            }
        }
        let slots = self.decode_slots(decode_fn, key);
        let split = decode_split(max_ctx, n, kvh, slots);
        *memo = Some((memo_key, split));
        split
    }

    /// Resident CTAs across the device of `decode_fn`, keyed by (format, group bound, head
    /// dim), at the shared memory of the longest split (asked of the driver once per key).
    fn decode_slots(&self, decode_fn: &CudaFunction, key: (usize, usize, usize)) -> usize {
        *self
            .decode_slots
            .lock()
            .expect("decode slots")
            .entry(key)
            .or_insert_with(|| self.resident_ctas(decode_fn, decode_smem(key.1, key.2, MAX_SPLIT)))
    }

    /// Resident CTAs across the device of the decode kernel for KV format `fmt` (the store's
    /// format index), `group` query heads per KV head and `dim` (for measurements: what
    /// [`decode_split`] fits the splits to).
    pub fn decode_resident_ctas(&self, fmt: usize, group: usize, dim: usize) -> usize {
        let (f, g_max) = self.k.decode_fn(fmt, group);
        self.decode_slots(f, (fmt, g_max, dim))
    }

    /// CTAs of `f` (`ATTN_THREADS` threads, `smem` bytes of dynamic shared memory) resident on
    /// the whole device at once, by the driver's occupancy calculator. A failed query (not
    /// expected for a loaded kernel) falls back to 4 per multiprocessor, the rule before
    /// 2026-12-01.
    fn resident_ctas(&self, f: &CudaFunction, smem: u32) -> usize {
        match f.occupancy_max_active_blocks_per_multiprocessor(ATTN_THREADS, smem as usize, None) {
            Ok(per_sm) => self.sms * (per_sm as usize).max(1),
            Err(e) => {
                tracing::warn!(error = %e, "decode kernel occupancy unknown, assuming 4 CTAs per SM");
                self.sms * 4
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::codec::MhcValues;
    use crate::backend::kv_policy::KvPolicy;

    fn part(policy: KvPolicy) -> Part {
        let seq = AttnSeq {
            rows: 1,
            start_pos: 0,
            block_table: &[],
            policy,
        };
        Part::of(&seq, 16)
    }

    #[test]
    fn parts_split_by_slab_window_and_quest_budget() {
        let mhc = |rank| {
            KvPolicy::format(Codec::Mhc {
                rank,
                values: MhcValues::Kivi4,
            })
        };
        // Two mhc ranks share kernels but not a slab: separate parts.
        assert_eq!(part(mhc(32)).fmt(), part(mhc(64)).fmt());
        assert_ne!(part(mhc(32)), part(mhc(64)));
        let kivi4 = KvPolicy::format(Codec::Kivi4);
        let quest = |b| KvPolicy {
            quest: Some(b),
            ..kivi4
        };
        assert_ne!(part(kivi4), part(quest(512)));
        assert_ne!(part(quest(256)), part(quest(512)));
        assert_eq!(part(quest(512)), part(quest(512)));
        let window = KvPolicy {
            window: Some(64),
            ..kivi4
        };
        assert_ne!(part(kivi4), part(window));
        // bf16 with quest's bounds reads the bf16s slab; plain bf16 and exact read exact blocks.
        let bf16 = KvPolicy::format(Codec::Bf16);
        assert_eq!(part(bf16).fmt(), 0);
        assert_eq!(part(KvPolicy::EXACT).fmt(), 0);
        assert_eq!(
            part(KvPolicy {
                quest: Some(64),
                ..bf16
            })
            .fmt(),
            8
        );
    }
}
