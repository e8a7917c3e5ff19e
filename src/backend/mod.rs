//! Compute backends. The model is written once against [`Backend`]; `cpu` is always compiled and
//! is the correctness oracle for every other backend.
//!
//! Shapes are passed explicitly; buffers are flat, row-major f32 activations living in the
//! backend's memory (host memory for the CPU backend, device memory for CUDA).

pub mod cpu;

use crate::error::BackendError;
use crate::model::tensor::HostTensor;

/// Rotary-embedding parameters, computed once by the model from its config (scaling included).
#[derive(Debug, Clone)]
pub struct RopeParams {
    /// `head_dim / 2` inverse frequencies (after `linear`/`llama3` scaling). Pair `i` rotates
    /// dims `(i, i + head_dim/2)` of each head (the Hugging Face `rotate_half` layout).
    pub inv_freq: Vec<f32>,
    /// Multiplier applied to cos/sin (1.0 unless a scaling type asks otherwise).
    pub attention_scaling: f32,
}

/// Shape of one attention layer as the kernels see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl AttnShape {
    /// Width of one fused `[q | k | v]` row.
    pub fn qkv_width(&self) -> usize {
        (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
    }
    pub fn q_width(&self) -> usize {
        self.num_heads * self.head_dim
    }
    pub fn kv_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

/// The operations the Llama forward needs, nothing more.
pub trait Backend: Send + Sync {
    /// f32 activations.
    type Buf: Send;
    /// A weight matrix `[rows = out_features, cols = in_features]` in the backend's format.
    type Matrix: Send + Sync;
    /// A contiguous per-sequence KV cache over all layers (replaced by the paged pool later).
    type Cache: Send;

    fn name(&self) -> String;

    /// Uploads one or more 2-D tensors stacked along rows (e.g. `[q; k; v]` into one fused
    /// matrix). All parts must have the same number of columns.
    fn upload_matrix(&self, parts: &[&HostTensor<'_>]) -> Result<Self::Matrix, BackendError>;
    /// Uploads f32 data (norm weights, biases).
    fn upload(&self, data: &[f32]) -> Self::Buf;
    /// A zeroed buffer of `len` floats.
    fn alloc(&self, len: usize) -> Self::Buf;
    /// Copies `buf[offset..offset + out.len()]` to the host.
    fn read(&self, buf: &Self::Buf, offset: usize, out: &mut [f32]);

    /// Copies rows `first..first + rows` (each `width` wide) of `x` into a new buffer.
    fn copy_rows(&self, x: &Self::Buf, first: usize, rows: usize, width: usize) -> Self::Buf;

    /// `out[i, :] = table[ids[i], :]`.
    fn embed(&self, table: &Self::Matrix, ids: &[u32], out: &mut Self::Buf);
    /// RMSNorm of `rows` rows of width `weight.len()`: `out = x / rms(x) * weight`.
    fn rms_norm(
        &self,
        x: &Self::Buf,
        weight: &Self::Buf,
        eps: f32,
        rows: usize,
        out: &mut Self::Buf,
    );
    /// `out[rows, w.rows] = x[rows, w.cols] · wᵀ`, f32 accumulation.
    fn matmul(&self, x: &Self::Buf, rows: usize, w: &Self::Matrix, out: &mut Self::Buf);
    /// Adds `bias` (length = row width) to each of `rows` rows of `x`.
    fn add_bias(&self, x: &mut Self::Buf, bias: &Self::Buf, rows: usize);
    /// `x += y` over the first `len` elements.
    fn add(&self, x: &mut Self::Buf, y: &Self::Buf, len: usize);
    /// `out[r, j] = silu(gu[r, j]) * gu[r, inter + j]` for a fused `[gate | up]` row of width `2*inter`.
    fn silu_mul(&self, gate_up: &Self::Buf, rows: usize, inter: usize, out: &mut Self::Buf);

    fn new_cache(&self, layers: usize, capacity: usize, shape: AttnShape) -> Self::Cache;
    /// Token capacity of a cache.
    fn cache_capacity(&self, cache: &Self::Cache) -> usize;
    /// Applies RoPE in place to the q and k parts of `rows` fused `[q | k | v]` rows at
    /// `positions`, then writes k and v into `cache` layer `layer` at those positions.
    #[allow(clippy::too_many_arguments)]
    fn rope_and_store(
        &self,
        qkv: &mut Self::Buf,
        rows: usize,
        positions: &[u32],
        shape: AttnShape,
        rope: &RopeParams,
        cache: &mut Self::Cache,
        layer: usize,
    );
    /// Causal attention for one sequence: row `i` of `qkv` (its q part) is at position
    /// `start_pos + i` and attends to cache positions `0..=start_pos + i`.
    /// Writes `[rows, num_heads * head_dim]` into `out`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        qkv: &Self::Buf,
        rows: usize,
        start_pos: usize,
        shape: AttnShape,
        cache: &Self::Cache,
        layer: usize,
        out: &mut Self::Buf,
    );
}
