// The sealed KV formats on the device: reading and writing the runs `src/backend/codec.rs`
// defines, byte for byte (that file's doc is the format reference), plus where a block's data
// lives in device memory. Pasted by the Rust loader in place of `#include "kv_formats.cuh"`
// (after `common.cuh`).
//
// Memory (see src/backend/cuda/store.rs): every representation of a block lives in a *slab*,
// in fixed-size slots grouped in chunks of 2^shift slots; `chunks[slot >> shift]` is the device
// address of a chunk. The exact slab holds bf16 blocks laid out [layer][k|v][kv_head][slot][dim];
// a sealed slab holds blocks laid out [layer][latent | kv_head x (K run | V run | key bounds)],
// every part padded to 16 bytes, runs as codec.rs encodes them; the key bounds (quest only) are
// per channel f16 minima then maxima of the keys attention reads (kv_store.rs `seal`).
//
// Decoding is exact arithmetic on the stored numbers: products and sums are written with
// __fmul_rn / __fadd_rn so that the compiler does not contract them into FMAs, and the results
// equal the CPU codec's f32 decode bit for bit.
#pragma once

// Formats of one run (codec.rs `Run`).
#define FMT_BF16 0
#define FMT_I8 1    // per token symmetric int8, f16 scale per token
#define FMT_TOK4 2  // per (token, group of 32 channels) 4-bit, f16 scale + zero
#define FMT_TOK2 3
#define FMT_CH4 4   // per channel over the block 4-bit, f16 scales then zeros
#define FMT_CH2 5
#define FMT_LAT 6   // keys as the layer's joint latent (mhc), no per-head run
#define FMT_BF16S 7 // a bf16 run in a sealed slab (bf16 + quest: kept beside its key bounds)

#define NO_SLOT 0xffffffffu

// Every KV format (codec.rs `Codec`): exact / bf16, int8, kivi4, kivi2, k8v4, mhc's latent
// keys with bf16, int8 or 4-bit values, and bf16 sealed (bf16s: bf16 blocks that carry key
// bounds for quest leave the exact slab like every other sealed block).
//
// A program may hold a share of the formats: with -DKV_PARTS=P -DKV_PART=i, KV_FORMATS lists
// the formats whose position is i modulo P (compile.rs builds attention.cu and prefill.cu in
// parts, so that NVRTC compiles them on several threads at start); without them, all of them.
// Entry points that are not per format belong to part 0 (KV_PART_0).
#ifndef KV_PARTS
#define KV_PARTS 1
#define KV_PART 0
#endif
#define KV_PART_0 (KV_PART == 0)
#if 0 % KV_PARTS == KV_PART
#define KV_FORMAT_0(X) X(bf16, FMT_BF16, FMT_BF16)
#else
#define KV_FORMAT_0(X)
#endif
#if 1 % KV_PARTS == KV_PART
#define KV_FORMAT_1(X) X(int8, FMT_I8, FMT_I8)
#else
#define KV_FORMAT_1(X)
#endif
#if 2 % KV_PARTS == KV_PART
#define KV_FORMAT_2(X) X(kivi4, FMT_CH4, FMT_TOK4)
#else
#define KV_FORMAT_2(X)
#endif
#if 3 % KV_PARTS == KV_PART
#define KV_FORMAT_3(X) X(kivi2, FMT_CH2, FMT_TOK2)
#else
#define KV_FORMAT_3(X)
#endif
#if 4 % KV_PARTS == KV_PART
#define KV_FORMAT_4(X) X(k8v4, FMT_I8, FMT_TOK4)
#else
#define KV_FORMAT_4(X)
#endif
#if 5 % KV_PARTS == KV_PART
#define KV_FORMAT_5(X) X(mhcbf16, FMT_LAT, FMT_BF16)
#else
#define KV_FORMAT_5(X)
#endif
#if 6 % KV_PARTS == KV_PART
#define KV_FORMAT_6(X) X(mhcint8, FMT_LAT, FMT_I8)
#else
#define KV_FORMAT_6(X)
#endif
#if 7 % KV_PARTS == KV_PART
#define KV_FORMAT_7(X) X(mhckivi4, FMT_LAT, FMT_TOK4)
#else
#define KV_FORMAT_7(X)
#endif
#if 8 % KV_PARTS == KV_PART
#define KV_FORMAT_8(X) X(bf16s, FMT_BF16S, FMT_BF16S)
#else
#define KV_FORMAT_8(X)
#endif
#define KV_FORMATS(X)                                                                         \
    KV_FORMAT_0(X) KV_FORMAT_1(X) KV_FORMAT_2(X) KV_FORMAT_3(X) KV_FORMAT_4(X) KV_FORMAT_5(X) \
    KV_FORMAT_6(X) KV_FORMAT_7(X) KV_FORMAT_8(X)

// Where one layer's KV lives, for one launch. Passed by value; the Rust twin is `KvArgs` in
// src/backend/cuda/store.rs (same field order, 8-byte aligned).
struct KvArgs {
    const unsigned long long* ex_chunks;  // [chunks]: address of each exact chunk (0: not allocated)
    const unsigned long long* se_chunks;  // [chunks]: same for the sealed slab of this launch's format
    const float* lat_mean;                // [kv_heads * dim]: this layer's key mean (mhc)
    const float* lat_up;                  // [rank, kv_heads * dim]: this layer's up-projection Bᵀ (mhc)
    const float* inv_freq;                // [dim / 2]: RoPE inverse frequencies (mhc)
    const unsigned int* quest_sel;        // [decode rows, kv_heads, quest_words]: bit b of a
                                          // (row, head)'s words = logical block b is read
                                          // (quest_select_f32); null: every block
    unsigned long long ex_block_bytes;    // bytes of one exact block over all layers
    unsigned long long ex_k;              // offset of this layer's K in an exact block
    unsigned long long ex_kv;             // bytes of one layer's K (its V follows)
    unsigned long long se_block_bytes;    // bytes of one sealed block over all layers
    unsigned long long se_layer;          // offset of this layer (its latent first) in a sealed block
    unsigned int ex_shift;                // log2 slots per exact chunk
    unsigned int se_shift;                // log2 slots per sealed chunk
    unsigned int k_run;                   // bytes of one head's K run (padded; 0 for mhc)
    unsigned int v_run;                   // bytes of one head's V run (padded)
    unsigned int b_run;                   // bytes of one head's key bounds (4 * dim; 0: none)
    unsigned int lat_bytes;               // bytes of this layer's latent (padded; 0 unless mhc)
    int rank;                             // this layer's latent rank (mhc)
    float rope_scaling;                   // RoPE attention_scaling (mhc)
    int window_blocks;                    // 0: no window; else blocks seen besides the sink block
    unsigned int quest_words;             // u32 words per (row, head) in quest_sel
};

__device__ __forceinline__ const unsigned char* slot_addr(const unsigned long long* chunks,
                                                          unsigned int shift,
                                                          unsigned long long block_bytes,
                                                          unsigned int slot) {
    return (const unsigned char*)chunks[slot >> shift] +
           (size_t)(slot & ((1u << shift) - 1u)) * block_bytes;
}

// Exact K (v = 0) or V (v = 1) of head h at offset 0 of exact slot `slot`, this layer.
__device__ __forceinline__ const bf16_t* exact_run(const KvArgs& a, unsigned int slot, int v,
                                                   int h, int block_size, int dim) {
    const unsigned char* b = slot_addr(a.ex_chunks, a.ex_shift, a.ex_block_bytes, slot);
    return (const bf16_t*)(b + a.ex_k + (v ? a.ex_kv : 0)) + (size_t)h * block_size * dim;
}

// This layer's part of sealed slot `slot`: its latent, then the heads' runs.
__device__ __forceinline__ const unsigned char* sealed_layer(const KvArgs& a, unsigned int slot) {
    return slot_addr(a.se_chunks, a.se_shift, a.se_block_bytes, slot) + a.se_layer;
}

// K (v = 0) or V (v = 1) run of head h of sealed slot `slot`, this layer.
__device__ __forceinline__ const unsigned char* sealed_run(const KvArgs& a, unsigned int slot,
                                                           int v, int h) {
    return sealed_layer(a, slot) + a.lat_bytes + (size_t)h * (a.k_run + a.v_run + a.b_run) +
           (v ? a.k_run : 0);
}

// Whether a query whose own block is `own` sees logical block `bi` under a window of
// `window_blocks` blocks besides the sink block 0 (0: no window, every block).
__device__ __forceinline__ bool sees(int bi, int own, int window_blocks) {
    return window_blocks == 0 || bi == own || bi == 0 || bi + window_blocks > own;
}

// Key bounds of head h of sealed slot `slot`, this layer: dim f16 minima, then dim f16 maxima.
__device__ __forceinline__ const unsigned char* key_bounds(const KvArgs& a, unsigned int slot,
                                                           int h) {
    return sealed_run(a, slot, 0, h) + a.k_run + a.v_run;
}

// ---- f16 as raw bits (no cuda_fp16.h under NVRTC) ----

// The two conversions are PTX instructions; a host build (tests/cuda_formats_host.rs compiles
// the format code with g++ to check it against the Rust codec) takes them from its shim.
__device__ __forceinline__ float f16_to_f32(unsigned short h) {
#ifdef __CUDA_ARCH__
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    return host_f16_to_f32(h);
#endif
}

// The least f16 >= x, clamped to +-65504 (NaN -> 0): codec.rs `f16_up`.
__device__ __forceinline__ unsigned short f16_up(float x) {
    if (x != x) return 0;
    if (x >= 65504.0f) return 0x7bff;
    if (x <= -65504.0f) return 0xfbff;
#ifdef __CUDA_ARCH__
    unsigned short h;
    asm("cvt.rp.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
#else
    return host_f16_round_up(x);
#endif
}

// codec.rs `f16_down(x) = -f16_up(-x)`.
__device__ __forceinline__ unsigned short f16_down(float x) { return f16_up(-x) ^ 0x8000u; }

// x rounded to the nearest f16, ties to even (half's `f16::from_f32`; inf beyond the range).
__device__ __forceinline__ unsigned short f16_nearest(float x) {
#ifdef __CUDA_ARCH__
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
#else
    return host_f16_nearest(x);
#endif
}

// Key bounds rounded outward, as kv_store.rs `f16_down` / `f16_up` (unlike the codec's, no
// clamping: beyond +-65504 they become +-inf, NaN stays NaN).
__device__ __forceinline__ unsigned short bound_down(float x) {
    const unsigned short h = f16_nearest(x);
    if (!(f16_to_f32(h) > x)) return h;
    return (h & 0x8000u) ? (unsigned short)(h + 1) : h == 0 ? (unsigned short)0x8001 : (unsigned short)(h - 1);
}
__device__ __forceinline__ unsigned short bound_up(float x) { return bound_down(-x) ^ 0x8000u; }

__device__ __forceinline__ float ld_f16(const unsigned char* p) {
    return f16_to_f32(*(const unsigned short*)p);
}

// ---- K/V loads of the decode kernels ----
// The decode kernels read each K/V byte once per launch, and nothing writes the store during a
// decode launch (the RoPE + KV write and the sealing are earlier launches), so their K/V loads
// take the read-only path as global loads that do not allocate in L1
// (`ld.global.nc.L1::no_allocate`). Plain dereferences compiled to generic loads (`LD.E.128` in
// the SASS, since block addresses come from the chunk tables), and each line was kept in L1
// although no thread reads it again. Only kernels that never write what they read may use these.
// `-DKV_LOAD_GENERIC` keeps the plain loads (gpu-check's A/B). Host builds dereference.
#if defined(__CUDA_ARCH__) && !defined(KV_LOAD_GENERIC)
__device__ __forceinline__ uint4 ld_kv16(const void* p) {
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
    return r;
}
__device__ __forceinline__ uint2 ld_kv8(const void* p) {
    uint2 r;
    asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p));
    return r;
}
__device__ __forceinline__ unsigned int ld_kv4(const void* p) {
    unsigned int r;
    asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(r) : "l"(p));
    return r;
}
__device__ __forceinline__ unsigned short ld_kv2(const void* p) {
    unsigned short r;
    asm("ld.global.nc.L1::no_allocate.u16 %0, [%1];" : "=h"(r) : "l"(p));
    return r;
}
#else
__device__ __forceinline__ uint4 ld_kv16(const void* p) { return *(const uint4*)p; }
__device__ __forceinline__ uint2 ld_kv8(const void* p) { return *(const uint2*)p; }
__device__ __forceinline__ unsigned int ld_kv4(const void* p) { return *(const unsigned int*)p; }
__device__ __forceinline__ unsigned short ld_kv2(const void* p) { return *(const unsigned short*)p; }
#endif

__device__ __forceinline__ void st_f16(unsigned char* p, unsigned short h) {
    *(unsigned short*)p = h;
}

// ---- geometry of a run (codec.rs `Run::bytes`) ----

__device__ __forceinline__ int fmt_bits(int f) {
    return (f == FMT_TOK4 || f == FMT_CH4) ? 4 : (f == FMT_TOK2 || f == FMT_CH2) ? 2 : 8;
}
__device__ __forceinline__ int group_of(int dim) { return dim % 32 == 0 ? 32 : dim; }
__device__ __forceinline__ int packed_len(int bits, int n) { return (n * bits + 7) / 8; }

__device__ __forceinline__ unsigned int get_code(const unsigned char* codes, int bits, int e) {
    const int per = 8 / bits;
    return (codes[e / per] >> ((e % per) * bits)) & ((1u << bits) - 1u);
}

// ---- decode ----

__device__ __forceinline__ void unpack_bf16x8(uint4 raw, float* f) {
    const unsigned int w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        f[2 * j] = __uint_as_float(w[j] << 16);
        f[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
    }
}

// Element (t, c) of a run of format F (not FMT_LAT).
template <int F>
__device__ __forceinline__ float run_elem(const unsigned char* run, int bs, int dim, int t, int c) {
    const int e = t * dim + c;
    if (F == FMT_BF16 || F == FMT_BF16S) return to_f32(((const bf16_t*)run)[e]);
    if (F == FMT_I8) return __fmul_rn((float)(signed char)run[e], ld_f16(run + bs * dim + 2 * t));
    const int bits = fmt_bits(F);
    const float code = (float)get_code(run, bits, e);
    const unsigned char* params = run + packed_len(bits, bs * dim);
    float s, z;
    if (F == FMT_TOK4 || F == FMT_TOK2) {
        const int g = group_of(dim), ng = dim / g;
        const unsigned char* p = params + 4 * (t * ng + c / g);
        s = ld_f16(p);
        z = ld_f16(p + 2);
    } else {
        s = ld_f16(params + 2 * c);
        z = ld_f16(params + 2 * (dim + c));
    }
    return __fadd_rn(z, __fmul_rn(code, s));
}

// Integer codes to floats without a conversion instruction. A byte u ORed into the mantissa of
// 2^23 is the float 2^23 + u exactly, and subtracting 2^23 leaves u exactly: the bits `(float)u`
// gives. One PRMT builds the word (byte k of w beside three of 0x4B000000's bytes) and one FADD
// finishes; a signed byte b is stored as b ^ 0x80 = b + 128, and 2^23 + 128 is subtracted. Why:
// I2F issues at 16 per clock per multiprocessor on sm_80 and sm_90 (the "all other type
// conversions" row of CUDA's throughput table) against 128 for an FADD, and the int8 decode
// converted 8 codes per position with it (I2F.S8 in the SASS). Per 4 positions of one thread
// (sm_90 SASS, NVRTC 13.5): int8 190 instructions with 32 I2F -> 197 with none; 4-bit 321 -> 312
// (per token) and 291 -> 279 (per channel), the I2FP gone.
__device__ __forceinline__ float byte_plus_2p23(unsigned int w, int k) {
    return __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7440u | (unsigned int)k));
}

// The 8 codes of `codes` (`bits` 8: signed bytes, two words; 4 or 2: unsigned fields, code j at
// bit j * bits of codes[0]) as floats.
template <int BITS>
__device__ __forceinline__ void codes_8(const unsigned int* codes, float* f) {
    if (BITS == 8) {
        const unsigned int w[2] = {codes[0] ^ 0x80808080u, codes[1] ^ 0x80808080u};
#pragma unroll
        for (int j = 0; j < 8; ++j) f[j] = __fsub_rn(byte_plus_2p23(w[j >> 2], j & 3), 8388736.0f);
    } else if (BITS == 4) {
        // Even codes in the low nibbles, odd in the high: byte j / 2 of one of two words.
        const unsigned int w[2] = {codes[0] & 0x0f0f0f0fu, (codes[0] >> 4) & 0x0f0f0f0fu};
#pragma unroll
        for (int j = 0; j < 8; ++j) f[j] = __fsub_rn(byte_plus_2p23(w[j & 1], j >> 1), 8388608.0f);
    } else {
        // 2-bit codes stay with the conversion (I2FP on sm_90): spreading them into bytes
        // first issued more instructions than it saved (35 more per 4 positions in the SASS).
#pragma unroll
        for (int j = 0; j < 8; ++j) f[j] = (float)((codes[0] >> (2 * j)) & 3u);
    }
}

// The 8 channels' scales and zeros from c0 of a per-channel run (FMT_CH4, FMT_CH2): the same
// for every token of the block, so a caller decoding several tokens of one block loads them
// once (`decode_8_ch`).
template <int F>
__device__ __forceinline__ void ch_params(const unsigned char* run, int bs, int dim, int c0,
                                          float* s, float* z) {
    const unsigned char* params = run + packed_len(fmt_bits(F), bs * dim);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        s[j] = ld_f16(params + 2 * (c0 + j));
        z[j] = ld_f16(params + 2 * (dim + c0 + j));
    }
}

// What one thread loads for elements (t, c0 .. c0 + 8) of a run, before decoding: `v` the bf16
// row (16 bytes) or the codes (v.x; int8 also v.y), `p` the f16 parameters (int8: the scale;
// per-token 4/2-bit: scale | zero << 16; per-channel: none, `ch_params` has them). Why apart
// from the decode: a decode kernel loads every position of its step (`load_8`) before decoding
// any (`decode_8`), so the step's loads are in flight together. Decoding each position as it
// was loaded made the warp wait for one load before issuing the next.
struct Raw8 {
    uint4 v;
    unsigned int p;
};

__device__ __forceinline__ Raw8 raw8_zero() {
    Raw8 r;
    r.v = make_uint4(0u, 0u, 0u, 0u);
    r.p = 0u;
    return r;
}

// The loads of `run_8` (format F, not FMT_LAT); c0 a multiple of 8, dim a multiple of 8 and runs
// 16-byte aligned, so the code loads are aligned vector loads.
template <int F>
__device__ __forceinline__ Raw8 load_8(const unsigned char* run, int bs, int dim, int t, int c0) {
    const int e0 = t * dim + c0;
    Raw8 r = raw8_zero();
    if (F == FMT_BF16 || F == FMT_BF16S) {
        r.v = ld_kv16(run + 2 * e0);
    } else if (F == FMT_I8) {
        const uint2 c = ld_kv8(run + e0);
        r.v.x = c.x;
        r.v.y = c.y;
        r.p = *(const unsigned short*)(run + bs * dim + 2 * t);
    } else {
        const int bits = fmt_bits(F);
        r.v.x = bits == 4 ? ld_kv4(run + e0 / 2) : (unsigned int)ld_kv2(run + e0 / 4);
        if (F == FMT_TOK4 || F == FMT_TOK2) {
            const int g = group_of(dim), ng = dim / g;
            const unsigned char* p = run + packed_len(bits, bs * dim) + 4 * (t * ng + c0 / g);
            r.p = (unsigned int)*(const unsigned short*)p |
                  ((unsigned int)*(const unsigned short*)(p + 2) << 16);
        }
    }
    return r;
}

// The 8 floats of a per-channel `load_8` given `ch_params`' scales and zeros.
template <int F>
__device__ __forceinline__ void decode_8_ch(const Raw8& r, const float* s, const float* z,
                                            float* out) {
    float c[8];
    codes_8<F == FMT_CH4 ? 4 : 2>(&r.v.x, c);
#pragma unroll
    for (int j = 0; j < 8; ++j) out[j] = __fadd_rn(z[j], __fmul_rn(c[j], s[j]));
}

// The 8 floats of a `load_8` of format F (not per-channel, not FMT_LAT); codes become floats by
// `codes_8`.
template <int F>
__device__ __forceinline__ void decode_8(const Raw8& r, float* out) {
    if (F == FMT_BF16 || F == FMT_BF16S) {
        unpack_bf16x8(r.v, out);
    } else if (F == FMT_I8) {
        const float s = f16_to_f32((unsigned short)(r.p & 0xffffu));
        const unsigned int w[2] = {r.v.x, r.v.y};
        float c[8];
        codes_8<8>(w, c);
#pragma unroll
        for (int j = 0; j < 8; ++j) out[j] = __fmul_rn(c[j], s);
    } else {
        const float s = f16_to_f32((unsigned short)(r.p & 0xffffu));
        const float z = f16_to_f32((unsigned short)(r.p >> 16));
        float c[8];
        codes_8<F == FMT_TOK4 ? 4 : 2>(&r.v.x, c);
#pragma unroll
        for (int j = 0; j < 8; ++j) out[j] = __fadd_rn(z, __fmul_rn(c[j], s));
    }
}

// Elements (t, c0 .. c0 + 8) of a run of format F (not FMT_LAT), loaded and decoded at once.
template <int F>
__device__ __forceinline__ void run_8(const unsigned char* run, int bs, int dim, int t, int c0,
                                      float* out) {
    const Raw8 r = load_8<F>(run, bs, dim, t, c0);
    if (F == FMT_CH4 || F == FMT_CH2) {
        float s[8], z[8];
        ch_params<F>(run, bs, dim, c0, s, z);
        decode_8_ch<F>(r, s, z, out);
    } else {
        decode_8<F>(r, out);
    }
}

// mhc: the pre-RoPE reconstruction of key channel `w` (of all kv_heads * dim) of token t from
// the layer's latent `lat` ([bs, rank] bf16): mean[w] + sum_j c_j up[j][w], in the CPU's order.
__device__ __forceinline__ float latent_elem(const KvArgs& a, const unsigned char* lat, int width,
                                             int t, int w) {
    const bf16_t* c = (const bf16_t*)lat + (size_t)t * a.rank;
    float x = a.lat_mean[w];
    for (int j = 0; j < a.rank; ++j)
        x = __fadd_rn(x, __fmul_rn(to_f32(c[j]), a.lat_up[(size_t)j * width + w]));
    return x;
}

// RoPE cos and sin of pair i at position pos, as the CPU's table computes them (the angle in
// f32, cos/sin in double, then f32, times attention_scaling).
__device__ __forceinline__ void rope_cs(const KvArgs& a, int i, int pos, float* c, float* s) {
    const float angle = __fmul_rn(a.inv_freq[i], (float)pos);
    *c = __fmul_rn((float)cos((double)angle), a.rope_scaling);
    *s = __fmul_rn((float)sin((double)angle), a.rope_scaling);
}

// mhc: rotated key channel c of head h, token t of a block whose first token is at `pos0`.
__device__ __forceinline__ float latent_key(const KvArgs& a, const unsigned char* lat, int kv_heads,
                                            int dim, int h, int t, int c, int pos0) {
    const int half = dim / 2, width = kv_heads * dim, i = c % half;
    const float lo = latent_elem(a, lat, width, t, h * dim + i);
    const float hi = latent_elem(a, lat, width, t, h * dim + i + half);
    float cs, sn;
    rope_cs(a, i, pos0 + t, &cs, &sn);
    // CPU rotate_head: lo' = lo*cos + (-hi)*sin, hi' = hi*cos + lo*sin.
    return c < half ? __fadd_rn(__fmul_rn(lo, cs), __fmul_rn(-hi, sn))
                    : __fadd_rn(__fmul_rn(hi, cs), __fmul_rn(lo, sn));
}
