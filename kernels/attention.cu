// Causal GQA attention over the paged KV store, f32 math on bf16 K/V blocks laid out per layer as
// [num_blocks][kv_heads][block_size][dim]. Position p of a sequence is at block
// tables[table_off + p / block_size], slot p % block_size.
//
// - paged_decode_g<G>_*: one query row per sequence (decode), for query groups of up to G heads. A CTA owns one KV head of one sequence
//   and one split of its context, so each K/V byte is read once for the whole query group
//   (G = heads / kv_heads query heads). TPK = dim / 8 threads read one key as 16-byte vectors.
//   Each split writes its unnormalised output with its max and sum; decode_reduce_f32 merges the
//   splits (the split count is chosen on the host so that the grid fills the GPU).
// - prefill_*: prompt chunks. A CTA owns one KV head and a tile of up to NQ = rows * G queries of
//   one sequence, walks the keys in tiles of 32 through shared memory with an online softmax
//   (one warp per query, one lane per key; outputs accumulate in shared memory), and masks keys
//   past each query's position.
#include "common.cuh"

#ifndef DECODE_UNROLL
#define DECODE_UNROLL 4  // keys (or values) each decode thread loads before using any
#endif
#define UNROLL DECODE_UNROLL
#define THREADS 128
#define KTILE 32      // keys per prefill tile (one per lane)
#define PREFILL_Q 32  // queries per prefill CTA (rows * G)

__device__ __forceinline__ void unpack8(uint4 raw, float* f) {
    unsigned int w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        f[2 * j] = __uint_as_float(w[j] << 16);
        f[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
    }
}

// Sums v[0..G_MAX) (one partial dot product per query head) over the tpk lanes of a thread
// group (tpk >= G_MAX) with a transposing butterfly: each of the first log2(G_MAX) steps sends
// half of the values still held and keeps the other half (the step's sizes are compile-time
// constants), then plain steps finish; G = 4 over 8 lanes takes 4 shuffles instead of 12.
// Afterwards v[0] holds the total of head `group_head<G_MAX>(ln, tpk)`.
template <int G_MAX>
__device__ __forceinline__ void group_reduce(float* v, int ln, int tpk) {
#pragma unroll
    for (int s = 0; (G_MAX >> (s + 1)) >= 1; ++s) {
        const int half = G_MAX >> (s + 1), o = tpk >> (s + 1);
        const bool upper = (ln & o) != 0;
#pragma unroll
        for (int i = 0; i < half; ++i) {
            float send = upper ? v[i] : v[i + half];
            float keep = upper ? v[i + half] : v[i];
            v[i] = keep + __shfl_xor_sync(0xffffffffu, send, o);
        }
    }
    for (int o = tpk / (2 * G_MAX); o > 0; o >>= 1) v[0] += __shfl_xor_sync(0xffffffffu, v[0], o);
}

template <int G_MAX>
__device__ __forceinline__ int group_head(int ln, int tpk) {
    int head = 0;
#pragma unroll
    for (int s = 0; (G_MAX >> (s + 1)) >= 1; ++s)
        if (ln & (tpk >> (s + 1))) head += G_MAX >> (s + 1);
    return head;
}

// Address of 8 elements (this thread's dims) of position p of KV head kvh. `bs_shift` is
// log2(block_size) when that is a power of two (shift and mask instead of a division), else -1.
template <typename KV>
__device__ __forceinline__ const KV* kv_at(const KV* cache, const unsigned int* table, int p,
                                           int block_size, int bs_shift, int kv_heads, int kvh,
                                           int dim, int ln) {
    const unsigned int blk = bs_shift >= 0 ? table[p >> bs_shift] : table[p / block_size];
    const int off = bs_shift >= 0 ? (p & (block_size - 1)) : p % block_size;
    return cache + (((size_t)blk * kv_heads + kvh) * block_size + off) * dim + ln * 8;
}

// G_MAX bounds the group at compile time (register arrays); the runtime group G is <= G_MAX.
// A thread group of tpk = dim / 8 threads handles UNROLL consecutive positions per step (one
// block-table lookup for all of them when block_size is a multiple of UNROLL), each thread
// loading 16 bytes of each before using any.
template <typename KV, int G_MAX>
__device__ void paged_decode(const float* qkv, const unsigned int* meta, const unsigned int* tables,
                             const KV* k_cache, const KV* v_cache, float* part_o, float* part_ml,
                             int heads, int kv_heads, int dim, int block_size, int bs_shift,
                             int split_len, int max_splits, float scale) {
    extern __shared__ float smem[];
    __shared__ float m_s[G_MAX], l_s[G_MAX];
    const int kvh = blockIdx.x, e = blockIdx.y, split = blockIdx.z;
    const int G = heads / kv_heads, tpk = dim / 8, kpp = THREADS / tpk;
    const unsigned int row = meta[3 * e], ctx = meta[3 * e + 1];
    const unsigned int* table = tables + meta[3 * e + 2];
    const int t0 = split * split_len;
    if (t0 >= (int)ctx) return;
    const int n = min((int)ctx - t0, split_len);
    const bool grouped = block_size % UNROLL == 0;  // t0 and every step start are multiples of UNROLL
    float* sc = smem;   // [G, split_len] scores, then probabilities
    float* red = smem;  // reused after the probabilities: [kpp, G, dim]
    const int width = (heads + 2 * kv_heads) * dim;
    const int grp = threadIdx.x / tpk, ln = threadIdx.x % tpk;
    // This thread only ever touches dims ln*8 .. ln*8+8: its slice of each query, pre-scaled,
    // lives in registers.
    float qr[G_MAX][8];
    const float* q = qkv + (size_t)row * width + (size_t)kvh * G * dim + ln * 8;
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
        uint4 raw[UNROLL];
        const KV* base = tg < n ? kv_at(k_cache, table, t0 + tg, block_size, bs_shift, kv_heads, kvh, dim, ln)
                                : k_cache;
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            raw[u] = make_uint4(0u, 0u, 0u, 0u);
            if (tg + u < n) {
                const KV* at = grouped ? base + u * dim
                                       : kv_at(k_cache, table, t0 + tg + u, block_size, bs_shift,
                                               kv_heads, kvh, dim, ln);
                raw[u] = *reinterpret_cast<const uint4*>(at);
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            float kf[8];
            unpack8(raw[u], kf);
            float v[G_MAX];
#pragma unroll
            for (int g = 0; g < G_MAX; ++g) {
                float d = 0.0f;
#pragma unroll
                for (int j = 0; j < 8; ++j) d += qr[g][j] * kf[j];
                v[g] = d;
            }
            group_reduce<G_MAX>(v, ln, tpk);
            if (writer && tg + u < n) sc[my_head * split_len + tg + u] = v[0];
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
            float p = expf(sc[g * split_len + t] - m);
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
        uint4 raw[UNROLL];
        const KV* base = kv_at(v_cache, table, t0 + tg, block_size, bs_shift, kv_heads, kvh, dim, ln);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            raw[u] = make_uint4(0u, 0u, 0u, 0u);
            if (tg + u < n) {
                const KV* at = grouped ? base + u * dim
                                       : kv_at(v_cache, table, t0 + tg + u, block_size, bs_shift,
                                               kv_heads, kvh, dim, ln);
                raw[u] = *reinterpret_cast<const uint4*>(at);
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            if (tg + u < n) {
                float vf[8];
                unpack8(raw[u], vf);
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
            for (int j = 0; j < 8; ++j) red[(grp * G + g) * dim + ln * 8 + j] = acc[g][j];
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
}

extern "C" __global__ void __launch_bounds__(THREADS) paged_decode_g1_bf16(
    const float* qkv,            // [rows, (heads + 2 * kv_heads) * dim]
    const unsigned int* meta,    // [n, 3]: (qkv row, context length, offset in tables)
    const unsigned int* tables,  // [sum of table lengths]
    const bf16_t* k_cache,       // [num_blocks, kv_heads, block_size, dim]
    const bf16_t* v_cache,       // [num_blocks, kv_heads, block_size, dim]
    float* part_o,               // [n, heads, max_splits, dim]
    float* part_ml,              // [n, heads, max_splits, 2]: (max, sum)
    int heads, int kv_heads, int dim, int block_size, int bs_shift, int split_len, int max_splits,
    float scale) {
    paged_decode<bf16_t, 1>(qkv, meta, tables, k_cache, v_cache, part_o, part_ml, heads,
                              kv_heads, dim, block_size, bs_shift, split_len, max_splits, scale);
}

extern "C" __global__ void __launch_bounds__(THREADS) paged_decode_g2_bf16(
    const float* qkv,            // [rows, (heads + 2 * kv_heads) * dim]
    const unsigned int* meta,    // [n, 3]: (qkv row, context length, offset in tables)
    const unsigned int* tables,  // [sum of table lengths]
    const bf16_t* k_cache,       // [num_blocks, kv_heads, block_size, dim]
    const bf16_t* v_cache,       // [num_blocks, kv_heads, block_size, dim]
    float* part_o,               // [n, heads, max_splits, dim]
    float* part_ml,              // [n, heads, max_splits, 2]: (max, sum)
    int heads, int kv_heads, int dim, int block_size, int bs_shift, int split_len, int max_splits,
    float scale) {
    paged_decode<bf16_t, 2>(qkv, meta, tables, k_cache, v_cache, part_o, part_ml, heads,
                              kv_heads, dim, block_size, bs_shift, split_len, max_splits, scale);
}

extern "C" __global__ void __launch_bounds__(THREADS) paged_decode_g4_bf16(
    const float* qkv,            // [rows, (heads + 2 * kv_heads) * dim]
    const unsigned int* meta,    // [n, 3]: (qkv row, context length, offset in tables)
    const unsigned int* tables,  // [sum of table lengths]
    const bf16_t* k_cache,       // [num_blocks, kv_heads, block_size, dim]
    const bf16_t* v_cache,       // [num_blocks, kv_heads, block_size, dim]
    float* part_o,               // [n, heads, max_splits, dim]
    float* part_ml,              // [n, heads, max_splits, 2]: (max, sum)
    int heads, int kv_heads, int dim, int block_size, int bs_shift, int split_len, int max_splits,
    float scale) {
    paged_decode<bf16_t, 4>(qkv, meta, tables, k_cache, v_cache, part_o, part_ml, heads,
                              kv_heads, dim, block_size, bs_shift, split_len, max_splits, scale);
}

extern "C" __global__ void __launch_bounds__(THREADS) paged_decode_g8_bf16(
    const float* qkv,            // [rows, (heads + 2 * kv_heads) * dim]
    const unsigned int* meta,    // [n, 3]: (qkv row, context length, offset in tables)
    const unsigned int* tables,  // [sum of table lengths]
    const bf16_t* k_cache,       // [num_blocks, kv_heads, block_size, dim]
    const bf16_t* v_cache,       // [num_blocks, kv_heads, block_size, dim]
    float* part_o,               // [n, heads, max_splits, dim]
    float* part_ml,              // [n, heads, max_splits, 2]: (max, sum)
    int heads, int kv_heads, int dim, int block_size, int bs_shift, int split_len, int max_splits,
    float scale) {
    paged_decode<bf16_t, 8>(qkv, meta, tables, k_cache, v_cache, part_o, part_ml, heads,
                              kv_heads, dim, block_size, bs_shift, split_len, max_splits, scale);
}

// Merges the splits of one (sequence, head): grid (n, heads), one thread per dim.
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
    float m = NEG_INF;
    for (int s = 0; s < splits; ++s) m = fmaxf(m, part_ml[2 * (base + s)]);
    float l = 0.0f, o = 0.0f;
    for (int s = 0; s < splits; ++s) {
        float w = expf(part_ml[2 * (base + s)] - m);
        l += w * part_ml[2 * (base + s) + 1];
        o += w * part_o[(base + s) * dim + d];
    }
    out[(size_t)row * heads * dim + h * dim + d] = o / l;
}

template <typename KV>
__device__ void prefill(const float* qkv, const unsigned int* tiles, const unsigned int* tables,
                        const KV* k_cache, const KV* v_cache, float* out, int heads, int kv_heads,
                        int dim, int block_size, float scale) {
    extern __shared__ float smem[];
    __shared__ float m_s[PREFILL_Q], l_s[PREFILL_Q];  // running max and sum per query
    const int kvh = blockIdx.x, tile = blockIdx.y;
    const int G = heads / kv_heads;
    const unsigned int row0 = tiles[4 * tile], nrows = tiles[4 * tile + 1];
    const unsigned int pos0 = tiles[4 * tile + 2];
    const unsigned int* table = tables + tiles[4 * tile + 3];
    const int nq = nrows * G;
    const int last = pos0 + nrows - 1;
    float* q_s = smem;                           // [PREFILL_Q, dim], pre-scaled
    float* o_s = q_s + PREFILL_Q * dim;          // [PREFILL_Q, dim] unnormalised outputs
    float* k_s = o_s + PREFILL_Q * dim;          // [KTILE, dim + 1] (padded: lane j reads row j)
    float* v_s = k_s + KTILE * (dim + 1);        // [KTILE, dim]
    const int width = (heads + 2 * kv_heads) * dim;
    for (int i = threadIdx.x; i < nq * dim; i += THREADS) {
        int qi = i / dim, d = i % dim, r = qi / G, g = qi % G;
        q_s[i] = qkv[(size_t)(row0 + r) * width + (kvh * G + g) * dim + d] * scale;
        o_s[i] = 0.0f;
    }
    if (threadIdx.x < PREFILL_Q) {
        m_s[threadIdx.x] = NEG_INF;
        l_s[threadIdx.x] = 0.0f;
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int kt = 0; kt <= last; kt += KTILE) {
        __syncthreads();  // q_s/o_s/m_s ready, or the previous tile consumed
        for (int i = threadIdx.x; i < KTILE * dim; i += THREADS) {
            int j = i / dim, d = i % dim, p = kt + j;
            float kv = 0.0f, vv = 0.0f;
            if (p <= last) {
                size_t at = (((size_t)table[p / block_size] * kv_heads + kvh) * block_size +
                             p % block_size) * dim + d;
                kv = to_f32(k_cache[at]);
                vv = to_f32(v_cache[at]);
            }
            k_s[j * (dim + 1) + d] = kv;
            v_s[j * dim + d] = vv;
        }
        __syncthreads();
        // One warp per query (warp-uniform loop), one lane per key of the tile.
        for (int qi = warp; qi < nq; qi += THREADS / 32) {
            int qpos = pos0 + qi / G, p = kt + lane;
            if (kt > qpos) continue;  // the whole tile is in this query's future
            float s = 0.0f;
            for (int d = 0; d < dim; ++d) s += q_s[qi * dim + d] * k_s[lane * (dim + 1) + d];
            bool valid = p <= qpos;
            s = valid ? s : NEG_INF;
            float m_old = m_s[qi];
            float m_new = fmaxf(m_old, warp_max(s));
            float pe = valid ? expf(s - m_new) : 0.0f;
            float alpha = expf(m_old - m_new);
            float psum = warp_sum(pe);
            for (int d0 = 0; d0 < dim; d0 += 32) {
                int d = d0 + lane;
                float acc = 0.0f;
#pragma unroll 8
                for (int j = 0; j < KTILE; ++j) {
                    float pj = __shfl_sync(0xffffffffu, pe, j);
                    if (d < dim) acc += pj * v_s[j * dim + d];
                }
                if (d < dim) o_s[qi * dim + d] = o_s[qi * dim + d] * alpha + acc;
            }
            __syncwarp();  // every lane has read m_s[qi] before lane 0 replaces it
            if (lane == 0) {
                m_s[qi] = m_new;
                l_s[qi] = l_s[qi] * alpha + psum;
            }
            __syncwarp();
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < nq * dim; i += THREADS) {
        int qi = i / dim, d = i % dim, r = qi / G, g = qi % G;
        out[(size_t)(row0 + r) * heads * dim + (kvh * G + g) * dim + d] = o_s[i] / l_s[qi];
    }
}

extern "C" __global__ void prefill_bf16(
    const float* qkv,            // [rows, (heads + 2 * kv_heads) * dim]
    const unsigned int* tiles,   // [tiles, 4]: (first qkv row, rows <= 32 / G, its position, table offset)
    const unsigned int* tables,  // [sum of table lengths]
    const bf16_t* k_cache,       // [num_blocks, kv_heads, block_size, dim]
    const bf16_t* v_cache,       // [num_blocks, kv_heads, block_size, dim]
    float* out,                  // [rows, heads * dim]
    int heads, int kv_heads, int dim, int block_size, float scale) {
    prefill<bf16_t>(qkv, tiles, tables, k_cache, v_cache, out, heads, kv_heads, dim, block_size,
                    scale);
}
