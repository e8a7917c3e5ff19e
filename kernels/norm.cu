// RMSNorm (Hugging Face LlamaRMSNorm in f32): out = w * (x * (1 / sqrt(mean(x^2) + eps))).
// One block per row.
#include "common.cuh"

template <typename T>
__device__ void rms_norm(const T* x,      // [rows, width]
                         const float* w,  // [width]
                         T* out,          // [rows, width]
                         int width, float eps) {
    __shared__ float scratch[32];
    const T* xr = x + (size_t)blockIdx.x * width;
    T* orow = out + (size_t)blockIdx.x * width;
    float s = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        float v = to_f32(xr[i]);
        s += v * v;
    }
    s = block_sum(s, scratch);
    float inv = 1.0f / sqrtf(s / (float)width + eps);
    for (int i = threadIdx.x; i < width; i += blockDim.x)
        orow[i] = from_f32<T>(w[i] * (to_f32(xr[i]) * inv));
}

extern "C" __global__ void rms_norm_f32(const float* x,  // [rows, width]
                                        const float* w,  // [width]
                                        float* out,      // [rows, width]
                                        int width, float eps) {
    rms_norm<float>(x, w, out, width, eps);
}
