//! Batched paged attention on the device: checks the batch, splits it by the kernels that read
//! each sequence's blocks (its policy's format and window), plans each part (`plan`: decode rows
//! to the split-K decode kernel, prompt chunks to the tiled prefill kernel), turns block ids into
//! the (exact slot, sealed slot) pairs the kernels read, and launches.

use super::kernels::{
    decode_smem, prefill_smem, ATTN_THREADS, MAX_GROUP, PREFILL_MAX_DIM, PREFILL_QUERIES,
};
use super::plan::{decode_split, plan};
use super::store::format_index;
use super::*;

/// Upload keys of the slot tables, one per format (a batch usually has one or two formats;
/// keys keep each one's upload cached across layers).
const TABLE_KEYS: [&str; 8] = [
    "tables/bf16",
    "tables/int8",
    "tables/kivi4",
    "tables/kivi2",
    "tables/k8v4",
    "tables/mhcbf16",
    "tables/mhcint8",
    "tables/mhckivi4",
];

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
            assert!(
                s.policy.quest.is_none(),
                "attention: quest reads are CPU-only (supports_policy)"
            );
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
        // One launch set per (format, window).
        let mut parts: Vec<(usize, usize)> = Vec::new();
        for s in seqs {
            let key = (
                format_index(s.policy.codec),
                s.policy.window_blocks(bs).unwrap_or(0),
            );
            if !parts.contains(&key) {
                parts.push(key);
            }
        }
        for (fmt, window) in parts {
            let in_part = |s: &AttnSeq<'_>| {
                format_index(s.policy.codec) == fmt
                    && s.policy.window_blocks(bs).unwrap_or(0) == window
            };
            let slab = seqs
                .iter()
                .find(|s| in_part(s))
                .and_then(|s| s.policy.codec)
                .filter(|&c| c != Codec::Bf16)
                .and_then(|c| store.existing_slab(c))
                .unwrap_or(0);
            self.attention_part(
                qkv, seqs, shape, store, layer, out, fmt, window, slab, &in_part,
            );
        }
    }

    /// The sequences of one format and window: decode rows, then prefill tiles.
    #[allow(clippy::too_many_arguments)]
    fn attention_part(
        &self,
        qkv: &CudaSlice<f32>,
        seqs: &[AttnSeq<'_>],
        shape: AttnShape,
        store: &CudaKvStore,
        layer: usize,
        out: &mut CudaSlice<f32>,
        fmt: usize,
        window: usize,
        slab: usize,
        in_part: &dyn Fn(&AttnSeq<'_>) -> bool,
    ) {
        let (h, kvh, d) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
        let group = h / kvh;
        let bs = store.block_size;
        let p = plan(seqs, group, bs, PREFILL_QUERIES, in_part);
        let mut pairs = Vec::with_capacity(2 * p.tables.len());
        store.slot_pairs(&p.tables, slab, &mut pairs);
        let tp = self.indices(TABLE_KEYS[fmt], &pairs);
        // mhc reconstructions are rotated with the projection's RoPE (the model's).
        let (freq, scaling) = match seqs
            .iter()
            .find(|s| in_part(s))
            .and_then(|s| s.policy.codec)
        {
            Some(c) if c.latent_rank().is_some() && slab > 0 => {
                let keys = store
                    .latent_keys
                    .iter()
                    .find(|k| Some(k.rank) == c.latent_rank())
                    .expect("an mhc slab exists only with its projection");
                (self.inv_freq(&keys.rope), keys.rope.attention_scaling)
            }
            _ => (0, 1.0),
        };
        let kv = store.args(&self.stream, layer, slab, freq, scaling, window);
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
            let (split, max_splits) = decode_split(p.max_ctx, n, kvh, self.sms);
            let mp = self.indices("decode", &p.decode);
            let part_o = self.scratch::<f32>(n * h * max_splits * d);
            let part_ml = self.scratch::<f32>(n * h * max_splits * 2);
            let (pop, pmp, spi, msi) = (
                self.ptr(&part_o),
                self.ptr(&part_ml),
                split as i32,
                max_splits as i32,
            );
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
        let t = p.num_tiles();
        if t > 0 {
            assert!(
                d <= PREFILL_MAX_DIM,
                "prefill attention: head_dim {d} > {PREFILL_MAX_DIM}"
            );
            let tip = self.indices("tiles", &p.tiles);
            let cfg = LaunchConfig {
                grid_dim: (kvh as u32, t as u32, 1),
                block_dim: (ATTN_THREADS, 1, 1),
                shared_mem_bytes: prefill_smem(d),
            };
            // SAFETY: each tile holds ≤ 32 queries of one sequence whose slot pairs cover its
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
}
