// Token selection on the device. argmax_f32 picks each row's greedy token by the rule of
// src/backend/cpu/argmax.rs (NaN counts as -inf, ties go to the lowest index, 0 when nothing is
// above -inf), so plain greedy decoding moves one index per row to the host instead of a row of
// vocabulary-wide logits, and gives the very token the CPU sampler would.
#include "common.cuh"

#define ARGMAX_THREADS 256  // kernels.rs ARGMAX_THREADS

// Keeps the better of (v, i) and (ov, oi): the larger value, then the lower index.
__device__ __forceinline__ void keep_better(float& v, int& i, float ov, int oi) {
    if (ov > v || (ov == v && oi < i)) {
        v = ov;
        i = oi;
    }
}

// One CTA per row. Each thread scans its strided share in index order (so it keeps its first
// maximum), then the (value, index) pairs meet in a warp butterfly and across warps.
extern "C" __global__ void __launch_bounds__(ARGMAX_THREADS) argmax_f32(
    const float* x,      // [rows, width]
    unsigned int* out,   // [rows]
    int width) {
    __shared__ float wv[32];
    __shared__ int wi[32];
    const float* row = x + (size_t)blockIdx.x * width;
    float v = NEG_INF;
    int idx = 0x7fffffff;  // no element yet: any one, even -inf, is better
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
    if (threadIdx.x == 0) {
        for (int w = 1; w < nwarps; ++w) keep_better(v, idx, wv[w], wi[w]);
        out[blockIdx.x] = idx == 0x7fffffff ? 0u : (unsigned int)idx;
    }
}
