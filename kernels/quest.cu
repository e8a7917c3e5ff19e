// Quest (Tang et al. 2024, "Query-aware sparsity"): which sealed blocks a decode row reads.
// Each sealed block carries per-channel f16 bounds of its keys (kv_seal.cu `seal_bounds_<fmt>`);
// a query's upper bound of q.k over a block ranks it, and only the best blocks that fit the
// policy's token budget are read. The selection is one bit per logical block per (row, KV
// head), which the decode kernels of attention.cu consult in their block lookup (`where`).
#include "common.cuh"
#include "kv_formats.cuh"

#define QUEST_THREADS 256

// Rust's `f32::total_cmp` order as an unsigned key (a larger key is later in that order).
__device__ __forceinline__ unsigned int total_order(float x) {
    const unsigned int b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Whether quest ranks block bi of a row whose own block is `own`: visible, not the own block,
// with bounds (a sealed copy).
__device__ __forceinline__ bool quest_ranked(const uint2* table, int bi, int own, int wb) {
    return bi < own && sees(bi, own, wb) && table[bi].y != NO_SLOT;
}

// Quest's block selection for decode rows, the CPU's rule (attention_reads.rs
// `quest_selection`): grid (kv_heads, n), QUEST_THREADS threads; one CTA picks the logical blocks
// decode row e reads for KV head h. Read: the row's own block, every visible block without key
// bounds (no sealed copy: it cannot be ranked), and the budget / block_size - 1 visible sealed
// blocks with the highest upper bound of q.k, max over the head's query group of
// sum_c max(q_c lo_c, q_c hi_c) (summed in channel order, as the CPU does), ties to the lower
// block. When every visible block fits in the budget, every block is read. The launch's KvArgs
// locate the sealed slab (and its window); its quest_sel is not read here.
extern "C" __global__ void __launch_bounds__(QUEST_THREADS, 1) quest_select_f32(
    const float* qkv,            // [rows, (heads + 2 * kv_heads) * dim]
    const unsigned int* meta,    // [n, 3]: (qkv row, context length, offset in tables)
    const unsigned int* tables,  // [sum of table lengths, 2]: (exact slot, sealed slot)
    KvArgs kv,
    unsigned int* keys,          // [n, kv_heads, quest_words * 32]: scratch, a rank key per block
    unsigned int* sel,           // [n, kv_heads, quest_words]: out, bit b = block b is read
    int heads, int kv_heads, int dim, int block_size, int budget) {
    __shared__ float q_s[8 * 256];  // the group's queries (G <= 8, dim <= 256)
    __shared__ unsigned int hist[256];
    __shared__ unsigned int s_cands, s_pick, s_need, s_ties, s_tie_last;
    const int h = blockIdx.x, e = blockIdx.y, tid = threadIdx.x;
    const int G = heads / kv_heads, width = (heads + 2 * kv_heads) * dim, wb = kv.window_blocks;
    const unsigned int row = meta[3 * e], ctx = meta[3 * e + 1];
    const uint2* table = reinterpret_cast<const uint2*>(tables + 2 * meta[3 * e + 2]);
    const int own = ((int)ctx - 1) / block_size;
    const size_t cta = (size_t)e * kv_heads + h;
    unsigned int* key = keys + cta * kv.quest_words * 32;
    unsigned int* out = sel + cta * kv.quest_words;
    // Visible: every block up to the own one, or the sink block and the last wb up to it.
    const int first = wb == 0 ? 0 : max(0, own - wb + 1);
    const int visible = own - first + 1 + (first > 0 ? 1 : 0);
    const int k = budget / block_size - 1;  // ranked blocks that fit besides the own one
    if ((long long)visible * block_size <= budget) {
        for (int w = tid; w < (int)kv.quest_words; w += blockDim.x) out[w] = 0xffffffffu;
        return;
    }
    const float* q = qkv + (size_t)row * width + (size_t)h * G * dim;
    for (int i = tid; i < G * dim; i += blockDim.x) q_s[i] = q[i];
    if (tid == 0) s_cands = 0;
    __syncthreads();
    for (int bi = tid; bi < own; bi += blockDim.x) {
        if (!quest_ranked(table, bi, own, wb)) continue;
        const unsigned char* b = key_bounds(kv, table[bi].y, h);
        float best = NEG_INF;
        for (int g = 0; g < G; ++g) {
            float ub = -0.0f;  // Rust's f32 `sum` starts at -0.0
            for (int c = 0; c < dim; ++c) {
                const float qc = q_s[g * dim + c];
                ub = __fadd_rn(ub, fmaxf(__fmul_rn(qc, ld_f16(b + 2 * c)),
                                         __fmul_rn(qc, ld_f16(b + 2 * (dim + c)))));
            }
            best = fmaxf(best, ub);
        }
        key[bi] = total_order(best);
        atomicAdd(&s_cands, 1u);
    }
    __syncthreads();
    // The k-th largest key T by radix selection (8 bits at a time from the top), and how many
    // of the keys equal to T are taken (the lowest blocks first).
    const bool take_all = (int)s_cands <= k;
    unsigned int pick = 0, need = k > 0 ? (unsigned int)k : 0u, tie_last = 0xffffffffu;
    if (!take_all && need > 0) {
        unsigned int mask = 0;
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int i = tid; i < 256; i += blockDim.x) hist[i] = 0;
            __syncthreads();
            for (int bi = tid; bi < own; bi += blockDim.x)
                if (quest_ranked(table, bi, own, wb) && (key[bi] & mask) == pick)
                    atomicAdd(&hist[(key[bi] >> shift) & 255u], 1u);
            __syncthreads();
            if (tid == 0) {
                unsigned int above = 0;
                int d = 255;
                for (; d > 0; --d) {
                    if (above + hist[d] >= need) break;
                    above += hist[d];
                }
                s_pick = pick | ((unsigned int)d << shift);
                s_need = need - above;
                s_ties = hist[d];
            }
            __syncthreads();
            pick = s_pick;
            need = s_need;
            mask |= 0xffu << shift;
        }
        // Ties at T beyond those taken: keep the lowest blocks (one thread; ties are rare).
        if (tid == 0) {
            unsigned int last = 0xffffffffu;
            if (s_ties > need) {
                unsigned int seen = 0;
                for (int bi = 0; bi < own && seen < need; ++bi)
                    if (quest_ranked(table, bi, own, wb) && key[bi] == pick) {
                        ++seen;
                        last = (unsigned int)bi;
                    }
            }
            s_tie_last = last;
        }
        __syncthreads();
        tie_last = s_tie_last;
    }
    for (int w = tid; w < (int)kv.quest_words; w += blockDim.x) {
        unsigned int bits = 0;
        for (int j = 0; j < 32; ++j) {
            const int bi = w * 32 + j;
            bool read = bi == own || (bi < own && sees(bi, own, wb) && table[bi].y == NO_SLOT);
            if (!read && quest_ranked(table, bi, own, wb)) {
                if (take_all) read = true;
                else if (k > 0) {
                    const unsigned int kb = key[bi];
                    read = kb > pick || (kb == pick && (unsigned int)bi <= tie_last);
                }
            }
            if (read) bits |= 1u << j;
        }
        out[w] = bits;
    }
}
