// Runs kernels/sampling.cu's argmax_f32 on the host (tests/cuda_formats_host.rs), one CTA of
// 256 real threads per row (shim.h `launch`), as the backend launches it:
//   argmax <in> <out>
// in (little-endian): u32 rows, width; f32 x[rows * width]
// out: u32 [rows], each row's greedy token.
#include "shim.h"
#include "io.h"
#include <cstdint>
#include <cstdio>
#include <vector>
#include "sampling.cu"

int main(int argc, char** argv) {
    if (argc != 4 || std::strcmp(argv[1], "argmax") != 0) return 2;
    std::vector<unsigned char> in = slurp(argv[2]);
    if (in.empty()) return 3;
    Reader r{in.data()};
    const unsigned rows = r.get<uint32_t>(), width = r.get<uint32_t>();
    std::vector<float> x = r.vec<float>((size_t)rows * width);
    std::vector<unsigned int> out(rows + 1, 0xdeadbeefu);
    launch(dim3h{rows, 1, 1}, 256, [&] { argmax_f32(x.data(), out.data(), (int)width); });
    FILE* f = std::fopen(argv[3], "wb");
    if (!f) return 4;
    std::fwrite(out.data(), 4, rows, f);
    std::fclose(f);
    return 0;
}
