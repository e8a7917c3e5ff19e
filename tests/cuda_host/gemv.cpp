// Runs kernels/gemv.cu on the host (tests/cuda_formats_host.rs), CTA by CTA with 128 real
// threads each (shim.h `launch`), with the grid and variant the backend launches:
//   gemv <in> <out>
// in (little-endian): u32 bound R (1, 2, 4 or 8; + 16: the fused gemv_silu_r<R>_bf16), rows, n,
// k; f32 x[rows * k]; u16 w[n * k] (bf16 bits; [2n, k] for gemv_silu: gate rows, then up rows)
// out: f32 [rows * n + 16]: the products, then 16 guard floats after them (NaN on entry: the
// kernel must leave them alone).
#include "shim.h"
#include "io.h"
#include <cstdint>
#include <cstdio>
#include <vector>
#include "gemv.cu"

int main(int argc, char** argv) {
    if (argc != 4 || std::strcmp(argv[1], "gemv") != 0) return 2;
    std::vector<unsigned char> in = slurp(argv[2]);
    if (in.empty()) return 3;
    Reader r{in.data()};
    const unsigned bound = r.get<uint32_t>(), rows = r.get<uint32_t>(), n = r.get<uint32_t>(),
                   k = r.get<uint32_t>();
    std::vector<float> x = r.vec<float>((size_t)rows * k);
    const bool silu = bound & 16;
    std::vector<bf16_t> w = r.vec<bf16_t>((size_t)n * k * (silu ? 2 : 1));
    std::vector<float> out((size_t)rows * n + 16, __uint_as_float(0x7fc00000u));
    const unsigned per_cta = GEMV_COLS / (silu ? 2 : 1) * (GEMV_THREADS / 32);
    const dim3h grid{(n + per_cta - 1) / per_cta, 1, 1};
    auto run = [&](auto f) {
        launch(grid, GEMV_THREADS, [&] { f(x.data(), w.data(), out.data(), (int)rows, (int)n, (int)k); });
    };
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
    FILE* f = std::fopen(argv[3], "wb");
    if (!f) return 4;
    std::fwrite(out.data(), 4, out.size(), f);
    std::fclose(f);
    return 0;
}
