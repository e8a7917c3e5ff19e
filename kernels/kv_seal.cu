// Sealing: a full block's exact bf16 K/V, one layer at a time, encoded into its policy's format
// in the sealed slab (kv_formats.cuh), byte for byte what codec.rs `Codec::encode_k/encode_v`
// and latent.rs `LatentKeys::encode` write for the same input numbers (same rounding of codes,
// same f16 rounding directions of scales and zeros, same order of every f32 operation).
//
// - seal_<fmt>: grid (seals, kv_heads, 2): one CTA encodes one head's K (z = 0) or V (z = 1) run.
// - latent_encode_bf16: grid (seals): mhc's joint latent of one block: the keys of every head
//   un-rotated to pre-RoPE, centred, projected, rounded to bf16.
// - seal_bounds_<fmt>: grid (seals, kv_heads): quest's per-channel key bounds of one head, taken
//   from the keys as attention reads them (decoded from the sealed copy written just before,
//   mhc keys rebuilt and rotated), rounded outward to f16.
// Speed is secondary: a block is sealed once per block_size tokens.
#include "common.cuh"
#include "kv_formats.cuh"

// The code of x against f16-rounded scale s and zero z (codec.rs `affine_code`): NaN -> 0.
__device__ __forceinline__ unsigned int affine_code(float x, float s, float z, float levels) {
    if (s == 0.0f) return 0;
    const float v = roundf(__fdiv_rn(__fsub_rn(x, z), s));  // half away from zero, as f32::round
    if (v != v) return 0;
    return (unsigned int)fminf(fmaxf(v, 0.0f), levels);
}

// codec.rs `affine_params`: zero rounded down, scale rounded up, so the grid covers [lo, hi].
__device__ __forceinline__ void affine_params(float lo, float hi, float levels, unsigned short* s,
                                              unsigned short* z) {
    *z = f16_down(lo);
    const float range = __fsub_rn(hi, f16_to_f32(*z));
    *s = range > 0.0f ? f16_up(__fdiv_rn(range, levels)) : (unsigned short)0;
}

// Encodes the run src ([bs, dim] bf16, token-major) into dst in format F, the whole CTA
// cooperating. Parameters first, then (after a barrier) every code byte, written whole.
template <int F>
__device__ void encode_run(const bf16_t* src, unsigned char* dst, int bs, int dim) {
    const int n = bs * dim;
    if constexpr (F == FMT_BF16 || F == FMT_BF16S) {
        for (int e = threadIdx.x; e < n; e += blockDim.x) ((bf16_t*)dst)[e] = src[e];
    } else if constexpr (F == FMT_I8) {
        for (int t = threadIdx.x; t < bs; t += blockDim.x) {
            float amax = 0.0f;  // fmaxf ignores NaN, as f32::max
            for (int c = 0; c < dim; ++c) amax = fmaxf(amax, fabsf(to_f32(src[t * dim + c])));
            const unsigned short sh = f16_up(__fdiv_rn(amax, 127.0f));
            st_f16(dst + n + 2 * t, sh);
            const float s = f16_to_f32(sh);
            for (int c = 0; c < dim; ++c) {
                int q = 0;
                if (s != 0.0f) {
                    const float v = roundf(__fdiv_rn(to_f32(src[t * dim + c]), s));
                    if (v == v) q = (int)fminf(fmaxf(v, -127.0f), 127.0f);
                }
                dst[t * dim + c] = (unsigned char)(signed char)q;
            }
        }
    } else {
        constexpr int bits = (F == FMT_TOK4 || F == FMT_CH4) ? 4 : 2;
        constexpr bool per_token = F == FMT_TOK4 || F == FMT_TOK2;
        const float levels = (float)((1 << bits) - 1);
        const int packed = packed_len(bits, n);
        unsigned char* params = dst + packed;
        const int g = group_of(dim), ng = dim / g;
        // Parameters: per (token, group) or per channel; min/max ignore NaN, (0, 0) if all NaN.
        const int groups = per_token ? bs * ng : dim;
        for (int i = threadIdx.x; i < groups; i += blockDim.x) {
            float lo = __int_as_float(0x7f800000), hi = NEG_INF;
            const int count = per_token ? g : bs;
            for (int k = 0; k < count; ++k) {
                const int e = per_token ? (i / ng) * dim + (i % ng) * g + k : k * dim + i;
                const float x = to_f32(src[e]);
                lo = fminf(lo, x);
                hi = fmaxf(hi, x);
            }
            if (lo > hi) lo = hi = 0.0f;
            unsigned short s, z;
            affine_params(lo, hi, levels, &s, &z);
            if (per_token) {
                st_f16(params + 4 * i, s);
                st_f16(params + 4 * i + 2, z);
            } else {
                st_f16(params + 2 * i, s);
                st_f16(params + 2 * (dim + i), z);
            }
        }
        __syncthreads();
        const int per = 8 / bits;
        for (int i = threadIdx.x; i < packed; i += blockDim.x) {
            unsigned int byte = 0;
            for (int j = 0; j < per; ++j) {
                const int e = i * per + j;
                if (e >= n) break;
                const int t = e / dim, c = e % dim;
                const unsigned char* p = per_token ? params + 4 * (t * ng + c / g) : nullptr;
                const float s = per_token ? ld_f16(p) : ld_f16(params + 2 * c);
                const float z = per_token ? ld_f16(p + 2) : ld_f16(params + 2 * (dim + c));
                byte |= affine_code(to_f32(src[e]), s, z, levels) << (j * bits);
            }
            dst[i] = (unsigned char)byte;
        }
    }
}

template <int KF, int VF>
__device__ void seal(const unsigned int* seals, const KvArgs& a, int dim, int block_size) {
    const int s = blockIdx.x, h = blockIdx.y, v = blockIdx.z;
    const unsigned int ex = seals[3 * s], se = seals[3 * s + 1];
    const bf16_t* src = exact_run(a, ex, v, h, block_size, dim);
    unsigned char* dst = (unsigned char*)sealed_run(a, se, v, h);
    if (v == 0) {
        if constexpr (KF != FMT_LAT) encode_run<KF>(src, dst, block_size, dim);
    } else {
        encode_run<VF>(src, dst, block_size, dim);
    }
}

#define SEAL_ENTRY(NAME, KF, VF)                                                                 \
    extern "C" __global__ void seal_##NAME(                                                      \
        const unsigned int* seals, /* [seals, 3]: (exact slot, sealed slot, first position) */    \
        KvArgs kv, int dim, int block_size) {                                                     \
        seal<KF, VF>(seals, kv, dim, block_size);                                                 \
    }

KV_FORMATS(SEAL_ENTRY)

// Bounds of head blockIdx.y of one sealed block: thread c's channel min and max over the block's
// decoded keys (f32 min/max ignore NaN, as the CPU's), rounded down / up (kv_store.rs `seal`).
template <int KF>
__device__ void seal_bounds(const unsigned int* seals, const KvArgs& a, int kv_heads, int dim,
                            int block_size) {
    const int s = blockIdx.x, h = blockIdx.y;
    const unsigned int se = seals[3 * s + 1], pos0 = seals[3 * s + 2];
    unsigned char* out = (unsigned char*)key_bounds(a, se, h);
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        float lo = __int_as_float(0x7f800000), hi = NEG_INF;
        for (int t = 0; t < block_size; ++t) {
            float x;
            if constexpr (KF == FMT_LAT)
                x = latent_key(a, sealed_layer(a, se), kv_heads, dim, h, t, c, pos0);
            else
                x = run_elem<KF>(sealed_run(a, se, 0, h), block_size, dim, t, c);
            lo = fminf(lo, x);
            hi = fmaxf(hi, x);
        }
        st_f16(out + 2 * c, bound_down(lo));
        st_f16(out + 2 * (dim + c), bound_up(hi));
    }
}

#define BOUNDS_ENTRY(NAME, KF, VF)                                                               \
    extern "C" __global__ void seal_bounds_##NAME(                                               \
        const unsigned int* seals, /* [seals, 3]: (exact slot, sealed slot, first position) */    \
        KvArgs kv, int kv_heads, int dim, int block_size) {                                       \
        seal_bounds<KF>(seals, kv, kv_heads, dim, block_size);                                    \
    }

KV_FORMATS(BOUNDS_ENTRY)

// mhc: the latent of one block and layer, c_t = A (k_t - mean), from the exact keys of every
// head un-rotated to their pre-RoPE values (latent.rs `encode`, kv_store.rs `seal`). Dynamic
// shared memory: [block_size, kv_heads * dim] f32.
extern "C" __global__ void latent_encode_bf16(
    const unsigned int* seals,  // [seals, 3]: (exact slot, sealed slot, first position)
    KvArgs kv,
    const float* down,          // [rank, kv_heads * dim]: this layer's A
    int kv_heads, int dim, int block_size) {
    extern __shared__ float pre[];
    const int s = blockIdx.x, half = dim / 2, width = kv_heads * dim;
    const unsigned int ex = seals[3 * s], se = seals[3 * s + 1], pos0 = seals[3 * s + 2];
    const float s2 = __fmul_rn(kv.rope_scaling, kv.rope_scaling);
    for (int idx = threadIdx.x; idx < block_size * kv_heads * half; idx += blockDim.x) {
        const int t = idx / (kv_heads * half), r = idx % (kv_heads * half);
        const int h = r / half, i = r % half;
        const bf16_t* k = exact_run(kv, ex, 0, h, block_size, dim) + (size_t)t * dim;
        const float x = to_f32(k[i]), y = to_f32(k[i + half]);
        float cs, sn;
        rope_cs(kv, i, pos0 + t, &cs, &sn);
        // RopeTable::unrotate_head: lo = (a cos + b sin) / s2, hi = (b cos - a sin) / s2.
        const float lo = __fdiv_rn(__fadd_rn(__fmul_rn(x, cs), __fmul_rn(y, sn)), s2);
        const float hi = __fdiv_rn(__fsub_rn(__fmul_rn(y, cs), __fmul_rn(x, sn)), s2);
        pre[t * width + h * dim + i] = __fsub_rn(lo, kv.lat_mean[h * dim + i]);
        pre[t * width + h * dim + i + half] = __fsub_rn(hi, kv.lat_mean[h * dim + i + half]);
    }
    __syncthreads();
    bf16_t* out = (bf16_t*)sealed_layer(kv, se);
    for (int idx = threadIdx.x; idx < block_size * kv.rank; idx += blockDim.x) {
        const int t = idx / kv.rank, j = idx % kv.rank;
        float dot = -0.0f;  // Rust's f32 `sum` starts at -0.0
        for (int w = 0; w < width; ++w)
            dot = __fadd_rn(dot, __fmul_rn(down[(size_t)j * width + w], pre[t * width + w]));
        out[t * kv.rank + j] = from_f32<bf16_t>(dot);
    }
}
