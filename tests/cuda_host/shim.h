// Host stand-ins for the CUDA built-ins the kernels use, so that g++ can compile kernels/*.cu
// as plain C++ and run them (tests/cuda_formats_host.rs). A kernel called directly runs as one
// thread (blockDim.x = 1: every loop strided by it covers everything, barriers are no-ops);
// `launch` runs a grid CTA by CTA, each CTA as real threads with a barrier for __syncthreads and
// per-warp barriers and exchange slots for __syncwarp and the shuffles (which the kernels only
// call with every lane of the warp, as CUDA requires). The test rewrites `extern __shared__` to
// `extern` (the dynamic shared memory is a global array) and `__shared__` is `static`: CTAs run
// one at a time.
//
// With HOST_FIBERS defined (the emulated device, tests/cuda_host/emu_driver.cpp) a CTA's threads
// are fibers on the launching OS thread instead (fiber.h): the same barriers and shuffles, each
// wait a switch of a few nanoseconds instead of an OS context switch, which is what makes whole
// forward passes affordable.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __device__
#define __global__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct uint2 { unsigned int x, y; };
struct uint4 { unsigned int x, y, z, w; };
struct float4 { float x, y, z, w; };
struct dim3h { unsigned int x = 0, y = 0, z = 0; };
#ifdef HOST_FIBERS
#include "fiber.h"
inline dim3h threadIdx;  // set by the fiber scheduler at every switch
using HostBarrier = FiberBarrier;
#else
inline thread_local dim3h threadIdx;
using HostBarrier = std::barrier<>;
#endif
inline dim3h blockIdx, blockDim{1, 1, 1}, gridDim{1, 1, 1};
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }

struct CtaSync {
    std::unique_ptr<HostBarrier> cta;
    std::vector<std::unique_ptr<HostBarrier>> warps;
    float xchg[32][32];
    unsigned int frag[32][32][6];  // per warp, per lane: the A and B fragments of an mma
};
inline CtaSync* g_cta = nullptr;

inline void __syncthreads() {
    if (g_cta) g_cta->cta->arrive_and_wait();
}
inline void __syncwarp() {
    if (g_cta) g_cta->warps[threadIdx.x / 32]->arrive_and_wait();
}
inline float shfl_from(float v, int src) {
    if (!g_cta) return v;
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    g_cta->xchg[w][lane] = v;
    g_cta->warps[w]->arrive_and_wait();
    const float r = g_cta->xchg[w][src & 31];
    g_cta->warps[w]->arrive_and_wait();
    return r;
}
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) {
    return std::atomic_ref<unsigned int>(*p).fetch_add(v);
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
// A load through L2 (no L1 caching); host memory has one level.
template <typename T>
inline T __ldcg(const T* p) { return *p; }
// Warp vote: whether any lane of the calling warp passes a nonzero `pred`.
inline int __any_sync(unsigned, int pred) {
    if (!g_cta) return pred;
    const unsigned w = threadIdx.x / 32, lanes = std::min(32u, blockDim.x - 32 * w);
    g_cta->xchg[w][threadIdx.x % 32] = pred ? 1.0f : 0.0f;
    g_cta->warps[w]->arrive_and_wait();
    int any = 0;
    for (unsigned i = 0; i < lanes; ++i) any |= g_cta->xchg[w][i] != 0.0f;
    g_cta->warps[w]->arrive_and_wait();
    return any;
}
inline float __shfl_xor_sync(unsigned, float v, int o) { return shfl_from(v, (threadIdx.x % 32) ^ o); }
inline float __shfl_sync(unsigned, float v, int src) { return shfl_from(v, src); }

// Runs `f` for every CTA of `grid`, `threads` threads each.
template <typename F>
void launch(dim3h grid, unsigned threads, F f) {
    blockDim = dim3h{threads, 1, 1};
    gridDim = grid;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                blockIdx = dim3h{x, y, z};
                CtaSync s;
                s.cta = std::make_unique<HostBarrier>(threads);
                for (unsigned w = 0; w * 32 < threads; ++w)
                    s.warps.push_back(std::make_unique<HostBarrier>(std::min(32u, threads - 32 * w)));
                g_cta = &s;
#ifdef HOST_FIBERS
                fiber_run_cta(threads, [&](unsigned t) { threadIdx = dim3h{t, 0, 0}; }, f);
#else
                std::vector<std::thread> ts;
                for (unsigned t = 0; t < threads; ++t)
                    ts.emplace_back([t, &f] {
                        threadIdx = dim3h{t, 0, 0};
                        f();
                    });
                for (auto& t : ts) t.join();
#endif
                g_cta = nullptr;
            }
    blockDim = dim3h{1, 1, 1};
    gridDim = dim3h{1, 1, 1};
}

inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline float __int_as_float(unsigned int i) { float f; std::memcpy(&f, &i, 4); return f; }
// Byte k of the result is byte (s >> 4k) & 7 of the 8 bytes y:x (x the low four); PRMT's
// default mode, selectors below 8 (the kernels use no other).
inline unsigned int __byte_perm(unsigned int x, unsigned int y, unsigned int s) {
    const unsigned long long b = ((unsigned long long)y << 32) | x;
    unsigned int r = 0;
    for (int k = 0; k < 4; ++k) r |= (unsigned int)((b >> (8 * ((s >> (4 * k)) & 7))) & 0xffu) << (8 * k);
    return r;
}
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
template <typename T> inline T min(T a, T b) { return a < b ? a : b; }
template <typename T> inline T max(T a, T b) { return a > b ? a : b; }

// mma.sync.m16n8k16 bf16 × bf16 + f32 (kernels/common.cuh: mma_bf16_16816) for the calling
// warp: every lane posts its fragments, each rebuilds A and B and computes its four outputs.
// Products of two bf16 are exact in f32; each output's 16 products are summed in k order and
// then added, as one f32 rounding per add (the hardware's order and internal width differ, by
// far less than the tests' tolerances).
inline void host_mma_bf16_16816(float* d, const unsigned int* a, const unsigned int* b) {
    const unsigned w = threadIdx.x / 32, lane = threadIdx.x % 32;
    auto& f = g_cta->frag[w];
    for (int i = 0; i < 4; ++i) f[lane][i] = a[i];
    f[lane][4] = b[0];
    f[lane][5] = b[1];
    g_cta->warps[w]->arrive_and_wait();
    auto lo = [](unsigned int x) { return __uint_as_float((x & 0xffffu) << 16); };
    auto hi = [](unsigned int x) { return __uint_as_float(x & 0xffff0000u); };
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l & 3;
        for (int i = 0; i < 4; ++i) {
            const int r = g + 8 * (i & 1), c = 2 * t + 8 * (i >> 1);
            A[r][c] = lo(f[l][i]);
            A[r][c + 1] = hi(f[l][i]);
        }
        for (int i = 0; i < 2; ++i) {
            B[2 * t + 8 * i][g] = lo(f[l][4 + i]);
            B[2 * t + 8 * i + 1][g] = hi(f[l][4 + i]);
        }
    }
    g_cta->warps[w]->arrive_and_wait();
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) {
        const int r = g + 8 * (i >> 1), c = 2 * t + (i & 1);
        float acc = 0.0f;
        for (int k = 0; k < 16; ++k) acc += A[r][k] * B[k][c];
        d[i] += acc;
    }
}

// f16 via the compiler's _Float16 (IEEE binary16, round to nearest even).
inline float host_f16_to_f32(unsigned short h) { _Float16 v; std::memcpy(&v, &h, 2); return (float)v; }
// The nearest f16, ties to even (PTX cvt.rn.f16.f32).
inline unsigned short host_f16_nearest(float x) {
    _Float16 v = (_Float16)x;
    unsigned short b;
    std::memcpy(&b, &v, 2);
    return b;
}
// The least f16 >= x for |x| < 65504 (PTX cvt.rp.f16.f32).
inline unsigned short host_f16_round_up(float x) {
    _Float16 v = (_Float16)x;
    unsigned short b;
    std::memcpy(&b, &v, 2);
    if ((float)v >= x) return b;
    if (b == 0x8000) return 0x0001;
    return (b & 0x8000) ? b - 1 : b + 1;
}
