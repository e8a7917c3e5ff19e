// Copy-on-write block copies within one slab of the paged KV store (kv_formats.cuh): every byte
// of a block, all layers, from slot src to slot dst. Grid: (pairs); the host launches one grid
// per dependent run so that copies keep their order. Block sizes are multiples of 16 bytes.
#include "common.cuh"
#include "kv_formats.cuh"

extern "C" __global__ void copy_blocks_u8(const unsigned long long* chunks,  // [chunks]: address of each chunk of the slab
                                          const unsigned int* pairs,         // [pairs, 2]: (src slot, dst slot)
                                          unsigned int shift, unsigned long long block_bytes) {
    const unsigned int src = pairs[2 * blockIdx.x], dst = pairs[2 * blockIdx.x + 1];
    const uint4* s = (const uint4*)slot_addr(chunks, shift, block_bytes, src);
    uint4* d = (uint4*)slot_addr(chunks, shift, block_bytes, dst);
    for (size_t i = threadIdx.x; i < block_bytes / 16; i += blockDim.x) d[i] = s[i];
}
