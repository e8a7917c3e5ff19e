// Causal GQA attention of decode rows over the paged KV store, in f32 math, on K/V read from
// each block's current representation: the exact bf16 copy, or the sealed copy in the launch's
// format (int8, 4- or 2-bit KIVI, k8v4, or mhc's latent keys), see kv_formats.cuh. Prompt
// chunks go to prefill.cu, which follows the same rules.
// Position p of a sequence is in logical block p / block_size, slot p % block_size; the table
// gives each logical block's (exact slot, sealed slot), NO_SLOT where absent.
//
// Which copy a query reads (the CPU backend's rule): its own block (the one its position is in)
// exact; any other block sealed when it has a sealed copy, else exact. Under a window a query
// sees the sink block 0, its own block and the `window_blocks` blocks up to its own; the others
// score -inf and are never read (they may be dropped: both slots NO_SLOT).
//
// - paged_decode_g<G>_<fmt>: one query row per sequence (decode), for query groups of up to G
//   heads. A CTA owns one KV head of one sequence and one split of its context, so each K/V
//   byte is read once for the whole query group (G = heads / kv_heads query heads). TPK = dim / 8
//   threads read 8 channels of one key each. Each split writes its unnormalised output with its
//   max and sum (the split count is chosen on the host so that the grid fills the GPU). Given a
//   counter per (sequence, KV head), the split that finishes last merges them all into the
//   output (CUDA's threadfence-reduction pattern: one launch per layer instead of two);
//   without one, decode_reduce_f32 merges them in a second launch. Both merge with
//   `merge_splits`, so both give the same bits.
//
// Under quest, decode rows read only the blocks quest.cu's selection marked (KvArgs.quest_sel).
#include "common.cuh"
#include "kv_formats.cuh"
#include "decode_steps.cuh"

// Keys (or values) each decode thread loads before using any: DECODE_UNROLL on the exact (bf16)
// path, DECODE_UNROLL_SEALED where a kernel reads sealed formats (decoded into float registers,
// kf[U][8]). On an H200 (gpu-check, 2026-11-28 and 2026-11-30) 8 on the exact path was faster
// than 4 in 7 of 8 decode shapes, by 2-9 %, and 0.5 % slower in the eighth; on the sealed path
// 8 made int8 / kivi4 decode ~30 % slower than 4 (docs/cuda.md). Before sm_90 the exact path
// keeps 4: at 8, ptxas for sm_80 spills paged_decode_g4_bf16 under its 6-CTA register cap, and
// no pre-Hopper GPU has measured either.
#ifndef DECODE_UNROLL
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define DECODE_UNROLL 4
#else
#define DECODE_UNROLL 8
#endif
#endif
#ifndef DECODE_UNROLL_SEALED
#define DECODE_UNROLL_SEALED 4
#endif
#define THREADS 128

// G_MAX bounds the group at compile time (register arrays); the runtime group G is <= G_MAX.
// A thread group of tpk = dim / 8 threads handles UNROLL consecutive positions per step (one
// block-table lookup for all of them when block_size is a multiple of UNROLL), each thread
// loading its 8 channels of each before using any. KF / VF: the sealed formats of K and V
// (FMT_BF16 for both: exact reads only).
template <int KF, int VF, int G_MAX>
__device__ void paged_decode(const float* qkv, const unsigned int* meta, const unsigned int* tables,
                             const KvArgs& a, float* part_o, float* part_ml, float* out,
                             unsigned int* counters, int heads, int kv_heads, int dim,
                             int block_size, int bs_shift, int split_len, int max_splits,
                             float scale) {
    constexpr bool SEALED = !(KF == FMT_BF16 && VF == FMT_BF16);
    constexpr bool LATENT = KF == FMT_LAT;
    constexpr int UNROLL = SEALED ? DECODE_UNROLL_SEALED : DECODE_UNROLL;
    extern __shared__ float smem[];
    __shared__ float m_s[G_MAX], l_s[G_MAX];
    const int kvh = blockIdx.x, e = blockIdx.y, split = blockIdx.z;
    const int G = heads / kv_heads, tpk = dim / 8, kpp = THREADS / tpk;
    const unsigned int row = meta[3 * e], ctx = meta[3 * e + 1];
    const unsigned int* table = tables + 2 * meta[3 * e + 2];
    const unsigned int* sel =
        a.quest_sel ? a.quest_sel + ((size_t)e * kv_heads + kvh) * a.quest_words : nullptr;
    const int t0 = split * split_len;
    if (t0 >= (int)ctx) return;
    const int n = min((int)ctx - t0, split_len);
    const int own = bs_shift >= 0 ? ((int)ctx - 1) >> bs_shift : ((int)ctx - 1) / block_size;
    const bool grouped = block_size % UNROLL == 0;  // t0 and every step start are multiples of UNROLL
    // Under a window or quest most steps of a long context may read nothing: a warp whose
    // positions all lie in unread blocks skips the step (scores -inf, no loads, no products).
    const bool sparse = grouped && (a.window_blocks != 0 || sel != nullptr);
    float* sc = smem;   // [G, split_len] scores, then probabilities
    float* red = smem;  // reused after the probabilities: [kpp, G, dim]
    const int width = (heads + 2 * kv_heads) * dim;
    const int grp = threadIdx.x / tpk, ln = threadIdx.x % tpk, c0 = ln * 8;
    // This thread only ever touches dims c0 .. c0 + 8: its slice of each query, pre-scaled,
    // lives in registers.
    float qr[G_MAX][8];
    const float* q = qkv + (size_t)row * width + (size_t)kvh * G * dim + c0;
#pragma unroll
    for (int g = 0; g < G_MAX; ++g)
#pragma unroll
        for (int j = 0; j < 8; ++j) qr[g][j] = g < G ? q[g * dim + j] * scale : 0.0f;

    // Scores. After the group reduction each lane holds one head's score; the first lane of the
    // tpk / G_MAX lanes holding the same head writes it.
    const int my_head = group_head<G_MAX>(ln, tpk);
    const bool writer = (ln & (tpk / G_MAX - 1)) == 0 && my_head < G;
    for (int tb = 0; tb < n; tb += kpp * UNROLL) {
        const int tg = tb + grp * UNROLL;
        if constexpr (!SEALED) {
            // Exact reads only: keep the loads as raw 16-byte vectors until used (fewer
            // registers than floats: more CTAs per SM for this bandwidth-bound path).
            uint4 raw[UNROLL];
            unsigned int read = 0u;  // bit u: position tg + u is visible and stored
            Where w0 = {nullptr, 0, 0};
            if (grouped && tg < n)
                w0 = where<false, false>(a, table, t0 + tg, own, block_size, bs_shift, 0, kvh, dim, nullptr);
            if (sparse && skip_step<UNROLL>(w0, writer, sc + my_head * split_len, tg, n)) continue;
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                raw[u] = make_uint4(0u, 0u, 0u, 0u);
                if (tg + u < n) {
                    Where w = w0;
                    if (grouped) w.off += u;
                    else w = where<false, false>(a, table, t0 + tg + u, own, block_size, bs_shift, 0, kvh, dim, nullptr);
                    if (w.kind) {
                        read |= 1u << u;
                        raw[u] = ld_kv16(w.base + 2 * (w.off * dim + c0));
                    }
                }
            }
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                float kf[8];
                unpack_bf16x8(raw[u], kf);
                const float score = group_score<G_MAX>(qr, kf, ln, tpk);
                if (writer && tg + u < n) sc[my_head * split_len + tg + u] = (read >> u) & 1u ? score : NEG_INF;
            }
            continue;
        }
        // Bit u: position tg + u is read (`read`), from its sealed copy (`sealed`). Bit masks,
        // not an int per position: fewer live registers (the exact path spilled them).
        unsigned int read = 0u, sealed = 0u;
        Where w0 = {nullptr, 0, 0};
        if (grouped && tg < n)
            w0 = where<SEALED, LATENT>(a, table, t0 + tg, own, block_size, bs_shift, 0, kvh, dim, sel);
        if (sparse && skip_step<UNROLL>(w0, writer, sc + my_head * split_len, tg, n)) continue;
        // Per-channel keys (kivi): a step's positions share a block, so its scales and zeros
        // are loaded once per step instead of once per position (16 loads each).
        constexpr bool CH = KF == FMT_CH4 || KF == FMT_CH2;
        float chs[CH ? 8 : 1], chz[CH ? 8 : 1];
        if constexpr (CH) {
            if (grouped && w0.kind == 2) ch_params<KF>(w0.base, block_size, dim, c0, chs, chz);
        }
        if constexpr (!LATENT) {
            // Every position's bytes first (`load_8`), then the decodes: the step's loads are
            // in flight together.
            Raw8 raw[UNROLL];
            load_step<KF, UNROLL>(a, table, w0, grouped, t0 + tg, n - tg, own, block_size, bs_shift,
                                  0, kvh, dim, sel, c0, raw, read, sealed);
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                float kf[8];
                if ((sealed >> u) & 1u) {
                    if constexpr (CH) {
                        if (grouped) {
                            decode_8_ch<KF>(raw[u], chs, chz, kf);
                        } else {
                            // Blocks whose size is not a multiple of UNROLL: this position's
                            // own block's parameters.
                            const Where w = where<SEALED, false>(a, table, t0 + tg + u, own, block_size, bs_shift, 0, kvh, dim, sel);
                            float s[8], z[8];
                            ch_params<KF>(w.base, block_size, dim, c0, s, z);
                            decode_8_ch<KF>(raw[u], s, z, kf);
                        }
                    } else {
                        decode_8<KF>(raw[u], kf);
                    }
                } else {
                    decode_8<FMT_BF16>(raw[u], kf);  // the exact copy, or zeros (not read)
                }
                const float score = group_score<G_MAX>(qr, kf, ln, tpk);
                if (writer && tg + u < n) sc[my_head * split_len + tg + u] = (read >> u) & 1u ? score : NEG_INF;
            }
            continue;
        }
        // mhc keys: rebuilt from the latent per position, then rotated across lanes.
        float kf[UNROLL][8];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
            for (int j = 0; j < 8; ++j) kf[u][j] = 0.0f;
            if (tg + u < n) {
                Where w = w0;
                if (grouped) w.off += u;
                else w = where<SEALED, LATENT>(a, table, t0 + tg + u, own, block_size, bs_shift, 0, kvh, dim, sel);
                if (w.kind) read |= 1u << u;
                if (w.kind == 2) sealed |= 1u << u;
                if (w.kind == 1) {
                    run_8<FMT_BF16>(w.base, block_size, dim, w.off, c0, kf[u]);
                } else if (w.kind == 2) {
#pragma unroll
                    for (int j = 0; j < 8; ++j)
                        kf[u][j] = latent_elem(a, w.base, kv_heads * dim, w.off, kvh * dim + c0 + j);
                }
            }
        }
        {
            // Rotate the reconstructions to their positions: pair i is (i, i + dim / 2), whose
            // other half lives in lane ln ^ (tpk / 2) of the same thread group.
            const int half = dim / 2;
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                float other[8];
#pragma unroll
                for (int j = 0; j < 8; ++j) other[j] = __shfl_xor_sync(0xffffffffu, kf[u][j], tpk / 2);
                if ((sealed >> u) & 1u) {
                    const int pos = t0 + tg + u;
#pragma unroll
                    for (int j = 0; j < 8; ++j) {
                        float cs, sn;
                        const int c = c0 + j;
                        rope_cs(a, c % half, pos, &cs, &sn);
                        kf[u][j] = c < half ? __fadd_rn(__fmul_rn(kf[u][j], cs), __fmul_rn(-other[j], sn))
                                            : __fadd_rn(__fmul_rn(kf[u][j], cs), __fmul_rn(other[j], sn));
                    }
                }
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const float score = group_score<G_MAX>(qr, kf[u], ln, tpk);
            if (writer && tg + u < n) sc[my_head * split_len + tg + u] = (read >> u) & 1u ? score : NEG_INF;
        }
    }
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int g = warp; g < G; g += THREADS / 32) {
        float m = NEG_INF;
        for (int t = lane; t < n; t += 32) m = fmaxf(m, sc[g * split_len + t]);
        m = warp_max(m);
        float l = 0.0f;
        for (int t = lane; t < n; t += 32) {
            // A split the window hides entirely has m = -inf: probabilities 0, sum 0.
            float p = m == NEG_INF ? 0.0f : expf(sc[g * split_len + t] - m);
            sc[g * split_len + t] = p;
            l += p;
        }
        l = warp_sum(l);
        if (lane == 0) { m_s[g] = m; l_s[g] = l; }
    }
    __syncthreads();

    // p · V, each thread accumulating its 8 dims of every query head of the group.
    float acc[G_MAX][8];
#pragma unroll
    for (int g = 0; g < G_MAX; ++g)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[g][j] = 0.0f;
    for (int tb = 0; tb < n; tb += kpp * UNROLL) {
        const int tg = tb + grp * UNROLL;
        if (tg >= n) continue;  // no shuffles below: threads may leave the step independently
        if constexpr (!SEALED) {
            uint4 raw[UNROLL];
            Where w0 = {nullptr, 0, 0};
            if (grouped) w0 = where<false, false>(a, table, t0 + tg, own, block_size, bs_shift, 1, kvh, dim, nullptr);
            if (sparse && w0.kind == 0) continue;  // nothing to read: probabilities 0
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                raw[u] = make_uint4(0u, 0u, 0u, 0u);
                if (tg + u < n) {
                    Where w = w0;
                    if (grouped) w.off += u;
                    else w = where<false, false>(a, table, t0 + tg + u, own, block_size, bs_shift, 1, kvh, dim, nullptr);
                    if (w.kind) raw[u] = ld_kv16(w.base + 2 * (w.off * dim + c0));
                }
            }
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                if (tg + u < n) {  // invisible positions have probability 0 and zero values
                    float vf[8];
                    unpack_bf16x8(raw[u], vf);
#pragma unroll
                    for (int g = 0; g < G_MAX; ++g) {
                        if (g < G) {
                            float pg = sc[g * split_len + tg + u];
#pragma unroll
                            for (int j = 0; j < 8; ++j) acc[g][j] += pg * vf[j];
                        }
                    }
                }
            }
            continue;
        }
        // As for the keys: every position's bytes first, then the decodes. Values are never
        // per-channel, and mhc keeps them in a plain run (bf16 for mhcbf16).
        constexpr int VR = VF == FMT_LAT ? FMT_BF16 : VF;
        static_assert(VR != FMT_CH4 && VR != FMT_CH2, "per-channel values");
        Raw8 raw[UNROLL];
        unsigned int read = 0u, sealed = 0u;  // as in the key pass
        Where w0 = {nullptr, 0, 0};
        if (grouped) w0 = where<SEALED, false>(a, table, t0 + tg, own, block_size, bs_shift, 1, kvh, dim, sel);
        if (sparse && w0.kind == 0) continue;
        load_step<VR, UNROLL>(a, table, w0, grouped, t0 + tg, n - tg, own, block_size, bs_shift, 1,
                              kvh, dim, sel, c0, raw, read, sealed);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            if ((read >> u) & 1u) {
                float vf[8];
                if ((sealed >> u) & 1u) decode_8<VR>(raw[u], vf);
                else decode_8<FMT_BF16>(raw[u], vf);
#pragma unroll
                for (int g = 0; g < G_MAX; ++g) {
                    if (g < G) {
                        float pg = sc[g * split_len + tg + u];
#pragma unroll
                        for (int j = 0; j < 8; ++j) acc[g][j] += pg * vf[j];
                    }
                }
            }
        }
    }
    __syncthreads();  // every thread is done with `sc` before `red` overwrites it
#pragma unroll
    for (int g = 0; g < G_MAX; ++g)
        if (g < G)
#pragma unroll
            for (int j = 0; j < 8; ++j) red[(grp * G + g) * dim + c0 + j] = acc[g][j];
    __syncthreads();
    for (int i = threadIdx.x; i < G * dim; i += THREADS) {
        float s = 0.0f;
        for (int k = 0; k < kpp; ++k) s += red[k * G * dim + i];  // fixed order: deterministic
        int g = i / dim, d = i % dim;
        size_t slot = ((size_t)e * heads + kvh * G + g) * max_splits + split;
        part_o[slot * dim + d] = s;
        if (d == 0) {
            part_ml[2 * slot] = m_s[g];
            part_ml[2 * slot + 1] = l_s[g];
        }
    }
    if (counters == nullptr) return;  // decode_reduce_f32 merges
    // The fused merge. Every thread makes its partials visible to the whole device before the
    // CTA counts itself done; the split that brings the count to `splits` merges, having
    // fenced again so that it sees what the others wrote before they counted, and sets the
    // counter back to 0 for the next launch (nothing else touches it in this one).
    __shared__ int last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned int* c = counters + (size_t)e * kv_heads + kvh;
        const unsigned int splits = (ctx + split_len - 1) / split_len;
        last = atomicAdd(c, 1u) == splits - 1;
        if (last) *c = 0;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    const int splits = ((int)ctx + split_len - 1) / split_len;
    for (int i = threadIdx.x; i < G * dim; i += THREADS) {
        const int g = i / dim, d = i % dim, h = kvh * G + g;
        const size_t base = ((size_t)e * heads + h) * max_splits;
        out[(size_t)row * heads * dim + h * dim + d] =
            merge_splits(part_o, part_ml, base, splits, dim, d);
    }
}

// Launch bounds: the exact path asks for 6 CTAs per SM (3 at G = 8), the register budget of the
// tuned bf16-only kernel; the sealed formats for one, which lets ptxas use the registers their
// decoding needs instead of spilling.
#define DECODE_BOUNDS(G, KF, VF) \
    __launch_bounds__(THREADS, (KF == FMT_BF16 && VF == FMT_BF16) ? (G == 8 ? 3 : 6) : 1)

// One extern "C" entry per (query group bound, format): paged_decode_g<G>_<fmt>. The comments
// are /* */ because a // comment would swallow the macro's line continuation.
#define DECODE_ENTRY(G, NAME, KF, VF)                                                              \
    extern "C" __global__ void DECODE_BOUNDS(G, KF, VF) paged_decode_g##G##_##NAME(                   \
        const float* qkv,           /* [rows, (heads + 2 * kv_heads) * dim] */                      \
        const unsigned int* meta,   /* [n, 3]: (qkv row, context length, offset in tables) */       \
        const unsigned int* tables, /* [sum of table lengths, 2]: (exact slot, sealed slot) */      \
        KvArgs kv,                                                                                  \
        float* part_o,              /* [n, heads, max_splits, dim] */                               \
        float* part_ml,             /* [n, heads, max_splits, 2]: (max, sum) */                     \
        float* out,                 /* [rows, heads * dim]; written when counters is set */         \
        unsigned int* counters,     /* [n, kv_heads], zero on entry and on exit; or null */         \
        int heads, int kv_heads, int dim, int block_size, int bs_shift, int split_len,              \
        int max_splits, float scale) {                                                              \
        paged_decode<KF, VF, G>(qkv, meta, tables, kv, part_o, part_ml, out, counters, heads,       \
                                kv_heads, dim, block_size, bs_shift, split_len, max_splits, scale); \
    }
#define DECODE_ENTRIES(NAME, KF, VF)  \
    DECODE_ENTRY(1, NAME, KF, VF)     \
    DECODE_ENTRY(2, NAME, KF, VF)     \
    DECODE_ENTRY(4, NAME, KF, VF)     \
    DECODE_ENTRY(8, NAME, KF, VF)

// Merges the splits of one (sequence, head): grid (n, heads), one thread per dim. Used when the
// decode launch had no counters.
#if KV_PART_0
extern "C" __global__ void decode_reduce_f32(const float* part_o,      // [n, heads, max_splits, dim]
                                             const float* part_ml,     // [n, heads, max_splits, 2]
                                             const unsigned int* meta, // [n, 3]
                                             float* out,               // [rows, heads * dim]
                                             int heads, int dim, int split_len, int max_splits) {
    const int e = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
    if (d >= dim) return;
    const unsigned int row = meta[3 * e], ctx = meta[3 * e + 1];
    const int splits = (ctx + split_len - 1) / split_len;
    const size_t base = ((size_t)e * heads + h) * max_splits;
    out[(size_t)row * heads * dim + h * dim + d] = merge_splits(part_o, part_ml, base, splits, dim, d);
}
#endif

KV_FORMATS(DECODE_ENTRIES)
