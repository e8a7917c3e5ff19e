// Runs kernels/attention.cu's decode (split-K, then the reduction; the fused merge must give the
// same bits, checked here: exit 6) and prefill.cu's kernels, after
// quest.cu's block selection where the policy has quest, on the host
// (tests/cuda_formats_host.rs), CTA by CTA with real threads (shim.h `launch`):
//   attention <in> <out>
// in (little-endian): u32 fmt, heads, kv_heads, dim, block_size; i32 bs_shift; u32 split_len,
// max_splits, n_decode, n_tiles, rows, window_blocks, rank; f32 rope_scaling; u64 ex_block_bytes,
// ex_k, ex_kv, se_block_bytes, se_layer; u32 k_run, v_run, lat_bytes; u64 table_len, ex_bytes,
// se_bytes; then f32 qkv[rows * width], u32 meta[n_decode * 3], u32 tiles[n_tiles * 4],
// u32 tables[table_len], f32 inv_freq[dim / 2], f32 lat_mean[kv_heads * dim],
// f32 lat_up[rank * kv_heads * dim], the exact slab (one chunk), the sealed slab (one chunk);
// then u32 b_run, quest budget (0: no quest; else quest_select_f32 picks the decode rows'
// blocks first).
// out: f32 [rows, heads * dim]. Query groups of 4 (the g4 kernels).
#include "shim.h"
#include "io.h"
#include <cstdint>
#include <cstdio>
#include <vector>
#include "attention.cu"
#include "prefill.cu"
#include "quest.cu"

float smem[1 << 20];  // the kernels' `extern __shared__` memory

#define CASE(I, NAME)                  \
    case I:                            \
        decode = &paged_decode_g4_##NAME; \
        prefill = &prefill_##NAME;     \
        break;

int main(int argc, char** argv) {
    if (argc != 4 || std::strcmp(argv[1], "attention") != 0) return 2;
    std::vector<unsigned char> in = slurp(argv[2]);
    if (in.empty()) return 3;
    Reader r{in.data()};
    const int fmt = r.get<uint32_t>(), heads = r.get<uint32_t>(), kvh = r.get<uint32_t>();
    const int dim = r.get<uint32_t>(), bs = r.get<uint32_t>(), bs_shift = r.get<int32_t>();
    const int split_len = r.get<uint32_t>(), max_splits = r.get<uint32_t>();
    const int n = r.get<uint32_t>(), tiles_n = r.get<uint32_t>(), rows = r.get<uint32_t>();
    KvArgs a{};
    a.window_blocks = r.get<uint32_t>();
    a.rank = r.get<uint32_t>();
    a.rope_scaling = r.get<float>();
    a.ex_block_bytes = r.get<uint64_t>();
    a.ex_k = r.get<uint64_t>();
    a.ex_kv = r.get<uint64_t>();
    a.se_block_bytes = r.get<uint64_t>();
    a.se_layer = r.get<uint64_t>();
    a.k_run = r.get<uint32_t>();
    a.v_run = r.get<uint32_t>();
    a.lat_bytes = r.get<uint32_t>();
    const uint64_t table_len = r.get<uint64_t>(), ex_bytes = r.get<uint64_t>(), se_bytes = r.get<uint64_t>();
    const int width = (heads + 2 * kvh) * dim;
    std::vector<float> qkv = r.vec<float>((size_t)rows * width);
    std::vector<unsigned int> meta = r.vec<unsigned int>((size_t)n * 3);
    std::vector<unsigned int> tiles = r.vec<unsigned int>((size_t)tiles_n * 4);
    std::vector<unsigned int> tables = r.vec<unsigned int>(table_len);
    std::vector<float> inv_freq = r.vec<float>(dim / 2), mean = r.vec<float>((size_t)kvh * dim);
    std::vector<float> up = r.vec<float>((size_t)a.rank * kvh * dim);
    std::vector<unsigned char> ex = r.vec<unsigned char>(ex_bytes), se = r.vec<unsigned char>(se_bytes);
    // One chunk per slab holding every slot (shift 24).
    unsigned long long ex_chunks[1] = {(unsigned long long)(uintptr_t)ex.data()};
    unsigned long long se_chunks[1] = {(unsigned long long)(uintptr_t)se.data()};
    a.b_run = r.get<uint32_t>();
    const int budget = r.get<uint32_t>();
    a.ex_chunks = ex_chunks;
    a.se_chunks = se_chunks;
    a.ex_shift = a.se_shift = 24;
    a.inv_freq = inv_freq.data();
    a.lat_mean = mean.data();
    a.lat_up = up.data();

    decltype(&paged_decode_g4_bf16) decode = nullptr;
    decltype(&prefill_bf16) prefill = nullptr;
    switch (fmt) {
        CASE(0, bf16)
        CASE(1, int8)
        CASE(2, kivi4)
        CASE(3, kivi2)
        CASE(4, k8v4)
        CASE(5, mhcbf16)
        CASE(6, mhcint8)
        CASE(7, mhckivi4)
        CASE(8, bf16s)
        default: return 5;
    }
    const float scale = 1.0f / std::sqrt((float)dim);
    std::vector<float> out((size_t)rows * heads * dim, NAN);
    std::vector<unsigned int> keys, sel;
    if (n > 0 && budget > 0) {
        unsigned int max_ctx = 0;
        for (int e = 0; e < n; ++e) max_ctx = std::max(max_ctx, meta[3 * e + 1]);
        a.quest_words = ((max_ctx + bs - 1) / bs + 31) / 32;
        keys.assign((size_t)n * kvh * a.quest_words * 32, 0xABABABABu);
        sel.assign((size_t)n * kvh * a.quest_words, 0xABABABABu);
        launch(dim3h{(unsigned)kvh, (unsigned)n, 1}, QUEST_THREADS, [&] {
            quest_select_f32(qkv.data(), meta.data(), tables.data(), a, keys.data(), sel.data(),
                             heads, kvh, dim, bs, budget);
        });
        a.quest_sel = sel.data();
    }
    if (n > 0) {
        std::vector<float> part_o((size_t)n * heads * max_splits * dim, NAN);
        std::vector<float> part_ml((size_t)n * heads * max_splits * 2, NAN);
        launch(dim3h{(unsigned)kvh, (unsigned)n, (unsigned)max_splits}, THREADS, [&] {
            decode(qkv.data(), meta.data(), tables.data(), a, part_o.data(), part_ml.data(),
                   nullptr, nullptr, heads, kvh, dim, bs, bs_shift, split_len, max_splits, scale);
        });
        launch(dim3h{(unsigned)n, (unsigned)heads, 1}, (unsigned)((dim + 31) / 32 * 32), [&] {
            decode_reduce_f32(part_o.data(), part_ml.data(), meta.data(), out.data(), heads, dim,
                              split_len, max_splits);
        });
        // The fused merge (counters given), twice over the same counters: each launch must
        // leave them at zero and write the reduction's very bits.
        std::vector<unsigned int> counters((size_t)n * kvh, 0);
        for (int pass = 0; pass < 2; ++pass) {
            std::vector<float> fused(out.size(), NAN);
            std::fill(part_o.begin(), part_o.end(), NAN);
            std::fill(part_ml.begin(), part_ml.end(), NAN);
            launch(dim3h{(unsigned)kvh, (unsigned)n, (unsigned)max_splits}, THREADS, [&] {
                decode(qkv.data(), meta.data(), tables.data(), a, part_o.data(), part_ml.data(),
                       fused.data(), counters.data(), heads, kvh, dim, bs, bs_shift, split_len,
                       max_splits, scale);
            });
            for (unsigned int c : counters)
                if (c != 0) {
                    std::fprintf(stderr, "fused merge left a counter at %u\n", c);
                    return 6;
                }
            for (int e = 0; e < n; ++e) {
                const size_t at = (size_t)meta[3 * e] * heads * dim;
                if (std::memcmp(&fused[at], &out[at], 4 * (size_t)heads * dim) != 0) {
                    std::fprintf(stderr, "fused merge differs from decode_reduce_f32 (row %u)\n", meta[3 * e]);
                    return 6;
                }
            }
        }
    }
    if (tiles_n > 0) {
        launch(dim3h{(unsigned)kvh, (unsigned)tiles_n, 1}, THREADS, [&] {
            prefill(qkv.data(), tiles.data(), tables.data(), a, out.data(), heads, kvh, dim, bs, scale);
        });
    }
    FILE* f = std::fopen(argv[3], "wb");
    if (!f) return 4;
    std::fwrite(out.data(), 4, out.size(), f);
    std::fclose(f);
    return 0;
}
