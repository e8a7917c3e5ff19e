// Shared helpers for every kernel file. The Rust loader (src/backend/cuda/compile.rs) pastes this
// file in place of the `#include "common.cuh"` line, so NVRTC needs no header search path and no
// CUDA toolkit headers: bf16 is handled as raw 16-bit patterns with the same round-to-nearest-even
// conversion the host uses (`half::bf16::from_f32`).
#pragma once

typedef unsigned short bf16_t;

// -inf without <math.h> (NVRTC compiles these files with no headers at all).
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16_t v) { return __uint_as_float(((unsigned int)v) << 16); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16_t from_f32<bf16_t>(float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// RoPE (Hugging Face rotate_half) of the pair (a, b) = (x[i], x[i + dim/2]) at angle
// inv_freq[i] * pos: cos and sin taken in double of the f32 angle, as the CPU backend's table
// does, then rounded to f32 and scaled; no contraction. rope_kv.cu and gemv.cu's fused variant
// both rotate with this, so they write the same bits.
__device__ __forceinline__ void rope_pair(float& a, float& b, float inv_freq, float pos,
                                          float scaling) {
    const float angle = inv_freq * pos;
    const float c = (float)cos((double)angle) * scaling;
    const float s = (float)sin((double)angle) * scaling;
    const float ra = __fadd_rn(__fmul_rn(a, c), __fmul_rn(-b, s));
    const float rb = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
    a = ra;
    b = rb;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over all threads of the block (blockDim.x a multiple of 32, at most 1024); every thread
// gets the result. `scratch` holds 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int nwarps = blockDim.x >> 5;
    v = lane < nwarps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

// D += A·B on the tensor cores (Ampere and newer): one warp-wide m16n8k16 product of bf16 A
// (16×16, row major) and B (16×8, column major) into f32 D (16×8). Lane l = 4·g + t holds
// (PTX ISA, "Matrix Fragments for mma.m16n8k16"): a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..],
// a[2] = A[g][2t+8..], a[3] = A[g+8][2t+8..]; b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g];
// d = D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1]. A pair's lower column is the low 16 bits.
// The host test build (no __CUDA_ARCH__) runs tests/cuda_host/shim.h's emulation instead.
__device__ __forceinline__ void mma_bf16_16816(float* d, const unsigned int* a,
                                               const unsigned int* b) {
#ifdef __CUDA_ARCH__
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    host_mma_bf16_16816(d, a, b);
#endif
}
