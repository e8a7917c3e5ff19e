//! `impl Backend for CudaBackend`: each op checks the sizes its kernel assumes, uploads the small
//! index arrays it needs and launches. Launch shapes are documented in the `.cu` files.

use super::kernels::{ARGMAX_THREADS, DRAW_BLOCK, DRAW_LANES, DRAW_THREADS};
use super::*;

impl Backend for CudaBackend {
    type Buf = CudaSlice<f32>;
    type Matrix = CudaMatrix;
    type KvStore = CudaKvStore;

    fn name(&self) -> String {
        format!(
            "cuda:{} ({}, sm_{}, driver {})",
            self.info.ordinal, self.info.name, self.info.arch, self.info.driver
        )
    }

    /// Synchronises the context twice: a sticky error (an illegal address, a trap, a lost
    /// device) comes back from every call after it, while an error cudarc recorded earlier
    /// (a failed free in a drop) comes back once and is cleared.
    fn device_status(&self) -> Result<(), String> {
        let ctx = self.stream.context();
        ctx.synchronize()
            .or_else(|_| ctx.synchronize())
            .map_err(|e| format!("{}: {e}", self.name()))
    }

    fn upload_matrix(&self, parts: &[&HostTensor<'_>]) -> Result<CudaMatrix, BackendError> {
        let cols = match parts.first() {
            Some(p) if p.shape.len() == 2 => p.shape[1],
            _ => return Err(BackendError::Shape("expected 2-D matrices".into())),
        };
        let mut data = Vec::new();
        let mut rows = 0;
        for p in parts {
            if p.shape.len() != 2 || p.shape[1] != cols || p.data.len() != p.numel() {
                return Err(BackendError::Shape(format!(
                    "{}: shape {:?} cannot stack with {cols} columns",
                    p.name, p.shape
                )));
            }
            rows += p.shape[0];
            data.extend(p.data.to_bf16());
        }
        let data = self
            .stream
            .clone_htod(&data)
            .map_err(|e| BackendError::Unsupported(format!("CUDA upload: {e}")))?;
        Ok(CudaMatrix { data, rows, cols })
    }

    fn matrix_format(&self, m: &CudaMatrix) -> (&'static str, usize) {
        // Quantized host tensors are widened to bf16 at upload (`HostData::to_bf16`).
        ("bf16", m.rows * m.cols * 2)
    }

    fn upload(&self, data: &[f32]) -> CudaSlice<f32> {
        if data.is_empty() {
            return self.alloc(0);
        }
        self.to_device(data)
    }

    fn alloc(&self, len: usize) -> CudaSlice<f32> {
        ok(self.stream.alloc_zeros(len.max(1)), "alloc")
    }

    fn read(&self, buf: &CudaSlice<f32>, offset: usize, out: &mut [f32]) {
        if out.is_empty() {
            return;
        }
        let view = buf.slice(offset..offset + out.len());
        ok(self.stream.memcpy_dtoh(&view, out), "read");
        self.synchronize();
    }

    fn take_host(&self, buf: CudaSlice<f32>, len: usize) -> Vec<f32> {
        let mut host = vec![0f32; len];
        self.read(&buf, 0, &mut host);
        host
    }

    fn argmax_rows(
        &self,
        x: &CudaSlice<f32>,
        rows: std::ops::Range<usize>,
        width: usize,
    ) -> Vec<u32> {
        let n = rows.len();
        if n == 0 {
            return Vec::new();
        }
        assert!(
            width > 0 && rows.end * width <= x.len(),
            "argmax_rows: rows {rows:?} of {width} out of range"
        );
        let out = self.scratch::<u32>(n);
        let xp = self.ptr(x) + (rows.start * width * std::mem::size_of::<f32>()) as u64;
        let (op, w) = (self.ptr(&out), width as i32);
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (ARGMAX_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: one CTA per row; `xp` starts row `rows.start` of `x`, which holds `rows.end`
        // rows of `width` floats (asserted); `out` holds `n` entries.
        ok(
            unsafe { args!(self.stream, &self.k.argmax, &xp, &op, &w).launch(cfg) },
            "argmax",
        );
        let mut host = vec![0u32; n];
        ok(self.stream.memcpy_dtoh(&out, &mut host), "argmax read");
        self.synchronize();
        host
    }

    fn draw_rows(
        &self,
        x: &CudaSlice<f32>,
        rows: std::ops::Range<usize>,
        width: usize,
        draws: &[(f32, f64)],
    ) -> Vec<u32> {
        let n = rows.len();
        assert_eq!(n, draws.len(), "draw_rows: one draw per row");
        if n == 0 {
            return Vec::new();
        }
        assert!(
            width > 0 && rows.end * width <= x.len(),
            "draw_rows: rows {rows:?} of {width} out of range"
        );
        let inv_t: Vec<f32> = draws.iter().map(|d| d.0).collect();
        let u01: Vec<f64> = draws.iter().map(|d| d.1).collect();
        let (inv_t, u01) = (self.to_device(&inv_t), self.to_device(&u01));
        let nblocks = width.div_ceil(DRAW_BLOCK);
        let chains = self.scratch_buf::<f32>(n * nblocks * DRAW_LANES);
        let sums = self.scratch_buf::<f64>(n * nblocks);
        let out = self.scratch::<u32>(n);
        let xp = self.ptr(x) + (rows.start * width * std::mem::size_of::<f32>()) as u64;
        let (tp, up, cp, sp, op, w) = (
            self.ptr(&inv_t),
            self.ptr(&u01),
            chains.ptr(),
            sums.ptr(),
            self.ptr(&out),
            width as i32,
        );
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (DRAW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: one CTA per row; `xp` starts row `rows.start` of `x`, which holds `rows.end`
        // rows of `width` floats (asserted); `inv_t`, `u01` and `out` hold `n` entries, the
        // scratch `ceil(width / 256) * 8` floats and `ceil(width / 256)` doubles per row.
        ok(
            unsafe {
                args!(self.stream, &self.k.draw, &xp, &tp, &up, &cp, &sp, &op, &w).launch(cfg)
            },
            "draw",
        );
        let mut host = vec![0u32; n];
        ok(self.stream.memcpy_dtoh(&out, &mut host), "draw read");
        self.synchronize();
        host
    }

    fn gather_rows(&self, x: &CudaSlice<f32>, rows: &[usize], width: usize) -> CudaSlice<f32> {
        let out = self.alloc(rows.len() * width);
        if let Some(&max) = rows.iter().max() {
            assert!(
                (max + 1) * width <= x.len(),
                "gather_rows: row {max} out of range"
            );
        }
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let ip = self.indices("rows", &idx);
        let (xp, op, n, w) = (self.ptr(x), self.ptr(&out), rows.len(), width as i32);
        // SAFETY: `x` holds every row in `rows` (asserted), `out` `n * width` floats.
        ok(
            unsafe {
                args!(self.stream, &self.k.gather_rows, &xp, &ip, &op, &n, &w)
                    .launch(grid_1d(n * width))
            },
            "gather_rows",
        );
        out
    }

    fn embed(&self, table: &CudaMatrix, ids: &[u32], out: &mut CudaSlice<f32>) {
        let (n, w) = (ids.len(), table.cols);
        assert!(out.len() >= n * w, "embed: output too small");
        if n == 0 {
            return;
        }
        let ip = self.indices("ids", ids);
        let (tp, op, wi, vocab) = (
            self.ptr(&table.data),
            self.ptr(out),
            w as i32,
            table.rows as u32,
        );
        // SAFETY: `table` is `[vocab, w]` bf16, `ids` n ids (bounds-checked in the kernel),
        // `out` ≥ `n * w` floats (asserted).
        ok(
            unsafe {
                args!(self.stream, &self.k.embed, &tp, &ip, &op, &n, &wi, &vocab)
                    .launch(grid_1d(n * w))
            },
            "embed",
        );
    }

    fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        eps: f32,
        rows: usize,
        out: &mut CudaSlice<f32>,
    ) {
        let w = weight.len();
        assert!(
            x.len() >= rows * w && out.len() >= rows * w,
            "rms_norm: buffers too small"
        );
        self.norm_rows(self.ptr(x), 0, weight, eps, rows, out);
    }

    fn add_rms_norm(
        &self,
        x: &mut CudaSlice<f32>,
        y: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        eps: f32,
        rows: usize,
        out: &mut CudaSlice<f32>,
    ) {
        let w = weight.len();
        assert!(
            x.len() >= rows * w && y.len() >= rows * w && out.len() >= rows * w,
            "add_rms_norm: buffers too small"
        );
        self.norm_rows(self.ptr(x), self.ptr(y), weight, eps, rows, out);
    }

    fn matmul(&self, x: &CudaSlice<f32>, rows: usize, w: &CudaMatrix, out: &mut CudaSlice<f32>) {
        self.matmul_impl(x, rows, w, out);
    }

    fn add_bias(&self, x: &mut CudaSlice<f32>, bias: &CudaSlice<f32>, rows: usize) {
        let w = bias.len();
        assert!(x.len() >= rows * w, "add_bias: buffer too small");
        let (xp, bp, wi) = (self.ptr(x), self.ptr(bias), w as i32);
        // SAFETY: `x` ≥ `rows * w` floats (asserted), `bias` `w`.
        ok(
            unsafe {
                args!(self.stream, &self.k.add_bias, &xp, &bp, &rows, &wi).launch(grid_1d(rows * w))
            },
            "add_bias",
        );
    }

    fn add(&self, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>, len: usize) {
        assert!(x.len() >= len && y.len() >= len, "add: buffers too small");
        if len == 0 {
            return;
        }
        let (xp, yp) = (self.ptr(x), self.ptr(y));
        // SAFETY: both hold ≥ `len` floats (asserted).
        ok(
            unsafe { args!(self.stream, &self.k.add, &xp, &yp, &len).launch(grid_1d(len)) },
            "add",
        );
    }

    fn matmul_silu_mul(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        w: &CudaMatrix,
        inter: usize,
        gate_up: &mut CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
    ) {
        self.matmul_silu_mul_impl(x, rows, w, inter, gate_up, out);
    }

    fn silu_mul(
        &self,
        gate_up: &CudaSlice<f32>,
        rows: usize,
        inter: usize,
        out: &mut CudaSlice<f32>,
    ) {
        assert!(
            gate_up.len() >= rows * 2 * inter && out.len() >= rows * inter,
            "silu_mul: buffers too small"
        );
        if rows * inter == 0 {
            return;
        }
        let (gp, op, ii) = (self.ptr(gate_up), self.ptr(out), inter as i32);
        // SAFETY: `gate_up` ≥ `rows * 2 * inter`, `out` ≥ `rows * inter` floats (asserted).
        ok(
            unsafe {
                args!(self.stream, &self.k.silu_mul, &gp, &op, &rows, &ii)
                    .launch(grid_1d(rows * inter))
            },
            "silu_mul",
        );
    }

    fn kv_bytes_per_block(&self, layers: usize, block_size: usize, shape: AttnShape) -> usize {
        store::exact_block_bytes(layers, block_size, shape)
    }

    fn new_kv_store(
        &self,
        layers: usize,
        num_blocks: usize,
        block_size: usize,
        shape: AttnShape,
    ) -> CudaKvStore {
        let chunk = self
            .kv_chunk_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        CudaKvStore::new(&self.stream, layers, num_blocks, block_size, shape, chunk)
    }

    fn rope_and_store(
        &self,
        qkv: &mut CudaSlice<f32>,
        rows: usize,
        positions: &[u32],
        slots: &[u32],
        shape: AttnShape,
        rope: &RopeParams,
        store: &mut CudaKvStore,
        layer: usize,
    ) {
        self.rope_and_store_impl(qkv, rows, positions, slots, shape, rope, store, layer, None);
    }

    fn matmul_rope_and_store(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        w: &CudaMatrix,
        qkv: &mut CudaSlice<f32>,
        positions: &[u32],
        slots: &[u32],
        shape: AttnShape,
        rope: &RopeParams,
        store: &mut CudaKvStore,
        layer: usize,
    ) {
        assert!(
            w.rows == shape.qkv_width() && x.len() >= rows * w.cols,
            "matmul_rope_and_store: shapes"
        );
        let xp = self.ptr(x);
        let fused = rows > 0 && shape.head_dim.is_multiple_of(4) && self.gemv_fits(xp, rows, w);
        if !fused {
            self.matmul(x, rows, w, qkv);
        }
        let product = fused.then_some((xp, w));
        self.rope_and_store_impl(
            qkv, rows, positions, slots, shape, rope, store, layer, product,
        );
    }

    fn attention(
        &self,
        qkv: &CudaSlice<f32>,
        seqs: &[AttnSeq<'_>],
        shape: AttnShape,
        store: &CudaKvStore,
        layer: usize,
        out: &mut CudaSlice<f32>,
    ) {
        self.attention_impl(qkv, seqs, shape, store, layer, out);
    }

    /// Every policy the CPU serves: formats, windows and quest reads.
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
        let bounds = policy.stores_bounds();
        match policy.codec {
            None => self.kv_bytes_per_block(layers, block_size, shape),
            Some(Codec::Bf16) if !bounds => self.kv_bytes_per_block(layers, block_size, shape),
            Some(c) => {
                store::SealedLayout::uniform(c, bounds, layers, block_size, shape).block_bytes
            }
        }
    }

    fn seal(&self, store: &mut CudaKvStore, layer: usize, seals: &[Seal]) {
        self.seal_impl(store, layer, seals);
    }

    fn release_exact(&self, store: &mut CudaKvStore, blocks: &[u32]) {
        self.release_exact_impl(store, blocks);
    }

    fn forget_blocks(&self, store: &mut CudaKvStore, blocks: &[u32]) {
        self.forget_blocks_impl(store, blocks);
    }

    fn device_memory(&self) -> Option<crate::backend::DeviceMemory> {
        self.synchronize();
        let (free, total) = ok(self.stream.context().mem_get_info(), "memory info");
        Some(crate::backend::DeviceMemory {
            free: free as u64,
            total: total as u64,
        })
    }

    fn kv_store_slack(&self, layers: usize, block_size: usize, shape: AttnShape) -> usize {
        // Compaction keeps each slab within one chunk of what its live blocks need, and a
        // chunk may be partly empty: two chunks per slab, the exact one and one per format.
        let chunk = self
            .kv_chunk_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        let exact = super::store::exact_block_bytes(layers, block_size, shape);
        2 * super::store::FORMATS.len() * chunk.max(exact)
    }

    fn attach_latent_keys(
        &self,
        store: &mut CudaKvStore,
        keys: &[std::sync::Arc<crate::backend::latent::LatentKeys>],
    ) {
        self.attach_latent_impl(store, keys);
    }

    fn copy_blocks(&self, store: &mut CudaKvStore, copies: &[(u32, u32)]) {
        self.copy_blocks_impl(store, copies);
    }
}

impl CudaBackend {
    /// `rms_norm_f32` over `rows` rows of `weight.len()` floats, one CTA each; `y` 0: the plain
    /// norm of `x`, else `x += y` first. The callers check the buffers hold `rows` rows.
    fn norm_rows(
        &self,
        x: u64,
        y: u64,
        weight: &CudaSlice<f32>,
        eps: f32,
        rows: usize,
        out: &mut CudaSlice<f32>,
    ) {
        if rows == 0 {
            return;
        }
        let (wp, op, wi) = (self.ptr(weight), self.ptr(out), weight.len() as i32);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: one CTA per row; `x`, `out` (and `y` when not 0) hold `rows` rows of `wi`
        // floats (checked by the callers).
        ok(
            unsafe {
                args!(self.stream, &self.k.rms_norm, &x, &y, &wp, &op, &wi, &eps).launch(cfg)
            },
            "rms_norm",
        );
    }
}
