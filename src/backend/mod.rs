//! Compute backends. The model is written once against [`Backend`]; `cpu` is always compiled and
//! is the correctness oracle for every other backend.
//!
//! Shapes are passed explicitly; buffers are flat, row-major f32 activations living in the
//! backend's memory (host memory for the CPU backend, device memory for CUDA).

pub mod codec;
pub mod cpu;
pub mod cuda;
pub mod kv_policy;
pub mod latent;

use crate::error::BackendError;
use crate::model::tensor::HostTensor;
use kv_policy::KvPolicy;
use latent::LatentKeys;
use std::sync::Arc;

/// Rotary-embedding parameters, computed once by the model from its config (scaling included).
#[derive(Debug, Clone, PartialEq)]
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

/// Where one sequence's rows sit in a batched [`Backend::attention`] call.
#[derive(Debug, Clone, Copy)]
pub struct AttnSeq<'a> {
    /// Rows of this sequence in the batch (they follow the previous sequence's rows).
    pub rows: usize,
    /// Position of the sequence's first row: row `i` is at `start_pos + i`.
    pub start_pos: usize,
    /// Physical block of each logical block: position `p` lives in block
    /// `block_table[p / block_size]`, slot `p % block_size`. Under a window, blocks no query
    /// of the step sees may be `u32::MAX` (dropped).
    pub block_table: &'a [u32],
    /// How the sequence's blocks are read: sealed blocks decoded, window and quest visibility.
    pub policy: KvPolicy,
}

/// A block that became full in a forward step, to encode into its policy's `codec` (with
/// per-channel key min/max when `bounds`, for `quest`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seal {
    pub block: u32,
    /// Position of the block's first token (`mhc` un-rotates the keys by their positions).
    pub pos: u32,
    pub codec: codec::Codec,
    pub bounds: bool,
}

/// A device's memory as its driver reports it, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    pub free: u64,
    pub total: u64,
}

/// The geometry every backend's paged KV store reports (the model validates block tables and
/// slots against it before any kernel runs).
pub trait KvGeometry: Send {
    fn num_layers(&self) -> usize;
    fn num_blocks(&self) -> usize;
    /// Tokens per block.
    fn block_size(&self) -> usize;
}

/// The operations the Llama forward needs, nothing more.
pub trait Backend: Send + Sync {
    /// f32 activations.
    type Buf: Send;
    /// A weight matrix `[rows = out_features, cols = in_features]` in the backend's format.
    type Matrix: Send + Sync;
    /// The physical pool of KV blocks over all layers. Block ids and refcounts belong to `kv/`;
    /// the store only holds the data, addressed by block ids and slots
    /// (`block * block_size + offset`).
    type KvStore: KvGeometry;

    fn name(&self) -> String;

    /// Whether the backend can still compute, asked after an op failed: `Err(cause)` when the
    /// failure was of the kind that leaves the device unusable for good (on a GPU, a sticky
    /// error such as an illegal address or a lost device: every later call fails too). An op
    /// that failed for a passing reason (an allocation) leaves this `Ok`. The CPU cannot lose
    /// its device.
    fn device_status(&self) -> Result<(), String> {
        Ok(())
    }

    /// Uploads one or more 2-D tensors stacked along rows (e.g. `[q; k; v]` into one fused
    /// matrix). All parts must have the same number of columns.
    fn upload_matrix(&self, parts: &[&HostTensor<'_>]) -> Result<Self::Matrix, BackendError>;
    /// The format a matrix is held in (`bf16`, `q4_1`, …) and its bytes: what a decode step
    /// streams of it.
    fn matrix_format(&self, m: &Self::Matrix) -> (&'static str, usize);
    /// Uploads f32 data (norm weights, biases).
    fn upload(&self, data: &[f32]) -> Self::Buf;
    /// A zeroed buffer of `len` floats.
    fn alloc(&self, len: usize) -> Self::Buf;
    /// Copies `buf[offset..offset + out.len()]` to the host.
    fn read(&self, buf: &Self::Buf, offset: usize, out: &mut [f32]);
    /// `buf[..len]` on the host, consuming `buf` (the CPU backend hands its memory over
    /// instead of copying it: a step's logits are the largest buffer the host reads).
    fn take_host(&self, buf: Self::Buf, len: usize) -> Vec<f32>;
    /// The greedy token of each row `r` in `rows` of `x` (rows `width` wide): the index of
    /// its largest value under [`cpu::argmax::argmax`]'s rule (NaN as `-inf`, ties to the
    /// lowest index, 0 when none is above `-inf`), so plain greedy decoding moves one index
    /// per row to the host instead of the row.
    fn argmax_rows(&self, x: &Self::Buf, rows: std::ops::Range<usize>, width: usize) -> Vec<u32>;
    /// The token drawn from each row `rows.start + i` of `x` (rows `width` wide) by
    /// `draws[i] = (1 / temperature, uniform in [0, 1))` under
    /// [`cpu::draw::draw_dense_row`]'s rule, so sampled decoding with the whole vocabulary in
    /// play (OpenAI's default) moves one index per row to the host instead of the row.
    fn draw_rows(
        &self,
        x: &Self::Buf,
        rows: std::ops::Range<usize>,
        width: usize,
        draws: &[(f32, f64)],
    ) -> Vec<u32>;

    /// Copies the rows `rows` (each `width` wide, in that order) of `x` into a new buffer.
    fn gather_rows(&self, x: &Self::Buf, rows: &[usize], width: usize) -> Self::Buf;

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
    /// The residual add fused with the next sublayer's norm: `x += y` over `rows` rows of width
    /// `weight.len()`, then `out` = RMSNorm of the sum (as `add` then `rms_norm`).
    fn add_rms_norm(
        &self,
        x: &mut Self::Buf,
        y: &Self::Buf,
        weight: &Self::Buf,
        eps: f32,
        rows: usize,
        out: &mut Self::Buf,
    );
    /// `out[r, j] = silu(gu[r, j]) * gu[r, inter + j]` for a fused `[gate | up]` row of width `2*inter`.
    fn silu_mul(&self, gate_up: &Self::Buf, rows: usize, inter: usize, out: &mut Self::Buf);
    /// The MLP's first product and its activation: `out = silu_mul(x · wᵀ)` for the `[gate; up]`
    /// matrix `w` of `2 * inter` rows. `gate_up` (`rows × 2·inter`) is where the default puts
    /// the product between the two ops; a backend that fuses them (the CUDA one for decode
    /// steps of a few rows: one launch instead of two) need not touch it.
    fn matmul_silu_mul(
        &self,
        x: &Self::Buf,
        rows: usize,
        w: &Self::Matrix,
        inter: usize,
        gate_up: &mut Self::Buf,
        out: &mut Self::Buf,
    ) {
        self.matmul(x, rows, w, gate_up);
        self.silu_mul(gate_up, rows, inter, out);
    }

    /// Bytes one block takes over all layers, K and V (budget in bytes → number of blocks).
    fn kv_bytes_per_block(&self, layers: usize, block_size: usize, shape: AttnShape) -> usize;
    /// A zeroed store of `num_blocks` blocks of `block_size` tokens for `layers` layers.
    fn new_kv_store(
        &self,
        layers: usize,
        num_blocks: usize,
        block_size: usize,
        shape: AttnShape,
    ) -> Self::KvStore;
    /// Applies RoPE in place to the q and k parts of `rows` fused `[q | k | v]` rows at
    /// `positions`, then writes row `i`'s k and v into `store` layer `layer` at slot
    /// `slots[i]` (`block * block_size + offset`). The caller guarantees every slot is
    /// `< num_blocks * block_size` and that no two rows share a slot.
    #[allow(clippy::too_many_arguments)]
    fn rope_and_store(
        &self,
        qkv: &mut Self::Buf,
        rows: usize,
        positions: &[u32],
        slots: &[u32],
        shape: AttnShape,
        rope: &RopeParams,
        store: &mut Self::KvStore,
        layer: usize,
    );
    /// The attention block's first product and what follows it: `qkv = x · wᵀ` (`w` the
    /// `[q; k; v]` matrix), then [`Backend::rope_and_store`] with the same arguments. A backend
    /// may fuse them (the CUDA one does for decode steps of a few rows: one launch instead of
    /// two). Models with a QKV bias call the three ops instead.
    #[allow(clippy::too_many_arguments)]
    fn matmul_rope_and_store(
        &self,
        x: &Self::Buf,
        rows: usize,
        w: &Self::Matrix,
        qkv: &mut Self::Buf,
        positions: &[u32],
        slots: &[u32],
        shape: AttnShape,
        rope: &RopeParams,
        store: &mut Self::KvStore,
        layer: usize,
    ) {
        self.matmul(x, rows, w, qkv);
        self.rope_and_store(qkv, rows, positions, slots, shape, rope, store, layer);
    }
    /// Causal attention for a batch of sequences whose fused `[q | k | v]` rows are stacked
    /// sequence after sequence in `qkv`: row `i` of sequence `s` is at position
    /// `s.start_pos + i` and attends to positions `0..=s.start_pos + i` read through its own
    /// block table (decode rows and prefill chunks mix freely). Those positions must have been
    /// written (`rope_and_store`); the caller guarantees the tables cover them with valid
    /// block ids. Writes `[total rows, num_heads * head_dim]` into `out`; each row's result
    /// depends only on its own query and its sequence's keys and values, never on the batch.
    fn attention(
        &self,
        qkv: &Self::Buf,
        seqs: &[AttnSeq<'_>],
        shape: AttnShape,
        store: &Self::KvStore,
        layer: usize,
        out: &mut Self::Buf,
    );
    /// Copy-on-write support: for each `(src, dst)`, block `dst` becomes a copy of block `src`
    /// in every layer, K and V. Copies run in order; pairs with an id out of range are skipped.
    fn copy_blocks(&self, store: &mut Self::KvStore, copies: &[(u32, u32)]);
    /// The memory of the device the backend computes on, when it has memory of its own (a
    /// GPU), after the work queued so far: the KV pool is then sized to what the weights and a
    /// step's working memory leave (`engine::device_budget`). `None`: host memory (CPU).
    fn device_memory(&self) -> Option<DeviceMemory> {
        None
    }
    /// Device memory a store may hold beyond the bytes of its blocks (its allocation
    /// granularity), set aside from the KV budget.
    fn kv_store_slack(&self, layers: usize, block_size: usize, shape: AttnShape) -> usize {
        let _ = (layers, block_size, shape);
        0
    }
    /// The pool freed `blocks` (nothing will read their data; a block handed out again is
    /// rewritten or copied into first): a store that holds device memory per block gives it
    /// back, so what it holds follows what the pool charges. Default: nothing (a store whose
    /// memory does not depend on which blocks are live).
    fn forget_blocks(&self, store: &mut Self::KvStore, blocks: &[u32]) {
        let _ = (store, blocks);
    }

    /// Whether this backend serves `policy` (its format, window and quest reads); every backend
    /// serves [`KvPolicy::EXACT`].
    fn supports_policy(&self, policy: &KvPolicy) -> bool;
    /// Bytes one block of `policy` takes once sealed, over all layers (its `kv` weight).
    fn kv_sealed_bytes_per_block(
        &self,
        layers: usize,
        block_size: usize,
        shape: AttnShape,
        policy: &KvPolicy,
    ) -> usize;
    /// Encodes layer `layer` of each block in `seals` (full after this step's `rope_and_store`)
    /// before attention reads the layer, so later positions of the same step read them sealed.
    fn seal(&self, store: &mut Self::KvStore, layer: usize, seals: &[Seal]);
    /// After the step: the exact copies of the blocks sealed in it are no longer needed.
    fn release_exact(&self, store: &mut Self::KvStore, blocks: &[u32]);
    /// Gives `store` the calibrated key projections that `mhc:R` blocks are sealed with (one
    /// per rank). Backends that do not serve `mhc` ignore them.
    fn attach_latent_keys(&self, store: &mut Self::KvStore, keys: &[Arc<LatentKeys>]);
}
