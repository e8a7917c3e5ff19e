// RoPE on the q and k heads of fused [q | k | v] rows (Hugging Face rotate_half: pair i is
// (x[i], x[i + D/2])), then the rotated k and the v written into their blocks' exact (bf16)
// copies in the exact slab (kv_formats.cuh).
// One block per row; the rotation is common.cuh's rope_pair. (For decode steps of a few rows,
// gemv.cu's gemv_rope_r<R>_bf16 does this inside the QKV product instead.)
#include "common.cuh"
#include "kv_formats.cuh"

__device__ void rope_store(float* qkv, const unsigned int* positions, const unsigned int* slots,
                           const float* inv_freq, float scaling, const KvArgs& kv, int heads,
                           int kv_heads, int dim, int block_size) {
    const int row = blockIdx.x, half = dim / 2;
    const int width = (heads + 2 * kv_heads) * dim;
    float* x = qkv + (size_t)row * width;
    const float pos = (float)positions[row];
    for (int idx = threadIdx.x; idx < (heads + kv_heads) * half; idx += blockDim.x) {
        int head = idx / half, i = idx % half;
        float* h = x + head * dim;
        float a = h[i], b = h[i + half];
        rope_pair(a, b, inv_freq[i], pos, scaling);
        h[i] = a;
        h[i + half] = b;
    }
    __syncthreads();
    const unsigned int slot = slots[row];
    const unsigned int block = slot / block_size, off = slot % block_size;
    const float* k = x + heads * dim;
    const float* v = k + kv_heads * dim;
    for (int idx = threadIdx.x; idx < kv_heads * dim; idx += blockDim.x) {
        int kh = idx / dim, d = idx % dim;
        const size_t at = (size_t)off * dim + d;
        ((bf16_t*)exact_run(kv, block, 0, kh, block_size, dim))[at] = from_f32<bf16_t>(k[idx]);
        ((bf16_t*)exact_run(kv, block, 1, kh, block_size, dim))[at] = from_f32<bf16_t>(v[idx]);
    }
}

extern "C" __global__ void rope_store_bf16(float* qkv,                     // [rows, (heads + 2 * kv_heads) * dim]
                                           const unsigned int* positions,  // [rows]
                                           const unsigned int* slots,      // [rows]: exact slot * block_size + offset
                                           const float* inv_freq,          // [dim / 2]
                                           float scaling, KvArgs kv, int heads, int kv_heads,
                                           int dim, int block_size) {
    rope_store(qkv, positions, slots, inv_freq, scaling, kv, heads, kv_heads, dim, block_size);
}
