// Runs the device KV format code on the host (tests/cuda_formats_host.rs):
//   harness run <in> <out>     in:  u32 fmt, u32 bs, u32 dim, bs*dim bf16 (token-major run)
//                              out: the encoded run (`bytes` long), then bs*dim f32 decoded by
//                                   run_elem, then bs*dim f32 decoded by run_8
//   harness latent <in> <out>  in:  u32 kv_heads, dim, bs, rank, pos0; f32 scaling;
//                                   dim/2 f32 inv_freq; W f32 mean; rank*W f32 down; rank*W f32 up;
//                                   bs*W bf16 rotated keys ([t][head][dim])
//                              out: bs*rank bf16 latent (latent_encode_bf16), then
//                                   kv_heads*bs*dim f32 keys rebuilt by latent_key ([head][t][dim])
//   harness bounds <in> <out>  in:  u32 fmt (index in KV_FORMATS), kv_heads, dim, bs, rank, pos0,
//                                   k_run, v_run, b_run, lat_bytes; f32 scaling; dim/2 f32
//                                   inv_freq; W f32 mean; rank*W f32 up; u64 n; n bytes: one layer
//                                   of one sealed block
//                              out: those bytes after seal_bounds_<fmt> (quest's key bounds)
// The kernel sources come from the test's copy of kernels/ (tests/cuda_formats_host.rs `build`).
#include "shim.h"
#include "io.h"
#include <cstdint>
#include <cstdio>
#include <vector>
#include "kv_seal.cu"

float pre[1 << 20];  // latent_encode_bf16's `extern __shared__` scratch

template <int F>
static void run(const bf16_t* src, int bs, int dim, FILE* out) {
    int bytes = F == FMT_BF16 ? 2 * bs * dim
              : F == FMT_I8   ? bs * dim + 2 * bs
              : (F == FMT_TOK4 || F == FMT_TOK2)
                    ? packed_len(fmt_bits(F), bs * dim) + 4 * bs * (dim / group_of(dim))
                    : packed_len(fmt_bits(F), bs * dim) + 4 * dim;
    std::vector<unsigned char> dst(bytes + 64, 0xAB);  // dirty: every byte must be written
    // One CTA of 128 threads, as the backend launches `seal_<fmt>`: the passes meet at barriers.
    launch(dim3h{1, 1, 1}, 128, [&] { encode_run<F>(src, dst.data(), bs, dim); });
    std::fwrite(dst.data(), 1, bytes, out);
    std::vector<float> a(bs * dim), b(bs * dim);
    for (int t = 0; t < bs; ++t)
        for (int c = 0; c < dim; ++c) a[t * dim + c] = run_elem<F>(dst.data(), bs, dim, t, c);
    for (int t = 0; t < bs; ++t)
        for (int c0 = 0; c0 < dim; c0 += 8) run_8<F>(dst.data(), bs, dim, t, c0, &b[t * dim + c0]);
    std::fwrite(a.data(), 4, a.size(), out);
    std::fwrite(b.data(), 4, b.size(), out);
}

int main(int argc, char** argv) {
    if (argc != 4) return 2;
    std::vector<unsigned char> in = slurp(argv[2]);
    if (in.empty()) return 3;
    FILE* out = std::fopen(argv[3], "wb");
    if (!out) return 4;
    Reader r{in.data()};
    if (std::strcmp(argv[1], "run") == 0) {
        const int fmt = r.get<uint32_t>(), bs = r.get<uint32_t>(), dim = r.get<uint32_t>();
        std::vector<bf16_t> src = r.vec<bf16_t>((size_t)bs * dim);
        switch (fmt) {
            case FMT_BF16: run<FMT_BF16>(src.data(), bs, dim, out); break;
            case FMT_I8: run<FMT_I8>(src.data(), bs, dim, out); break;
            case FMT_TOK4: run<FMT_TOK4>(src.data(), bs, dim, out); break;
            case FMT_TOK2: run<FMT_TOK2>(src.data(), bs, dim, out); break;
            case FMT_CH4: run<FMT_CH4>(src.data(), bs, dim, out); break;
            case FMT_CH2: run<FMT_CH2>(src.data(), bs, dim, out); break;
            default: return 5;
        }
    } else if (std::strcmp(argv[1], "latent") == 0) {
        const int kvh = r.get<uint32_t>(), dim = r.get<uint32_t>(), bs = r.get<uint32_t>();
        const int rank = r.get<uint32_t>(), pos0 = r.get<uint32_t>();
        const float scaling = r.get<float>();
        const int w = kvh * dim;
        std::vector<float> inv_freq = r.vec<float>(dim / 2), mean = r.vec<float>(w);
        std::vector<float> down = r.vec<float>((size_t)rank * w), up = r.vec<float>((size_t)rank * w);
        std::vector<bf16_t> keys = r.vec<bf16_t>((size_t)bs * w);
        // One exact block (one layer: K then V planes of [head][slot][dim]) and one sealed block
        // (one layer: the latent only), each the only slot of its one chunk.
        std::vector<bf16_t> exact((size_t)2 * kvh * bs * dim, 0);
        for (int t = 0; t < bs; ++t)
            for (int h = 0; h < kvh; ++h)
                for (int c = 0; c < dim; ++c)
                    exact[((size_t)h * bs + t) * dim + c] = keys[(size_t)t * w + h * dim + c];
        std::vector<unsigned char> sealed((size_t)2 * bs * rank + 16, 0xAB);
        unsigned long long ex_chunks[1] = {(unsigned long long)(uintptr_t)exact.data()};
        unsigned long long se_chunks[1] = {(unsigned long long)(uintptr_t)sealed.data()};
        KvArgs a{};
        a.ex_chunks = ex_chunks;
        a.se_chunks = se_chunks;
        a.lat_mean = mean.data();
        a.lat_up = up.data();
        a.inv_freq = inv_freq.data();
        a.ex_block_bytes = exact.size() * 2;
        a.ex_k = 0;
        a.ex_kv = (unsigned long long)kvh * bs * dim * 2;
        a.se_block_bytes = sealed.size();
        a.rank = rank;
        a.rope_scaling = scaling;
        unsigned int seals[3] = {0, 0, (unsigned int)pos0};
        blockIdx = dim3h{};
        launch(dim3h{1, 1, 1}, 128, [&] { latent_encode_bf16(seals, a, down.data(), kvh, dim, bs); });
        std::fwrite(sealed.data(), 1, (size_t)2 * bs * rank, out);
        std::vector<float> rebuilt((size_t)kvh * bs * dim);
        for (int h = 0; h < kvh; ++h)
            for (int t = 0; t < bs; ++t)
                for (int c = 0; c < dim; ++c)
                    rebuilt[((size_t)h * bs + t) * dim + c] =
                        latent_key(a, sealed_layer(a, 0), kvh, dim, h, t, c, pos0);
        std::fwrite(rebuilt.data(), 4, rebuilt.size(), out);
    } else if (std::strcmp(argv[1], "bounds") == 0) {
        const int fmt = r.get<uint32_t>(), kvh = r.get<uint32_t>(), dim = r.get<uint32_t>();
        const int bs = r.get<uint32_t>(), rank = r.get<uint32_t>(), pos0 = r.get<uint32_t>();
        KvArgs a{};
        a.k_run = r.get<uint32_t>();
        a.v_run = r.get<uint32_t>();
        a.b_run = r.get<uint32_t>();
        a.lat_bytes = r.get<uint32_t>();
        a.rope_scaling = r.get<float>();
        a.rank = rank;
        const int w = kvh * dim;
        std::vector<float> inv_freq = r.vec<float>(dim / 2), mean = r.vec<float>(w);
        std::vector<float> up = r.vec<float>((size_t)rank * w);
        const uint64_t n = r.get<uint64_t>();
        std::vector<unsigned char> block = r.vec<unsigned char>(n);
        unsigned long long se_chunks[1] = {(unsigned long long)(uintptr_t)block.data()};
        a.se_chunks = se_chunks;
        a.se_block_bytes = n;
        a.lat_mean = mean.data();
        a.lat_up = up.data();
        a.inv_freq = inv_freq.data();
#define BOUNDS_FN(NAME, KF, VF) &seal_bounds_##NAME,
        void (*fns[])(const unsigned int*, KvArgs, int, int, int) = {KV_FORMATS(BOUNDS_FN)};
        if (fmt < 0 || fmt >= (int)(sizeof fns / sizeof fns[0])) return 5;
        unsigned int seals[3] = {NO_SLOT, 0, (unsigned int)pos0};
        launch(dim3h{1, (unsigned)kvh, 1}, 64, [&] { fns[fmt](seals, a, kvh, dim, bs); });
        std::fwrite(block.data(), 1, n, out);
    } else {
        return 6;
    }
    std::fclose(out);
    return 0;
}
