//! Batched paged attention on the device: checks the batch, plans it (`plan`: decode rows to
//! the split-K decode kernel, prompt chunks to the tiled prefill kernel) and launches.

use super::kernels::{
    decode_smem, prefill_smem, ATTN_THREADS, MAX_GROUP, PREFILL_MAX_DIM, PREFILL_QUERIES,
};
use super::plan::{decode_split, plan};
use super::*;

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
        let rows: usize = seqs.iter().map(|s| s.rows).sum();
        assert!(
            qkv.len() >= rows * shape.qkv_width() && out.len() >= rows * h * d,
            "attention: buffers too small"
        );
        for s in seqs {
            let needed = (s.start_pos + s.rows).div_ceil(store.block_size);
            assert!(
                s.block_table.len() >= needed
                    && s.block_table[..needed]
                        .iter()
                        .all(|&b| (b as usize) < store.num_blocks),
                "attention: block table does not cover the sequence"
            );
        }
        let p = plan(seqs, group, store.block_size, PREFILL_QUERIES);
        if rows == 0 {
            return;
        }
        let tp = self.indices("tables", &p.tables);
        let base = self.ptr(&store.data);
        let kp = base + ((2 * layer) * store.plane() * 2) as u64;
        let vp = base + ((2 * layer + 1) * store.plane() * 2) as u64;
        let (qp, op) = (self.ptr(qkv), self.ptr(out));
        let scale = 1.0 / (d as f32).sqrt();
        let (hi, kvhi, di, bsi) = (h as i32, kvh as i32, d as i32, store.block_size as i32);

        let n = p.decode_rows();
        if n > 0 {
            let (decode_fn, g_max) = self.k.decode_fn(group);
            assert!(
                d / 8 >= g_max,
                "decode attention: head_dim {d} too small for {group} query heads per KV head"
            );
            let bs_shift = if store.block_size.is_power_of_two() {
                store.block_size.trailing_zeros() as i32
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
            // SAFETY: `meta` describes `n` decode rows whose tables (in `tables`) cover their
            // contexts with valid blocks (asserted above); `part_*` hold `max_splits` splits of
            // `split` positions per (row, head); shared memory per `decode_smem`.
            ok(
                unsafe {
                    args!(
                        self.stream,
                        decode_fn,
                        &qp,
                        &mp,
                        &tp,
                        &kp,
                        &vp,
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
            // SAFETY: each tile holds ≤ 32 queries of one sequence whose table covers its rows
            // (asserted above); the function's shared-memory limit was raised at load.
            ok(
                unsafe {
                    args!(
                        self.stream,
                        &self.k.prefill,
                        &qp,
                        &tip,
                        &tp,
                        &kp,
                        &vp,
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
