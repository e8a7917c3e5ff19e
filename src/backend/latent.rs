//! `mhc:R` keys: one joint low-rank latent per token across all KV heads of a layer, from a
//! projection calibrated once on text (`kvserve calibrate`, research note §5.5–5.6).
//!
//! Keys are projected *before* RoPE (pre-RoPE keys are far more low-rank than rotated ones:
//! 98.4 % vs 94.7 % of the energy at rank 64 on SmolLM2), so a sealed block stores
//! `c_t = A (k_t − μ)` (`r` bf16 per token and layer) and attention reconstructs
//! `k̂_t = RoPE_t(μ + B c_t)` per KV head inside its loop. The store un-rotates the block's
//! exact (rotated) keys at seal time and rotates the reconstruction back: RoPE is a rotation,
//! so this is exact up to f32 rounding and needs no pre-RoPE copy of the keys.
//!
//! `A = U_rᵀ M` and `B = M⁻¹ U_r` come from the top eigenvectors `U_r` of the query-weighted key
//! covariance `M C M` (`M` = √ of the query energy of each frequency pair): the projection
//! minimizes the error of the attention *logits*, not of the keys (it halves plain PCA's error
//! on this model). Ranks may differ per layer; they sum to `layers · R`, so a block's size
//! depends on `R` alone.

use super::RopeParams;
use half::bf16;

/// The projection of one layer (`W` = KV heads × head_dim, `r` = this layer's rank).
#[derive(Debug, Clone, PartialEq)]
pub struct LatentLayer {
    pub rank: usize,
    /// `μ`, `W` floats: the calibration keys' mean (pre-RoPE).
    pub mean: Vec<f32>,
    /// `A`, `[r][W]`: latent `c = A (k − μ)`.
    pub down: Vec<f32>,
    /// `Bᵀ`, `[r][W]`: row `j` is column `j` of the up-projection, so a reconstruction
    /// `μ + Σ_j c_j Bᵀ[j]` is `r` contiguous AXPYs over one head's channels.
    pub up_t: Vec<f32>,
}

/// A calibrated key projection for every layer of one model.
#[derive(Debug, Clone, PartialEq)]
pub struct LatentKeys {
    /// Calibration id: BLAKE3 of the projection file's tensors and metadata. Part of the key of
    /// every block sealed with it, so blocks of two calibrations never alias.
    pub id: [u8; 32],
    /// The `R` of `mhc:R`: the mean rank over layers (Σ ranks = layers · R).
    pub rank: u16,
    /// KV heads × head_dim.
    pub kv_width: usize,
    pub head_dim: usize,
    pub layers: Vec<LatentLayer>,
    /// The model's RoPE, to rotate reconstructions (the backend builds its table from it).
    pub rope: RopeParams,
    /// Positions the rope table must cover (the model's context).
    pub max_positions: usize,
}

impl LatentKeys {
    /// Checks the shapes against each other: `layers` layers of `kv_width` channels, each rank in
    /// `1..=kv_width`, ranks summing to `layers · rank`, finite numbers.
    pub fn validate(&self) -> Result<(), String> {
        let w = self.kv_width;
        if self.layers.is_empty()
            || w == 0
            || self.head_dim == 0
            || !w.is_multiple_of(self.head_dim)
        {
            return Err("empty projection or bad head shape".into());
        }
        let mut total = 0usize;
        for (l, layer) in self.layers.iter().enumerate() {
            let r = layer.rank;
            if r == 0 || r > w {
                return Err(format!("layer {l}: rank {r} outside 1..={w}"));
            }
            if layer.mean.len() != w || layer.down.len() != r * w || layer.up_t.len() != r * w {
                return Err(format!(
                    "layer {l}: tensor sizes do not match rank {r} × {w}"
                ));
            }
            let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
            if !(finite(&layer.mean) && finite(&layer.down) && finite(&layer.up_t)) {
                return Err(format!("layer {l}: non-finite numbers"));
            }
            total += r;
        }
        if total != self.layers.len() * self.rank as usize {
            return Err(format!(
                "ranks sum to {total}, not layers × {} = {}",
                self.rank,
                self.layers.len() * self.rank as usize
            ));
        }
        Ok(())
    }

    /// Bytes of one block's latent of layer `layer` (`bs` tokens × rank, bf16).
    pub fn latent_bytes(&self, layer: usize, bs: usize) -> usize {
        2 * bs * self.layers[layer].rank
    }

    /// Bytes of one block's latents over all layers (`2 · bs · layers · R`).
    pub fn block_latent_bytes(&self, bs: usize) -> usize {
        2 * bs * self.layers.len() * self.rank as usize
    }

    /// Encodes `bs` pre-RoPE key rows (`keys`, `[bs][W]`) of layer `layer` into `out`
    /// (`latent_bytes(layer, bs)`): `c = A (k − μ)`, bf16, token-major.
    pub fn encode(&self, layer: usize, keys: &[f32], bs: usize, out: &mut [u8]) {
        let (w, p) = (self.kv_width, &self.layers[layer]);
        assert_eq!(keys.len(), bs * w, "encode: keys are not bs × W");
        assert_eq!(out.len(), self.latent_bytes(layer, bs), "encode: out size");
        let mut centred = vec![0f32; w];
        for t in 0..bs {
            for ((c, &k), &m) in centred
                .iter_mut()
                .zip(&keys[t * w..(t + 1) * w])
                .zip(&p.mean)
            {
                *c = k - m;
            }
            for j in 0..p.rank {
                let a = &p.down[j * w..(j + 1) * w];
                let dot: f32 = a.iter().zip(&centred).map(|(x, y)| x * y).sum();
                let at = 2 * (t * p.rank + j);
                out[at..at + 2].copy_from_slice(&bf16::from_f32(dot).to_le_bytes());
            }
        }
    }

    /// Reconstructs the pre-RoPE keys of KV head `g`, rows `r0..r1` of a block, from its latent
    /// of layer `layer` (`latent_bytes(layer, bs)` bytes) into `out` (`(r1 − r0) × head_dim`).
    pub fn decode_head(
        &self,
        layer: usize,
        latent: &[u8],
        g: usize,
        r0: usize,
        r1: usize,
        out: &mut [f32],
    ) {
        let (w, d, p) = (self.kv_width, self.head_dim, &self.layers[layer]);
        let r = p.rank;
        debug_assert!(latent.len() >= 2 * r1 * r && out.len() == (r1 - r0) * d);
        let mean = &p.mean[g * d..(g + 1) * d];
        for (t, row) in (r0..r1).zip(out.chunks_exact_mut(d)) {
            row.copy_from_slice(mean);
            let codes = &latent[2 * t * r..2 * (t + 1) * r];
            for (j, b) in codes.chunks_exact(2).enumerate() {
                let c = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
                let up = &p.up_t[j * w + g * d..j * w + (g + 1) * d];
                for (o, &u) in row.iter_mut().zip(up) {
                    *o += c * u;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// An orthonormal projection of rank `r` onto the first `r` coordinates, and data living in
    /// that subspace plus the mean: reconstruction is exact up to bf16 rounding of the latent.
    fn toy(layers: usize, w: usize, d: usize, r: usize) -> LatentKeys {
        let layer = |l: usize| {
            let mut down = vec![0f32; r * w];
            for j in 0..r {
                down[j * w + j] = 1.0;
            }
            LatentLayer {
                rank: r,
                mean: (0..w).map(|c| (c + l) as f32 * 0.01).collect(),
                up_t: down.clone(),
                down,
            }
        };
        LatentKeys {
            id: [7; 32],
            rank: r as u16,
            kv_width: w,
            head_dim: d,
            layers: (0..layers).map(layer).collect(),
            rope: RopeParams {
                inv_freq: vec![1.0; d / 2],
                attention_scaling: 1.0,
            },
            max_positions: 64,
        }
    }

    #[test]
    fn encode_decode_reconstructs_the_subspace() {
        let (w, d, r, bs) = (12, 4, 5, 3);
        let lk = toy(2, w, d, r);
        lk.validate().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut keys = vec![0f32; bs * w];
        for t in 0..bs {
            for c in 0..w {
                let m = lk.layers[1].mean[c];
                keys[t * w + c] = m + if c < r {
                    rng.random_range(-2.0..2.0)
                } else {
                    0.0
                };
            }
        }
        let mut lat = vec![0u8; lk.latent_bytes(1, bs)];
        lk.encode(1, &keys, bs, &mut lat);
        for g in 0..w / d {
            let mut out = vec![0f32; 2 * d];
            lk.decode_head(1, &lat, g, 1, 3, &mut out);
            for (i, &o) in out.iter().enumerate() {
                let (t, c) = (1 + i / d, g * d + i % d);
                let x = keys[t * w + c];
                assert!(
                    (o - x).abs() <= 4e-3 * x.abs().max(1.0),
                    "t{t} c{c}: {o} vs {x}"
                );
            }
        }
    }

    #[test]
    fn validate_refuses_inconsistent_projections() {
        let mut lk = toy(2, 12, 4, 5);
        lk.layers[0].rank = 6;
        assert!(lk.validate().unwrap_err().contains("sizes"));
        let mut lk = toy(2, 12, 4, 5);
        lk.rank = 4;
        assert!(lk.validate().unwrap_err().contains("sum"));
        let mut lk = toy(2, 12, 4, 5);
        lk.layers[1].mean[0] = f32::NAN;
        assert!(lk.validate().unwrap_err().contains("non-finite"));
    }
}
