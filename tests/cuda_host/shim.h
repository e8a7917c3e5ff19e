// Host stand-ins for the CUDA built-ins the KV format code uses, so that g++ can compile
// kernels/kv_formats.cuh and kernels/kv_seal.cu as plain C++ (tests/cuda_formats_host.rs).
// One thread per "CTA": every kernel loop is strided by blockDim.x = 1, __syncthreads is a
// no-op. Warp shuffles are never reached by the code under test.
#pragma once
#include <cmath>
#include <cstring>

#define __device__
#define __global__
#define __forceinline__ inline
#define __shared__

struct uint2 { unsigned int x, y; };
struct uint4 { unsigned int x, y, z, w; };
struct dim3h { unsigned int x = 0, y = 0, z = 0; };
inline dim3h threadIdx, blockIdx, blockDim{1, 1, 1};
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline void __syncthreads() {}
inline void __syncwarp() {}

inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __int_as_float(unsigned int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __shfl_xor_sync(unsigned, float v, int) { return v; }
inline float __shfl_sync(unsigned, float v, int) { return v; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
template <typename T> inline T min(T a, T b) { return a < b ? a : b; }
template <typename T> inline T max(T a, T b) { return a > b ? a : b; }

// f16 via the compiler's _Float16 (IEEE binary16, round to nearest even).
inline float host_f16_to_f32(unsigned short h) { _Float16 v; std::memcpy(&v, &h, 2); return (float)v; }
// The least f16 >= x for |x| < 65504 (PTX cvt.rp.f16.f32).
inline unsigned short host_f16_round_up(float x) {
    _Float16 v = (_Float16)x;
    unsigned short b;
    std::memcpy(&b, &v, 2);
    if ((float)v >= x) return b;
    if (b == 0x8000) return 0x0001;
    return (b & 0x8000) ? b - 1 : b + 1;
}
