// Runs kernels/sampling.cu on the host (tests/cuda_formats_host.rs), one CTA of 256 real threads
// per row (shim.h `launch`), as the backend launches it:
//   argmax <in> <out>
//     in (little-endian): u32 rows, width; f32 x[rows * width]
//     out: u32 [rows], each row's greedy token (argmax_f32).
//   draw <in> <out>
//     in: u32 rows, width; f32 x[rows * width], inv_t[rows]; f64 u01[rows]
//     out: u32 [rows], each row's drawn token (draw_dense_f32); then f64 [rows, ceil(width / 256)],
//     the block sums it drew on (left as NaN for rows it answered by the argmax).
#include "shim.h"
#include "io.h"
#include <cstdint>
#include <cstdio>
#include <vector>
#include "sampling.cu"

int main(int argc, char** argv) {
    if (argc != 4) return 2;
    const bool draw = std::strcmp(argv[1], "draw") == 0;
    if (!draw && std::strcmp(argv[1], "argmax") != 0) return 2;
    std::vector<unsigned char> in = slurp(argv[2]);
    if (in.empty()) return 3;
    Reader r{in.data()};
    const unsigned rows = r.get<uint32_t>(), width = r.get<uint32_t>();
    std::vector<float> x = r.vec<float>((size_t)rows * width);
    std::vector<unsigned int> out(rows + 1, 0xdeadbeefu);
    std::vector<double> sums_out;
    if (draw) {
        std::vector<float> inv_t = r.vec<float>(rows);
        std::vector<double> u01 = r.vec<double>(rows);
        const size_t nblocks = (width + DRAW_BLOCK - 1) / DRAW_BLOCK;
        std::vector<float> chains(rows * nblocks * DRAW_LANES + 1);
        std::vector<double> sums(rows * nblocks + 1, __builtin_nan(""));
        launch(dim3h{rows, 1, 1}, DRAW_THREADS, [&] {
            draw_dense_f32(x.data(), inv_t.data(), u01.data(), chains.data(), sums.data(),
                           out.data(), (int)width);
        });
        sums_out.assign(sums.begin(), sums.end() - 1);
    } else {
        launch(dim3h{rows, 1, 1}, ARGMAX_THREADS, [&] { argmax_f32(x.data(), out.data(), (int)width); });
    }
    FILE* f = std::fopen(argv[3], "wb");
    if (!f) return 4;
    std::fwrite(out.data(), 4, rows, f);
    if (draw) std::fwrite(sums_out.data(), 8, sums_out.size(), f);
    std::fclose(f);
    return 0;
}
