// Causal GQA attention over the paged KV store, f32 math on bf16 K/V blocks laid out per layer as
// [num_blocks][kv_heads][block_size][dim]. Position p of a sequence is at block
// tables[table_off + p / block_size], slot p % block_size.
//
// - paged_decode_*: one query row per sequence (decode). A CTA owns one KV head of one sequence
//   and one split of its context, so each K/V byte is read once for the whole query group
//   (G = heads / kv_heads query heads). TPK = dim / 8 threads read one key as 16-byte vectors.
//   Each split writes its unnormalised output with its max and sum; decode_reduce_f32 merges the
//   splits (the split count is chosen on the host so that the grid fills the GPU).
// - prefill_*: prompt chunks. A CTA owns one KV head and a tile of up to NQ = rows * G queries of
//   one sequence, walks the keys in tiles of 32 through shared memory with an online softmax
//   (one warp per query, one lane per key; outputs accumulate in shared memory), and masks keys
//   past each query's position.
#include "common.cuh"

#define MAXG 8        // query heads per KV head handled by the decode kernel
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

template <typename KV>
__device__ void paged_decode(const float* qkv, const unsigned int* meta, const unsigned int* tables,
                             const KV* k_cache, const KV* v_cache, float* part_o, float* part_ml,
                             int heads, int kv_heads, int dim, int block_size, int split_len,
                             int max_splits, float scale) {
    extern __shared__ float smem[];
    __shared__ float m_s[MAXG], l_s[MAXG];
    const int kvh = blockIdx.x, e = blockIdx.y, split = blockIdx.z;
    const int G = heads / kv_heads, tpk = dim / 8, kpp = THREADS / tpk;
    const unsigned int row = meta[3 * e], ctx = meta[3 * e + 1];
    const unsigned int* table = tables + meta[3 * e + 2];
    const int t0 = split * split_len;
    if (t0 >= (int)ctx) return;
    const int n = min((int)ctx - t0, split_len);
    float* q_s = smem;              // [G, dim], pre-scaled
    float* sc = smem + G * dim;     // [G, split_len] scores, then probabilities
    float* red = sc;                // reused after the scores: [kpp, G, dim]
    const int width = (heads + 2 * kv_heads) * dim;
    const float* q = qkv + (size_t)row * width + (size_t)kvh * G * dim;
    for (int i = threadIdx.x; i < G * dim; i += THREADS) q_s[i] = q[i] * scale;
    __syncthreads();

    const int grp = threadIdx.x / tpk, ln = threadIdx.x % tpk;
    for (int tb = 0; tb < n; tb += kpp) {
        int t = tb + grp;
        float kf[8];
        if (t < n) {
            int p = t0 + t;
            size_t at = (((size_t)table[p / block_size] * kv_heads + kvh) * block_size +
                         p % block_size) * dim + ln * 8;
            unpack8(*reinterpret_cast<const uint4*>(k_cache + at), kf);
        } else {
#pragma unroll
            for (int j = 0; j < 8; ++j) kf[j] = 0.0f;
        }
#pragma unroll
        for (int g = 0; g < MAXG; ++g) {
            if (g < G) {
                float d = 0.0f;
#pragma unroll
                for (int j = 0; j < 8; ++j) d += q_s[g * dim + ln * 8 + j] * kf[j];
                for (int o = tpk / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
                if (ln == 0 && t < n) sc[g * split_len + t] = d;
            }
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

    float acc[MAXG][8];
#pragma unroll
    for (int g = 0; g < MAXG; ++g)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[g][j] = 0.0f;
    for (int t = grp; t < n; t += kpp) {
        int p = t0 + t;
        size_t at = (((size_t)table[p / block_size] * kv_heads + kvh) * block_size +
                     p % block_size) * dim + ln * 8;
        float vf[8];
        unpack8(*reinterpret_cast<const uint4*>(v_cache + at), vf);
#pragma unroll
        for (int g = 0; g < MAXG; ++g) {
            if (g < G) {
                float pg = sc[g * split_len + t];
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[g][j] += pg * vf[j];
            }
        }
    }
    __syncthreads();  // every thread is done with `sc` before `red` overwrites it
#pragma unroll
    for (int g = 0; g < MAXG; ++g)
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

extern "C" __global__ void paged_decode_bf16(
    const float* qkv,            // [rows, (heads + 2 * kv_heads) * dim]
    const unsigned int* meta,    // [n, 3]: (qkv row, context length, offset in tables)
    const unsigned int* tables,  // [sum of table lengths]
    const bf16_t* k_cache,       // [num_blocks, kv_heads, block_size, dim]
    const bf16_t* v_cache,       // [num_blocks, kv_heads, block_size, dim]
    float* part_o,               // [n, heads, max_splits, dim]
    float* part_ml,              // [n, heads, max_splits, 2]: (max, sum)
    int heads, int kv_heads, int dim, int block_size, int split_len, int max_splits, float scale) {
    paged_decode<bf16_t>(qkv, meta, tables, k_cache, v_cache, part_o, part_ml, heads, kv_heads,
                         dim, block_size, split_len, max_splits, scale);
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
