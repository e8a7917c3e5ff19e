//! The paged KV store on the device. Block ids belong to `kv/`; this file keeps, per block id,
//! where its data is (`slots::BlockMap`: an exact bf16 copy while it fills, a sealed copy in its
//! policy's format once full) and the device memory behind it.
//!
//! Memory is a set of *slabs*: slab 0 holds exact blocks (bf16, `[layer][k|v][kv_head][slot]
//! [dim]` per block), slab `i ≥ 1` the blocks sealed in one format, with or without quest's key
//! bounds (`[layer][latent | kv_head × (K run | V run | bounds)]`, runs as `backend::codec`
//! encodes them, bounds as `cpu::kv_store` keeps them, every part padded to 16 bytes).
//! A slab allocates device memory a chunk of slots at a time and frees a chunk once none of its
//! slots is live, so the memory held follows what the pool holds (its bytes weigh each block by
//! its current form) instead of reserving every block id in every format up front. Kernels find
//! a slot's address through the slab's chunk-pointer array (`kernels/kv_formats.cuh`).

use super::slots::{Action, BlockLoc, BlockMap, NO_SLOT};
use crate::backend::codec::Codec;
use crate::backend::latent::LatentKeys;
use crate::backend::{AttnShape, KvGeometry};
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use std::sync::Arc;

/// Device memory per chunk a slab aims at by default (a chunk holds the largest power-of-two
/// number of blocks that fits, at least one). `CudaBackend::set_kv_chunk_bytes` changes it for
/// the stores made after (tests use small chunks so that compaction has work).
pub const CHUNK_BYTES: usize = 8 << 20;
pub use super::layout::{exact_block_bytes, format_index, SealedLayout, FORMATS};

/// Slots per chunk for blocks of `block_bytes` in chunks of about `chunk_bytes`.
fn per_chunk(block_bytes: usize, chunk_bytes: usize) -> u32 {
    let n = (chunk_bytes / block_bytes.max(1)).clamp(1, 1 << 30);
    1 << n.ilog2()
}

/// One slab's device memory: its chunks and the array of their addresses the kernels read.
#[derive(Debug)]
pub struct Slab {
    pub block_bytes: usize,
    pub shift: u32,
    chunks: Vec<Option<CudaSlice<u8>>>,
    addrs: Vec<u64>,
    /// The device copy of `addrs`, re-uploaded when a chunk comes or goes.
    dev_addrs: Option<CudaSlice<u64>>,
}

impl Slab {
    fn new(block_bytes: usize, per_chunk: u32, max_chunks: usize) -> Self {
        Slab {
            block_bytes,
            shift: per_chunk.trailing_zeros(),
            chunks: (0..max_chunks).map(|_| None).collect(),
            addrs: vec![0; max_chunks],
            dev_addrs: None,
        }
    }

    /// Uploads the chunk-pointer array if a chunk came or went since the last upload.
    fn sync(&mut self, stream: &Arc<CudaStream>) {
        if self.dev_addrs.is_none() {
            let dev = stream
                .clone_htod(&self.addrs)
                .unwrap_or_else(|e| panic!("CUDA KV chunk table upload: {e:?}"));
            self.dev_addrs = Some(dev);
        }
    }

    /// Device address of the chunk-pointer array (kept current by `CudaKvStore::apply`).
    pub fn addrs(&self, stream: &Arc<CudaStream>) -> u64 {
        use cudarc::driver::DevicePtr;
        self.dev_addrs
            .as_ref()
            .expect("chunk table uploaded at every change")
            .device_ptr(stream)
            .0
    }

    /// Bytes of device memory the slab holds.
    pub fn bytes(&self) -> usize {
        self.chunks.iter().flatten().map(|c| c.len()).sum()
    }
}

/// `mhc` projections on the device, one per rank: per layer `(mean, down, up_t)`.
#[derive(Debug)]
pub struct DeviceLatent {
    pub rank: u16,
    pub ranks: Vec<usize>,
    pub layers: Vec<(CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>)>,
}

/// The paged KV pool on the device.
#[derive(Debug)]
pub struct CudaKvStore {
    pub(super) layers: usize,
    pub(super) num_blocks: usize,
    pub(super) block_size: usize,
    pub(super) shape: AttnShape,
    pub(super) map: BlockMap,
    /// Slab 0: exact; slab `i ≥ 1`: `sealed[i - 1]`'s format.
    pub(super) slabs: Vec<Slab>,
    pub(super) sealed: Vec<SealedLayout>,
    pub(super) latents: Vec<DeviceLatent>,
    /// Kept for the latents' shapes (ranks per layer).
    pub(super) latent_keys: Vec<Arc<LatentKeys>>,
    /// Device memory per chunk its slabs aim at ([`CHUNK_BYTES`] unless set otherwise).
    chunk_bytes: usize,
}

impl KvGeometry for CudaKvStore {
    fn num_layers(&self) -> usize {
        self.layers
    }
    fn num_blocks(&self) -> usize {
        self.num_blocks
    }
    fn block_size(&self) -> usize {
        self.block_size
    }
}

/// Where one layer's KV lives, for one launch: the twin of `struct KvArgs` in
/// kernels/kv_formats.cuh (same fields, same order; passed by value).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct KvArgs {
    pub ex_chunks: u64,
    pub se_chunks: u64,
    pub lat_mean: u64,
    pub lat_up: u64,
    pub inv_freq: u64,
    pub quest_sel: u64,
    pub ex_block_bytes: u64,
    pub ex_k: u64,
    pub ex_kv: u64,
    pub se_block_bytes: u64,
    pub se_layer: u64,
    pub ex_shift: u32,
    pub se_shift: u32,
    pub k_run: u32,
    pub v_run: u32,
    pub b_run: u32,
    pub lat_bytes: u32,
    pub rank: i32,
    pub rope_scaling: f32,
    pub window_blocks: i32,
    pub quest_words: u32,
}

// SAFETY: plain old data, `#[repr(C)]`, laid out like the CUDA struct (8-byte fields first,
// then 4-byte ones, 128 bytes).
unsafe impl DeviceRepr for KvArgs {}

impl CudaKvStore {
    pub(super) fn new(
        stream: &Arc<CudaStream>,
        layers: usize,
        num_blocks: usize,
        block_size: usize,
        shape: AttnShape,
        chunk_bytes: usize,
    ) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        let exact = exact_block_bytes(layers, block_size, shape);
        let pc = per_chunk(exact, chunk_bytes);
        let map = BlockMap::new(num_blocks, pc);
        let mut slab = Slab::new(exact, pc, num_blocks.div_ceil(pc as usize));
        slab.sync(stream);
        CudaKvStore {
            layers,
            num_blocks,
            block_size,
            shape,
            map,
            slabs: vec![slab],
            sealed: Vec::new(),
            latents: Vec::new(),
            latent_keys: Vec::new(),
            chunk_bytes,
        }
    }

    /// Bytes of one layer's K (or V) in an exact block.
    pub(super) fn kv_plane(&self) -> usize {
        self.block_size * self.shape.kv_width() * 2
    }

    /// Where `block` lives now.
    pub fn loc(&self, block: u32) -> BlockLoc {
        self.map.loc(block)
    }

    /// The slab of `codec`'s sealed blocks with key `bounds` or without, created on first use
    /// (`None` for `bf16` without bounds, which is never moved, and for an `mhc` rank without a
    /// projection).
    pub(super) fn slab_of(
        &mut self,
        stream: &Arc<CudaStream>,
        codec: Codec,
        bounds: bool,
    ) -> Option<usize> {
        if codec == Codec::Bf16 && !bounds {
            return None;
        }
        if let Some(i) = self.existing_slab(codec, bounds) {
            return Some(i);
        }
        let ranks = match codec.latent_rank() {
            None => Vec::new(),
            Some(r) => self.latents.iter().find(|l| l.rank == r)?.ranks.clone(),
        };
        let layout = SealedLayout::new(
            codec,
            bounds,
            &ranks,
            self.layers,
            self.block_size,
            self.shape,
        );
        let pc = per_chunk(layout.block_bytes, self.chunk_bytes);
        let slab = self.map.add_slab(pc);
        debug_assert_eq!(slab, self.slabs.len());
        let mut s = Slab::new(
            layout.block_bytes,
            pc,
            self.num_blocks.div_ceil(pc as usize),
        );
        s.sync(stream);
        self.slabs.push(s);
        self.sealed.push(layout);
        Some(slab)
    }

    /// The slab `codec`'s blocks (with key `bounds` or without) are sealed in, if it exists yet.
    pub(super) fn existing_slab(&self, codec: Codec, bounds: bool) -> Option<usize> {
        self.sealed
            .iter()
            .position(|l| l.codec == codec && l.bounds == bounds)
            .map(|i| i + 1)
    }

    /// Applies chunk allocations and frees; returns the copies for the caller to launch.
    pub(super) fn apply(&mut self, stream: &Arc<CudaStream>, actions: &[Action]) -> Vec<Action> {
        use cudarc::driver::DevicePtr;
        let mut copies = Vec::new();
        for &a in actions {
            match a {
                Action::AllocChunk { slab, chunk } => {
                    let s = &mut self.slabs[slab];
                    let bytes = (1usize << s.shift) * s.block_bytes;
                    let mem = stream
                        .alloc_zeros::<u8>(bytes)
                        .unwrap_or_else(|e| panic!("CUDA KV chunk alloc ({bytes} bytes): {e:?}"));
                    s.addrs[chunk as usize] = mem.device_ptr(stream).0;
                    s.chunks[chunk as usize] = Some(mem);
                    s.dev_addrs = None;
                }
                Action::FreeChunk { slab, chunk } => {
                    let s = &mut self.slabs[slab];
                    // Freed in stream order: kernels queued before still read valid memory.
                    s.chunks[chunk as usize] = None;
                    s.addrs[chunk as usize] = 0;
                    s.dev_addrs = None;
                }
                Action::Copy { .. } => copies.push(a),
            }
        }
        for s in &mut self.slabs {
            s.sync(stream);
        }
        copies
    }

    /// Device memory held by the store's slabs, in bytes.
    pub fn device_bytes(&self) -> usize {
        self.slabs.iter().map(Slab::bytes).sum()
    }

    /// The launch arguments for layer `layer` reading sealed slab `slab` (0: exact reads only),
    /// with the window of the launch's sequences.
    pub(super) fn args(
        &self,
        stream: &Arc<CudaStream>,
        layer: usize,
        slab: usize,
        inv_freq: u64,
        rope_scaling: f32,
        window_blocks: usize,
    ) -> KvArgs {
        use cudarc::driver::DevicePtr;
        let plane = self.kv_plane();
        let mut a = KvArgs {
            ex_chunks: self.slabs[0].addrs(stream),
            ex_block_bytes: self.slabs[0].block_bytes as u64,
            ex_k: (layer * 2 * plane) as u64,
            ex_kv: plane as u64,
            ex_shift: self.slabs[0].shift,
            inv_freq,
            rope_scaling,
            window_blocks: window_blocks as i32,
            ..KvArgs::default()
        };
        if slab > 0 {
            let layout = &self.sealed[slab - 1];
            a.se_block_bytes = layout.block_bytes as u64;
            a.se_layer = layout.layer_at[layer] as u64;
            a.k_run = layout.k_run as u32;
            a.v_run = layout.v_run as u32;
            a.b_run = layout.b_run as u32;
            a.lat_bytes = layout.latent[layer] as u32;
            if let Some(r) = layout.codec.latent_rank() {
                let lat = self
                    .latents
                    .iter()
                    .find(|l| l.rank == r)
                    .expect("an mhc slab exists only with its projection");
                let (mean, _, up) = &lat.layers[layer];
                a.rank = lat.ranks[layer] as i32;
                a.lat_mean = mean.device_ptr(stream).0;
                a.lat_up = up.device_ptr(stream).0;
            }
            a.se_chunks = self.slabs[slab].addrs(stream);
            a.se_shift = self.slabs[slab].shift;
        }
        a
    }

    /// `(exact slot, sealed slot)` of each block in `table` for kernels reading sealed slab
    /// `slab` (a copy in another slab is not readable by them: only the exact one is offered).
    pub(super) fn slot_pairs(&self, table: &[u32], slab: usize, out: &mut Vec<u32>) {
        for &b in table {
            let l = self.map.loc(b);
            let sealed = if slab > 0 && l.sealed != NO_SLOT && l.slab as usize == slab {
                l.sealed
            } else {
                debug_assert!(
                    l.sealed == NO_SLOT || slab == 0,
                    "block {b} sealed in slab {} read as slab {slab}",
                    l.slab
                );
                NO_SLOT
            };
            out.extend([l.exact, sealed]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::codec::MhcValues;
    use crate::backend::cuda::layout::tests::shape;

    #[test]
    fn chunks_hold_a_power_of_two_of_blocks_near_8_mib() {
        assert_eq!(per_chunk(368_640, CHUNK_BYTES), 16); // SmolLM2 exact block: 22.75 → 16
        assert_eq!(per_chunk(512 << 10, CHUNK_BYTES), 16);
        assert_eq!(per_chunk(1, CHUNK_BYTES), 8 << 20);
        assert_eq!(per_chunk(9 << 20, CHUNK_BYTES), 1);
        assert_eq!(per_chunk(368_640, 3 * 368_640), 2);
        assert_eq!(format_index(None, false), 0);
        assert_eq!(format_index(Some(Codec::Bf16), false), 0);
        assert_eq!(FORMATS[format_index(Some(Codec::Bf16), true)], "bf16s");
        assert_eq!(FORMATS[format_index(Some(Codec::K8v4), false)], "k8v4");
        assert_eq!(FORMATS[format_index(Some(Codec::K8v4), true)], "k8v4");
        let mhc = Codec::Mhc {
            rank: 64,
            values: MhcValues::Int8,
        };
        assert_eq!(FORMATS[format_index(Some(mhc), false)], "mhcint8");
        assert_eq!(std::mem::size_of::<KvArgs>(), 128);
        assert_eq!(exact_block_bytes(30, 16, shape()), 30 * 2 * 16 * 192 * 2);
    }
}
