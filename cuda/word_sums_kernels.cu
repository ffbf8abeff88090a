// One launch sums the word mixes of a whole chunk (see word_sums.h). Each
// thread reads 16-byte vectors in a grid-stride loop and keeps its own two
// sums; a warp shuffle and one atomicAdd per warp combine them. Integer
// addition is associative, so the result is exact and the same on every run.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "word_sums.h"

namespace lmcache_fs {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 4096;

__device__ __forceinline__ uint32_t mix(uint32_t word, uint32_t index, const WordMix& m) {
  uint32_t h = word + index * m.position;
  h *= m.multiply1;
  h ^= h >> 15;
  h *= m.multiply2;
  h ^= h >> 13;
  return h;
}

__device__ __forceinline__ void add_word(uint32_t word, uint32_t index, const WordMix& lane0,
                                         const WordMix& lane1, uint64_t& sum0, uint64_t& sum1) {
  sum0 += mix(word, index, lane0);
  sum1 += mix(word, index, lane1);
}

__global__ void __launch_bounds__(kThreads)
word_sums_kernel(const uint8_t* __restrict__ data, int64_t num_words, bool vectorized,
                 uint64_t* __restrict__ out, WordMix lane0, WordMix lane1) {
  uint64_t sum0 = 0, sum1 = 0;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  const int64_t first = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const uint32_t* words = reinterpret_cast<const uint32_t*>(data);
  int64_t scalar_from = 0;
  if (vectorized) {
    const int64_t num_vectors = num_words / 4;
    const uint4* vectors = reinterpret_cast<const uint4*>(data);
    for (int64_t v = first; v < num_vectors; v += stride) {
      const uint4 x = vectors[v];
      const uint32_t i = uint32_t(v * 4);
      add_word(x.x, i, lane0, lane1, sum0, sum1);
      add_word(x.y, i + 1, lane0, lane1, sum0, sum1);
      add_word(x.z, i + 2, lane0, lane1, sum0, sum1);
      add_word(x.w, i + 3, lane0, lane1, sum0, sum1);
    }
    scalar_from = num_vectors * 4;
  }
  for (int64_t w = scalar_from + first; w < num_words; w += stride) {
    add_word(words[w], uint32_t(w), lane0, lane1, sum0, sum1);
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    sum0 += __shfl_down_sync(0xffffffffu, sum0, offset);
    sum1 += __shfl_down_sync(0xffffffffu, sum1, offset);
  }
  if ((threadIdx.x & 31) == 0) {
    atomicAdd(reinterpret_cast<unsigned long long*>(&out[0]), (unsigned long long)sum0);
    atomicAdd(reinterpret_cast<unsigned long long*>(&out[1]), (unsigned long long)sum1);
  }
}

}  // namespace

const char* launch_word_sums(const uint8_t* data, int64_t nbytes, uint64_t* out,
                             uint64_t* host_out, const WordMix& lane0, const WordMix& lane1,
                             uintptr_t stream_handle) {
  if (nbytes % 4 != 0 || reinterpret_cast<uintptr_t>(data) % 4 != 0) {
    return "data must be a whole number of 4-byte-aligned words";
  }
  if (nbytes / 4 > (int64_t(1) << 31)) return "more than 2^31 words: the sums could overflow";
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  cudaError_t err = cudaMemsetAsync(out, 0, 2 * sizeof(uint64_t), stream);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  const int64_t num_words = nbytes / 4;
  if (num_words > 0) {
    const bool vectorized = reinterpret_cast<uintptr_t>(data) % 16 == 0;
    const int64_t work = vectorized ? (num_words + 3) / 4 : num_words;
    const int blocks = int(std::min<int64_t>(kMaxBlocks, (work + kThreads - 1) / kThreads));
    word_sums_kernel<<<blocks, kThreads, 0, stream>>>(data, num_words, vectorized, out, lane0,
                                                      lane1);
  }
  err = cudaGetLastError();
  if (err == cudaSuccess && host_out != nullptr) {
    err = cudaMemcpyAsync(host_out, out, 2 * sizeof(uint64_t), cudaMemcpyDeviceToHost, stream);
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace lmcache_fs
