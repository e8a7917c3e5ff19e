//! Matrix products on the device: the few-row kernels (`kernels/gemv.cu`, with their fused
//! SiLU·up and RoPE + KV-write variants) for decode steps of up to `gemv_max_rows` rows, cuBLAS
//! GemmEx above (f32 activations split into bf16 hi + lo rows unless `split_matmul` is off).

use super::kernels::{GEMV_COLS, GEMV_THREADS};
use super::*;

impl CudaBackend {
    /// [`Backend::matmul`]: the few-row kernel when it fits, else cuBLAS (hi/lo split or plain
    /// bf16 activations, see the module doc).
    pub(super) fn matmul_impl(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        w: &CudaMatrix,
        out: &mut CudaSlice<f32>,
    ) {
        let (k, n) = (w.cols, w.rows);
        assert!(
            x.len() >= rows * k && out.len() >= rows * n,
            "matmul: buffers too small"
        );
        if rows == 0 {
            return;
        }
        let xp = self.ptr(x);
        if self.gemv_fits(xp, rows, w) {
            self.gemv(xp, rows, w, self.ptr(out), false);
            return;
        }
        if self.split_matmul.load(std::sync::atomic::Ordering::Relaxed) {
            let hilo = self.scratch_buf::<bf16>(2 * rows * k);
            let y2 = self.scratch_buf::<f32>(2 * rows * n);
            let (hp, yp, op, len) = (hilo.ptr(), y2.ptr(), self.ptr(out), rows * k);
            // SAFETY: `x` ≥ `len` floats (asserted), `hilo` holds `2 * len` bf16.
            ok(
                unsafe { args!(self.stream, &self.k.split, &xp, &hp, &len).launch(grid_1d(len)) },
                "split",
            );
            self.gemm(hp, 2 * rows, w, yp);
            let m = rows * n;
            // SAFETY: `y2` holds `2 * m` floats, `out` ≥ `m` (asserted).
            ok(
                unsafe { args!(self.stream, &self.k.sum_halves, &yp, &op, &m).launch(grid_1d(m)) },
                "sum_halves",
            );
        } else {
            let xb = self.scratch_buf::<bf16>(rows * k);
            let (bp, len) = (xb.ptr(), rows * k);
            // SAFETY: `x` ≥ `len` floats, `xb` holds `len` bf16.
            ok(
                unsafe { args!(self.stream, &self.k.convert, &xp, &bp, &len).launch(grid_1d(len)) },
                "convert",
            );
            self.gemm(bp, rows, w, self.ptr(out));
        }
    }

    /// [`Backend::matmul_silu_mul`]: one `gemv_silu_r<R>_bf16` launch when the product fits the
    /// few-row kernels, else the product then `silu_mul`.
    pub(super) fn matmul_silu_mul_impl(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        w: &CudaMatrix,
        inter: usize,
        gate_up: &mut CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
    ) {
        assert!(
            w.rows == 2 * inter && x.len() >= rows * w.cols && out.len() >= rows * inter,
            "matmul_silu_mul: shapes"
        );
        let xp = self.ptr(x);
        if rows > 0 && self.gemv_fits(xp, rows, w) {
            self.gemv(xp, rows, w, self.ptr(out), true);
        } else {
            self.matmul_impl(x, rows, w, gate_up);
            Backend::silu_mul(self, gate_up, rows, inter, out);
        }
    }

    /// Whether a product of `rows` rows of `x` (at `xp`) with `w` runs on the few-row kernels:
    /// at most `gemv_max_rows` rows, a width of whole 16-byte groups, both operands aligned.
    pub(super) fn gemv_fits(&self, xp: u64, rows: usize, w: &CudaMatrix) -> bool {
        let max = self
            .gemv_max_rows
            .load(std::sync::atomic::Ordering::Relaxed);
        rows <= max
            && w.cols.is_multiple_of(8)
            && xp.is_multiple_of(16)
            && self.ptr(&w.data).is_multiple_of(16)
    }

    /// `gemv_r<R>_bf16` (`out[rows, w.rows]`), or with `silu` `gemv_silu_r<R>_bf16`
    /// (`out[rows, w.rows / 2]`: SiLU(gate)·up of the `[gate; up]` matrix `w`). The callers
    /// checked [`Self::gemv_fits`] and that `x` and `out` hold their rows.
    fn gemv(&self, xp: u64, rows: usize, w: &CudaMatrix, op: u64, silu: bool) {
        let n = if silu { w.rows / 2 } else { w.rows };
        let (ri, ni, ki, wp) = (rows as i32, n as i32, w.cols as i32, self.ptr(&w.data));
        let per_warp = if silu { GEMV_COLS / 2 } else { GEMV_COLS };
        let slices = self.gemv_slices.load(std::sync::atomic::Ordering::Relaxed);
        let per_cta = per_warp * (GEMV_THREADS as usize / 32 / slices);
        let si = slices as i32;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(per_cta) as u32, 1, 1),
            block_dim: (GEMV_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = if silu {
            self.k.gemv_silu_fn(rows)
        } else {
            self.k.gemv_fn(rows)
        };
        // SAFETY: `x` holds `rows * k` floats and `out` `rows * n` (the callers), `w` its
        // `rows * k` bf16; `k % 8 == 0` and both operands 16-byte aligned for the kernel's
        // vector loads (`gemv_fits`); the variant's row bound holds `rows`; `slices` is 1, 2
        // or 4 (`set_gemv_slices`) and the grid has `per_cta` columns per CTA for it.
        ok(
            unsafe { args!(self.stream, f, &xp, &wp, &op, &ri, &ni, &ki, &si).launch(cfg) },
            if silu { "gemv_silu" } else { "gemv" },
        );
    }

    /// `out[rows, n] = x[rows, k] · wᵀ` with bf16 `x` (`[rows, k]`) through cuBLAS.
    fn gemm(&self, x: u64, rows: usize, w: &CudaMatrix, out: u64) {
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: `w` holds `w.rows * w.cols` bf16, `x` `rows * w.cols` bf16 and `out`
        // `rows * w.rows` f32 (the callers allocate them so); column-major view: out (w.rows ×
        // rows) = wᵀ-stored (w.cols × w.rows)ᵀ · x (w.cols × rows).
        let r = unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                w.rows as i32,
                rows as i32,
                w.cols as i32,
                &alpha as *const f32 as *const _,
                self.ptr(&w.data) as *const _,
                blas_sys::cudaDataType::CUDA_R_16BF,
                w.cols as i32,
                x as *const _,
                blas_sys::cudaDataType::CUDA_R_16BF,
                w.cols as i32,
                &beta as *const f32 as *const _,
                out as *mut _,
                blas_sys::cudaDataType::CUDA_R_32F,
                w.rows as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        ok(r, "cublasGemmEx");
    }
}
