// Whole-block copies between many layers' paged KV caches and one chunk buffer.
//
// Shared by the CUDA kernels (block_copy_kernels.cu) and the Python binding
// (bindings.cpp); it names no CUDA type so that the binding builds
// with a plain C++ compiler.
#pragma once

#include <cstdint>

namespace lmcache_fs {

// Where one block's bytes lie, in every layer (all layers share it) and in the
// chunk buffer. A block is a logical [dim1, dim2, row] page (vLLM:
// [num_kv_heads, block_size, 2 * head_size]); each row is contiguous in both
// places, the two outer dimensions may have any strides in the paged cache
// (HND, NHD, padded views). All strides are in bytes.
struct PageGeometry {
  int64_t block_stride;          // between consecutive blocks of one layer
  int64_t dim1_stride;           // between rows that differ in dim1 (heads)
  int64_t dim2_stride;           // between rows that differ in dim2 (tokens)
  int32_t dim1;
  int32_t dim2;
  int32_t row_vectors;           // a row's bytes / vector_bytes
  int64_t num_blocks;            // blocks per layer: ids outside [0, num_blocks) are skipped
  int64_t chunk_layer_stride;    // chunk buffer: between layers
  int64_t chunk_block_stride;    // chunk buffer: between blocks (a page is contiguous)
};

// Launches one kernel that copies block block_ids[i] of every layer to/from
// chunk[layer, i] (gather: paged cache -> chunk; otherwise chunk -> paged cache).
// vector_bytes (1, 2, 4, 8 or 16) must divide every pointer, stride and row
// size. Returns nullptr on success, else the CUDA error text. The copy runs
// asynchronously on `stream` (a cudaStream_t passed as an integer).
const char* launch_block_copy(bool gather, int vector_bytes, const uint64_t* layer_ptrs,
                              int32_t num_layers, const int64_t* block_ids, int32_t num_ids,
                              uint8_t* chunk, const PageGeometry& geometry, uintptr_t stream);

}  // namespace lmcache_fs
