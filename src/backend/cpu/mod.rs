//! The CPU backend: always compiled, the correctness oracle for every other backend, and fast
//! enough to serve small models. Follows Hugging Face Llama's float32 math (see each op).
//!
//! - `matmul`: weight matrices in their stored 16-bit format; one batch-invariant AVX2
//!   outer-product kernel for every row count (decode streams, prompts tile).
//! - `ops`: RMSNorm, SiLU·up, softmax, RoPE (cos/sin table cached by position in the backend).
//! - `kv_store`, `attention`: the paged KV block pool (f32 blocks, per layer
//!   `[block][kv head][slot][dim]`) and batched causal GQA attention over block tables.
//! - `simd`: runtime CPU-feature detection and AVX2 helpers (generic x86-64 binaries).
//! - `arena`: huge-page storage for weights; `parallel`: the fork/join every op uses.
//!
//! Threads: helpers run as jobs on rayon's global pool (one worker per core); no op creates
//! threads of its own.

pub mod arena;
pub mod argmax;
pub mod attention;
pub mod draw;
mod kv_sealed;
pub mod kv_store;
pub mod matmul;
pub mod ops;
pub mod parallel;
pub mod simd;

use crate::backend::kv_policy::KvPolicy;
use crate::backend::latent::LatentKeys;
use crate::backend::{AttnSeq, AttnShape, Backend, RopeParams, Seal};
use crate::error::BackendError;
use crate::model::tensor::{HostTensor, QuantKind};
use kv_store::CpuKvStore;
use matmul::{CpuMatrix, WData};
use ops::RopeTable;
use std::sync::{Arc, RwLock};

/// Host-memory backend. Cheap to create; holds only the shared RoPE tables.
#[derive(Debug, Default)]
pub struct CpuBackend {
    /// One table per distinct `RopeParams` seen (one for Llama), grown by doubling.
    rope: RwLock<Vec<Arc<RopeTable>>>,
    /// Keys and values rounded to bf16 before they are stored (see [`Self::with_bf16_kv`]).
    bf16_kv: bool,
}

impl CpuBackend {
    pub fn new() -> Self {
        Self::default()
    }

    /// The oracle of the CUDA backend's storage: keys and values are rounded to bf16 (nearest,
    /// ties to even) before they are stored, as the device's exact copies hold them, so a block
    /// sealed into a quantized format gets the device's very codes. With f32 storage a code on
    /// a rounding boundary may differ, one quantization step (1/15 of a 4-bit group's range),
    /// which a whole forward pass turns into differences far above rounding noise. Not for
    /// serving: the plain CPU backend keeps f32.
    pub fn with_bf16_kv() -> Self {
        Self {
            bf16_kv: true,
            ..Self::default()
        }
    }

    /// A table serving `rope` for positions `< len`, built (or grown) on first need.
    fn rope_table(&self, rope: &RopeParams, len: usize) -> Arc<RopeTable> {
        let found =
            |tables: &[Arc<RopeTable>]| tables.iter().find(|t| t.serves(rope, len)).cloned();
        if let Some(t) = found(&self.rope.read().unwrap_or_else(|e| e.into_inner())) {
            return t;
        }
        let mut tables = self.rope.write().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = found(&tables) {
            return t;
        }
        // Same parameters with a shorter table: replace it by one twice as long (amortized
        // O(1) transcendentals per position).
        tables.retain(|t| !t.serves(rope, 0));
        let t = Arc::new(RopeTable::new(rope, len.next_power_of_two().max(256)));
        tables.push(t.clone());
        t
    }
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Matrix = CpuMatrix;
    type KvStore = CpuKvStore;

    fn name(&self) -> String {
        let isa = if simd::avx2_fma() {
            "avx2+fma"
        } else {
            "scalar"
        };
        format!("cpu ({isa}, {} threads)", rayon::current_num_threads())
    }

    fn upload_matrix(&self, parts: &[&HostTensor<'_>]) -> Result<CpuMatrix, BackendError> {
        CpuMatrix::from_parts(parts)
    }

    fn matrix_format(&self, m: &CpuMatrix) -> (&'static str, usize) {
        (matrix_dtype(m), m.bytes())
    }

    fn upload(&self, data: &[f32]) -> Vec<f32> {
        data.to_vec()
    }

    fn alloc(&self, len: usize) -> Vec<f32> {
        vec![0.0; len]
    }

    fn read(&self, buf: &Vec<f32>, offset: usize, out: &mut [f32]) {
        out.copy_from_slice(&buf[offset..offset + out.len()]);
    }

    fn take_host(&self, mut buf: Vec<f32>, len: usize) -> Vec<f32> {
        buf.truncate(len);
        buf
    }

    fn argmax_rows(&self, x: &Vec<f32>, rows: std::ops::Range<usize>, width: usize) -> Vec<u32> {
        rows.map(|r| argmax::argmax(&x[r * width..(r + 1) * width]) as u32)
            .collect()
    }

    /// Rows in parallel (each is O(width), ~27 µs at 49,152 tokens), one scratch per row.
    fn draw_rows(
        &self,
        x: &Vec<f32>,
        rows: std::ops::Range<usize>,
        width: usize,
        draws: &[(f32, f64)],
    ) -> Vec<u32> {
        assert_eq!(rows.len(), draws.len(), "draw_rows: one draw per row");
        let out: Vec<std::sync::atomic::AtomicU32> = (0..draws.len()).map(|_| 0.into()).collect();
        parallel::for_each(draws.len(), |i| {
            let r = rows.start + i;
            let (inv_t, u01) = draws[i];
            let mut blocks = Vec::new();
            let t = draw::draw_dense_row(&x[r * width..(r + 1) * width], inv_t, u01, &mut blocks);
            out[i].store(t, std::sync::atomic::Ordering::Relaxed);
        });
        out.into_iter().map(|a| a.into_inner()).collect()
    }

    fn gather_rows(&self, x: &Vec<f32>, rows: &[usize], width: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(rows.len() * width);
        for &r in rows {
            out.extend_from_slice(&x[r * width..(r + 1) * width]);
        }
        out
    }

    fn embed(&self, table: &CpuMatrix, ids: &[u32], out: &mut Vec<f32>) {
        let w = table.cols;
        for (&id, row) in ids.iter().zip(out.chunks_exact_mut(w)) {
            // The model validates ids against the vocabulary; an id past the table gives a
            // zero row (and trips a debug assertion) instead of a panic.
            debug_assert!(
                (id as usize) < table.rows,
                "token id {id} ≥ vocab {}",
                table.rows
            );
            if (id as usize) < table.rows {
                table.row_f32(id as usize, row);
            } else {
                row.fill(0.0);
            }
        }
    }

    fn rms_norm(&self, x: &Vec<f32>, weight: &Vec<f32>, eps: f32, rows: usize, out: &mut Vec<f32>) {
        ops::rms_norm(x, weight, eps, rows, out);
    }

    fn matmul(&self, x: &Vec<f32>, rows: usize, w: &CpuMatrix, out: &mut Vec<f32>) {
        matmul::matmul(x, rows, w, out);
    }

    fn add_bias(&self, x: &mut Vec<f32>, bias: &Vec<f32>, rows: usize) {
        ops::add_bias(x, bias, rows);
    }

    fn add(&self, x: &mut Vec<f32>, y: &Vec<f32>, len: usize) {
        ops::add(x, y, len);
    }

    fn add_rms_norm(
        &self,
        x: &mut Vec<f32>,
        y: &Vec<f32>,
        weight: &Vec<f32>,
        eps: f32,
        rows: usize,
        out: &mut Vec<f32>,
    ) {
        // Two passes stay cheap on the CPU (the rows are in cache) and keep its results bit for
        // bit what they were before the fused op existed.
        ops::add(x, y, rows * weight.len());
        ops::rms_norm(x, weight, eps, rows, out);
    }

    fn silu_mul(&self, gate_up: &Vec<f32>, rows: usize, inter: usize, out: &mut Vec<f32>) {
        ops::silu_mul(gate_up, rows, inter, out);
    }

    fn kv_bytes_per_block(&self, layers: usize, block_size: usize, shape: AttnShape) -> usize {
        CpuKvStore::bytes_per_block(layers, block_size, shape)
    }

    fn new_kv_store(
        &self,
        layers: usize,
        num_blocks: usize,
        block_size: usize,
        shape: AttnShape,
    ) -> CpuKvStore {
        CpuKvStore::new(layers, num_blocks, block_size, shape)
    }

    fn rope_and_store(
        &self,
        qkv: &mut Vec<f32>,
        rows: usize,
        positions: &[u32],
        slots: &[u32],
        shape: AttnShape,
        rope: &RopeParams,
        store: &mut CpuKvStore,
        layer: usize,
    ) {
        let positions = &positions[..rows];
        let max_pos = positions.iter().copied().max().unwrap_or(0) as usize;
        self.rope_table(rope, max_pos + 1)
            .apply(qkv, rows, positions, shape);
        if self.bf16_kv {
            let (q, width) = (shape.q_width(), shape.qkv_width());
            for row in qkv[..rows * width].chunks_exact_mut(width) {
                for x in &mut row[q..] {
                    *x = half::bf16::from_f32(*x).to_f32();
                }
            }
        }
        store.store(layer, qkv, rows, &slots[..rows]);
    }

    fn attention(
        &self,
        qkv: &Vec<f32>,
        seqs: &[AttnSeq<'_>],
        shape: AttnShape,
        store: &CpuKvStore,
        layer: usize,
        out: &mut Vec<f32>,
    ) {
        attention::attention(qkv, seqs, shape, store, layer, out, simd::avx2_fma());
    }

    fn copy_blocks(&self, store: &mut CpuKvStore, copies: &[(u32, u32)]) {
        store.copy_blocks(copies);
    }

    fn supports_policy(&self, _policy: &KvPolicy) -> bool {
        true
    }

    fn kv_sealed_bytes_per_block(
        &self,
        layers: usize,
        block_size: usize,
        shape: AttnShape,
        policy: &KvPolicy,
    ) -> usize {
        policy
            .sealed_bytes_per_block(layers, shape.num_kv_heads, block_size, shape.head_dim)
            .unwrap_or_else(|| CpuKvStore::bytes_per_block(layers, block_size, shape))
    }

    fn seal(&self, store: &mut CpuKvStore, layer: usize, seals: &[Seal]) {
        store.seal(layer, seals);
    }

    fn release_exact(&self, store: &mut CpuKvStore, blocks: &[u32]) {
        store.release_exact(blocks);
    }

    fn forget_blocks(&self, store: &mut CpuKvStore, blocks: &[u32]) {
        store.forget(blocks);
    }

    fn attach_latent_keys(&self, store: &mut CpuKvStore, keys: &[Arc<LatentKeys>]) {
        for k in keys {
            let table = self.rope_table(&k.rope, k.max_positions);
            store.attach_latent(k.clone(), table);
        }
    }
}

/// The dtype a matrix is stored in (for logs and benchmarks).
pub fn matrix_dtype(m: &CpuMatrix) -> &'static str {
    match m.data {
        WData::Bf16(_) => "bf16",
        WData::F16(_) => "f16",
        WData::F32(_) => "f32",
        WData::Quant(QuantKind::Q4_1, _) => "q4_1",
        WData::Quant(QuantKind::Q8_0, _) => "q8_0",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tensor::HostData;
    use half::bf16;
    use std::borrow::Cow;

    #[test]
    fn embed_gathers_rows_exactly() {
        let b = CpuBackend::new();
        let vals: Vec<bf16> = (0..12)
            .map(|i| bf16::from_f32(i as f32 * 0.5 - 2.0))
            .collect();
        let t = HostTensor {
            name: "emb".into(),
            shape: vec![4, 3],
            data: HostData::Bf16(Cow::Owned(vals.clone())),
        };
        let m = b.upload_matrix(&[&t]).unwrap();
        assert_eq!(matrix_dtype(&m), "bf16");
        let mut out = b.alloc(6);
        b.embed(&m, &[2, 0], &mut out);
        let want: Vec<f32> = [6, 7, 8, 0, 1, 2]
            .iter()
            .map(|&i| vals[i].to_f32())
            .collect();
        assert_eq!(out, want);
    }

    #[test]
    fn rope_table_is_shared_and_grows() {
        let b = CpuBackend::new();
        let rope = RopeParams {
            inv_freq: vec![1.0, 0.1],
            attention_scaling: 1.0,
        };
        let t1 = b.rope_table(&rope, 10);
        assert_eq!(t1.len(), 256);
        assert!(Arc::ptr_eq(&t1, &b.rope_table(&rope, 200)));
        let t2 = b.rope_table(&rope, 300);
        assert_eq!(t2.len(), 512);
        assert_eq!(b.rope.read().unwrap().len(), 1);
        let other = RopeParams {
            inv_freq: vec![1.0, 0.1],
            attention_scaling: 0.5,
        };
        b.rope_table(&other, 1);
        assert_eq!(b.rope.read().unwrap().len(), 2);
    }
}
