//! K/V inputs and device-layout sealed blocks for the host-run kernel tests
//! (`cuda_formats_host.rs`, `cuda_attention_host.rs`): random keys and values with outlier
//! channels, random mhc latents, and a block's sealed runs and key bounds written by the CPU
//! codec. Each test binary uses part of it.
#![allow(dead_code)]

use half::bf16;
use kvserve::backend::cpu::kv_store::CpuKvStore;
use kvserve::backend::cpu::ops::RopeTable;
use kvserve::backend::cuda::store::SealedLayout;
use kvserve::backend::latent::{LatentKeys, LatentLayer};
use kvserve::backend::RopeParams;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// bf16-representable normals, channels `outliers` ×20.
pub fn values(rng: &mut ChaCha8Rng, n: usize, d: usize, outliers: &[usize]) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let u: f32 = rng.random_range(f32::EPSILON..1.0);
            let v: f32 = rng.random_range(0.0..std::f32::consts::TAU);
            let x = (-2.0 * u.ln()).sqrt() * v.cos();
            let x = if outliers.contains(&(i % d)) {
                x * 20.0
            } else {
                x
            };
            bf16::from_f32(x).to_f32()
        })
        .collect()
}

/// A random `mhc` projection of nominal rank `rank` over keys of `kv_width` channels (heads of
/// `head_dim`), one layer per entry of `ranks`, rotating with `rope`.
pub fn random_latent(
    rng: &mut ChaCha8Rng,
    (kv_width, head_dim): (usize, usize),
    rank: u16,
    ranks: &[usize],
    rope: &RopeParams,
) -> LatentKeys {
    let mut small =
        |n: usize, s: f32| -> Vec<f32> { (0..n).map(|_| rng.random_range(-s..s)).collect() };
    let lk = LatentKeys {
        id: [1; 32],
        rank,
        kv_width,
        head_dim,
        layers: ranks
            .iter()
            .map(|&r| LatentLayer {
                rank: r,
                mean: small(kv_width, 0.5),
                down: small(r * kv_width, 0.2),
                up_t: small(r * kv_width, 0.3),
            })
            .collect(),
        rope: rope.clone(),
        max_positions: 4096,
    };
    lk.validate().unwrap();
    lk
}

/// Writes layer `l` of one block's sealed form into `block` (a whole sealed block of `lay`)
/// with the CPU codec: `k`, `v` are `[bs, kv_heads * d]` (rotated keys), `p0` the block's first
/// position (mhc un-rotates the keys to encode the latent). Key bounds are left as they are.
#[allow(clippy::too_many_arguments)]
pub fn write_sealed(
    block: &mut [u8],
    lay: &SealedLayout,
    l: usize,
    k: &[f32],
    v: &[f32],
    p0: usize,
    lat: Option<&LatentKeys>,
    rope: &RopeTable,
    (kvh, d, bs): (usize, usize, usize),
) {
    let (c, w) = (lay.codec, kvh * d);
    let base = lay.layer_at[l];
    if let Some(lk) = lat {
        let mut pre = k.to_vec();
        for t in 0..bs {
            for h in 0..kvh {
                rope.unrotate_head(&mut pre[t * w + h * d..t * w + (h + 1) * d], p0 + t);
            }
        }
        let n = lk.latent_bytes(l, bs);
        lk.encode(l, &pre, bs, &mut block[base..base + n]);
    }
    for h in 0..kvh {
        let run = |x: &[f32]| -> Vec<f32> {
            (0..bs)
                .flat_map(|t| x[t * w + h * d..t * w + (h + 1) * d].to_vec())
                .collect()
        };
        let at = base + lay.latent[l] + h * (lay.k_run + lay.v_run + lay.b_run);
        let (kb, vb) = (c.k_bytes(bs, d), c.v_bytes(bs, d));
        c.encode_k(&run(k), bs, d, &mut block[at..at + kb]);
        let at = at + lay.k_run;
        c.encode_v(&run(v), bs, d, &mut block[at..at + vb]);
    }
}

/// Writes the CPU store's key bounds of `block`, layer `l`, into the device image `dst` (one
/// sealed block of `lay`); false when the CPU keeps none for it.
pub fn write_bounds(
    dst: &mut [u8],
    lay: &SealedLayout,
    cpu: &CpuKvStore,
    block: u32,
    l: usize,
) -> bool {
    let (kvh, d) = (cpu.shape().num_kv_heads, cpu.shape().head_dim);
    let view = cpu.view(l);
    let (mut lo, mut hi) = (vec![0f32; d], vec![0f32; d]);
    for h in 0..kvh {
        if !view.key_bounds(block, h, &mut lo, &mut hi) {
            return false;
        }
        let at = lay.layer_at[l]
            + lay.latent[l]
            + h * (lay.k_run + lay.v_run + lay.b_run)
            + lay.k_run
            + lay.v_run;
        for (i, x) in lo.iter().chain(&hi).enumerate() {
            dst[at + 2 * i..at + 2 * i + 2].copy_from_slice(&half::f16::from_f32(*x).to_le_bytes());
        }
    }
    true
}
