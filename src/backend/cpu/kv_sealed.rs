//! One sealed arena of the CPU KV store: the blocks of one codec, block-major, and how to
//! decode a block's runs (see `kv_store` for the layout and who calls what).

use super::arena::ZeroedBytes;
use super::ops::RopeTable;
use crate::backend::codec::Codec;
use crate::backend::latent::LatentKeys;
use half::f16;
use std::sync::Arc;

/// The sealed blocks of one codec, block-major: per block, per layer `[latent | per KV head:
/// K run, V run]` (the latent only for `mhc`, whose K runs are empty).
#[derive(Debug)]
pub(super) struct SealedArena {
    pub(super) codec: Codec,
    /// Offset of each layer's part within a block.
    pub(super) layer_at: Vec<usize>,
    /// Bytes of each layer's latent (0 unless `mhc`).
    pub(super) latent: Vec<usize>,
    pub(super) k_run: usize,
    pub(super) v_run: usize,
    /// Bytes of one block over all layers and heads.
    pub(super) block_bytes: usize,
    pub(super) data: ZeroedBytes,
    /// `mhc`: the projection and the rope table its keys are rotated with.
    pub(super) keys: Option<(Arc<LatentKeys>, Arc<RopeTable>)>,
}

impl SealedArena {
    pub(super) fn new(
        codec: Codec,
        layers: usize,
        heads: usize,
        bs: usize,
        d: usize,
        num_blocks: usize,
        keys: Option<(Arc<LatentKeys>, Arc<RopeTable>)>,
    ) -> Self {
        let (k_run, v_run) = (codec.k_bytes(bs, d), codec.v_bytes(bs, d));
        let latent: Vec<usize> = (0..layers)
            .map(|l| keys.as_ref().map_or(0, |(lk, _)| lk.latent_bytes(l, bs)))
            .collect();
        let mut layer_at = Vec::with_capacity(layers);
        let mut at = 0;
        for lat in &latent {
            layer_at.push(at);
            at += lat + heads * (k_run + v_run);
        }
        SealedArena {
            codec,
            layer_at,
            latent,
            k_run,
            v_run,
            block_bytes: at,
            data: ZeroedBytes::new(num_blocks * at),
            keys,
        }
    }

    pub(super) fn run_at(&self, block: usize, layer: usize, g: usize) -> usize {
        block * self.block_bytes
            + self.layer_at[layer]
            + self.latent[layer]
            + g * (self.k_run + self.v_run)
    }

    pub(super) fn latent_range(&self, block: usize, layer: usize) -> std::ops::Range<usize> {
        let at = block * self.block_bytes + self.layer_at[layer];
        at..at + self.latent[layer]
    }

    /// Keys of head `g`, rows `r0..r1` of `block` (whose first token is at `pos`) into `out`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn decode_k(
        &self,
        block: usize,
        layer: usize,
        g: usize,
        (bs, d): (usize, usize),
        (r0, r1): (usize, usize),
        pos: usize,
        out: &mut [f32],
    ) {
        if let Some((lk, rope)) = &self.keys {
            lk.decode_head(
                layer,
                &self.data[self.latent_range(block, layer)],
                g,
                r0,
                r1,
                out,
            );
            for (t, head) in (r0..r1).zip(out.chunks_exact_mut(d)) {
                rope.rotate_head(head, pos + t);
            }
        } else {
            let at = self.run_at(block, layer, g);
            self.codec
                .decode_k(&self.data[at..at + self.k_run], bs, d, r0, r1, out);
        }
    }

    pub(super) fn decode_v(
        &self,
        block: usize,
        layer: usize,
        g: usize,
        (bs, d): (usize, usize),
        (r0, r1): (usize, usize),
        out: &mut [f32],
    ) {
        let at = self.run_at(block, layer, g) + self.k_run;
        self.codec
            .decode_v(&self.data[at..at + self.v_run], bs, d, r0, r1, out);
    }
}

pub(super) fn f16_down(x: f32) -> f16 {
    let h = f16::from_f32(x);
    if h.to_f32() > x {
        f16::from_bits(if h.to_bits() & 0x8000 != 0 {
            h.to_bits() + 1
        } else if h.to_bits() == 0 {
            0x8001
        } else {
            h.to_bits() - 1
        })
    } else {
        h
    }
}

pub(super) fn f16_up(x: f32) -> f16 {
    -f16_down(-x)
}
