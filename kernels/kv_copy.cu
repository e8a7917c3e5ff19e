// Copy-on-write block copies in the paged KV store. The store is one allocation laid out as
// [layer][k|v][block][kv_head][slot][dim]; one block of one layer's K (or V) is `block_elems`
// contiguous elements. Grid: (pairs, layers * 2); the host launches one grid per dependent run
// so that copies keep their order.
#include "common.cuh"

template <typename KV>
__device__ void copy_blocks(KV* store, const unsigned int* pairs, size_t block_elems,
                            unsigned int num_blocks) {
    unsigned int src = pairs[2 * blockIdx.x], dst = pairs[2 * blockIdx.x + 1];
    if (src >= num_blocks || dst >= num_blocks) return;
    size_t plane = (size_t)blockIdx.y * num_blocks * block_elems;  // one layer's K or V
    const KV* s = store + plane + (size_t)src * block_elems;
    KV* d = store + plane + (size_t)dst * block_elems;
    for (size_t i = threadIdx.x; i < block_elems; i += blockDim.x) d[i] = s[i];
}

extern "C" __global__ void copy_blocks_bf16(bf16_t* store,              // [layers, 2, num_blocks, block_elems]
                                            const unsigned int* pairs,  // [pairs, 2]: (src, dst)
                                            size_t block_elems, unsigned int num_blocks) {
    copy_blocks<bf16_t>(store, pairs, block_elems, num_blocks);
}
