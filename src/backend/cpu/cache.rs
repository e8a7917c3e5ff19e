//! The contiguous per-sequence KV cache of the CPU backend: K and V per layer, f32 for
//! exactness (the paged pool with bf16 blocks replaces it later). Attention reads it in
//! `attention.rs`.

use crate::backend::AttnShape;

/// K and V of one layer, each `[capacity, num_kv_heads, head_dim]`.
#[derive(Debug, Clone)]
pub struct LayerKv {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// A contiguous KV cache over all layers for one sequence (f32 for exactness; the paged pool
/// replaces it later).
#[derive(Debug, Clone)]
pub struct CpuCache {
    pub layers: Vec<LayerKv>,
    pub capacity: usize,
    pub shape: AttnShape,
}

impl CpuCache {
    pub fn new(layers: usize, capacity: usize, shape: AttnShape) -> Self {
        let len = capacity * shape.kv_width();
        let layer = || LayerKv {
            k: vec![0.0; len],
            v: vec![0.0; len],
        };
        CpuCache {
            layers: (0..layers).map(|_| layer()).collect(),
            capacity,
            shape,
        }
    }

    /// Writes the (already rotated) k and the v of fused `[q | k | v]` rows at `positions`.
    /// The caller guarantees `position < capacity`; out-of-range rows are skipped (and trip a
    /// debug assertion) rather than panicking in a server.
    pub fn store(
        &mut self,
        layer: usize,
        qkv: &[f32],
        rows: usize,
        positions: &[u32],
        shape: AttnShape,
    ) {
        let (qw, kvw, width) = (shape.q_width(), shape.kv_width(), shape.qkv_width());
        let cap = self.capacity;
        let lkv = &mut self.layers[layer];
        for (row, &pos) in qkv[..rows * width].chunks_exact(width).zip(positions) {
            let pos = pos as usize;
            debug_assert!(pos < cap, "KV position {pos} ≥ capacity {cap}");
            if pos >= cap {
                continue;
            }
            lkv.k[pos * kvw..(pos + 1) * kvw].copy_from_slice(&row[qw..qw + kvw]);
            lkv.v[pos * kvw..(pos + 1) * kvw].copy_from_slice(&row[qw + kvw..qw + 2 * kvw]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_writes_k_and_v_at_their_positions() {
        let shape = AttnShape {
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 2,
        };
        let mut cache = CpuCache::new(2, 4, shape);
        // Two rows [q0 q0 q1 q1 | k k | v v] at positions 3 and 1 of layer 1.
        let qkv = [
            0., 0., 0., 0., 1., 2., 3., 4., 0., 0., 0., 0., 5., 6., 7., 8.,
        ];
        cache.store(1, &qkv, 2, &[3, 1], shape);
        assert_eq!(cache.layers[1].k, [0., 0., 5., 6., 0., 0., 1., 2.]);
        assert_eq!(cache.layers[1].v, [0., 0., 7., 8., 0., 0., 3., 4.]);
        assert!(cache.layers[0].k.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn store_skips_positions_past_capacity_in_release() {
        if cfg!(debug_assertions) {
            return; // the debug assertion is the intended behaviour there
        }
        let shape = AttnShape {
            num_heads: 1,
            num_kv_heads: 1,
            head_dim: 2,
        };
        let mut cache = CpuCache::new(1, 2, shape);
        cache.store(0, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 1, &[5], shape);
        assert!(cache.layers[0].k.iter().all(|&v| v == 0.0));
    }
}
