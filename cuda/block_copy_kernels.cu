// One launch copies the chosen blocks of every layer: grid.y walks the
// (layer, block) pages, grid.x splits a page into pieces of
// kThreads * kUnroll vectors. Each thread issues all its loads before its
// stores so that several memory requests are in flight per thread; a copy
// this simple is bound by memory bandwidth, not by the index arithmetic.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "block_copy.h"

namespace lmcache_fs {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;
constexpr int64_t kMaxGridY = 65535;

template <int W> struct Vector;
template <> struct Vector<16> { using type = uint4; };
template <> struct Vector<8> { using type = uint2; };
template <> struct Vector<4> { using type = uint32_t; };
template <> struct Vector<2> { using type = uint16_t; };
template <> struct Vector<1> { using type = uint8_t; };

template <int W, bool kGather>
__global__ void __launch_bounds__(kThreads)
block_copy_kernel(const uint64_t* __restrict__ layer_ptrs, int32_t num_layers,
                  const int64_t* __restrict__ block_ids, int32_t num_ids,
                  uint8_t* __restrict__ chunk, PageGeometry g) {
  using V = typename Vector<W>::type;
  const uint32_t page_vectors = uint32_t(g.dim1) * uint32_t(g.dim2) * uint32_t(g.row_vectors);
  const uint32_t first = blockIdx.x * (kThreads * kUnroll) + threadIdx.x;
  const int64_t num_pages = int64_t(num_layers) * num_ids;
  for (int64_t page = blockIdx.y; page < num_pages; page += gridDim.y) {
    const int64_t layer = page / num_ids;
    const int64_t i = page - layer * num_ids;
    const int64_t block = block_ids[i];
    // A bad id must never turn into a wild write into another request's KV.
    if (block < 0 || block >= g.num_blocks) continue;
    uint8_t* paged = reinterpret_cast<uint8_t*>(layer_ptrs[layer]) + block * g.block_stride;
    uint8_t* staged = chunk + layer * g.chunk_layer_stride + i * g.chunk_block_stride;

    V values[kUnroll];
    int64_t paged_offset[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const uint32_t idx = first + k * kThreads;
      if (idx < page_vectors) {
        const uint32_t row = idx / uint32_t(g.row_vectors);
        const uint32_t col = idx - row * uint32_t(g.row_vectors);
        const uint32_t d1 = row / uint32_t(g.dim2);
        const uint32_t d2 = row - d1 * uint32_t(g.dim2);
        paged_offset[k] = d1 * g.dim1_stride + d2 * g.dim2_stride + int64_t(col) * W;
        const uint8_t* src = kGather ? paged + paged_offset[k] : staged + int64_t(idx) * W;
        values[k] = *reinterpret_cast<const V*>(src);
      }
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const uint32_t idx = first + k * kThreads;
      if (idx < page_vectors) {
        uint8_t* dst = kGather ? staged + int64_t(idx) * W : paged + paged_offset[k];
        *reinterpret_cast<V*>(dst) = values[k];
      }
    }
  }
}

template <int W>
void launch(bool gather, dim3 grid, cudaStream_t stream, const uint64_t* layer_ptrs,
            int32_t num_layers, const int64_t* block_ids, int32_t num_ids, uint8_t* chunk,
            const PageGeometry& g) {
  if (gather) {
    block_copy_kernel<W, true><<<grid, kThreads, 0, stream>>>(layer_ptrs, num_layers, block_ids,
                                                              num_ids, chunk, g);
  } else {
    block_copy_kernel<W, false><<<grid, kThreads, 0, stream>>>(layer_ptrs, num_layers, block_ids,
                                                               num_ids, chunk, g);
  }
}

}  // namespace

const char* launch_block_copy(bool gather, int vector_bytes, const uint64_t* layer_ptrs,
                              int32_t num_layers, const int64_t* block_ids, int32_t num_ids,
                              uint8_t* chunk, const PageGeometry& g, uintptr_t stream_handle) {
  const uint64_t page_vectors = uint64_t(g.dim1) * uint64_t(g.dim2) * uint64_t(g.row_vectors);
  if (page_vectors == 0 || num_layers <= 0 || num_ids <= 0) return nullptr;
  if (page_vectors > UINT32_MAX) return "a block page is too large for 32-bit indexing";
  const uint64_t per_cta = uint64_t(kThreads) * kUnroll;
  const int64_t pages = int64_t(num_layers) * num_ids;
  dim3 grid(unsigned((page_vectors + per_cta - 1) / per_cta), unsigned(std::min(pages, kMaxGridY)));
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (vector_bytes) {
    case 16: launch<16>(gather, grid, stream, layer_ptrs, num_layers, block_ids, num_ids, chunk, g); break;
    case 8: launch<8>(gather, grid, stream, layer_ptrs, num_layers, block_ids, num_ids, chunk, g); break;
    case 4: launch<4>(gather, grid, stream, layer_ptrs, num_layers, block_ids, num_ids, chunk, g); break;
    case 2: launch<2>(gather, grid, stream, layer_ptrs, num_layers, block_ids, num_ids, chunk, g); break;
    case 1: launch<1>(gather, grid, stream, layer_ptrs, num_layers, block_ids, num_ids, chunk, g); break;
    default: return "vector_bytes must be 1, 2, 4, 8 or 16";
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace lmcache_fs
