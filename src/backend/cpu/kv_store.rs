//! The paged KV store of the CPU backend: the physical pool of KV blocks over all layers.
//! Block ids, refcounts and tables belong to `kv/`; this file only holds the data and moves it
//! (write a token's K/V at a slot, copy whole blocks for copy-on-write).
//!
//! Layout, per layer, for K and for V: `[num_blocks][num_kv_heads][block_size][head_dim]`.
//! One (block, KV head) is `block_size × head_dim` contiguous elements, so attention reads a
//! whole block of one head as one sequential run (a query group of one KV head never touches
//! the other heads' bytes), and a block of one layer is one contiguous range (a copy-on-write
//! copy is one `memcpy` per layer and K/V).
//!
//! Elements are f32 for exactness. The element format is private to this file and to the
//! kernels in `attention.rs` that read blocks (`KvView`): a compressed format (bf16, int8 with
//! scales) changes `ELEM_BYTES`, `write_row`/`copy_blocks` and those kernels, nothing outside.

use super::arena::ZeroedBuf;
use crate::backend::{AttnShape, KvGeometry};

/// Bytes per stored element (f32 today).
pub const ELEM_BYTES: usize = 4;

/// K and V of one layer, each `[num_blocks, num_kv_heads, block_size, head_dim]`.
#[derive(Debug)]
pub struct LayerKv {
    pub k: ZeroedBuf,
    pub v: ZeroedBuf,
}

/// The block pool's storage: every layer's K and V for `num_blocks` blocks.
#[derive(Debug)]
pub struct CpuKvStore {
    layers: Vec<LayerKv>,
    num_blocks: usize,
    block_size: usize,
    shape: AttnShape,
}

impl KvGeometry for CpuKvStore {
    fn num_layers(&self) -> usize {
        self.layers.len()
    }
    fn num_blocks(&self) -> usize {
        self.num_blocks
    }
    fn block_size(&self) -> usize {
        self.block_size
    }
}

impl CpuKvStore {
    /// A zeroed store (memory is committed page by page as blocks are first written).
    pub fn new(layers: usize, num_blocks: usize, block_size: usize, shape: AttnShape) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        let len = num_blocks * block_size * shape.kv_width();
        let layer = || LayerKv {
            k: ZeroedBuf::new(len),
            v: ZeroedBuf::new(len),
        };
        CpuKvStore {
            layers: (0..layers).map(|_| layer()).collect(),
            num_blocks,
            block_size,
            shape,
        }
    }

    /// Bytes one block takes over `layers` layers, K and V.
    pub fn bytes_per_block(layers: usize, block_size: usize, shape: AttnShape) -> usize {
        layers * 2 * block_size * shape.kv_width() * ELEM_BYTES
    }

    pub fn shape(&self) -> AttnShape {
        self.shape
    }

    pub fn layer(&self, layer: usize) -> &LayerKv {
        &self.layers[layer]
    }

    pub fn layer_mut(&mut self, layer: usize) -> &mut LayerKv {
        &mut self.layers[layer]
    }

    /// Elements of one block of one layer (K or V alone).
    fn block_len(&self) -> usize {
        self.block_size * self.shape.kv_width()
    }

    /// Index in a layer's K (or V) of `(block, kv head, offset in block, dim 0)`.
    pub fn index(&self, block: usize, kv_head: usize, offset: usize) -> usize {
        let d = self.shape.head_dim;
        ((block * self.shape.num_kv_heads + kv_head) * self.block_size + offset) * d
    }

    /// The read-only view of one layer that attention works on.
    pub fn view(&self, layer: usize) -> KvView<'_> {
        let l = &self.layers[layer];
        KvView {
            k: &l.k,
            v: &l.v,
            num_blocks: self.num_blocks,
            block_size: self.block_size,
            kv_heads: self.shape.num_kv_heads,
            head_dim: self.shape.head_dim,
        }
    }

    /// Writes the (already rotated) k and the v of fused `[q | k | v]` rows at `slots`
    /// (`block * block_size + offset`). The caller (kv) guarantees valid slots; an invalid one
    /// trips a debug assertion and is skipped in release rather than panicking in a server.
    pub fn store(&mut self, layer: usize, qkv: &[f32], rows: usize, slots: &[u32]) {
        let shape = self.shape;
        let (qw, kvw, width, d) = (
            shape.q_width(),
            shape.kv_width(),
            shape.qkv_width(),
            shape.head_dim,
        );
        let cap = self.num_blocks * self.block_size;
        for (row, &slot) in qkv[..rows * width].chunks_exact(width).zip(slots) {
            let slot = slot as usize;
            debug_assert!(slot < cap, "KV slot {slot} ≥ capacity {cap}");
            if slot >= cap {
                continue;
            }
            let (block, off) = (slot / self.block_size, slot % self.block_size);
            for g in 0..shape.num_kv_heads {
                let at = self.index(block, g, off);
                let lkv = &mut self.layers[layer];
                lkv.k[at..at + d].copy_from_slice(&row[qw + g * d..qw + (g + 1) * d]);
                lkv.v[at..at + d].copy_from_slice(&row[qw + kvw + g * d..qw + kvw + (g + 1) * d]);
            }
        }
    }

    /// For each `(src, dst)` in order, block `dst` becomes a copy of block `src` in every layer,
    /// K and V. Out-of-range ids trip a debug assertion and are skipped in release.
    pub fn copy_blocks(&mut self, copies: &[(u32, u32)]) {
        let n = self.block_len();
        for &(src, dst) in copies {
            let (src, dst) = (src as usize, dst as usize);
            debug_assert!(
                src < self.num_blocks && dst < self.num_blocks,
                "copy_blocks: block id ≥ {}",
                self.num_blocks
            );
            if src >= self.num_blocks || dst >= self.num_blocks || src == dst {
                continue;
            }
            for l in &mut self.layers {
                l.k.copy_within(src * n..(src + 1) * n, dst * n);
                l.v.copy_within(src * n..(src + 1) * n, dst * n);
            }
        }
    }
}

/// One layer's K and V as attention reads them.
#[derive(Clone, Copy)]
pub struct KvView<'a> {
    k: &'a [f32],
    v: &'a [f32],
    pub num_blocks: usize,
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl<'a> KvView<'a> {
    fn at(&self, block: u32, kv_head: usize, offset: usize) -> usize {
        ((block as usize * self.kv_heads + kv_head) * self.block_size + offset) * self.head_dim
    }

    /// Keys of `kv_head` in `block` from `offset` to the block's end, `head_dim` apart.
    /// Panics on an id out of range: `attention` validates every table before it gets here.
    pub fn k(&self, block: u32, kv_head: usize, offset: usize) -> &'a [f32] {
        let a = self.at(block, kv_head, offset);
        &self.k[a..self.at(block, kv_head, self.block_size)]
    }

    /// Values, as [`Self::k`].
    pub fn v(&self, block: u32, kv_head: usize, offset: usize) -> &'a [f32] {
        let a = self.at(block, kv_head, offset);
        &self.v[a..self.at(block, kv_head, self.block_size)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: AttnShape = AttnShape {
        num_heads: 2,
        num_kv_heads: 2,
        head_dim: 2,
    };

    #[test]
    fn store_writes_each_head_into_its_block_run() {
        // Block size 2, 3 blocks. Rows [q q q q | k0 k0 k1 k1 | v0 v0 v1 v1] at slots 5 and 0.
        let mut s = CpuKvStore::new(2, 3, 2, SHAPE);
        let qkv: Vec<f32> = (0..24).map(|i| i as f32).collect();
        s.store(1, &qkv, 2, &[5, 0]);
        let l = s.layer(1);
        // Slot 5 = block 2, offset 1: head 0 at ((2*2+0)*2+1)*2 = 18, head 1 at 22.
        assert_eq!(&l.k[18..20], &[4.0, 5.0]);
        assert_eq!(&l.k[22..24], &[6.0, 7.0]);
        assert_eq!(&l.v[18..20], &[8.0, 9.0]);
        assert_eq!(&l.v[22..24], &[10.0, 11.0]);
        // Slot 0: head 0 at 0, head 1 at 4.
        assert_eq!(&l.k[0..2], &[16.0, 17.0]);
        assert_eq!(&l.k[4..6], &[18.0, 19.0]);
        assert_eq!(&l.v[4..6], &[22.0, 23.0]);
        let written = [0, 1, 4, 5, 18, 19, 22, 23];
        for (i, &x) in l.k.iter().enumerate() {
            assert_eq!(x != 0.0, written.contains(&i), "k[{i}] = {x}");
        }
        assert!(s.layer(0).k.iter().all(|&v| v == 0.0));
        assert_eq!(s.view(1).k(2, 1, 1), &[6.0, 7.0]);
    }

    #[test]
    fn copy_blocks_copies_every_layer_k_and_v() {
        let mut s = CpuKvStore::new(3, 4, 2, SHAPE);
        let n = 2 * SHAPE.kv_width();
        for l in 0..3 {
            let lkv = s.layer_mut(l);
            for i in 0..lkv.k.len() {
                lkv.k[i] = (l * 1000 + i) as f32;
                lkv.v[i] = -((l * 1000 + i) as f32);
            }
        }
        // Chain: 1 → 3, then 3 → 0 (sees the copied data, in order); an invalid pair is skipped
        // in release.
        let copies: &[(u32, u32)] = if cfg!(debug_assertions) {
            &[(1, 3), (3, 0)]
        } else {
            &[(1, 3), (9, 2), (3, 0)]
        };
        s.copy_blocks(copies);
        for l in 0..3 {
            let lkv = s.layer(l);
            for i in 0..n {
                let src = (l * 1000 + n + i) as f32;
                assert_eq!(lkv.k[3 * n + i], src, "layer {l} K");
                assert_eq!(lkv.v[3 * n + i], -src, "layer {l} V");
                assert_eq!(lkv.k[i], src);
                assert_eq!(lkv.v[i], -src);
                // Untouched blocks keep their data.
                assert_eq!(lkv.k[2 * n + i], (l * 1000 + 2 * n + i) as f32);
            }
        }
    }

    #[test]
    fn store_skips_slots_past_capacity_in_release() {
        if cfg!(debug_assertions) {
            return; // the debug assertion is the intended behaviour there
        }
        let mut s = CpuKvStore::new(1, 1, 2, SHAPE);
        s.store(0, &[1.0; 12], 1, &[2]);
        assert!(s.layer(0).k.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn bytes_per_block() {
        // SmolLM2-135M: 30 layers, 3 KV heads of 64, 16 tokens: 30 · 2 · 16 · 192 · 4 bytes.
        let shape = AttnShape {
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
        };
        assert_eq!(CpuKvStore::bytes_per_block(30, 16, shape), 737_280);
    }
}
