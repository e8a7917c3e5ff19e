// The steps of the decode attention kernels (attention.cu), apart from the kernel so that it
// reads as its passes: the thread group's score sum (`group_reduce`, `group_score`), where a
// position's K or V is (`where`), the warp's skip of an unread step (`skip_step`), the sealed
// kernels' loads of a step (`load_step`) and the merge of context splits (`merge_splits`).
// Pasted by the Rust loader in place of `#include "decode_steps.cuh"` (after common.cuh and
// kv_formats.cuh, whose helpers it uses); host builds include it from the kernels folder.
#pragma once

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

// One position's score for this lane's head: the thread's 8 channels of the key `kf` against
// each query of the group (`qr`, pre-scaled), summed over the thread group by `group_reduce`.
template <int G_MAX>
__device__ __forceinline__ float group_score(const float (&qr)[G_MAX][8], const float* kf, int ln,
                                             int tpk) {
    float v[G_MAX];
#pragma unroll
    for (int g = 0; g < G_MAX; ++g) {
        float d = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; ++j) d += qr[g][j] * kf[j];
        v[g] = d;
    }
    group_reduce<G_MAX>(v, ln, tpk);
    return v[0];
}

template <int G_MAX>
__device__ __forceinline__ int group_head(int ln, int tpk) {
    int head = 0;
#pragma unroll
    for (int s = 0; (G_MAX >> (s + 1)) >= 1; ++s)
        if (ln & (tpk >> (s + 1))) head += G_MAX >> (s + 1);
    return head;
}


// Where a decode thread group reads K (v = 0) or V (v = 1) at position p: `kind` 0 (nothing:
// not visible or not stored), 1 (exact: `base` is the head's exact run) or 2 (sealed: `base` is
// the head's run, or the layer's latent for mhc keys); `off` is p's slot in its block.
struct Where {
    const unsigned char* base;
    int off, kind;
};

// `sel`: the blocks quest lets this (row, head) read (one bit per logical block), or null.
template <bool SEALED, bool LATENT>
__device__ __forceinline__ Where where(const KvArgs& a, const unsigned int* table, int p, int own,
                                       int block_size, int bs_shift, int v, int kvh, int dim,
                                       const unsigned int* sel) {
    const int bi = bs_shift >= 0 ? p >> bs_shift : p / block_size;
    Where w;
    w.off = bs_shift >= 0 ? (p & (block_size - 1)) : p % block_size;
    w.kind = 0;
    w.base = nullptr;
    if (!sees(bi, own, a.window_blocks)) return w;
    if (SEALED && sel && !((sel[bi >> 5] >> (bi & 31)) & 1u)) return w;
    const uint2 e = reinterpret_cast<const uint2*>(table)[bi];
    if (SEALED && e.y != NO_SLOT && bi != own) {
        w.kind = 2;
        w.base = LATENT ? sealed_layer(a, e.y) : sealed_run(a, e.y, v, kvh);
    } else if (e.x != NO_SLOT) {
        w.kind = 1;
        w.base = (const unsigned char*)exact_run(a, e.x, v, kvh, block_size, dim);
    }
    return w;
}

// Whether a decode step may be skipped by the whole warp: true when no thread group of the warp
// reads any of its positions (in a grouped step all UNROLL positions of a thread group share one
// block, so `w0` decides for them all); the writers then score their positions -inf. Called by
// every thread of the warp (a warp vote).
template <int UNROLL>
__device__ __forceinline__ bool skip_step(const Where& w0, bool writer, float* sc_head, int tg,
                                          int n) {
    if (__any_sync(0xffffffffu, w0.kind != 0)) return false;
    if (writer)
        for (int u = 0; u < UNROLL && tg + u < n; ++u) sc_head[tg + u] = NEG_INF;
    return true;
}

// The sealed kernels' loads of one step: positions p0 .. p0 + UNROLL (the first `left` of them
// in the split) of K (v = 0) or V (v = 1), each as raw words (`load_8`): the exact copy as a
// bf16 row, the sealed one in format F. Bit u of `read` is set when position p0 + u is read, of
// `sealed` when from its sealed copy. `w0` is the step's first position when `grouped` (the
// step within one block), else each position looks its block up. No decoding here: the step's
// loads are all issued before any is used.
template <int F, int UNROLL>
__device__ __forceinline__ void load_step(const KvArgs& a, const unsigned int* table, Where w0,
                                          bool grouped, int p0, int left, int own, int block_size,
                                          int bs_shift, int v, int kvh, int dim,
                                          const unsigned int* sel, int c0, Raw8* raw,
                                          unsigned int& read, unsigned int& sealed) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        raw[u] = raw8_zero();
        if (u < left) {
            Where w = w0;
            if (grouped) w.off += u;
            else w = where<true, false>(a, table, p0 + u, own, block_size, bs_shift, v, kvh, dim, sel);
            if (w.kind) read |= 1u << u;
            if (w.kind == 1) {
                raw[u] = load_8<FMT_BF16>(w.base, block_size, dim, w.off, c0);
            } else if (w.kind == 2) {
                sealed |= 1u << u;
                raw[u] = load_8<F>(w.base, block_size, dim, w.off, c0);
            }
        }
    }
}

// One output channel `d` of one (sequence, query head) from its `splits` partial results at
// `base` (in units of splits): rescaled to the largest max, summed in split order.
// `__ldcg` reads through L2: under the fused merge the partials were written by other CTAs
// (possibly on other SMs) during this launch, so no stale L1 line may serve them.
__device__ __forceinline__ float merge_splits(const float* part_o, const float* part_ml,
                                              size_t base, int splits, int dim, int d) {
    float m = NEG_INF;
    for (int s = 0; s < splits; ++s) m = fmaxf(m, __ldcg(part_ml + 2 * (base + s)));
    float l = 0.0f, o = 0.0f;
    for (int s = 0; s < splits; ++s) {
        const float ms = __ldcg(part_ml + 2 * (base + s));
        const float w = ms == NEG_INF ? 0.0f : expf(ms - m);  // a split with nothing visible
        l += w * __ldcg(part_ml + 2 * (base + s) + 1);
        o += w * __ldcg(part_o + (base + s) * dim + d);
    }
    return o / l;
}
