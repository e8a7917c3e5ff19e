//! Typed wrappers over the `kernels/*.cu` entry points: one method per kernel that computes the
//! launch shape and checks what the kernel assumes. Device pointers travel as raw `u64`
//! addresses: the backend runs everything on one stream with cudarc's event tracking off, so
//! stream order alone orders every read after the writes before it.

use super::compile::Compiled;
use super::store::FORMATS;
use cudarc::driver::{
    sys::CUfunction_attribute_enum, CudaContext, CudaFunction, DriverError, LaunchConfig,
};
use std::sync::Arc;

/// Threads per CTA of the attention kernels (`THREADS` in attention.cu, `PREFILL_THREADS` in
/// prefill.cu).
pub const ATTN_THREADS: u32 = 128;
/// Threads per CTA of the greedy token selection (`ARGMAX_THREADS` in sampling.cu).
pub const ARGMAX_THREADS: u32 = 256;
/// Threads per CTA of the dense temperature draw (`DRAW_THREADS` in sampling.cu).
pub const DRAW_THREADS: u32 = 256;
/// Elements per partial sum of the draw (`DRAW_BLOCK`; `backend::cpu::draw::BLOCK`).
pub const DRAW_BLOCK: usize = crate::backend::cpu::draw::BLOCK;
/// Lane sums per block of the draw (`DRAW_LANES`).
pub const DRAW_LANES: usize = 8;
/// Threads per CTA of the few-row products (`GEMV_THREADS` in gemv.cu).
pub const GEMV_THREADS: u32 = 128;
/// Output columns per warp of the few-row products (`GEMV_COLS`).
pub const GEMV_COLS: usize = 4;
/// Most activation rows a product can take through `gemv_r<R>_bf16` (the largest `R`) rather
/// than cuBLAS: a decode step of up to this many sequences.
pub const GEMV_MAX_ROWS: usize = 8;
/// Rows up to which products take the few-row kernel by default. 2: on an H200 (gpu-check,
/// 2026-11-30) the kernel took 0.55–0.76x cuBLAS hi+lo's time at 1 row and 0.85–0.94x at 2,
/// but 1.18–1.73x at 4 and 1.82–3.44x at 8 (the down product's 2048 columns give one CTA per
/// SM); the 1B engine ran 1,158 tok/s with it at batch 2 against 1,018 without, and 2,257
/// against 3,712 at batch 8 (docs/cuda.md).
pub const GEMV_DEFAULT_ROWS: usize = 2;
/// Warps per column group of the few-row products by default: 1, each warp owning its columns
/// and all of k, the layout timed on the H200 (2026-11-30). Splitting k (`set_gemv_slices`)
/// gives products with few columns more warps; `gpu-check`'s products section times 2 and 4
/// beside it, and this follows what it measures.
pub const GEMV_DEFAULT_SLICES: usize = 1;
/// Threads per CTA of quest's block selection (`QUEST_THREADS`).
pub const QUEST_THREADS: u32 = 256;
/// Query heads per KV head the decode kernels handle (the largest `paged_decode_g<G>` variant).
pub const MAX_GROUP: usize = 8;
/// Keys per prefill tile (`KTILE`).
pub const KTILE: usize = 32;
/// Largest head_dim the prefill kernel's shared memory is sized for at load (and it needs
/// head_dim % 16 == 0: the tensor-core product steps through the channels 16 at a time).
pub const PREFILL_MAX_DIM: usize = 256;
/// Output channels one prefill warp accumulates (`PD_MAX`); above it two warps share a tile.
const PREFILL_WARP_DIM: usize = 128;

/// Queries per prefill CTA at `dim` (`PREFILL_Q / dsplit` in the kernel): 4 warps of 16, or 2
/// query tiles of 16 when two warps share each (head_dim above 128).
pub fn prefill_queries(dim: usize) -> usize {
    if dim > PREFILL_WARP_DIM {
        32
    } else {
        64
    }
}

/// Builds a launch from a function and argument references (all locals of the caller).
macro_rules! args {
    ($stream:expr, $f:expr, $($arg:expr),* $(,)?) => {{
        let mut b = $stream.launch_builder($f);
        $( b.arg($arg); )*
        b
    }};
}
pub(crate) use args;

/// Every kernel, loaded from the compiled modules.
#[derive(Debug)]
pub struct Kernels {
    pub rms_norm: CudaFunction,
    pub add: CudaFunction,
    pub add_bias: CudaFunction,
    pub silu_mul: CudaFunction,
    pub gather_rows: CudaFunction,
    pub embed: CudaFunction,
    pub split: CudaFunction,
    pub sum_halves: CudaFunction,
    pub convert: CudaFunction,
    pub rope_store: CudaFunction,
    pub argmax: CudaFunction,
    pub draw: CudaFunction,
    /// `gemv_r{1,2,4,8}_bf16`: products of up to 1, 2, 4, 8 f32 rows with bf16 weights.
    pub gemv: [CudaFunction; 4],
    /// `gemv_silu_r{1,2,4,8}_bf16`: the MLP's gate/up product and its SiLU·up in one launch.
    pub gemv_silu: [CudaFunction; 4],
    /// `gemv_rope_r{1,2,4,8}_bf16`: the QKV product, RoPE and the KV write in one launch.
    pub gemv_rope: [CudaFunction; 4],
    /// `paged_decode_g{1,2,4,8}_<fmt>` per format of [`FORMATS`]: register arrays sized for the
    /// group (see `decode_fn`).
    pub paged_decode: Vec<[CudaFunction; 4]>,
    pub decode_reduce: CudaFunction,
    /// `prefill_<fmt>` per format.
    pub prefill: Vec<CudaFunction>,
    /// `seal_<fmt>` per format (index 0, bf16, is never launched: bf16 blocks without key
    /// bounds stay exact; with bounds they are `bf16s`).
    pub seal: Vec<CudaFunction>,
    /// `seal_bounds_<fmt>` per format: quest's key bounds of freshly sealed blocks.
    pub seal_bounds: Vec<CudaFunction>,
    /// Quest's block selection for decode rows.
    pub quest_select: CudaFunction,
    pub latent_encode: CudaFunction,
    pub copy_blocks: CudaFunction,
}

/// Every entry point the backend loads, as `(file, name)`: the compile test checks that each is
/// in its file's CUBIN.
pub fn kernel_names() -> Vec<(&'static str, String)> {
    let mut v: Vec<(&'static str, String)> = [
        ("norm.cu", "rms_norm_f32"),
        ("elementwise.cu", "add_f32"),
        ("elementwise.cu", "add_bias_f32"),
        ("elementwise.cu", "silu_mul_f32"),
        ("elementwise.cu", "gather_rows_f32"),
        ("elementwise.cu", "embed_bf16"),
        ("elementwise.cu", "split_bf16"),
        ("elementwise.cu", "sum_halves_f32"),
        ("elementwise.cu", "convert_bf16"),
        ("rope_kv.cu", "rope_store_bf16"),
        ("attention.cu", "decode_reduce_f32"),
        ("quest.cu", "quest_select_f32"),
        ("kv_seal.cu", "latent_encode_bf16"),
        ("kv_copy.cu", "copy_blocks_u8"),
        ("sampling.cu", "argmax_f32"),
        ("sampling.cu", "draw_dense_f32"),
        ("gemv.cu", "gemv_r1_bf16"),
        ("gemv.cu", "gemv_r2_bf16"),
        ("gemv.cu", "gemv_r4_bf16"),
        ("gemv.cu", "gemv_r8_bf16"),
        ("gemv.cu", "gemv_silu_r1_bf16"),
        ("gemv.cu", "gemv_silu_r2_bf16"),
        ("gemv.cu", "gemv_silu_r4_bf16"),
        ("gemv.cu", "gemv_silu_r8_bf16"),
        ("gemv.cu", "gemv_rope_r1_bf16"),
        ("gemv.cu", "gemv_rope_r2_bf16"),
        ("gemv.cu", "gemv_rope_r4_bf16"),
        ("gemv.cu", "gemv_rope_r8_bf16"),
    ]
    .iter()
    .map(|&(f, n)| (f, n.to_string()))
    .collect();
    for fmt in FORMATS {
        for g in [1, 2, 4, 8] {
            v.push(("attention.cu", format!("paged_decode_g{g}_{fmt}")));
        }
        v.push(("prefill.cu", format!("prefill_{fmt}")));
        v.push(("kv_seal.cu", format!("seal_{fmt}")));
        v.push(("kv_seal.cu", format!("seal_bounds_{fmt}")));
    }
    v
}

/// Dynamic shared memory the latent encoder may use: `[block_size, kv_heads * head_dim]` f32
/// (sm_80 allows 163 KiB per CTA, sm_86/89 99 KiB, sm_90 227 KiB).
pub const LATENT_MAX_SMEM: usize = 96 << 10;

impl Kernels {
    pub fn load(ctx: &Arc<CudaContext>, modules: Vec<Compiled>) -> Result<Self, DriverError> {
        let mut loaded = Vec::new();
        for m in modules {
            loaded.push((
                m.file,
                ctx.load_module(cudarc::nvrtc::Ptx::from_binary(m.cubin))?,
            ));
        }
        // A file may be compiled in parts (`compile::parts`): its kernel is in one of them.
        let f = |file: &str, name: &str| -> Result<CudaFunction, DriverError> {
            let mut parts = loaded.iter().filter(|(f, _)| *f == file).peekable();
            assert!(parts.peek().is_some(), "{file} is compiled");
            let mut last = None;
            for (_, module) in parts {
                match module.load_function(name) {
                    Ok(func) => return Ok(func),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.expect("at least one part"))
        };
        let per_format = |file: &str, op: &str| -> Result<Vec<CudaFunction>, DriverError> {
            FORMATS
                .iter()
                .map(|fmt| f(file, &format!("{op}_{fmt}")))
                .collect()
        };
        let decode = FORMATS
            .iter()
            .map(|fmt| -> Result<[CudaFunction; 4], DriverError> {
                let g = |n: u32| f("attention.cu", &format!("paged_decode_g{n}_{fmt}"));
                Ok([g(1)?, g(2)?, g(4)?, g(8)?])
            })
            .collect::<Result<Vec<_>, _>>()?;
        let k = Kernels {
            rms_norm: f("norm.cu", "rms_norm_f32")?,
            add: f("elementwise.cu", "add_f32")?,
            add_bias: f("elementwise.cu", "add_bias_f32")?,
            silu_mul: f("elementwise.cu", "silu_mul_f32")?,
            gather_rows: f("elementwise.cu", "gather_rows_f32")?,
            embed: f("elementwise.cu", "embed_bf16")?,
            split: f("elementwise.cu", "split_bf16")?,
            sum_halves: f("elementwise.cu", "sum_halves_f32")?,
            convert: f("elementwise.cu", "convert_bf16")?,
            rope_store: f("rope_kv.cu", "rope_store_bf16")?,
            argmax: f("sampling.cu", "argmax_f32")?,
            draw: f("sampling.cu", "draw_dense_f32")?,
            gemv: [
                f("gemv.cu", "gemv_r1_bf16")?,
                f("gemv.cu", "gemv_r2_bf16")?,
                f("gemv.cu", "gemv_r4_bf16")?,
                f("gemv.cu", "gemv_r8_bf16")?,
            ],
            gemv_silu: [
                f("gemv.cu", "gemv_silu_r1_bf16")?,
                f("gemv.cu", "gemv_silu_r2_bf16")?,
                f("gemv.cu", "gemv_silu_r4_bf16")?,
                f("gemv.cu", "gemv_silu_r8_bf16")?,
            ],
            gemv_rope: [
                f("gemv.cu", "gemv_rope_r1_bf16")?,
                f("gemv.cu", "gemv_rope_r2_bf16")?,
                f("gemv.cu", "gemv_rope_r4_bf16")?,
                f("gemv.cu", "gemv_rope_r8_bf16")?,
            ],
            paged_decode: decode,
            decode_reduce: f("attention.cu", "decode_reduce_f32")?,
            prefill: per_format("prefill.cu", "prefill")?,
            seal: per_format("kv_seal.cu", "seal")?,
            seal_bounds: per_format("kv_seal.cu", "seal_bounds")?,
            quest_select: f("quest.cu", "quest_select_f32")?,
            latent_encode: f("kv_seal.cu", "latent_encode_bf16")?,
            copy_blocks: f("kv_copy.cu", "copy_blocks_u8")?,
        };
        // The prefill CTA's shared memory passes 48 KiB from head_dim 80 up (106 KiB at 256;
        // sm_80 allows 163 KiB per CTA, sm_90 227 KiB).
        for p in &k.prefill {
            p.set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                prefill_smem(PREFILL_MAX_DIM) as i32,
            )?;
        }
        k.latent_encode.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            LATENT_MAX_SMEM as i32,
        )?;
        Ok(k)
    }
}

/// Dynamic shared memory of the prefill kernel at `dim`, bf16 high and low parts each: q
/// `[queries, dim + 8]`, K `[32, dim + 8]`, V transposed `[dim, 32 + 8]` (rows padded so that a
/// fragment's 32-bit loads hit distinct banks).
pub fn prefill_smem(dim: usize) -> u32 {
    let q = prefill_queries(dim);
    (2 * 2 * (q * (dim + 8) + KTILE * (dim + 8) + dim * (KTILE + 8))) as u32
}

/// Dynamic shared memory of the decode kernel: the larger of the scores `[G, split_len]` and
/// the per-thread-group partial outputs `[128 / (dim / 8), G, dim]` (they share the space).
pub fn decode_smem(group: usize, dim: usize, split_len: usize) -> u32 {
    let kpp = ATTN_THREADS as usize / (dim / 8);
    ((group * split_len).max(kpp * group * dim) * 4) as u32
}

impl Kernels {
    /// The smallest decode variant of format `fmt` whose compile-time group bound `G_MAX` holds
    /// `group` (≤ 8), with that bound (the kernel needs `dim / 8 >= G_MAX` lanes per key).
    pub fn decode_fn(&self, fmt: usize, group: usize) -> (&CudaFunction, usize) {
        let i = match group {
            0 | 1 => 0,
            2 => 1,
            3 | 4 => 2,
            _ => 3,
        };
        (&self.paged_decode[fmt][i], 1 << i)
    }
}

/// The row bound `R` of the `gemv_r<R>_bf16` variant that takes `rows` (1..=GEMV_MAX_ROWS)
/// rows: the smallest that holds them.
pub fn gemv_bound(rows: usize) -> usize {
    debug_assert!((1..=GEMV_MAX_ROWS).contains(&rows));
    rows.next_power_of_two().min(GEMV_MAX_ROWS)
}

impl Kernels {
    /// `gemv_r<R>_bf16` for `rows` rows, `R` = [`gemv_bound`].
    pub fn gemv_fn(&self, rows: usize) -> &CudaFunction {
        &self.gemv[gemv_bound(rows).trailing_zeros() as usize]
    }
    /// `gemv_silu_r<R>_bf16` for `rows` rows, `R` = [`gemv_bound`].
    pub fn gemv_silu_fn(&self, rows: usize) -> &CudaFunction {
        &self.gemv_silu[gemv_bound(rows).trailing_zeros() as usize]
    }
    /// `gemv_rope_r<R>_bf16` for `rows` rows, `R` = [`gemv_bound`].
    pub fn gemv_rope_fn(&self, rows: usize) -> &CudaFunction {
        &self.gemv_rope[gemv_bound(rows).trailing_zeros() as usize]
    }
}

/// A 1-D grid-stride launch over `n` elements.
pub fn grid_1d(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_535 * 8) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemv_variants_hold_their_rows() {
        let bounds: Vec<usize> = (1..=GEMV_MAX_ROWS).map(gemv_bound).collect();
        assert_eq!(bounds, [1, 2, 4, 4, 8, 8, 8, 8]);
        // The variant's index in `Kernels::gemv` is its bound's log2.
        assert!(bounds.iter().all(|b| b.trailing_zeros() < 4));
    }
}
