//! The paged KV store of the CPU backend: the physical pool of KV blocks over all layers.
//! Block ids, refcounts and tables belong to `kv/`; this file only holds the data and moves it
//! (write a token's K/V at a slot, seal full blocks into their policy's format, copy whole
//! blocks for copy-on-write).
//!
//! Two kinds of storage, both indexed by block id and committed page by page as written:
//! - the *exact* arena, f32, per layer for K and for V: `[num_blocks][num_kv_heads][block_size]
//!   [head_dim]`. One (block, KV head) is `block_size × head_dim` contiguous floats, so attention
//!   reads a block of one head as one sequential run. Blocks are written here while they fill;
//!   the block being filled is always exact.
//! - one *sealed* arena per [`Codec`] in use, block-major (`[num_blocks][layers][latent |
//!   kv_heads × (K run | V run)]`, runs as `backend::codec` encodes them; the latent only for
//!   `mhc`, whose keys are one projection across heads, see `backend::latent`), plus optional
//!   per-(block, layer, head) key min/max (`quest`). [`CpuKvStore::seal`] encodes a full block's runs here, layer by layer,
//!   inside the forward that fills it; [`CpuKvStore::release_exact`] then gives the block's
//!   exact pages back to the OS, so the memory a sequence holds is its sealed bytes plus one
//!   exact tail block. Block-major layout makes one block of one format a contiguous range, so
//!   a block sealed into another format than last time releases its old pages too, and
//!   [`CpuKvStore::forget`] gives back every page of a block the pool freed.
//!
//! Which representation of a block is current is `state[block]`; attention decodes sealed runs
//! into an L1 tile inside its loop (`KvView::decode_k`/`decode_v`), never in a separate pass.

use super::arena::{ZeroedBuf, ZeroedBytes};
use super::kv_sealed::{f16_down, f16_up, SealedArena};
use super::ops::RopeTable;
use crate::backend::codec::Codec;
use crate::backend::latent::LatentKeys;
use crate::backend::{AttnShape, KvGeometry, Seal};
use half::f16;
use std::sync::Arc;

/// Bytes per stored element of the exact arena (f32).
pub const ELEM_BYTES: usize = 4;

/// K and V of one layer, each `[num_blocks, num_kv_heads, block_size, head_dim]`.
#[derive(Debug)]
pub struct LayerKv {
    pub k: ZeroedBuf,
    pub v: ZeroedBuf,
}

/// Where block `b`'s current data is: `EXACT`, or `1 + index` of its sealed arena, `| BOUNDS`
/// when its key bounds are stored.
const EXACT: u8 = 0;
const BOUNDS: u8 = 0x80;
/// Sealed arenas a store can have (one bit each in `resident`).
const MAX_ARENAS: usize = 64;

/// The block pool's storage: every layer's K and V for `num_blocks` blocks.
#[derive(Debug)]
pub struct CpuKvStore {
    layers: Vec<LayerKv>,
    num_blocks: usize,
    block_size: usize,
    shape: AttnShape,
    /// One per codec in use, created on first seal; `state` indexes it.
    sealed: Vec<SealedArena>,
    /// The `mhc` projections (one per rank) with their rope table.
    latents: Vec<(Arc<LatentKeys>, Arc<RopeTable>)>,
    /// Key min/max per (block, layer, KV head): `[num_blocks][layers][kv_heads][2][head_dim]`
    /// f16 (min row then max row); created on first use.
    bounds: Option<ZeroedBytes>,
    state: Vec<u8>,
    /// Bit `i` set: block's pages in sealed arena `i` may be committed.
    resident: Vec<u64>,
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
            sealed: Vec::new(),
            latents: Vec::new(),
            bounds: None,
            state: vec![EXACT; num_blocks],
            resident: vec![0; num_blocks],
        }
    }

    /// Bytes one exact (filling) block takes over `layers` layers, K and V.
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

    /// The codec block `block` is currently sealed in, if any.
    pub fn sealed_codec(&self, block: u32) -> Option<Codec> {
        match self.state.get(block as usize).map(|s| s & !BOUNDS) {
            None | Some(EXACT) => None,
            Some(i) => Some(self.sealed[i as usize - 1].codec),
        }
    }

    /// Adds the projection `mhc:R` blocks of its rank are sealed with (replacing one of the
    /// same rank that no block uses yet).
    pub fn attach_latent(&mut self, keys: Arc<LatentKeys>, rope: Arc<RopeTable>) {
        self.latents.retain(|(k, _)| k.rank != keys.rank);
        self.latents.push((keys, rope));
    }

    /// The index of `codec`'s arena, created on first use; `None` for an `mhc` rank without a
    /// projection (or past [`MAX_ARENAS`]).
    fn arena_index(&mut self, codec: Codec) -> Option<usize> {
        if let Some(i) = self.sealed.iter().position(|a| a.codec == codec) {
            return Some(i);
        }
        let keys = match codec.latent_rank() {
            None => None,
            Some(r) => Some(self.latents.iter().find(|(k, _)| k.rank == r)?.clone()),
        };
        if self.sealed.len() >= MAX_ARENAS {
            return None;
        }
        self.sealed.push(SealedArena::new(
            codec,
            self.layers.len(),
            self.shape.num_kv_heads,
            self.block_size,
            self.shape.head_dim,
            self.num_blocks,
            keys,
        ));
        Some(self.sealed.len() - 1)
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
            layer,
            layers: self.layers.len(),
            state: &self.state,
            sealed: &self.sealed,
            bounds: self.bounds.as_deref(),
        }
    }

    /// Writes the (already rotated) k and the v of fused `[q | k | v]` rows at `slots`
    /// (`block * block_size + offset`). A write at offset 0 of layer 0 starts a block afresh:
    /// it is exact until sealed. The caller (kv) guarantees valid slots; an invalid one trips a
    /// debug assertion and is skipped in release rather than panicking in a server.
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
            if layer == 0 && off == 0 {
                self.state[block] = EXACT;
            }
            for g in 0..shape.num_kv_heads {
                let at = self.index(block, g, off);
                let lkv = &mut self.layers[layer];
                lkv.k[at..at + d].copy_from_slice(&row[qw + g * d..qw + (g + 1) * d]);
                lkv.v[at..at + d].copy_from_slice(&row[qw + kvw + g * d..qw + kvw + (g + 1) * d]);
            }
        }
    }

    fn bounds_block_bytes(&self) -> usize {
        self.layers.len() * self.shape.num_kv_heads * 2 * self.shape.head_dim * 2
    }

    /// Encodes layer `layer` of each full block in `seals` into its codec (and key bounds).
    /// Called once per layer, after `store` and before attention reads the layer, so a sealed
    /// block is read sealed by every later query of the same forward. Layer 0 also switches
    /// the block's state (and releases its pages in another codec's arena). A block whose
    /// codec cannot be served (an `mhc` rank without projection: the model refuses such steps
    /// first) stays exact.
    pub fn seal(&mut self, layer: usize, seals: &[Seal]) {
        let (bs, d, heads) = (
            self.block_size,
            self.shape.head_dim,
            self.shape.num_kv_heads,
        );
        let (run, w) = (bs * d, heads * d);
        let mut keys = vec![0f32; run];
        let mut pre = vec![0f32; bs * w];
        for s in seals {
            let b = s.block as usize;
            if b >= self.num_blocks {
                debug_assert!(false, "seal of block {b} ≥ {}", self.num_blocks);
                continue;
            }
            let Some(ai) = self.arena_index(s.codec) else {
                debug_assert!(false, "no arena for {}", s.codec.name());
                continue;
            };
            if layer == 0 {
                self.state[b] = (ai as u8 + 1) | if s.bounds { BOUNDS } else { 0 };
                for (j, other) in self.sealed.iter_mut().enumerate() {
                    if j != ai && self.resident[b] & (1 << j) != 0 {
                        let r = b * other.block_bytes..(b + 1) * other.block_bytes;
                        other.data.release(r);
                    }
                }
                self.resident[b] = 1 << ai;
            } else if self.state[b] & !BOUNDS != ai as u8 + 1 {
                continue; // layer 0 did not seal it
            }
            let starts: Vec<usize> = (0..heads).map(|g| self.index(b, g, 0)).collect();
            let lkv = &self.layers[layer];
            let kx: Vec<&[f32]> = starts.iter().map(|&a| &lkv.k[a..a + run]).collect();
            let vx: Vec<&[f32]> = starts.iter().map(|&a| &lkv.v[a..a + run]).collect();
            let arena = &mut self.sealed[ai];
            if let Some((lk, rope)) = &arena.keys {
                // Pre-RoPE keys, token-major across heads: the latent is joint over heads.
                for (g, k) in kx.iter().enumerate() {
                    for t in 0..bs {
                        let head = &mut pre[t * w + g * d..t * w + (g + 1) * d];
                        head.copy_from_slice(&k[t * d..(t + 1) * d]);
                        rope.unrotate_head(head, s.pos as usize + t);
                    }
                }
                let r = arena.latent_range(b, layer);
                lk.encode(layer, &pre, bs, &mut arena.data[r]);
            }
            for g in 0..heads {
                let at = arena.run_at(b, layer, g);
                let (k_run, v_run) = (arena.k_run, arena.v_run);
                let (kd, rest) = arena.data[at..at + k_run + v_run].split_at_mut(k_run);
                s.codec.encode_k(kx[g], bs, d, kd);
                s.codec.encode_v(vx[g], bs, d, &mut rest[..v_run]);
            }
            if s.bounds {
                let bb = self.bounds_block_bytes();
                let nb = self.num_blocks;
                let arena = &self.sealed[ai];
                let mut mins = vec![0u16; heads * 2 * d];
                for g in 0..heads {
                    // Bounds of the keys attention will read: the decoded ones.
                    arena.decode_k(b, layer, g, (bs, d), (0, bs), s.pos as usize, &mut keys);
                    for c in 0..d {
                        let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
                        for t in 0..bs {
                            lo = lo.min(keys[t * d + c]);
                            hi = hi.max(keys[t * d + c]);
                        }
                        // Round outward so the bound stays a bound after f16 rounding.
                        mins[g * 2 * d + c] = f16_down(lo).to_bits();
                        mins[g * 2 * d + d + c] = f16_up(hi).to_bits();
                    }
                }
                let bounds = self.bounds.get_or_insert_with(|| ZeroedBytes::new(nb * bb));
                let at = b * bb + layer * heads * 2 * d * 2;
                for (i, m) in mins.iter().enumerate() {
                    bounds[at + 2 * i..at + 2 * i + 2].copy_from_slice(&m.to_le_bytes());
                }
            }
        }
    }

    /// Gives the exact pages of sealed `blocks` back to the OS (call after the forward that
    /// sealed them: nothing reads them exact any more).
    pub fn release_exact(&mut self, blocks: &[u32]) {
        let n = self.block_len();
        for &b in blocks {
            let b = b as usize;
            if b >= self.num_blocks || self.state[b] == EXACT {
                continue;
            }
            for l in &mut self.layers {
                l.k.release(b * n..(b + 1) * n);
                l.v.release(b * n..(b + 1) * n);
            }
        }
    }

    /// Gives every page of `blocks` back to the OS: exact, sealed in any arena, key bounds. The
    /// pool freed them and nothing reads them again (a block handed out again is written from
    /// offset 0, which makes it exact, or copied into whole), so what the store holds follows
    /// what the pool charges instead of keeping each id's last contents until it is reused.
    pub fn forget(&mut self, blocks: &[u32]) {
        let n = self.block_len();
        let bb = self.bounds_block_bytes();
        for &b in blocks {
            let b = b as usize;
            if b >= self.num_blocks {
                continue;
            }
            for l in &mut self.layers {
                l.k.release(b * n..(b + 1) * n);
                l.v.release(b * n..(b + 1) * n);
            }
            for (j, a) in self.sealed.iter_mut().enumerate() {
                if self.resident[b] & (1 << j) != 0 {
                    a.data.release(b * a.block_bytes..(b + 1) * a.block_bytes);
                }
            }
            if let Some(bd) = &mut self.bounds {
                bd.release(b * bb..(b + 1) * bb);
            }
            self.resident[b] = 0;
            self.state[b] = EXACT;
        }
    }

    /// For each `(src, dst)` in order, block `dst` becomes a copy of block `src` in every layer,
    /// K and V (and its sealed form, if any). Out-of-range ids trip a debug assertion and are
    /// skipped in release.
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
            self.state[dst] = self.state[src];
            let ai = (self.state[src] & !BOUNDS) as usize;
            if ai != EXACT as usize {
                let a = &mut self.sealed[ai - 1];
                let bb = a.block_bytes;
                a.data.copy_within(src * bb..(src + 1) * bb, dst * bb);
                self.resident[dst] |= 1 << (ai - 1);
            }
            if self.state[src] & BOUNDS != 0 {
                let bb = self.bounds_block_bytes();
                if let Some(bd) = &mut self.bounds {
                    bd.copy_within(src * bb..(src + 1) * bb, dst * bb);
                }
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
    layer: usize,
    layers: usize,
    state: &'a [u8],
    sealed: &'a [SealedArena],
    bounds: Option<&'a [u8]>,
}

impl<'a> KvView<'a> {
    fn at(&self, block: u32, kv_head: usize, offset: usize) -> usize {
        ((block as usize * self.kv_heads + kv_head) * self.block_size + offset) * self.head_dim
    }

    /// Keys of `kv_head` in `block` from `offset` to the block's end, `head_dim` apart (the
    /// exact arena). Panics on an id out of range: `attention` validates every table first.
    pub fn k(&self, block: u32, kv_head: usize, offset: usize) -> &'a [f32] {
        let a = self.at(block, kv_head, offset);
        &self.k[a..self.at(block, kv_head, self.block_size)]
    }

    /// Values, as [`Self::k`].
    pub fn v(&self, block: u32, kv_head: usize, offset: usize) -> &'a [f32] {
        let a = self.at(block, kv_head, offset);
        &self.v[a..self.at(block, kv_head, self.block_size)]
    }

    /// The codec `block` is sealed in (`None`: read it exact).
    #[inline]
    pub fn sealed(&self, block: u32) -> Option<Codec> {
        self.arena(block).map(|a| a.codec)
    }

    #[inline]
    fn arena(&self, block: u32) -> Option<&'a SealedArena> {
        match self.state[block as usize] & !BOUNDS {
            EXACT => None,
            i => Some(&self.sealed[i as usize - 1]),
        }
    }

    /// Decodes keys of sealed `block`, head `g`, rows `r0..r1` of the block into `out`; the
    /// block's first token is at position `pos` (`mhc` rotates its reconstructions).
    pub fn decode_k(
        &self,
        block: u32,
        g: usize,
        r0: usize,
        r1: usize,
        pos: usize,
        out: &mut [f32],
    ) {
        let a = self.arena(block).expect("decode_k of a sealed block");
        let geo = (self.block_size, self.head_dim);
        a.decode_k(block as usize, self.layer, g, geo, (r0, r1), pos, out);
    }

    /// Values, as [`Self::decode_k`].
    pub fn decode_v(&self, block: u32, g: usize, r0: usize, r1: usize, out: &mut [f32]) {
        let a = self.arena(block).expect("decode_v of a sealed block");
        let geo = (self.block_size, self.head_dim);
        a.decode_v(block as usize, self.layer, g, geo, (r0, r1), out);
    }

    /// Per-channel key min (into `lo`) and max (into `hi`) of a sealed block, if it stores them.
    pub fn key_bounds(&self, block: u32, g: usize, lo: &mut [f32], hi: &mut [f32]) -> bool {
        if self.state[block as usize] & BOUNDS == 0 {
            return false;
        }
        let Some(bounds) = self.bounds else {
            return false;
        };
        let d = self.head_dim;
        let bb = self.layers * self.kv_heads * 2 * d * 2;
        let at = block as usize * bb + (self.layer * self.kv_heads + g) * 2 * d * 2;
        let f =
            |i: usize| f16::from_le_bytes([bounds[at + 2 * i], bounds[at + 2 * i + 1]]).to_f32();
        for c in 0..d {
            lo[c] = f(c);
            hi[c] = f(d + c);
        }
        true
    }

    /// The layer this view reads.
    pub fn layer(&self) -> usize {
        self.layer
    }
}

#[cfg(test)]
#[path = "kv_store_tests.rs"]
mod tests;
