// RMSNorm (Hugging Face LlamaRMSNorm in f32): out = w * (x * (1 / sqrt(mean(x^2) + eps))).
// One block per row. With a residual y it first adds it (x += y, written back), so the forward
// pass reads and writes the hidden state once per sublayer instead of three times.
#include "common.cuh"

// `y` null: plain norm of x; else x += y first (each thread rereads only what it wrote).
template <typename T>
__device__ void rms_norm(T* x,            // [rows, width]
                         const T* y,      // [rows, width] or null
                         const float* w,  // [width]
                         T* out,          // [rows, width]
                         int width, float eps) {
    __shared__ float scratch[32];
    T* xr = x + (size_t)blockIdx.x * width;
    T* orow = out + (size_t)blockIdx.x * width;
    float s = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        float v = to_f32(xr[i]);
        if (y) {
            v = __fadd_rn(v, to_f32(y[(size_t)blockIdx.x * width + i]));
            xr[i] = from_f32<T>(v);
        }
        s += v * v;
    }
    s = block_sum(s, scratch);
    float inv = 1.0f / sqrtf(s / (float)width + eps);
    for (int i = threadIdx.x; i < width; i += blockDim.x)
        orow[i] = from_f32<T>(w[i] * (to_f32(xr[i]) * inv));
}

extern "C" __global__ void rms_norm_f32(float* x,        // [rows, width]: x + y on return
                                        const float* y,  // [rows, width], or null: no residual
                                        const float* w,  // [width]
                                        float* out,      // [rows, width]
                                        int width, float eps) {
    rms_norm<float>(x, y, w, out, width, eps);
}
