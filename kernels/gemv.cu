// Products of a few f32 rows with a bf16 weight matrix, out[r, j] = sum_c x[r, c] * w[j, c]
// with f32 accumulation: the matrix products of a decode step of a small batch. There each weight
// meets only a few rows, so the product is bound by reading the weights once. cuBLAS takes bf16
// activations, so the backend's cuBLAS path splits the f32 rows into bf16 hi + lo halves and sums
// the two products after (three launches and two scratch buffers per product); this takes the
// f32 rows as they are, in one launch, and sums exact bf16 x f32 products in f32 as the CPU does.
// The backend takes it for up to GEMV_MAX_ROWS rows (kernels.rs) when the width is a multiple of
// 8 and both operands are 16-byte aligned. Two variants also do the op that follows the product,
// so that it costs no launch of its own: SiLU·up after the MLP's gate/up product, RoPE and the
// KV write after the attention block's QKV product.
#include "common.cuh"
#include "kv_formats.cuh"

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

// acc[r][c] = the dot products of activation row r (< rows <= R) with weight row wrow[c], this
// lane's share: the 16-byte groups g0, g0 + stride, ... (with g0 = lane and stride 32 a warp
// step covers 256 weights of each row; split along k, warp slice i of s starts at lane + 32 i
// with stride 32 s), multiplying every group it loads with the matching 8 floats of each row,
// so each weight is read once and each activation element once per GEMV_COLS weights.
template <int R>
__device__ __forceinline__ void gemv_dots(const float* __restrict__ x, const uint4* const (&wrow)[GEMV_COLS],
                                          float (&acc)[R][GEMV_COLS], int rows, int k, int g0,
                                          int stride) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int c = 0; c < GEMV_COLS; ++c) acc[r][c] = 0.0f;
    const int groups = k >> 3;
#pragma unroll 4
    for (int g = g0; g < groups; g += stride) {
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
}

// Row r's outputs from its GEMV_COLS sums: columns j0 .. of `n`, or (SWIGLU) silu(gate) * up
// of the pairs (t[c], t[c + 2]).
template <bool SWIGLU>
__device__ __forceinline__ void gemv_write(float* __restrict__ out, const float (&t)[GEMV_COLS],
                                           int r, int rows, int n, int j0) {
    constexpr int OUTS = SWIGLU ? GEMV_COLS / 2 : GEMV_COLS;
#pragma unroll
    for (int c = 0; c < OUTS; ++c) {
        if (r < rows && j0 + c < n) {
            const float g = t[c];
            out[(size_t)r * n + j0 + c] = SWIGLU ? g / (1.0f + expf(-g)) * t[c + OUTS] : g;
        }
    }
}

// GEMV_COLS weight rows per `slices` warps, for every activation row (gemv_dots); a warp sum
// gives each warp's share of each product. With one slice a warp owns its columns and all of k.
// Split along k (slices 2 or 4, the CTA's 4 warps in groups of `slices` consecutive ones), each
// warp of a group takes every slices-th warp step of k and the group's first warp adds the
// shares from shared memory in slice order: more warps for a product with few columns (the
// 1B's down product has 2048, 512 warps unsplit: about 4 per multiprocessor).
// Plain (SWIGLU false): the warp's weight rows are output columns j0 .. j0 + 4 of `n`; columns
// past `n` repeat the last weight row and are not written.
// SWIGLU: `w` is the MLP's [gate; up] matrix of 2n rows and the output the activation
// silu(gate) * up of width n (elementwise.cu's silu_mul, the same expression), so the products
// never leave the warp: its weight rows are gate rows j0, j0 + 1 and up rows n + j0, n + j0 + 1.
template <int R, bool SWIGLU>
__device__ void gemv(const float* __restrict__ x, const bf16_t* __restrict__ w,
                     float* __restrict__ out, int rows, int n, int k, int slices) {
    constexpr int OUTS = SWIGLU ? GEMV_COLS / 2 : GEMV_COLS;  // outputs per warp and row
    __shared__ float shares[GEMV_THREADS / 32][R][GEMV_COLS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, slice = warp % slices;
    const int j0 = (blockIdx.x * (GEMV_THREADS / 32 / slices) + warp / slices) * OUTS;
    if (slices == 1 && j0 >= n) return;  // the whole warp (no barrier below)
    const uint4* wrow[GEMV_COLS];
#pragma unroll
    for (int c = 0; c < GEMV_COLS; ++c) {
        const int j = min(j0 + c % OUTS, n - 1);
        wrow[c] = (const uint4*)(w + ((size_t)j + (c < OUTS ? 0 : n)) * k);
    }
    float acc[R][GEMV_COLS];
    // A split group past `n` still reaches the barrier; it reads nothing (k 0).
    gemv_dots<R>(x, wrow, acc, rows, j0 < n ? k : 0, lane + 32 * slice, 32 * slices);
    if (slices == 1) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
            float t[GEMV_COLS];
#pragma unroll
            for (int c = 0; c < GEMV_COLS; ++c) t[c] = warp_sum(acc[r][c]);
            if (lane == 0) gemv_write<SWIGLU>(out, t, r, rows, n, j0);
        }
        return;
    }
    // Split: every warp's shares to shared memory, then the group's first warp adds them in
    // slice order, a row at a time (so no R x GEMV_COLS sums live in registers at once).
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int c = 0; c < GEMV_COLS; ++c) {
            const float v = warp_sum(acc[r][c]);
            if (lane == 0) shares[warp][r][c] = v;
        }
    __syncthreads();
    if (slice != 0 || j0 >= n) return;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        float t[GEMV_COLS];
#pragma unroll
        for (int c = 0; c < GEMV_COLS; ++c) {
            t[c] = shares[warp][r][c];
            // Unrolled to the CTA's warps (a loop bounded by `slices` made ptxas spill the r8
            // variants); `warp` is its group's first, so warp + i < 4 for every i < slices.
#pragma unroll
            for (int i = 1; i < GEMV_THREADS / 32; ++i)
                if (i < slices) t[c] += shares[warp + i][r][c];
        }
        if (lane == 0) gemv_write<SWIGLU>(out, t, r, rows, n, j0);
    }
}

// The attention block's [q; k; v] product with RoPE and the KV write (rope_kv.cu's rope_store,
// split by output column): a warp of the q and k heads takes channels i, i + 1 of one head and
// their RoPE partners i + dim/2, i + dim/2 + 1, rotates them and writes them to `qkv` (a k
// head's also into its exact block, bf16); a warp of the v heads takes 4 consecutive channels
// and writes them (and into the block). Every column is a real one (dim % 4 == 0). Lane r
// finishes row r, so the rows' RoPE (cos and sin in double) and writes run side by side.
template <int R>
__device__ void gemv_rope(const float* __restrict__ x, const bf16_t* __restrict__ w,
                          float* __restrict__ qkv, const unsigned int* positions,
                          const unsigned int* slots, const float* inv_freq, float scaling,
                          const KvArgs& kv, int heads, int kv_heads, int dim, int block_size,
                          int rows, int k) {
    const int lane = threadIdx.x & 31;
    const int wi = blockIdx.x * (GEMV_THREADS / 32) + (threadIdx.x >> 5);
    const int n = (heads + 2 * kv_heads) * dim, half = dim / 2;
    const int pairs = (heads + kv_heads) * half / 2;  // warps of the q and k heads
    if (wi * GEMV_COLS >= n) return;                  // the whole warp
    const bool rotated = wi < pairs;
    const int i0 = rotated ? 2 * (wi % (half / 2)) : 0;  // first channel of the pair
    int col[GEMV_COLS];
    if (rotated) {
        const int c0 = wi / (half / 2) * dim + i0;
        col[0] = c0, col[1] = c0 + 1, col[2] = c0 + half, col[3] = c0 + half + 1;
    } else {
        const int c0 = (heads + kv_heads) * dim + GEMV_COLS * (wi - pairs);
#pragma unroll
        for (int c = 0; c < GEMV_COLS; ++c) col[c] = c0 + c;
    }
    const uint4* wrow[GEMV_COLS];
#pragma unroll
    for (int c = 0; c < GEMV_COLS; ++c) wrow[c] = (const uint4*)(w + (size_t)col[c] * k);
    float acc[R][GEMV_COLS];
    gemv_dots<R>(x, wrow, acc, rows, k, lane, 32);
    // Every lane gets every sum (xor shuffles); lane r keeps row r's.
    float mine[GEMV_COLS];
#pragma unroll
    for (int c = 0; c < GEMV_COLS; ++c) mine[c] = 0.0f;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int c = 0; c < GEMV_COLS; ++c) {
            const float s = warp_sum(acc[r][c]);
            if (lane == r) mine[c] = s;
        }
    const int r = lane;
    if (r >= R || r >= rows) return;
    if (rotated) {
        const float pos = (float)positions[r];
        rope_pair(mine[0], mine[2], inv_freq[i0], pos, scaling);
        rope_pair(mine[1], mine[3], inv_freq[i0 + 1], pos, scaling);
    }
    float* o = qkv + (size_t)r * n;
#pragma unroll
    for (int c = 0; c < GEMV_COLS; ++c) o[col[c]] = mine[c];
    const int first_k = heads * dim, kvw = kv_heads * dim;
    if (col[0] < first_k) return;  // a q warp: nothing to store
    const unsigned int slot = slots[r];
    const unsigned int block = slot / block_size, off = slot % block_size;
#pragma unroll
    for (int c = 0; c < GEMV_COLS; ++c) {
        const int at = col[c] - first_k;  // within [k | v]
        const int v = at >= kvw, kh = (at - v * kvw) / dim, d = (at - v * kvw) % dim;
        ((bf16_t*)exact_run(kv, block, v, kh, block_size, dim))[(size_t)off * dim + d] =
            from_f32<bf16_t>(mine[c]);
    }
}

// Grid: ceil(n / (GEMV_COLS * 4 / slices)) CTAs of GEMV_THREADS, slices 1, 2 or 4 (warps per
// column group, splitting k). Rows <= the variant's R; k % 8 == 0; x, w 16-byte aligned.
#define GEMV_ENTRY(R)                                                                           \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_r##R##_bf16(                \
        const float* x,   /* [rows, k] */                                                       \
        const bf16_t* w,  /* [n, k] */                                                          \
        float* out,       /* [rows, n] */                                                       \
        int rows, int n, int k, int slices) {                                                   \
        gemv<R, false>(x, w, out, rows, n, k, slices);                                          \
    }
// The MLP's first product and its activation in one: grid ceil(n / (GEMV_COLS / 2 * 4 / slices))
// CTAs of GEMV_THREADS, n the intermediate width. Same bounds on rows, k and alignment.
#define GEMV_SILU_ENTRY(R)                                                                      \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_silu_r##R##_bf16(           \
        const float* x,   /* [rows, k] */                                                       \
        const bf16_t* w,  /* [2 * n, k]: gate rows, then up rows */                             \
        float* out,       /* [rows, n]: silu(x·gateᵀ) * (x·upᵀ) */                              \
        int rows, int n, int k, int slices) {                                                   \
        gemv<R, true>(x, w, out, rows, n, k, slices);                                           \
    }
// The attention block's QKV product, RoPE and KV write in one (rope_kv.cu's rope_store after
// gemv_r<R>_bf16, the same bits): grid ceil(n / (GEMV_COLS * 4)) CTAs of GEMV_THREADS, n = (heads
// + 2 * kv_heads) * dim, dim % 4 == 0; `kv` addresses the layer in the exact slab, every slot
// has its chunk. Same bounds on rows, k and alignment.
#define GEMV_ROPE_ENTRY(R)                                                                      \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_rope_r##R##_bf16(           \
        const float* x,                 /* [rows, k] */                                         \
        const bf16_t* w,                /* [n, k]: q, k, v rows */                              \
        float* qkv,                     /* [rows, n] */                                         \
        const unsigned int* positions,  /* [rows] */                                            \
        const unsigned int* slots,      /* [rows]: exact slot * block_size + offset */          \
        const float* inv_freq,          /* [dim / 2] */                                         \
        float scaling, KvArgs kv, int heads, int kv_heads, int dim, int block_size, int rows,  \
        int k) {                                                                                \
        gemv_rope<R>(x, w, qkv, positions, slots, inv_freq, scaling, kv, heads, kv_heads, dim,  \
                     block_size, rows, k);                                                      \
    }
GEMV_ENTRY(1)
GEMV_ENTRY(2)
GEMV_ENTRY(4)
GEMV_ENTRY(8)
GEMV_SILU_ENTRY(1)
GEMV_SILU_ENTRY(2)
GEMV_SILU_ENTRY(4)
GEMV_SILU_ENTRY(8)
GEMV_ROPE_ENTRY(1)
GEMV_ROPE_ENTRY(2)
GEMV_ROPE_ENTRY(4)
GEMV_ROPE_ENTRY(8)
