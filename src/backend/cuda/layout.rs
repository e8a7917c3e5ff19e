//! Byte layouts of the device KV store's blocks: an exact block (bf16 K and V of every layer) and
//! a sealed block of each format (`[layer][latent | kv_head × (K run | V run | bounds)]`, runs as
//! `backend::codec` encodes them, every part padded to 16 bytes), and the format index that
//! names the kernels reading them. Pure host arithmetic, shared by the store (`store.rs`), the
//! pool's sizing (`ops.rs`) and the kernels' arguments.

use crate::backend::codec::{Codec, MhcValues};
use crate::backend::AttnShape;

/// Every part of a sealed block (latent, K run, V run) starts on this boundary: the kernels
/// read codes with aligned vector loads.
pub(super) const ALIGN: usize = 16;

pub(super) fn pad(n: usize) -> usize {
    n.next_multiple_of(ALIGN)
}

/// The KV formats the kernels are compiled for, in `KV_FORMATS` order (kernels/kv_formats.cuh):
/// entry points are `<op>_<name>`. `bf16s` is `bf16` sealed: blocks that carry quest's key
/// bounds leave the exact slab like any sealed block.
pub const FORMATS: [&str; 9] = [
    "bf16", "int8", "kivi4", "kivi2", "k8v4", "mhcbf16", "mhcint8", "mhckivi4", "bf16s",
];

/// The index in [`FORMATS`] of the kernels that read blocks of `codec` (with quest's key
/// `bounds` or not). `None` and `bf16` without bounds: exact reads only (the GPU never moves
/// such a block out of the exact slab).
pub fn format_index(codec: Option<Codec>, bounds: bool) -> usize {
    match codec {
        Some(Codec::Bf16) if bounds => 8,
        None | Some(Codec::Bf16) => 0,
        Some(Codec::Int8) => 1,
        Some(Codec::Kivi4) => 2,
        Some(Codec::Kivi2) => 3,
        Some(Codec::K8v4) => 4,
        Some(Codec::Mhc { values, .. }) => match values {
            MhcValues::Bf16 => 5,
            MhcValues::Int8 => 6,
            MhcValues::Kivi4 => 7,
        },
    }
}

/// Byte layout of one sealed block of `codec` (per-layer latent sizes for `mhc`), with quest's
/// key bounds or without.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedLayout {
    pub codec: Codec,
    pub bounds: bool,
    /// Offset of each layer in a block.
    pub layer_at: Vec<usize>,
    /// Padded bytes of each layer's latent (0 unless `mhc`).
    pub latent: Vec<usize>,
    /// Padded bytes of one head's K run (0 for `mhc`) and V run.
    pub k_run: usize,
    pub v_run: usize,
    /// Bytes of one head's key bounds: `head_dim` f16 minima then maxima (0 without bounds).
    pub b_run: usize,
    pub block_bytes: usize,
}

impl SealedLayout {
    /// `ranks`: each layer's latent rank (`mhc`; ignored otherwise).
    pub fn new(
        codec: Codec,
        bounds: bool,
        ranks: &[usize],
        layers: usize,
        bs: usize,
        shape: AttnShape,
    ) -> Self {
        let d = shape.head_dim;
        let (k_run, v_run) = (pad(codec.k_bytes(bs, d)), pad(codec.v_bytes(bs, d)));
        let b_run = if bounds { pad(4 * d) } else { 0 };
        let mhc = codec.latent_rank().is_some();
        let latent: Vec<usize> = (0..layers)
            .map(|l| if mhc { pad(2 * bs * ranks[l]) } else { 0 })
            .collect();
        let mut layer_at = Vec::with_capacity(layers);
        let mut at = 0;
        for lat in &latent {
            layer_at.push(at);
            at += lat + shape.num_kv_heads * (k_run + v_run + b_run);
        }
        SealedLayout {
            codec,
            bounds,
            layer_at,
            latent,
            k_run,
            v_run,
            b_run,
            block_bytes: at,
        }
    }

    /// The layout `mhc:R` would have with rank R in every layer (the pool's weight of a block
    /// before a projection's per-layer ranks are known; equal when ranks are uniform).
    pub fn uniform(codec: Codec, bounds: bool, layers: usize, bs: usize, shape: AttnShape) -> Self {
        let r = codec.latent_rank().map_or(0, usize::from);
        Self::new(codec, bounds, &vec![r; layers], layers, bs, shape)
    }
}

/// Bytes of one exact block over `layers` layers, K and V, bf16.
pub fn exact_block_bytes(layers: usize, bs: usize, shape: AttnShape) -> usize {
    layers * 2 * bs * shape.kv_width() * 2
}
#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::backend::kv_policy::KvPolicy;

    /// SmolLM2's attention shape (9 query heads over 3 KV heads of 64), also for `store.rs`.
    pub(in crate::backend::cuda) fn shape() -> AttnShape {
        AttnShape {
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
        }
    }

    #[test]
    fn sealed_layouts_pad_every_part_and_match_the_codec_sizes() {
        let s = shape();
        for c in Codec::PLAIN {
            let l = SealedLayout::uniform(c, false, 30, 16, s);
            assert_eq!(l.k_run, pad(c.k_bytes(16, 64)));
            assert_eq!(l.v_run, pad(c.v_bytes(16, 64)));
            assert!(l.k_run.is_multiple_of(ALIGN) && l.v_run.is_multiple_of(ALIGN));
            assert_eq!(l.block_bytes, 30 * 3 * (l.k_run + l.v_run));
            assert_eq!(l.layer_at[1], 3 * (l.k_run + l.v_run));
        }
        // At bs 16, d 64 the plain runs are already 16-byte multiples: no padding at all.
        let int8 = SealedLayout::uniform(Codec::Int8, false, 30, 16, s);
        assert_eq!(int8.k_run, 1056);
        // mhc: per-layer latents of different ranks, then the value runs.
        let mhc = Codec::Mhc {
            rank: 8,
            values: MhcValues::Kivi4,
        };
        let l = SealedLayout::new(mhc, false, &[3, 13], 2, 16, s);
        assert_eq!(l.latent, vec![96, 416]);
        assert_eq!(l.k_run, 0);
        assert_eq!(l.layer_at, vec![0, 96 + 3 * 640]);
        assert_eq!(l.block_bytes, 96 + 416 + 2 * 3 * 640);
        // Odd shapes get padded: bs 5, d 8 int8 runs are 5*8 + 10 = 50 bytes → 64.
        let small = AttnShape {
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 8,
        };
        assert_eq!(
            SealedLayout::uniform(Codec::Int8, false, 1, 5, small).k_run,
            64
        );
        // Quest's key bounds follow each head's runs: head_dim f16 minima and maxima.
        let q = SealedLayout::uniform(Codec::Kivi4, true, 30, 16, s);
        assert_eq!(q.b_run, 4 * 64);
        assert_eq!(q.block_bytes, 30 * 3 * (q.k_run + q.v_run + 256));
        let mhcq = SealedLayout::new(mhc, true, &[3, 13], 2, 16, s);
        assert_eq!(mhcq.layer_at, vec![0, 96 + 3 * (640 + 256)]);
        // As many bytes as the CPU pool weighs such a block (no padding at these shapes).
        let policy = KvPolicy {
            quest: Some(512),
            ..KvPolicy::format(Codec::Kivi4)
        };
        assert_eq!(
            Some(q.block_bytes),
            policy.sealed_bytes_per_block(30, 3, 16, 64)
        );
    }
}
