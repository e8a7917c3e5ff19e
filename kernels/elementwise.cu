// Element-wise ops of the forward pass: residual add, bias add, SiLU*up, row gather, embedding
// gather, and the split of f32 activations into bf16 hi + lo halves for the cuBLAS products.
// Grid-stride loops; any grid size is correct.
#include "common.cuh"

#define GRID_STRIDE(i, n) \
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)

template <typename T>
__device__ void add(T* x, const T* y, size_t n) {
    GRID_STRIDE(i, n) x[i] = from_f32<T>(to_f32(x[i]) + to_f32(y[i]));
}
extern "C" __global__ void add_f32(float* x,        // [n]
                                   const float* y,  // [n]
                                   size_t n) {
    add<float>(x, y, n);
}

template <typename T>
__device__ void add_bias(T* x, const float* b, size_t rows, int width) {
    GRID_STRIDE(i, rows * width) x[i] = from_f32<T>(to_f32(x[i]) + b[i % width]);
}
extern "C" __global__ void add_bias_f32(float* x,        // [rows, width]
                                        const float* b,  // [width]
                                        size_t rows, int width) {
    add_bias<float>(x, b, rows, width);
}

// out[r, j] = silu(gu[r, j]) * gu[r, inter + j], silu(g) = g / (1 + exp(-g)).
template <typename T>
__device__ void silu_mul(const T* gu, T* out, size_t rows, int inter) {
    GRID_STRIDE(i, rows * inter) {
        size_t r = i / inter, j = i % inter;
        float g = to_f32(gu[r * 2 * inter + j]);
        float u = to_f32(gu[r * 2 * inter + inter + j]);
        out[i] = from_f32<T>(g / (1.0f + expf(-g)) * u);
    }
}
extern "C" __global__ void silu_mul_f32(const float* gu,  // [rows, 2 * inter]
                                        float* out,       // [rows, inter]
                                        size_t rows, int inter) {
    silu_mul<float>(gu, out, rows, inter);
}

template <typename T>
__device__ void gather_rows(const T* x, const unsigned int* rows, T* out, size_t n, int width) {
    GRID_STRIDE(i, n * width) out[i] = x[(size_t)rows[i / width] * width + i % width];
}
extern "C" __global__ void gather_rows_f32(const float* x,            // [any, width]
                                           const unsigned int* rows,  // [n]
                                           float* out,                // [n, width]
                                           size_t n, int width) {
    gather_rows<float>(x, rows, out, n, width);
}

// Embedding rows of a 16-bit table widened to f32; an id past the table gives a zero row (the
// model validates ids first, as on the CPU backend).
template <typename W>
__device__ void embed(const W* table, const unsigned int* ids, float* out, size_t n, int width,
                      unsigned int vocab) {
    GRID_STRIDE(i, n * width) {
        unsigned int id = ids[i / width];
        out[i] = id < vocab ? to_f32(table[(size_t)id * width + i % width]) : 0.0f;
    }
}
extern "C" __global__ void embed_bf16(const bf16_t* table,       // [vocab, width]
                                      const unsigned int* ids,   // [n]
                                      float* out,                // [n, width]
                                      size_t n, int width, unsigned int vocab) {
    embed<bf16_t>(table, ids, out, n, width, vocab);
}

// x = hi + lo with hi = bf16(x), lo = bf16(x - hi): 16 significant bits, so a bf16 product of
// [hi; lo] with bf16 weights, summed, matches an f32-activation product to ~1e-5 relative.
template <typename L>
__device__ void split(const float* x, L* hilo, size_t n) {
    GRID_STRIDE(i, n) {
        float v = x[i];
        L hi = from_f32<L>(v);
        hilo[i] = hi;
        hilo[n + i] = from_f32<L>(v - to_f32(hi));
    }
}
extern "C" __global__ void split_bf16(const float* x,  // [n]
                                      bf16_t* hilo,    // [2, n]: hi then lo
                                      size_t n) {
    split<bf16_t>(x, hilo, n);
}

// out[i] = y[i] + y[n + i]: folds the hi and lo halves of a split product.
template <typename T>
__device__ void sum_halves(const T* y, T* out, size_t n) {
    GRID_STRIDE(i, n) out[i] = from_f32<T>(to_f32(y[i]) + to_f32(y[n + i]));
}
extern "C" __global__ void sum_halves_f32(const float* y,  // [2, n]
                                          float* out,      // [n]
                                          size_t n) {
    sum_halves<float>(y, out, n);
}

// f32 -> 16-bit storage (used for the plain, unsplit product path and by tests).
template <typename L>
__device__ void convert(const float* x, L* out, size_t n) {
    GRID_STRIDE(i, n) out[i] = from_f32<L>(x[i]);
}
extern "C" __global__ void convert_bf16(const float* x,  // [n]
                                        bf16_t* out,     // [n]
                                        size_t n) {
    convert<bf16_t>(x, out, n);
}
