// Products of a few f32 rows with a bf16 weight matrix, out[r, j] = sum_c x[r, c] * w[j, c]
// with f32 accumulation: the matrix products of a decode step of a small batch. There each weight
// meets only a few rows, so the product is bound by reading the weights once. cuBLAS takes bf16
// activations, so the backend's cuBLAS path splits the f32 rows into bf16 hi + lo halves and sums
// the two products after (three launches and two scratch buffers per product); this takes the
// f32 rows as they are, in one launch, and sums exact bf16 x f32 products in f32 as the CPU does.
// The backend takes it for up to GEMV_MAX_ROWS rows (kernels.rs) when the width is a multiple of
// 8 and both operands are 16-byte aligned.
#include "common.cuh"

#define GEMV_THREADS 128  // kernels.rs GEMV_THREADS: 4 warps per CTA
#define GEMV_COLS 4       // kernels.rs GEMV_COLS: output columns per warp

// acc += the 8 products of one 16-byte group of weights (8 bf16, lower half first) with 8 floats.
__device__ __forceinline__ float dot8(float acc, uint4 w, float4 a, float4 b) {
    acc += to_f32((bf16_t)(w.x & 0xffffu)) * a.x;
    acc += to_f32((bf16_t)(w.x >> 16)) * a.y;
    acc += to_f32((bf16_t)(w.y & 0xffffu)) * a.z;
    acc += to_f32((bf16_t)(w.y >> 16)) * a.w;
    acc += to_f32((bf16_t)(w.z & 0xffffu)) * b.x;
    acc += to_f32((bf16_t)(w.z >> 16)) * b.y;
    acc += to_f32((bf16_t)(w.w & 0xffffu)) * b.z;
    acc += to_f32((bf16_t)(w.w >> 16)) * b.w;
    return acc;
}

// One warp per GEMV_COLS consecutive output columns, for every row: lane l reads the 16-byte
// groups l, l + 32, ... of each of its columns' weight rows (a warp step covers 256 weights of
// each), and multiplies every group it loads with the matching 8 floats of each of the `rows`
// (<= R) activation rows, so each weight is read once and each activation element once per
// GEMV_COLS weights. A warp sum gives each output. Columns past `n` repeat the last weight row
// and are not written.
template <int R>
__device__ void gemv(const float* __restrict__ x, const bf16_t* __restrict__ w,
                     float* __restrict__ out, int rows, int n, int k) {
    const int lane = threadIdx.x & 31;
    const int j0 = (blockIdx.x * (GEMV_THREADS / 32) + (threadIdx.x >> 5)) * GEMV_COLS;
    if (j0 >= n) return;  // the whole warp
    const uint4* wrow[GEMV_COLS];
#pragma unroll
    for (int c = 0; c < GEMV_COLS; ++c)
        wrow[c] = (const uint4*)(w + (size_t)min(j0 + c, n - 1) * k);
    float acc[R][GEMV_COLS];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int c = 0; c < GEMV_COLS; ++c) acc[r][c] = 0.0f;
    const int groups = k >> 3;
#pragma unroll 4
    for (int g = lane; g < groups; g += 32) {
        uint4 wv[GEMV_COLS];
#pragma unroll
        for (int c = 0; c < GEMV_COLS; ++c) wv[c] = wrow[c][g];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            if (r < rows) {
                const float4* xr = (const float4*)(x + (size_t)r * k) + 2 * g;
                const float4 a = xr[0], b = xr[1];
#pragma unroll
                for (int c = 0; c < GEMV_COLS; ++c) acc[r][c] = dot8(acc[r][c], wv[c], a, b);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int c = 0; c < GEMV_COLS; ++c) {
            const float s = warp_sum(acc[r][c]);
            if (lane == 0 && r < rows && j0 + c < n) out[(size_t)r * n + j0 + c] = s;
        }
    }
}

// Grid: ceil(n / (GEMV_COLS * 4)) CTAs of GEMV_THREADS. Rows <= the variant's R; k % 8 == 0; x,
// w 16-byte aligned.
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_r1_bf16(
    const float* x,   // [rows, k]
    const bf16_t* w,  // [n, k]
    float* out,       // [rows, n]
    int rows, int n, int k) {
    gemv<1>(x, w, out, rows, n, k);
}
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_r2_bf16(
    const float* x,   // [rows, k]
    const bf16_t* w,  // [n, k]
    float* out,       // [rows, n]
    int rows, int n, int k) {
    gemv<2>(x, w, out, rows, n, k);
}
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_r4_bf16(
    const float* x,   // [rows, k]
    const bf16_t* w,  // [n, k]
    float* out,       // [rows, n]
    int rows, int n, int k) {
    gemv<4>(x, w, out, rows, n, k);
}
extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_r8_bf16(
    const float* x,   // [rows, k]
    const bf16_t* w,  // [n, k]
    float* out,       // [rows, n]
    int rows, int n, int k) {
    gemv<8>(x, w, out, rows, n, k);
}
