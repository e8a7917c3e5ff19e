//! `kvserve calibrate`: the key projection of the experimental `mhc:R` policy, computed once
//! from a text (research note shared/research/kv_compression.md §5.5–5.6).
//!
//! 1. Run the model (exact f32 KV) over windows of the calibration text and collect, per
//!    layer, the pre-RoPE keys of all KV heads jointly (`W` = heads × head_dim channels) — mean
//!    and second moments, in f64 — and the query energy of each (KV head, frequency pair):
//!    `λ_{g,j} = Σ_{h ∈ group(g)} E[q_{h,j}² + q_{h,j+d/2}²]`. Keys come from the rotated rows
//!    the forward produces, rotated back; RoPE preserves the energy of a pair, so queries are
//!    used as they are.
//! 2. The error that matters is the logit error `E[(q · R_t (k − k̂))²]`; averaged over relative
//!    positions it is the key error in the metric `M = diag(√λ)` (each pair's λ on both of its
//!    channels). With `C = M Cov M` and its top eigenvectors `U_r`: down `A = U_rᵀ M`, up
//!    `B = M⁻¹ U_r`, latent `c = A (k − μ)`, reconstruction `μ + B c`. On SmolLM2 this halves
//!    the error of plain PCA (`M = I`).
//! 3. Ranks: `uniform` gives every layer R; `energy` water-fills — it keeps the `layers · R`
//!    components of largest eigenvalue over all layers (each eigenvalue is that component's
//!    expected squared logit error, so they compare across layers), every layer keeping at
//!    least R/4.
//!
//! Everything is deterministic: the forward is batch-invariant, sums run in a fixed order, the
//! eigensolver is nalgebra's (f64, CPU), eigenvector signs are fixed (largest component
//! positive) and the file is written in a fixed order (`file`).

pub mod file;

use crate::backend::latent::{LatentKeys, LatentLayer};
use crate::backend::{AttnShape, Backend, RopeParams};
use crate::kv::policy::KvPolicy;
use crate::model::llama::{Llama, LogitsFor, SeqStep};
use anyhow::{bail, Context, Result};
use nalgebra::{DMatrix, SymmetricEigen};

/// How the rank budget is spread over layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// Every layer gets R.
    Uniform,
    /// Water-filling on the eigenvalues (logit error) across layers, at least R/4 each.
    Energy,
}

impl Allocation {
    pub fn name(self) -> &'static str {
        match self {
            Allocation::Uniform => "uniform",
            Allocation::Energy => "energy",
        }
    }
}

impl std::str::FromStr for Allocation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "uniform" => Ok(Allocation::Uniform),
            "energy" => Ok(Allocation::Energy),
            _ => Err(format!("`{s}`: expected `uniform` or `energy`")),
        }
    }
}

/// What to calibrate on and how.
#[derive(Debug, Clone)]
pub struct CalibrateOptions {
    /// The R of `mhc:R`: the mean rank over layers.
    pub rank: u16,
    /// Window length in tokens (each window is a sequence from position 0).
    pub ctx: usize,
    /// Use at most this many tokens of the text.
    pub max_tokens: usize,
    pub allocation: Allocation,
}

impl Default for CalibrateOptions {
    fn default() -> Self {
        Self {
            rank: 64,
            ctx: 1024,
            max_tokens: 16384,
            allocation: Allocation::Energy,
        }
    }
}

/// Running sums of one layer (f64).
#[derive(Debug, Clone)]
struct LayerStats {
    n: f64,
    /// Σ k, `W`.
    sum: Vec<f64>,
    /// Σ k kᵀ, `W × W` row-major.
    cross: Vec<f64>,
    /// Σ query energy per (KV head, pair), `kv_heads × d/2`.
    qenergy: Vec<f64>,
}

impl LayerStats {
    fn new(shape: AttnShape) -> Self {
        let w = shape.kv_width();
        Self {
            n: 0.0,
            sum: vec![0.0; w],
            cross: vec![0.0; w * w],
            qenergy: vec![0.0; shape.num_kv_heads * shape.head_dim / 2],
        }
    }

    /// Adds fused `[q | k | v]` rows (q, k rotated) at `positions`.
    fn add(&mut self, rows: &[f32], positions: &[usize], shape: AttnShape, rope: &RopeParams) {
        let (d, half, w) = (shape.head_dim, shape.head_dim / 2, shape.kv_width());
        let (qw, width) = (shape.q_width(), shape.qkv_width());
        let group = shape.num_heads / shape.num_kv_heads;
        let s2 = f64::from(rope.attention_scaling).powi(2);
        let mut k = vec![0f64; w];
        for (row, &pos) in rows.chunks_exact(width).zip(positions) {
            for h in 0..shape.num_heads {
                let q = &row[h * d..(h + 1) * d];
                for j in 0..half {
                    let e = f64::from(q[j]).powi(2) + f64::from(q[j + half]).powi(2);
                    self.qenergy[(h / group) * half + j] += e;
                }
            }
            // Undo RoPE: the inverse of the forward's f32 rotation, in f64.
            for g in 0..shape.num_kv_heads {
                let kr = &row[qw + g * d..qw + (g + 1) * d];
                for j in 0..half {
                    let angle = f64::from(rope.inv_freq[j] * pos as f32);
                    let (sin, cos) = angle.sin_cos();
                    let (a, b) = (f64::from(kr[j]), f64::from(kr[j + half]));
                    k[g * d + j] = (a * cos + b * sin) / s2.sqrt();
                    k[g * d + j + half] = (b * cos - a * sin) / s2.sqrt();
                }
            }
            self.n += 1.0;
            for (s, &x) in self.sum.iter_mut().zip(&k) {
                *s += x;
            }
            for (r, &x) in self.cross.chunks_exact_mut(w).zip(&k) {
                for (c, &y) in r.iter_mut().zip(&k) {
                    *c += x * y;
                }
            }
        }
    }
}

/// One layer's eigen-decomposition in the query metric.
struct LayerBasis {
    mean: Vec<f64>,
    /// `m_c = √λ` per channel.
    metric: Vec<f64>,
    /// Eigenvalues, descending.
    values: Vec<f64>,
    /// Eigenvectors as columns, in the order of `values`: `[W][W]` row-major, `u[c][i]`.
    vectors: Vec<f64>,
}

fn basis(st: &LayerStats, shape: AttnShape) -> LayerBasis {
    let (w, d, half) = (shape.kv_width(), shape.head_dim, shape.head_dim / 2);
    let n = st.n.max(1.0);
    let mean: Vec<f64> = st.sum.iter().map(|s| s / n).collect();
    let max_q = st
        .qenergy
        .iter()
        .copied()
        .fold(0.0, f64::max)
        .max(f64::MIN_POSITIVE);
    let metric: Vec<f64> = (0..w)
        .map(|c| {
            let (g, j) = (c / d, (c % d) % half);
            (st.qenergy[g * half + j].max(max_q * 1e-9) / n).sqrt()
        })
        .collect();
    let c = DMatrix::from_fn(w, w, |i, j| {
        (st.cross[i * w + j] / n - mean[i] * mean[j]) * metric[i] * metric[j]
    });
    // Symmetrize exactly (the sums are symmetric up to rounding order).
    let c = (&c + c.transpose()) * 0.5;
    let eig = SymmetricEigen::new(c);
    let mut order: Vec<usize> = (0..w).collect();
    order.sort_by(|&a, &b| {
        eig.eigenvalues[b]
            .total_cmp(&eig.eigenvalues[a])
            .then(a.cmp(&b))
    });
    let mut vectors = vec![0f64; w * w];
    for (i, &o) in order.iter().enumerate() {
        let col = eig.eigenvectors.column(o);
        // Fix the sign: the largest-magnitude component positive (ties: the first).
        let mut big = 0;
        for r in 0..w {
            if col[r].abs() > col[big].abs() {
                big = r;
            }
        }
        let sign = if col[big] < 0.0 { -1.0 } else { 1.0 };
        for r in 0..w {
            vectors[r * w + i] = sign * col[r];
        }
    }
    LayerBasis {
        mean,
        metric,
        values: order.iter().map(|&o| eig.eigenvalues[o].max(0.0)).collect(),
        vectors,
    }
}

/// Per-layer ranks summing to `layers · rank`.
fn allocate(bases: &[LayerBasis], rank: usize, w: usize, how: Allocation) -> Vec<usize> {
    let layers = bases.len();
    match how {
        Allocation::Uniform => vec![rank; layers],
        Allocation::Energy => {
            let floor = (rank / 4).max(1);
            let mut ranks = vec![floor; layers];
            let mut rest: Vec<(f64, usize, usize)> = bases
                .iter()
                .enumerate()
                .flat_map(|(l, b)| (floor..w).map(move |i| (b.values[i], l, i)))
                .collect();
            // Largest first; within a layer eigenvalues descend, so each layer's kept set is
            // a prefix.
            rest.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
            for &(_, l, _) in rest.iter().take(layers * (rank - floor)) {
                ranks[l] += 1;
            }
            ranks
        }
    }
}

/// Loads the projection files `files` (for the model loaded from `model_path`) into `model`,
/// each serving `mhc:R` of its rank: a file for another model, a corrupt one or two of one
/// rank is an error.
pub fn attach_files<B: Backend>(
    model: &mut Llama<B>,
    model_path: &std::path::Path,
    files: &[std::path::PathBuf],
) -> Result<(), crate::error::ModelError> {
    if files.is_empty() {
        return Ok(());
    }
    let fingerprint = file::model_fingerprint(model_path)?;
    for f in files {
        let cal = file::load(f, &fingerprint)?;
        tracing::info!(
            file = %f.display(),
            rank = cal.info.rank,
            text = %cal.info.text,
            "mhc calibration loaded"
        );
        let head_dim = model.attn_shape().head_dim;
        model.attach_latent_keys(cal.into_keys(head_dim))?;
    }
    Ok(())
}

/// The outcome: the projection plus what the file records about it.
#[derive(Debug, Clone)]
pub struct Calibrated {
    pub keys: LatentKeys,
    pub allocation: Allocation,
    /// Tokens the statistics were gathered on.
    pub tokens: usize,
    /// Per layer, the share of the query-weighted key variance the kept components carry.
    pub retained: Vec<f64>,
}

/// Runs the calibration of `model` on `tokens`.
pub fn calibrate<B: Backend>(
    model: &Llama<B>,
    tokens: &[u32],
    opts: &CalibrateOptions,
) -> Result<Calibrated> {
    let cfg = model.config();
    let shape = model.attn_shape();
    let w = shape.kv_width();
    let rank = opts.rank as usize;
    if rank == 0 || rank > w {
        bail!("--rank must be in 1..={w} (KV heads × head_dim of this model)");
    }
    if opts.ctx == 0 || opts.ctx > cfg.max_position_embeddings {
        bail!(
            "--ctx must be in 1..={} (the model's context)",
            cfg.max_position_embeddings
        );
    }
    let tokens = &tokens[..tokens.len().min(opts.max_tokens)];
    if tokens.len() < 2 * w {
        bail!(
            "the calibration text has {} tokens; at least {} are needed for {w} channels",
            tokens.len(),
            2 * w
        );
    }
    const BS: usize = 16;
    const CHUNK: usize = 256;
    let blocks = opts.ctx.div_ceil(BS);
    let mut store = model.new_kv_store(blocks, BS);
    let table: Vec<u32> = (0..blocks as u32).collect();
    let mut stats = vec![LayerStats::new(shape); cfg.num_layers];
    let rope = model.rope().clone();
    for window in tokens.chunks(opts.ctx) {
        for start in (0..window.len()).step_by(CHUNK) {
            let chunk = &window[start..(start + CHUNK).min(window.len())];
            let positions: Vec<usize> = (start..start + chunk.len()).collect();
            let step = SeqStep {
                tokens: chunk,
                start_pos: start,
                block_table: &table,
                logits: LogitsFor::None,
                policy: KvPolicy::EXACT,
            };
            let mut observe = |layer: usize, rows: &[f32]| {
                stats[layer].add(rows, &positions, shape, &rope);
            };
            model
                .forward_observed(&[step], &mut store, Some(&mut observe))
                .context("calibration forward")?;
        }
    }
    use rayon::prelude::*;
    let bases: Vec<LayerBasis> = stats.par_iter().map(|s| basis(s, shape)).collect();
    let ranks = allocate(&bases, rank, w, opts.allocation);
    let mut layers = Vec::with_capacity(bases.len());
    let mut retained = Vec::with_capacity(bases.len());
    for (b, &r) in bases.iter().zip(&ranks) {
        let (mut down, mut up_t) = (vec![0f32; r * w], vec![0f32; r * w]);
        for i in 0..r {
            for c in 0..w {
                let u = b.vectors[c * w + i];
                down[i * w + c] = (u * b.metric[c]) as f32;
                up_t[i * w + c] = (u / b.metric[c]) as f32;
            }
        }
        let total: f64 = b.values.iter().sum();
        retained.push(if total > 0.0 {
            b.values[..r].iter().sum::<f64>() / total
        } else {
            1.0
        });
        layers.push(LatentLayer {
            rank: r,
            mean: b.mean.iter().map(|&m| m as f32).collect(),
            down,
            up_t,
        });
    }
    let keys = LatentKeys {
        id: [0; 32], // set by `file` from the serialized bytes
        rank: opts.rank,
        kv_width: w,
        head_dim: shape.head_dim,
        layers,
        rope,
        max_positions: cfg.max_position_embeddings,
    };
    keys.validate().map_err(anyhow::Error::msg)?;
    Ok(Calibrated {
        keys,
        allocation: opts.allocation,
        tokens: tokens.len(),
        retained,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_basis(values: Vec<f64>) -> LayerBasis {
        let w = values.len();
        LayerBasis {
            mean: vec![0.0; w],
            metric: vec![1.0; w],
            values,
            vectors: vec![0.0; w * w],
        }
    }

    #[test]
    fn energy_allocation_follows_the_eigenvalues_and_keeps_the_budget() {
        // Layer 1's spectrum dominates: it takes the components layer 0 does not need.
        let bases = vec![
            fake_basis(vec![8.0, 1.0, 0.5, 0.1, 0.05, 0.01, 0.0, 0.0]),
            fake_basis(vec![9.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]),
        ];
        let r = allocate(&bases, 4, 8, Allocation::Energy);
        assert_eq!(r.iter().sum::<usize>(), 8);
        assert_eq!(r, vec![1, 7]);
        assert_eq!(allocate(&bases, 4, 8, Allocation::Uniform), vec![4, 4]);
        // The floor: never below R/4.
        let r = allocate(&bases, 8, 8, Allocation::Energy);
        assert_eq!(r, vec![8, 8]);
    }
}
