//! The CUDA backend: the [`Backend`] ops on an NVIDIA GPU through cudarc, with the driver, NVRTC
//! and cuBLAS loaded at run time (`device` probes them first, so a machine without them gets a
//! clear answer instead of cudarc's loader panic).
//!
//! - Weights: bf16 on the device (`CudaMatrix`), whatever the source format.
//! - Activations: f32 (`CudaSlice<f32>`), as the trait specifies.
//! - Products: up to [`kernels::GEMV_DEFAULT_ROWS`] rows (decode steps of one or two sequences; up to
//!   [`kernels::GEMV_MAX_ROWS`] with [`CudaBackend::set_gemv_max_rows`]),
//!   `kernels/gemv.cu`: f32 rows times bf16 weights in one launch, bound by reading the weights
//!   once. More rows: cuBLAS GemmEx, bf16 × bf16 with f32 accumulation; the f32 activations
//!   are split into bf16 `hi + lo` rows (`split_bf16`) and multiplied in one product of twice
//!   the rows, so the result matches an f32-activation product (the CPU oracle) to ~1e-5
//!   instead of the ~3e-3 of a plain bf16 cast; weights are still read once.
//!   [`CudaBackend::set_split_matmul`] turns the split off (plain bf16 activations, half the
//!   arithmetic), [`CudaBackend::set_gemv_max_rows`] moves the line between the two.
//! - KV: `store::CudaKvStore`: blocks fill as exact bf16 copies and are sealed into their
//!   policy's format (int8, KIVI 4/2-bit, k8v4, mhc latent keys) by `kernels/kv_seal.cu`;
//!   attention reads each block in its current form (`kernels/attention.cu`, `prefill.cu`), windows included;
//!   quest's key bounds are written at seal and its blocks picked per decode row on the device.
//! - Kernels: `kernels/*.cu`, compiled at start by NVRTC for the device's arch (`compile`).
//!
//! Everything runs in order on one stream with cudarc's event tracking off. The trait's ops are
//! infallible: a CUDA error inside one (a lost device, an out-of-memory) panics with the op's
//! name, like an out-of-bounds index would on the CPU; start-up errors are returned.
//! Unlike the CPU backend, a row's result may differ in the last bits with the batch around it
//! (cuBLAS picks its algorithm by shape).

mod attention;
pub mod compile;
pub mod device;
pub mod kernels;
mod kv_write;
pub mod layout;
pub mod parity;
pub mod plan;
pub mod scratch;
pub mod slots;
pub mod split;
pub mod store;

use crate::backend::codec::Codec;
use crate::backend::kv_policy::KvPolicy;
use crate::backend::{AttnSeq, AttnShape, Backend, RopeParams, Seal};
use crate::error::BackendError;
use crate::model::tensor::HostTensor;
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{
    sys::CUdevice_attribute, CudaContext, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    LaunchConfig, PushKernelArg,
};
pub use device::{choose, probe, Choice, DeviceArg, GpuInfo};
use half::bf16;
use kernels::{args, grid_1d, Kernels};
use std::sync::{Arc, Mutex};
pub use store::CudaKvStore;

/// A weight matrix `[rows, cols]` in bf16 on the device.
#[derive(Debug)]
pub struct CudaMatrix {
    pub data: CudaSlice<bf16>,
    pub rows: usize,
    pub cols: usize,
}

/// One cached index array: its purpose, its host copy and its device copy.
type Upload = (&'static str, Vec<u32>, CudaSlice<u32>);

/// What a decode split is picked for: (format, group bound, head dim, longest context, rows,
/// KV heads).
type DecodeSplitKey = (usize, usize, usize, usize, usize, usize);

/// A GPU backend on one device.
pub struct CudaBackend {
    info: GpuInfo,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    k: Kernels,
    sms: usize,
    split_matmul: std::sync::atomic::AtomicBool,
    /// Products of at most this many rows go to `gemv_r<R>_bf16` (0: all to cuBLAS).
    gemv_max_rows: std::sync::atomic::AtomicUsize,
    /// Warps per column group of the few-row products, splitting k (1, 2 or 4; see gemv.cu).
    gemv_slices: std::sync::atomic::AtomicUsize,
    /// `inv_freq` uploaded once per distinct rope parameters.
    rope: Mutex<Vec<(Vec<f32>, CudaSlice<f32>)>>,
    /// The last index array uploaded for each purpose (positions, slots, block tables, ...).
    /// A copy from pageable host memory waits for the stream to drain, and a forward step
    /// uploads the same arrays for every layer: an unchanged array is reused, so a step syncs
    /// once per array instead of once per layer. A replaced array is freed in stream order,
    /// after the kernels queued before that read it.
    uploads: Mutex<Vec<Upload>>,
    /// Per-op scratch kept for reuse (see `scratch.rs`).
    scratch_cache: scratch::ScratchCache,
    /// `true` (default): decode attention merges its context splits in the same launch
    /// (`decode_counters`); `false`: a second launch, `decode_reduce_f32` (for measurements).
    fused_merge: std::sync::atomic::AtomicBool,
    /// One counter per (decode row, KV head) for the fused merge: zero between launches (the
    /// kernel sets each back), grown as batches grow.
    decode_counters: Mutex<Option<CudaSlice<u32>>>,
    /// Resident CTAs across the device of each decode kernel, by (format, group bound, head
    /// dim): the driver's occupancy, asked once (`split.rs` fits the splits to these slots).
    decode_slots: Mutex<std::collections::HashMap<(usize, usize, usize), usize>>,
    /// The last decode split picked, with what it was picked for (kernel key, context, rows,
    /// KV heads): every layer of a step asks the same question.
    decode_split_memo: Mutex<Option<(DecodeSplitKey, (usize, usize))>>,
    /// Decode split length forced for measurements (`gpu-check`'s sweep); 0: `split.rs` picks.
    decode_split_len: std::sync::atomic::AtomicUsize,
    /// Device memory per chunk of the KV stores made after a change (`store::CHUNK_BYTES`).
    kv_chunk_bytes: std::sync::atomic::AtomicUsize,
    /// KV blocks moved by slab compaction so far (`kv_write.rs`), for checks and reports.
    kv_moves: std::sync::atomic::AtomicU64,
    /// Seconds spent compiling kernels at start (0 when all came from the cache).
    pub compile_seconds: f64,
}

/// Unwraps a CUDA result inside an infallible trait op (see the module doc).
#[track_caller]
fn ok<T, E: std::fmt::Debug>(r: Result<T, E>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("CUDA {what}: {e:?}"))
}

/// Per-op scratch and activations come from the device's default stream-ordered memory pool,
/// whose release threshold is 0 by default: every synchronisation (one per forward step, to
/// read the logits) would hand its memory back to the driver and the next step would map it
/// again. Keep it instead. Failure only costs speed, so it is logged, not returned.
fn keep_pool_memory(ctx: &Arc<CudaContext>) {
    use cudarc::driver::sys as drv;
    let mut pool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: valid out-pointer and device; the attribute takes a pointer to a u64.
    let r = unsafe {
        drv::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
            .result()
            .and_then(|()| {
                drv::cuMemPoolSetAttribute(
                    pool,
                    drv::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    &mut threshold as *mut u64 as *mut std::ffi::c_void,
                )
                .result()
            })
    };
    if let Err(e) = r {
        tracing::warn!(error = %e, "cannot keep freed memory in the CUDA memory pool");
    }
}

fn start_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> BackendError + '_ {
    move |e| BackendError::Unsupported(format!("CUDA {what}: {e}"))
}

impl CudaBackend {
    /// Probes device `ordinal` and opens it (see [`device::probe`]).
    pub fn open(ordinal: usize) -> Result<Self, BackendError> {
        let info = probe(ordinal).map_err(BackendError::Unsupported)?;
        Self::new(info)
    }

    /// Opens a probed device: context, stream, cuBLAS, kernels (compiled or from the cache).
    pub fn new(info: GpuInfo) -> Result<Self, BackendError> {
        Self::with_defines(info, &[])
    }

    /// [`CudaBackend::new`] with `-D NAME=VALUE` tuning knobs for the kernels (e.g.
    /// `DECODE_UNROLL`), for measurements.
    pub fn with_defines(info: GpuInfo, defines: &[(&str, u32)]) -> Result<Self, BackendError> {
        let ctx = CudaContext::new(info.ordinal).map_err(start_err("context"))?;
        // SAFETY: one stream only; stream order is the only ordering the backend relies on.
        unsafe { ctx.disable_event_tracking() };
        keep_pool_memory(&ctx);
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| BackendError::Unsupported(format!("cuBLAS: {e:?}")))?;
        let t = std::time::Instant::now();
        let modules = compile::compile_all(info.arch, info.driver, defines)
            .map_err(BackendError::Unsupported)?;
        let compiled = modules.iter().any(|m| !m.from_cache);
        let k = Kernels::load(&ctx, modules).map_err(start_err("module load"))?;
        let sms = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(start_err("attribute"))? as usize;
        Ok(Self {
            info,
            stream,
            blas,
            k,
            sms,
            split_matmul: true.into(),
            gemv_max_rows: kernels::GEMV_DEFAULT_ROWS.into(),
            gemv_slices: kernels::GEMV_DEFAULT_SLICES.into(),
            rope: Mutex::new(Vec::new()),
            uploads: Mutex::new(Vec::new()),
            scratch_cache: scratch::ScratchCache::default(),
            fused_merge: true.into(),
            decode_counters: Mutex::new(None),
            decode_slots: Mutex::new(Default::default()),
            decode_split_memo: Mutex::new(None),
            decode_split_len: 0.into(),
            kv_chunk_bytes: store::CHUNK_BYTES.into(),
            kv_moves: 0.into(),
            compile_seconds: if compiled {
                t.elapsed().as_secs_f64()
            } else {
                0.0
            },
        })
    }

    pub fn info(&self) -> &GpuInfo {
        &self.info
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn multiprocessors(&self) -> usize {
        self.sms
    }

    /// Device memory per chunk for the KV stores made after this call (default
    /// `store::CHUNK_BYTES`, ~8 MiB): a slab allocates and frees a chunk of blocks at a time.
    /// Small chunks make compaction happen at small pools (tests).
    pub fn set_kv_chunk_bytes(&self, bytes: usize) {
        self.kv_chunk_bytes
            .store(bytes.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// KV blocks the stores' slab compaction has moved so far.
    pub fn kv_blocks_moved(&self) -> u64 {
        self.kv_moves.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits for all queued work (timing, and errors surfacing from earlier launches).
    pub fn synchronize(&self) {
        ok(self.stream.synchronize(), "synchronize");
    }

    /// `true` (default): products with bf16 `hi + lo` activations (f32-exact); `false`: plain
    /// bf16 activations.
    pub fn set_split_matmul(&self, on: bool) {
        self.split_matmul
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Products of up to `rows` rows (capped at [`kernels::GEMV_MAX_ROWS`]) run on the few-row
    /// kernel, more on cuBLAS; 0 sends every product to cuBLAS (for measurements).
    pub fn set_gemv_max_rows(&self, rows: usize) {
        self.gemv_max_rows.store(
            rows.min(kernels::GEMV_MAX_ROWS),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// The few-row products split k over `slices` warps per column group (1, 2 or 4; others
    /// round down to one of these): more warps for products with few columns, at the cost of a
    /// shared-memory sum (for measurements; default [`kernels::GEMV_DEFAULT_SLICES`]).
    pub fn set_gemv_slices(&self, slices: usize) {
        let s = match slices {
            0 | 1 => 1,
            2 | 3 => 2,
            _ => 4,
        };
        self.gemv_slices
            .store(s, std::sync::atomic::Ordering::Relaxed);
    }

    /// `true` (default): each decode attention launch merges its own context splits; `false`:
    /// a second launch merges them (the same arithmetic, so the same bits; for measurements).
    pub fn set_fused_merge(&self, on: bool) {
        self.fused_merge
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Forces every decode split to `len` positions (rounded up to a multiple of
    /// [`split::SPLIT_STEP`], within [`split::MIN_SPLIT`]..=[`split::MAX_SPLIT`]); 0 (default)
    /// lets [`split::decode_split`] pick (for measurements).
    pub fn set_decode_split(&self, len: usize) {
        let len = if len == 0 {
            0
        } else {
            len.next_multiple_of(split::SPLIT_STEP)
                .clamp(split::MIN_SPLIT, split::MAX_SPLIT)
        };
        self.decode_split_len
            .store(len, std::sync::atomic::Ordering::Relaxed);
    }

    /// Device address of at least `len` zeroed merge counters (see `decode_counters`). A
    /// buffer too small is replaced by a zeroed one of twice the size (the old one is freed in
    /// stream order, after the launches that used it).
    fn decode_counters(&self, len: usize) -> u64 {
        let mut c = self
            .decode_counters
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if c.as_ref().is_none_or(|b| b.len() < len) {
            let size = len.max(2 * c.as_ref().map_or(0, |b| b.len())).max(64);
            *c = Some(ok(self.stream.alloc_zeros::<u32>(size), "alloc"));
        }
        self.ptr(c.as_ref().expect("allocated above"))
    }

    fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        s.device_ptr(&self.stream).0
    }

    fn to_device<T: DeviceRepr>(&self, v: &[T]) -> CudaSlice<T> {
        ok(self.stream.clone_htod(v), "upload")
    }

    /// Scratch for `len` elements of `T` (at least one) for the op being enqueued, from the
    /// backend's kept buffers (`scratch.rs`); uninitialised.
    fn scratch_buf<T>(&self, len: usize) -> scratch::Scratch<'_> {
        let bytes = len.max(1) * std::mem::size_of::<T>();
        ok(self.scratch_cache.take(&self.stream, bytes), "alloc")
    }

    /// Spare scratch buffers the backend holds (tests, measurements).
    pub fn spare_scratch(&self) -> usize {
        self.scratch_cache.spare()
    }

    /// Uninitialised device memory for `len` elements (at least one).
    fn scratch<T: DeviceRepr>(&self, len: usize) -> CudaSlice<T> {
        // SAFETY: every caller overwrites the elements it later reads.
        ok(unsafe { self.stream.alloc::<T>(len.max(1)) }, "alloc")
    }

    /// Device address of `data` uploaded under `key` (see `uploads`). Valid until the next
    /// call with the same key; every caller enqueues its kernels before that.
    fn indices(&self, key: &'static str, data: &[u32]) -> u64 {
        let mut cache = self.uploads.lock().unwrap_or_else(|e| e.into_inner());
        let pos = cache.iter().position(|e| e.0 == key);
        if let Some(i) = pos {
            if cache[i].1 == data {
                return self.ptr(&cache[i].2);
            }
        }
        let dev = self.to_device(if data.is_empty() { &[0] } else { data });
        let p = self.ptr(&dev);
        match pos {
            Some(i) => cache[i] = (key, data.to_vec(), dev),
            None => cache.push((key, data.to_vec(), dev)),
        }
        p
    }

    fn inv_freq(&self, rope: &RopeParams) -> u64 {
        let mut tables = self.rope.lock().unwrap_or_else(|e| e.into_inner());
        let scaled: Vec<f32> = rope.inv_freq.clone();
        if let Some((_, d)) = tables.iter().find(|(f, _)| *f == scaled) {
            return self.ptr(d);
        }
        let d = self.to_device(&scaled);
        let p = self.ptr(&d);
        tables.push((scaled, d));
        p
    }
}

mod ops;
mod products;
