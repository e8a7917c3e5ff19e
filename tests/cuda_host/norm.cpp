// Runs kernels/norm.cu on the host (tests/cuda_formats_host.rs), one CTA of 256 real threads per
// row (shim.h `launch`), as the backend launches it:
//   norm <in> <out>
// in (little-endian): u32 rows, width; f32 eps; f32 x[rows * width], y[rows * width], w[width]
// out: f32 [rows * width] x + y, then rms_norm_f32's norm of it (with the residual y), then
// rms_norm_f32 of x (no residual).
#include "shim.h"
#include "io.h"
#include <cstdint>
#include <cstdio>
#include <vector>
#include "norm.cu"

int main(int argc, char** argv) {
    if (argc != 4 || std::strcmp(argv[1], "norm") != 0) return 2;
    std::vector<unsigned char> in = slurp(argv[2]);
    if (in.empty()) return 3;
    Reader r{in.data()};
    const unsigned rows = r.get<uint32_t>(), width = r.get<uint32_t>();
    const float eps = r.get<float>();
    const size_t n = (size_t)rows * width;
    std::vector<float> x = r.vec<float>(n), y = r.vec<float>(n), w = r.vec<float>(width);
    std::vector<float> sum = x, fused(n + 1), plain(n + 1);
    launch(dim3h{rows, 1, 1}, 256, [&] {
        rms_norm_f32(sum.data(), y.data(), w.data(), fused.data(), (int)width, eps);
    });
    launch(dim3h{rows, 1, 1}, 256, [&] {
        rms_norm_f32(x.data(), nullptr, w.data(), plain.data(), (int)width, eps);
    });
    FILE* out = std::fopen(argv[3], "wb");
    if (!out) return 4;
    std::fwrite(sum.data(), 4, n, out);
    std::fwrite(fused.data(), 4, n, out);
    std::fwrite(plain.data(), 4, n, out);
    std::fclose(out);
    return 0;
}
