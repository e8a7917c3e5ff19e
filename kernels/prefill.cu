// Causal GQA attention of prompt chunks over the paged KV store, on the bf16 tensor cores
// (mma.sync m16n8k16, f32 accumulate) with every operand that is not bf16 already split into
// high and low bf16 parts, so the result matches the CPU backend's f32 math to ~1e-5. K/V come
// from each block's current representation, under the rules attention.cu's header states (own
// block exact, others sealed when they have a sealed copy; windows with the sink block).
//
// - prefill_<fmt>: a CTA owns one KV head and a tile of up to 64 = rows * G queries of one
//   sequence (16 per warp), walks the keys in tiles of 32 through shared memory with an online
//   softmax in registers (FlashAttention-2's layout), and masks keys past each query's
//   position. A block sealed in this very step has both copies: the queries whose own block it
//   is read it exact in a second pass over that tile.
#include "common.cuh"
#include "kv_formats.cuh"

#define PREFILL_THREADS 128  // 4 warps (kernels.rs ATTN_THREADS)
#define KTILE 32             // keys per tile (one per lane)
#define PREFILL_Q 64         // queries per CTA (rows * G): 4 warps of 16 (32 above head_dim PD_MAX)
#define PD_MAX 128           // output channels one warp accumulates

// Whether a prompt query at position `qpos` reads key position `p` in pass `pass` of its tile:
// causal, inside its window, stored, and in pass 0 the key's preferred copy except the query's
// own block when that block has both copies (sealed in this step), which pass 1 reads exact.
__device__ __forceinline__ bool prefill_reads(const uint2* table, int p, int qpos, int block_size,
                                              int wb, int pass, bool sealed) {
    if (p > qpos) return false;
    const int own = qpos / block_size, bi = p / block_size;
    if (!sees(bi, own, wb)) return false;
    const uint2 e = table[bi];
    const bool exact_own = sealed && e.x != NO_SLOT && e.y != NO_SLOT && bi == own;
    return (pass == 0 ? !exact_own : exact_own) && (e.x != NO_SLOT || e.y != NO_SLOT);
}

// Splits x into bf16 hi + lo: hi is x rounded to bf16, lo the rest rounded, so hi + lo keeps
// ~16 significant bits. Products of split operands on the bf16 tensor cores then match f32
// math to ~1e-5 (the CPU backend is f32), at two or three products instead of one.
__device__ __forceinline__ void split_bf16(float x, bf16_t* hi, bf16_t* lo) {
    const bf16_t h = from_f32<bf16_t>(x);
    *hi = h;
    *lo = from_f32<bf16_t>(x - to_f32(h));
}

__device__ __forceinline__ unsigned int ld_pair(const bf16_t* p) {
    return *reinterpret_cast<const unsigned int*>(p);
}

// d += A·B with split operands: a_hi·b_hi + a_lo·b_hi, and a_hi·b_lo when B has a low part
// (BLO). `b_hi` / `b_lo` point at this lane's B fragment: a pair there and a pair 8 further.
template <bool BLO>
__device__ __forceinline__ void mma_split(float* d, const unsigned int* a_hi,
                                          const unsigned int* a_lo, const bf16_t* b_hi,
                                          const bf16_t* b_lo) {
    const unsigned int h[2] = {ld_pair(b_hi), ld_pair(b_hi + 8)};
    mma_bf16_16816(d, a_hi, h);
    mma_bf16_16816(d, a_lo, h);
    if (BLO) {
        const unsigned int l[2] = {ld_pair(b_lo), ld_pair(b_lo + 8)};
        mma_bf16_16816(d, a_hi, l);
    }
}

__device__ __forceinline__ unsigned int pack_pair(float a, float b) {
    return (unsigned int)from_f32<bf16_t>(a) | ((unsigned int)from_f32<bf16_t>(b) << 16);
}

// Prompt-chunk attention on the tensor cores (mma.sync m16n8k16, bf16 in, f32 accumulate), in
// the shape of FlashAttention-2: a CTA holds up to PREFILL_Q queries of one sequence and one KV
// head (rows × G, so K/V are read once per query group), each warp 16 of them; keys come in
// tiles of KTILE through shared memory, decoded from any format and split into bf16 hi + lo
// (exact keys and values are bf16 already: their low parts are zero and skipped); scores, the
// online softmax and the outputs stay in registers, and P goes from the score fragments
// straight into the A operand of P·V. Above head_dim PD_MAX two warps share a query tile, each
// accumulating half of the output channels (both compute the full scores).
template <int KF, int VF>
__device__ void prefill(const float* qkv, const unsigned int* tiles, const unsigned int* tables,
                        const KvArgs& a, float* out, int heads, int kv_heads, int dim,
                        int block_size, float scale) {
    constexpr bool SEALED = !(KF == FMT_BF16 && VF == FMT_BF16);
    constexpr bool KLO = KF != FMT_BF16, VLO = VF != FMT_BF16;  // decoded values need a low part
    extern __shared__ float smem[];
    const int kvh = blockIdx.x, tile = blockIdx.y;
    const int G = heads / kv_heads;
    const unsigned int row0 = tiles[4 * tile], nrows = tiles[4 * tile + 1];
    const unsigned int pos0 = tiles[4 * tile + 2];
    const uint2* table = reinterpret_cast<const uint2*>(tables + 2 * tiles[4 * tile + 3]);
    const int nq = nrows * G;
    const int last = pos0 + nrows - 1;
    const int wb = a.window_blocks;
    const int QS = dim + 8, KS = dim + 8, VS = KTILE + 8;  // padded rows: conflict-free pairs
    const int dsplit = dim > PD_MAX ? 2 : 1;
    const int qcap = PREFILL_Q / dsplit;           // queries per CTA
    bf16_t* qh = reinterpret_cast<bf16_t*>(smem);  // [qcap, QS] q · scale, high part
    bf16_t* ql = qh + qcap * QS;                   // and low part
    bf16_t* kh = ql + qcap * QS;                   // [KTILE, KS]
    bf16_t* kl = kh + KTILE * KS;
    bf16_t* vh = kl + KTILE * KS;                  // [dim, VS]: V transposed
    bf16_t* vl = vh + dim * VS;
    const int width = (heads + 2 * kv_heads) * dim;
    for (int i = threadIdx.x; i < qcap * dim; i += PREFILL_THREADS) {
        const int qi = i / dim, d = i % dim;
        float x = 0.0f;
        if (qi < nq) {
            const int r = qi / G, g = qi % G;
            x = qkv[(size_t)(row0 + r) * width + (kvh * G + g) * dim + d] * scale;
        }
        split_bf16(x, &qh[qi * QS + d], &ql[qi * QS + d]);
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int gq = lane >> 2, tq = lane & 3;  // fragment row and column pair of this lane
    const int q0 = (warp / dsplit) * 16;      // the warp's 16 queries
    const int dh = dim / dsplit, d0 = (warp % dsplit) * dh;  // and its output channels
    const bool active = q0 < nq;
    const int wlast = active ? (int)pos0 + min(q0 + 15, nq - 1) / G : -1;
    int qpos[2];  // positions of this lane's rows gq and gq + 8 (-1: no query)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int qi = q0 + gq + 8 * r;
        qpos[r] = qi < nq ? (int)pos0 + qi / G : -1;
    }
    float o[PD_MAX / 8][4];
#pragma unroll
    for (int n = 0; n < PD_MAX / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};  // l: this lane's columns only
    // Blocks with both copies (sealed in this step) that are some query's own block need a
    // second, exact pass over their tile.
    const int first_own = pos0 / block_size, last_own = last / block_size;
    for (int kt = 0; kt <= last; kt += KTILE) {
        // Under a window, a tile of blocks past the sink block and before the window of the
        // CTA's first query is seen by none of its queries (later queries see even less): skip
        // it unread. A long prompt chunk then costs O(window) per query, not O(context).
        if (wb != 0 && kt >= block_size && min(kt + KTILE - 1, last) / block_size + wb <= first_own)
            continue;
        int passes = 1;
        if (SEALED) {
            const int b1 = min(kt + KTILE - 1, last) / block_size;
            for (int bi = max(kt / block_size, first_own); bi <= min(b1, last_own); ++bi)
                if (table[bi].x != NO_SLOT && table[bi].y != NO_SLOT) passes = 2;
        }
        for (int pass = 0; pass < passes; ++pass) {
            __syncthreads();  // q ready, or the previous tile consumed
            if constexpr (!SEALED) {
                // Exact bf16 blocks only: 16-byte loads (8 channels of one key per thread; a
                // warp's lanes take the 32 keys, so the transposed value stores hit distinct
                // banks), keys stored as they come, values transposed.
                for (int i = threadIdx.x; i < KTILE * dim / 8; i += PREFILL_THREADS) {
                    const int j = i % KTILE, c = (i / KTILE) * 8, p = kt + j;
                    uint4 kq = make_uint4(0, 0, 0, 0), vq = make_uint4(0, 0, 0, 0);
                    if (p <= last) {
                        const int bi = p / block_size, off = p % block_size;
                        const unsigned int x = table[bi].x;
                        if (x != NO_SLOT) {
                            const size_t at = (size_t)off * dim + c;
                            kq = *reinterpret_cast<const uint4*>(exact_run(a, x, 0, kvh, block_size, dim) + at);
                            vq = *reinterpret_cast<const uint4*>(exact_run(a, x, 1, kvh, block_size, dim) + at);
                        }
                    }
                    *reinterpret_cast<uint4*>(kh + j * KS + c) = kq;
                    const unsigned int vw[4] = {vq.x, vq.y, vq.z, vq.w};
#pragma unroll
                    for (int u = 0; u < 4; ++u) {
                        vh[(c + 2 * u) * VS + j] = (bf16_t)(vw[u] & 0xffffu);
                        vh[(c + 2 * u + 1) * VS + j] = (bf16_t)(vw[u] >> 16);
                    }
                }
            } else {
                for (int i = threadIdx.x; i < KTILE * dim; i += PREFILL_THREADS) {
                    int j = i / dim, d = i % dim, p = kt + j;
                    float kv = 0.0f, vv = 0.0f;
                    if (p <= last) {
                        const int bi = p / block_size, off = p % block_size;
                        const uint2 e = table[bi];
                        if (SEALED && pass == 0 && e.y != NO_SLOT) {
                            if constexpr (KF == FMT_LAT)
                                kv = latent_key(a, sealed_layer(a, e.y), kv_heads, dim, kvh, off, d, bi * block_size);
                            else
                                kv = run_elem<KF == FMT_LAT ? FMT_BF16 : KF>(sealed_run(a, e.y, 0, kvh), block_size, dim, off, d);
                            vv = run_elem<VF>(sealed_run(a, e.y, 1, kvh), block_size, dim, off, d);
                        } else if (e.x != NO_SLOT && (pass == 0 || e.y != NO_SLOT)) {
                            kv = to_f32(exact_run(a, e.x, 0, kvh, block_size, dim)[off * dim + d]);
                            vv = to_f32(exact_run(a, e.x, 1, kvh, block_size, dim)[off * dim + d]);
                        }
                    }
                    if (KLO) split_bf16(kv, &kh[j * KS + d], &kl[j * KS + d]);
                    else kh[j * KS + d] = from_f32<bf16_t>(kv);
                    if (VLO) split_bf16(vv, &vh[d * VS + j], &vl[d * VS + j]);
                    else vh[d * VS + j] = from_f32<bf16_t>(vv);
                }
            }
            __syncthreads();
            if (!active || kt > wlast) continue;  // warp-uniform: the tile is in its future
            // Scores S = Q·Kᵀ for the warp's 16 queries × the tile's 32 keys: four 16×8 tiles.
            float s[4][4];
#pragma unroll
            for (int n = 0; n < 4; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
            for (int kc = 0; kc < dim; kc += 16) {
                const bf16_t* qa = qh + (q0 + gq) * QS + kc + 2 * tq;
                const bf16_t* qb = ql + (q0 + gq) * QS + kc + 2 * tq;
                const unsigned int ah[4] = {ld_pair(qa), ld_pair(qa + 8 * QS), ld_pair(qa + 8),
                                            ld_pair(qa + 8 * QS + 8)};
                const unsigned int al[4] = {ld_pair(qb), ld_pair(qb + 8 * QS), ld_pair(qb + 8),
                                            ld_pair(qb + 8 * QS + 8)};
#pragma unroll
                for (int n = 0; n < 4; ++n) {
                    const int at = (n * 8 + gq) * KS + kc + 2 * tq;
                    mma_split<KLO>(s[n], ah, al, kh + at, kl + at);
                }
            }
            // Mask; the online softmax per row (a row's 32 scores lie in the 4 lanes of a quad).
            float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
            for (int n = 0; n < 4; ++n)
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int r = c >> 1, p = kt + n * 8 + 2 * tq + (c & 1);
                    // Exact blocks and no window: every stored key up to the query is read.
                    const bool ok = qpos[r] >= 0 &&
                                    (!SEALED && wb == 0 ? p <= qpos[r]
                                                        : prefill_reads(table, p, qpos[r], block_size, wb, pass, SEALED));
                    s[n][c] = ok ? s[n][c] : NEG_INF;
                    mx[r] = fmaxf(mx[r], s[n][c]);
                }
            float alpha[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
                const float m_new = fmaxf(m[r], mx[r]);
                alpha[r] = m[r] == NEG_INF ? 0.0f : expf(m[r] - m_new);
                m[r] = m_new;
                l[r] *= alpha[r];
            }
#pragma unroll
            for (int n = 0; n < 4; ++n)
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int r = c >> 1;
                    const float pe = s[n][c] == NEG_INF ? 0.0f : expf(s[n][c] - m[r]);
                    s[n][c] = pe;
                    l[r] += pe;
                }
#pragma unroll
            for (int n = 0; n < PD_MAX / 8; ++n) {
                o[n][0] *= alpha[0];
                o[n][1] *= alpha[0];
                o[n][2] *= alpha[1];
                o[n][3] *= alpha[1];
            }
            // O += P·V: the score tiles of keys 16k..16k+15 are the A fragments of step k.
#pragma unroll
            for (int k = 0; k < 2; ++k) {
                const float* s0 = s[2 * k];
                const float* s1 = s[2 * k + 1];
                const unsigned int ph[4] = {pack_pair(s0[0], s0[1]), pack_pair(s0[2], s0[3]),
                                            pack_pair(s1[0], s1[1]), pack_pair(s1[2], s1[3])};
                unsigned int pl[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const float* sv = i < 2 ? s0 : s1;
                    const int c = 2 * (i & 1);
                    pl[i] = pack_pair(sv[c] - to_f32((bf16_t)(ph[i] & 0xffffu)),
                                      sv[c + 1] - to_f32((bf16_t)(ph[i] >> 16)));
                }
#pragma unroll
                for (int n = 0; n < PD_MAX / 8; ++n) {
                    if (n * 8 >= dh) break;
                    const int at = (d0 + n * 8 + gq) * VS + k * 16 + 2 * tq;
                    mma_split<VLO>(o[n], ph, pl, vh + at, vl + at);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
    if (!active) return;
#pragma unroll
    for (int n = 0; n < PD_MAX / 8; ++n) {
        if (n * 8 >= dh) break;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const int r = c >> 1, qi = q0 + gq + 8 * r;
            if (qpos[r] < 0) continue;
            const int row = qi / G, g = qi % G, d = d0 + n * 8 + 2 * tq + (c & 1);
            out[(size_t)(row0 + row) * heads * dim + (kvh * G + g) * dim + d] = o[n][c] / l[r];
        }
    }
}

#define PREFILL_ENTRY(NAME, KF, VF)                                                                \
    extern "C" __global__ void prefill_##NAME(                                                     \
        const float* qkv,           /* [rows, (heads + 2 * kv_heads) * dim] */                      \
        const unsigned int* tiles,  /* [tiles, 4]: (first qkv row, rows <= 64 / G, its position, table offset) */ \
        const unsigned int* tables, /* [sum of table lengths, 2]: (exact slot, sealed slot) */      \
        KvArgs kv,                                                                                  \
        float* out,                 /* [rows, heads * dim] */                                       \
        int heads, int kv_heads, int dim, int block_size, float scale) {                            \
        prefill<KF, VF>(qkv, tiles, tables, kv, out, heads, kv_heads, dim, block_size, scale);      \
    }

KV_FORMATS(PREFILL_ENTRY)
