// Runs kernels/gemv.cu on the host (tests/cuda_formats_host.rs), CTA by CTA with 128 real
// threads each (shim.h `launch`), with the grid and variant the backend launches:
//   gemv <in> <out>
// in (little-endian): u32 bound R (1, 2, 4 or 8; + 16: the fused gemv_silu_r<R>_bf16; + 32: the
// fused gemv_rope_r<R>_bf16; + 256 * slices: k split over that many warps, 1 when 0), rows, n, k; f32 x[rows * k]; u16 w[n * k] (bf16 bits; [2n, k] for
// gemv_silu: gate rows, then up rows). For gemv_rope then: u32 heads, kv_heads, dim, block_size,
// blocks; f32 scaling; u32 positions[rows], slots[rows]; f32 inv_freq[dim / 2].
// out: f32 [rows * n + 16]: the products (rotated, for gemv_rope), then 16 guard floats after them
// (NaN on entry: the kernel must leave them alone).
// gemv_rope also runs the two launches it replaces (gemv_r<R>_bf16, then rope_kv.cu's
// rope_store_bf16) over a second copy of the rows and of an exact slab of `blocks` blocks (one
// layer, one chunk): its rows and the slab's bytes must come out the same (else exit 6).
#include "shim.h"
#include "io.h"
#include <cstdint>
#include <cstdio>
#include <vector>
#include "gemv.cu"
#include "rope_kv.cu"

int main(int argc, char** argv) {
    if (argc != 4 || std::strcmp(argv[1], "gemv") != 0) return 2;
    std::vector<unsigned char> in = slurp(argv[2]);
    if (in.empty()) return 3;
    Reader r{in.data()};
    const unsigned code = r.get<uint32_t>(), rows = r.get<uint32_t>(), n = r.get<uint32_t>(),
                   k = r.get<uint32_t>();
    const unsigned bound = code & 0xff, slices = (code >> 8) ? (code >> 8) : 1;
    const bool silu = bound & 16, rope = bound & 32;
    std::vector<float> x = r.vec<float>((size_t)rows * k);
    std::vector<bf16_t> w = r.vec<bf16_t>((size_t)n * k * (silu ? 2 : 1));
    std::vector<float> out((size_t)rows * n + 16, __uint_as_float(0x7fc00000u));
    const unsigned per_cta = GEMV_COLS / (silu ? 2 : 1) * (GEMV_THREADS / 32 / slices);
    const dim3h grid{(n + per_cta - 1) / per_cta, 1, 1};
    auto run = [&](auto f) {
        launch(grid, GEMV_THREADS,
               [&] { f(x.data(), w.data(), out.data(), (int)rows, (int)n, (int)k, (int)slices); });
    };
    if (rope) {
        const int heads = r.get<uint32_t>(), kvh = r.get<uint32_t>(), dim = r.get<uint32_t>();
        const int bs = r.get<uint32_t>(), blocks = r.get<uint32_t>();
        const float scaling = r.get<float>();
        std::vector<unsigned int> pos = r.vec<unsigned int>(rows), slots = r.vec<unsigned int>(rows);
        std::vector<float> inv_freq = r.vec<float>(dim / 2);
        const size_t plane = (size_t)kvh * bs * dim * 2;  // one layer's K (or V) bytes per block
        std::vector<unsigned char> slab_fused(2 * plane * blocks, 0xAB), slab_two(slab_fused);
        auto args_for = [&](std::vector<unsigned char>& slab, unsigned long long* chunk) {
            *chunk = (unsigned long long)(uintptr_t)slab.data();
            KvArgs a{};
            a.ex_chunks = chunk;
            a.ex_shift = 24;
            a.ex_block_bytes = 2 * plane;
            a.ex_k = 0;
            a.ex_kv = plane;
            return a;
        };
        unsigned long long c1, c2;
        const KvArgs kv_fused = args_for(slab_fused, &c1), kv_two = args_for(slab_two, &c2);
        decltype(&gemv_rope_r1_bf16) fused = nullptr;
        decltype(&gemv_r1_bf16) plain = nullptr;
        switch (bound & 15) {
            case 1: fused = gemv_rope_r1_bf16, plain = gemv_r1_bf16; break;
            case 2: fused = gemv_rope_r2_bf16, plain = gemv_r2_bf16; break;
            case 4: fused = gemv_rope_r4_bf16, plain = gemv_r4_bf16; break;
            case 8: fused = gemv_rope_r8_bf16, plain = gemv_r8_bf16; break;
            default: return 5;
        }
        launch(grid, GEMV_THREADS, [&] {
            fused(x.data(), w.data(), out.data(), pos.data(), slots.data(), inv_freq.data(), scaling,
                  kv_fused, heads, kvh, dim, bs, (int)rows, (int)k);
        });
        std::vector<float> two(out.size(), __uint_as_float(0x7fc00000u));
        launch(grid, GEMV_THREADS, [&] { plain(x.data(), w.data(), two.data(), (int)rows, (int)n, (int)k, 1); });
        launch(dim3h{rows, 1, 1}, 128, [&] {
            rope_store_bf16(two.data(), pos.data(), slots.data(), inv_freq.data(), scaling, kv_two,
                            heads, kvh, dim, bs);
        });
        if (std::memcmp(out.data(), two.data(), 4 * out.size()) != 0) {
            std::fprintf(stderr, "gemv_rope: rows differ from gemv + rope_store\n");
            return 6;
        }
        if (slab_fused != slab_two) {
            std::fprintf(stderr, "gemv_rope: KV blocks differ from gemv + rope_store\n");
            return 6;
        }
    } else {
        switch (bound) {
            case 1: run(gemv_r1_bf16); break;
            case 2: run(gemv_r2_bf16); break;
            case 4: run(gemv_r4_bf16); break;
            case 8: run(gemv_r8_bf16); break;
            case 17: run(gemv_silu_r1_bf16); break;
            case 18: run(gemv_silu_r2_bf16); break;
            case 20: run(gemv_silu_r4_bf16); break;
            case 24: run(gemv_silu_r8_bf16); break;
            default: return 5;
        }
    }
    FILE* f = std::fopen(argv[3], "wb");
    if (!f) return 4;
    std::fwrite(out.data(), 4, out.size(), f);
    std::fclose(f);
    return 0;
}
