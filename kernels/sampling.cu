// Token selection on the device. argmax_f32 picks each row's greedy token by the rule of
// src/backend/cpu/argmax.rs (NaN counts as -inf, ties go to the lowest index, 0 when nothing is
// above -inf), so plain greedy decoding moves one index per row to the host instead of a row of
// vocabulary-wide logits, and gives the very token the CPU sampler would. draw_dense_f32 draws
// each row's token at a temperature from a uniform drawn on the host before the step, by the rule
// of src/backend/cpu/draw.rs, operation for operation: sampled requests with the whole vocabulary
// in play (OpenAI's default) likewise get the CPU sampler's very token, one index per row.
#include "common.cuh"

#define ARGMAX_THREADS 256  // kernels.rs ARGMAX_THREADS

// Keeps the better of (v, i) and (ov, oi): the larger value, then the lower index.
__device__ __forceinline__ void keep_better(float& v, int& i, float ov, int oi) {
    if (ov > v || (ov == v && oi < i)) {
        v = ov;
        i = oi;
    }
}

// The best (value, index) of a row by the rule above, left in thread 0's `v` and `idx` (the other
// threads hold partial results). Each thread scans its strided share in index order (so it keeps
// its first maximum), then the pairs meet in a warp butterfly and across warps.
__device__ __forceinline__ void row_best(const float* row, int width, float& v, int& idx) {
    __shared__ float wv[32];
    __shared__ int wi[32];
    v = NEG_INF;
    idx = 0x7fffffff;  // no element yet: any one, even -inf, is better
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        const float a = row[i];
        keep_better(v, idx, a != a ? NEG_INF : a, i);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __float_as_int(__shfl_xor_sync(0xffffffffu, __int_as_float(idx), o));
        keep_better(v, idx, ov, oi);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    if (lane == 0) {
        wv[warp] = v;
        wi[warp] = idx;
    }
    __syncthreads();
    if (threadIdx.x == 0)
        for (int w = 1; w < nwarps; ++w) keep_better(v, idx, wv[w], wi[w]);
}

// One CTA per row.
extern "C" __global__ void __launch_bounds__(ARGMAX_THREADS) argmax_f32(
    const float* x,      // [rows, width]
    unsigned int* out,   // [rows]
    int width) {
    float v;
    int idx;
    row_best(x + (size_t)blockIdx.x * width, width, v, idx);
    if (threadIdx.x == 0) out[blockIdx.x] = idx == 0x7fffffff ? 0u : (unsigned int)idx;
}

// ---- The dense temperature draw: src/backend/cpu/draw.rs `draw_dense_row`, operation for
// operation, so that a row and a uniform give the CPU's token. Every float operation is an _rn
// intrinsic: NVRTC would otherwise contract a multiply and an add into an FMA, which rounds once
// where the CPU rounds twice.

#define DRAW_THREADS 256  // kernels.rs DRAW_THREADS
#define DRAW_BLOCK 256    // draw.rs BLOCK: elements per partial sum
#define DRAW_LANES 8      // draw.rs L: lanes of a block's sum

// exp(x) for x <= 0; 0 below -87 and for NaN (draw.rs `exp_nonpos`: Cephes' expf polynomial).
__device__ __forceinline__ float exp_nonpos(float x) {
    const float ROUND = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    const bool keep = x >= -87.0f;    // false for NaN
    float c = x < -87.0f ? -87.0f : x;  // Rust's clamp: NaN stays NaN (zeroed below)
    c = c > 0.0f ? 0.0f : c;
    const float t = __fadd_rn(__fmul_rn(c, 1.44269504088896340736f), ROUND);
    const float n = __fsub_rn(t, ROUND);
    const float r = __fadd_rn(__fsub_rn(c, __fmul_rn(n, 0.6933594f)), __fmul_rn(n, 2.1219444e-4f));
    float p = 1.9875691e-4f;
    p = __fadd_rn(__fmul_rn(p, r), 1.3981999e-3f);
    p = __fadd_rn(__fmul_rn(p, r), 8.333452e-3f);
    p = __fadd_rn(__fmul_rn(p, r), 4.1665796e-2f);
    p = __fadd_rn(__fmul_rn(p, r), 1.6666665e-1f);
    p = __fadd_rn(__fmul_rn(p, r), 0.5f);
    float e = __fadd_rn(__fadd_rn(__fmul_rn(__fmul_rn(p, r), r), r), 1.0f);
    e = __fmul_rn(e, __uint_as_float((__float_as_uint(t) - (0x4B400000u - 127u)) << 23));
    return keep ? e : 0.0f;
}

// A token's weight exp((x - m) * inv_t).
__device__ __forceinline__ float draw_weight(float x, float m, float inv_t) {
    return exp_nonpos(__fmul_rn(__fsub_rn(x, m), inv_t));
}

// One CTA of DRAW_THREADS per row: the row's max (and argmax, for rows whose max is not finite);
// the block sums, each of a block's DRAW_LANES lane sums by one thread in the CPU's order (lane j
// adds elements j, j + 8, ... of the block), then each block's lanes summed in order by one
// thread, plus the last block's tail; then thread 0 sums the blocks in f64, scales the uniform by
// the total and walks: whole blocks by their sums, then the block the draw lands in weight by
// weight. `chains` and `sums` are scratch of ceil(width / 256) * 8 floats and ceil(width / 256)
// doubles per row.
extern "C" __global__ void __launch_bounds__(DRAW_THREADS) draw_dense_f32(
    const float* x,        // [rows, width]
    const float* inv_t,    // [rows]: 1 / temperature
    const double* u01,     // [rows]: uniform in [0, 1)
    float* chains,         // [rows, ceil(width / 256) * 8]
    double* sums,          // [rows, ceil(width / 256)]
    unsigned int* out,     // [rows]
    int width) {
    __shared__ float s_max;
    __shared__ int s_idx;
    const float* row = x + (size_t)blockIdx.x * width;
    const int nblocks = (width + DRAW_BLOCK - 1) / DRAW_BLOCK;
    float* ch = chains + (size_t)blockIdx.x * nblocks * DRAW_LANES;
    double* bs = sums + (size_t)blockIdx.x * nblocks;
    float v;
    int idx;
    row_best(row, width, v, idx);
    if (threadIdx.x == 0) {
        s_max = v;
        s_idx = idx == 0x7fffffff ? 0 : idx;
    }
    __syncthreads();
    const float m = s_max, it = inv_t[blockIdx.x];
    if (m == NEG_INF || m == -NEG_INF) {  // nothing above -inf, or a +inf: the argmax
        if (threadIdx.x == 0) out[blockIdx.x] = (unsigned int)s_idx;
        return;
    }
    for (int q = threadIdx.x; q < nblocks * DRAW_LANES; q += blockDim.x) {
        const int b = q / DRAW_LANES, j = q % DRAW_LANES;
        const int len = min(DRAW_BLOCK, width - b * DRAW_BLOCK);
        const float* blk = row + b * DRAW_BLOCK;
        float acc = 0.0f;
        for (int c = 0; c < len / DRAW_LANES; ++c)
            acc = __fadd_rn(acc, draw_weight(blk[c * DRAW_LANES + j], m, it));
        ch[q] = acc;
    }
    __syncthreads();
    for (int b = threadIdx.x; b < nblocks; b += blockDim.x) {
        const int len = min(DRAW_BLOCK, width - b * DRAW_BLOCK);
        const float* blk = row + b * DRAW_BLOCK;
        float sum = ch[b * DRAW_LANES];
        for (int j = 1; j < DRAW_LANES; ++j) sum = __fadd_rn(sum, ch[b * DRAW_LANES + j]);
        for (int i = len - len % DRAW_LANES; i < len; ++i) sum = __fadd_rn(sum, draw_weight(blk[i], m, it));
        bs[b] = (double)sum;
    }
    __syncthreads();
    if (threadIdx.x != 0) return;
    double total = 0.0;
    for (int b = 0; b < nblocks; ++b) total = __dadd_rn(total, bs[b]);
    double u = __dmul_rn(u01[blockIdx.x], total);
    for (int b = 0; b < nblocks; ++b) {
        if (u >= bs[b]) {
            u = __dsub_rn(u, bs[b]);
            continue;
        }
        const int start = b * DRAW_BLOCK, end = min(start + DRAW_BLOCK, width);
        int last = start;
        for (int i = start; i < end; ++i) {
            const float w = draw_weight(row[i], m, it);
            if (w > 0.0f) {
                last = i;
                u = __dsub_rn(u, (double)w);
                if (u < 0.0) {
                    out[blockIdx.x] = (unsigned int)i;
                    return;
                }
            }
        }
        // The block's sum (in lane order) and this walk rounded differently: its last token with
        // weight.
        out[blockIdx.x] = (unsigned int)last;
        return;
    }
    out[blockIdx.x] = (unsigned int)s_idx;  // round-off past the last block: the argmax
}
