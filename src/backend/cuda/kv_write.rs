//! The writes into the device KV store, host side: which slot each write goes to
//! (`slots::BlockMap`), the chunk allocations that follow, and the launches of the write, seal
//! and copy kernels (`kernels/rope_kv.cu`, `kv_seal.cu`, `kv_copy.cu`).

use super::kernels::{GEMV_COLS, GEMV_THREADS, LATENT_MAX_SMEM};
use super::slots::Action;
use super::store::{format_index, DeviceLatent};
use super::*;
use crate::backend::latent::LatentKeys;

impl CudaBackend {
    /// [`Backend::rope_and_store`]: RoPE, then each row's k and v into its block's exact copy.
    /// With `product` (the activations' address and the `[q; k; v]` weights, a product the
    /// few-row kernels take, `head_dim % 4 == 0`: the caller checked) `qkv` is computed in the
    /// same launch (`gemv_rope_r<R>_bf16`, [`Backend::matmul_rope_and_store`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rope_and_store_impl(
        &self,
        qkv: &mut CudaSlice<f32>,
        rows: usize,
        positions: &[u32],
        slots: &[u32],
        shape: AttnShape,
        rope: &RopeParams,
        store: &mut CudaKvStore,
        layer: usize,
        product: Option<(u64, &CudaMatrix)>,
    ) {
        assert!(
            qkv.len() >= rows * shape.qkv_width(),
            "rope_and_store: qkv too small"
        );
        assert_eq!(
            rope.inv_freq.len() * 2,
            shape.head_dim,
            "rope: inv_freq is head_dim / 2"
        );
        assert_eq!(store.shape, shape, "rope_and_store: store of another shape");
        let (bs, cap) = (store.block_size, store.num_blocks * store.block_size);
        assert!(
            slots[..rows].iter().all(|&s| (s as usize) < cap),
            "rope_and_store: slot out of range"
        );
        if rows == 0 {
            return;
        }
        // Block-id slots → exact-slab slots (a write at offset 0 of layer 0 starts a block).
        let mut actions = Vec::new();
        let exact: Vec<u32> = slots[..rows]
            .iter()
            .map(|&s| {
                let (block, off) = (s / bs as u32, s as usize % bs);
                let e = store.map.write(block, layer, off, &mut actions);
                e * bs as u32 + off as u32
            })
            .collect();
        store.apply(&self.stream, &actions);
        let pp = self.indices("positions", &positions[..rows]);
        let sp = self.indices("slots", &exact);
        let freq = self.inv_freq(rope);
        let kv = store.args(&self.stream, layer, 0, freq, rope.attention_scaling, 0);
        let (qp, scale) = (self.ptr(qkv), rope.attention_scaling);
        let (h, kvh, d, bsi) = (
            shape.num_heads as i32,
            shape.num_kv_heads as i32,
            shape.head_dim as i32,
            bs as i32,
        );
        if let Some((xp, w)) = product {
            let (ri, ki) = (rows as i32, w.cols as i32);
            let wp = self.ptr(&w.data);
            let per_cta = GEMV_COLS * (GEMV_THREADS as usize / 32);
            let cfg = LaunchConfig {
                grid_dim: (shape.qkv_width().div_ceil(per_cta) as u32, 1, 1),
                block_dim: (GEMV_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: `x` holds `rows * k` floats, `w` `qkv_width * k` bf16, `qkv` `rows *
            // qkv_width` floats (the caller and the assert above); `k % 8 == 0`, both operands
            // 16-byte aligned, `head_dim % 4 == 0` (the caller); every exact slot was just
            // given a chunk (`apply`); `kv` addresses layer `layer` of the exact slab.
            ok(
                unsafe {
                    args!(
                        self.stream,
                        self.k.gemv_rope_fn(rows),
                        &xp,
                        &wp,
                        &qp,
                        &pp,
                        &sp,
                        &freq,
                        &scale,
                        &kv,
                        &h,
                        &kvh,
                        &d,
                        &bsi,
                        &ri,
                        &ki
                    )
                    .launch(cfg)
                },
                "gemv_rope",
            );
            return;
        }
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: one CTA per row of `qkv` (asserted size); every exact slot was just given a
        // chunk (`apply`); `kv` addresses layer `layer` of the exact slab.
        ok(
            unsafe {
                args!(
                    self.stream,
                    &self.k.rope_store,
                    &qp,
                    &pp,
                    &sp,
                    &freq,
                    &scale,
                    &kv,
                    &h,
                    &kvh,
                    &d,
                    &bsi
                )
                .launch(cfg)
            },
            "rope_store",
        );
    }

    /// The RoPE an `mhc` codec's keys are rebuilt with (the projection's: sealing un-rotates
    /// with it, attention rotates back): its inverse frequencies on the device and its
    /// attention scaling. `(0, 1.0)` for other codecs (and an `mhc` rank without projection,
    /// which never gets a slab).
    pub(super) fn latent_rope(&self, store: &CudaKvStore, codec: Option<Codec>) -> (u64, f32) {
        codec
            .and_then(Codec::latent_rank)
            .and_then(|r| store.latent_keys.iter().find(|k| k.rank == r))
            .map_or((0, 1.0), |k| {
                (self.inv_freq(&k.rope), k.rope.attention_scaling)
            })
    }

    /// [`Backend::seal`]: encodes layer `layer` of each block of `seals` from its exact copy
    /// into its format's slab (layer 0 gives it the sealed slot), then, for quest, the key
    /// bounds of what was just written. `bf16` blocks without bounds stay exact.
    pub(super) fn seal_impl(&self, store: &mut CudaKvStore, layer: usize, seals: &[Seal]) {
        let mut actions = Vec::new();
        // (format slab, codec, bounds, [exact slot, sealed slot, first position] per block).
        let mut groups: Vec<(usize, Codec, bool, Vec<u32>)> = Vec::new();
        for s in seals {
            let Some(slab) = store.slab_of(&self.stream, s.codec, s.bounds) else {
                continue; // bf16 without bounds (never moved), or an mhc rank without projection
            };
            let slots = if layer == 0 {
                store.map.seal(s.block, slab, &mut actions)
            } else {
                let l = store.loc(s.block);
                (l.exact != slots::NO_SLOT && l.sealed != slots::NO_SLOT && l.slab as usize == slab)
                    .then_some((l.exact, l.sealed))
            };
            let Some((ex, se)) = slots else {
                debug_assert!(false, "seal of block {} without an exact copy", s.block);
                continue;
            };
            match groups.iter_mut().find(|g| g.0 == slab) {
                Some(g) => g.3.extend([ex, se, s.pos]),
                None => groups.push((slab, s.codec, s.bounds, vec![ex, se, s.pos])),
            }
        }
        store.apply(&self.stream, &actions);
        let (kvh, d, bs) = (
            store.shape.num_kv_heads,
            store.shape.head_dim,
            store.block_size,
        );
        for (slab, codec, bounds, list) in groups {
            let n = list.len() / 3;
            let seals_dev = self.to_device(&list);
            let sp = self.ptr(&seals_dev);
            let fmt = format_index(Some(codec), bounds);
            let (freq, scaling) = self.latent_rope(store, Some(codec));
            let kv = store.args(&self.stream, layer, slab, freq, scaling, 0);
            let (di, bsi) = (d as i32, bs as i32);
            let cfg = LaunchConfig {
                grid_dim: (n as u32, kvh as u32, 2),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: `seals_dev` holds n (exact, sealed, pos) triples of live slots in the
            // exact slab and in slab `slab`; `kv` addresses layer `layer` of both.
            ok(
                unsafe { args!(self.stream, &self.k.seal[fmt], &sp, &kv, &di, &bsi).launch(cfg) },
                "seal",
            );
            if let Some(rank) = codec.latent_rank() {
                let lat = store
                    .latents
                    .iter()
                    .find(|l| l.rank == rank)
                    .expect("mhc projection on the device");
                let down = self.ptr(&lat.layers[layer].1);
                let smem = bs * kvh * d * 4;
                assert!(
                    smem <= LATENT_MAX_SMEM,
                    "mhc on CUDA: block_size × kv_heads × head_dim × 4 = {smem} bytes > {LATENT_MAX_SMEM}"
                );
                let (kvhi, di, bsi) = (kvh as i32, d as i32, bs as i32);
                let cfg = LaunchConfig {
                    grid_dim: (n as u32, 1, 1),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: smem as u32,
                };
                // SAFETY: as above; `down` is this layer's [rank, W] projection; shared memory
                // within the limit set at load (asserted).
                ok(
                    unsafe {
                        args!(
                            self.stream,
                            &self.k.latent_encode,
                            &sp,
                            &kv,
                            &down,
                            &kvhi,
                            &di,
                            &bsi
                        )
                        .launch(cfg)
                    },
                    "latent_encode",
                );
            }
            if bounds {
                let (kvhi, di, bsi) = (kvh as i32, d as i32, bs as i32);
                let cfg = LaunchConfig {
                    grid_dim: (n as u32, kvh as u32, 1),
                    block_dim: (d.next_multiple_of(32).min(256) as u32, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: as above; reads the sealed copies written by the launches before it
                // (same stream) and writes each head's bounds inside its own sealed slot.
                ok(
                    unsafe {
                        args!(
                            self.stream,
                            &self.k.seal_bounds[fmt],
                            &sp,
                            &kv,
                            &kvhi,
                            &di,
                            &bsi
                        )
                        .launch(cfg)
                    },
                    "seal_bounds",
                );
            }
        }
    }

    /// [`Backend::release_exact`].
    pub(super) fn release_exact_impl(&self, store: &mut CudaKvStore, blocks: &[u32]) {
        let mut actions = Vec::new();
        store.map.release_exact(blocks, &mut actions);
        store.apply(&self.stream, &actions);
        self.compact(store);
    }

    /// [`Backend::forget_blocks`]: the blocks' slots freed, then the slabs compacted.
    pub(super) fn forget_blocks_impl(&self, store: &mut CudaKvStore, blocks: &[u32]) {
        let mut actions = Vec::new();
        store.map.forget(blocks, &mut actions);
        store.apply(&self.stream, &actions);
        self.compact(store);
    }

    /// Moves live slots out of sparsely used chunks and frees them (`BlockMap::compact`), so
    /// a slab holds at most one chunk more than its live blocks need. The copies are queued
    /// before the chunk frees: both are in stream order, so they read the chunks before the
    /// memory goes back to the pool.
    fn compact(&self, store: &mut CudaKvStore) {
        let (mut moves, mut frees) = (Vec::new(), Vec::new());
        store.map.compact(&mut moves, &mut frees);
        if !moves.is_empty() {
            self.kv_moves
                .fetch_add(moves.len() as u64, std::sync::atomic::Ordering::Relaxed);
            self.launch_copies(store, moves);
            store.apply(&self.stream, &frees);
        }
    }

    /// [`Backend::copy_blocks`]: every copy of `src` (exact and/or sealed) into new slots of
    /// `dst`, in order; dependent copies go to separate launches.
    pub(super) fn copy_blocks_impl(&self, store: &mut CudaKvStore, copies: &[(u32, u32)]) {
        let mut actions = Vec::new();
        store.map.copy(copies, &mut actions);
        let copies = store.apply(&self.stream, &actions);
        self.launch_copies(store, copies);
    }

    /// Launches `copies` (slot to slot within a slab, slots live in allocated chunks), in order.
    fn launch_copies(&self, store: &CudaKvStore, copies: Vec<Action>) {
        // Runs of copies of one slab in which no copy reads or writes a slot an earlier copy
        // of the run writes (or writes one it reads): one launch each, in order.
        let mut runs: Vec<(usize, Vec<u32>)> = Vec::new();
        let (mut reads, mut writes) = (Vec::new(), Vec::new());
        for a in copies {
            let Action::Copy { slab, src, dst } = a else {
                continue;
            };
            let fresh = match runs.last() {
                None => true,
                Some((s, _)) => {
                    *s != slab
                        || writes.contains(&src)
                        || writes.contains(&dst)
                        || reads.contains(&dst)
                }
            };
            if fresh {
                runs.push((slab, Vec::new()));
                reads.clear();
                writes.clear();
            }
            runs.last_mut().expect("pushed above").1.extend([src, dst]);
            reads.push(src);
            writes.push(dst);
        }
        for (slab, pairs) in runs {
            let dev = self.to_device(&pairs);
            let pp = self.ptr(&dev);
            let s = &store.slabs[slab];
            let (cp, shift, bb) = (s.addrs(&self.stream), s.shift, s.block_bytes as u64);
            let cfg = LaunchConfig {
                grid_dim: ((pairs.len() / 2) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: every slot in `pairs` is live in slab `slab` (the map allocated them and
            // `apply` gave their chunks memory); blocks are whole multiples of 16 bytes.
            ok(
                unsafe {
                    args!(self.stream, &self.k.copy_blocks, &cp, &pp, &shift, &bb).launch(cfg)
                },
                "copy_blocks",
            );
        }
    }

    /// [`Backend::attach_latent_keys`]: the projections on the device, one per rank.
    pub(super) fn attach_latent_impl(&self, store: &mut CudaKvStore, keys: &[Arc<LatentKeys>]) {
        for k in keys {
            if store.latents.iter().any(|l| l.rank == k.rank) {
                continue;
            }
            let layers = k
                .layers
                .iter()
                .map(|l| {
                    (
                        self.to_device(&l.mean),
                        self.to_device(&l.down),
                        self.to_device(&l.up_t),
                    )
                })
                .collect();
            store.latents.push(DeviceLatent {
                rank: k.rank,
                ranks: k.layers.iter().map(|l| l.rank).collect(),
                layers,
            });
            store.latent_keys.push(k.clone());
        }
    }
}
