// Python bindings of launch_block_copy and launch_word_sums. They take raw
// addresses and the CUDA stream as integers, so they need no CUDA or ATen-CUDA
// header; the Python side (lmcache_fs/block_copy_cuda.py,
// lmcache_fs/device_checksum.py) validates tensors and computes the geometry.
#include <torch/extension.h>

#include <stdexcept>

#include "block_copy.h"
#include "word_sums.h"

namespace {

void copy_blocks(bool gather, int vector_bytes, uint64_t layer_ptrs, int32_t num_layers,
                 uint64_t block_ids, int32_t num_ids, uint64_t chunk, int64_t block_stride,
                 int64_t dim1_stride, int64_t dim2_stride, int32_t dim1, int32_t dim2,
                 int32_t row_vectors, int64_t num_blocks, int64_t chunk_layer_stride,
                 int64_t chunk_block_stride, uint64_t stream) {
  const lmcache_fs::PageGeometry geometry{block_stride, dim1_stride,        dim2_stride,
                                          dim1,         dim2,               row_vectors,
                                          num_blocks,   chunk_layer_stride, chunk_block_stride};
  const char* error = lmcache_fs::launch_block_copy(
      gather, vector_bytes, reinterpret_cast<const uint64_t*>(layer_ptrs), num_layers,
      reinterpret_cast<const int64_t*>(block_ids), num_ids, reinterpret_cast<uint8_t*>(chunk),
      geometry, static_cast<uintptr_t>(stream));
  if (error != nullptr) throw std::runtime_error(std::string("lmcache-fs block copy: ") + error);
}

void word_sums(uint64_t data, int64_t nbytes, uint64_t out, uint64_t host_out, uint32_t position0,
               uint32_t multiply1_0, uint32_t multiply2_0, uint32_t position1,
               uint32_t multiply1_1, uint32_t multiply2_1, uint64_t stream) {
  const lmcache_fs::WordMix lane0{position0, multiply1_0, multiply2_0};
  const lmcache_fs::WordMix lane1{position1, multiply1_1, multiply2_1};
  const char* error = lmcache_fs::launch_word_sums(
      reinterpret_cast<const uint8_t*>(data), nbytes, reinterpret_cast<uint64_t*>(out),
      reinterpret_cast<uint64_t*>(host_out), lane0, lane1, static_cast<uintptr_t>(stream));
  if (error != nullptr) throw std::runtime_error(std::string("lmcache-fs word sums: ") + error);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("copy_blocks", &copy_blocks,
        "Copy whole blocks of every layer to (gather) or from a chunk buffer, in one launch.",
        py::arg("gather"), py::arg("vector_bytes"), py::arg("layer_ptrs"), py::arg("num_layers"),
        py::arg("block_ids"), py::arg("num_ids"), py::arg("chunk"), py::arg("block_stride"),
        py::arg("dim1_stride"), py::arg("dim2_stride"), py::arg("dim1"), py::arg("dim2"),
        py::arg("row_vectors"), py::arg("num_blocks"), py::arg("chunk_layer_stride"),
        py::arg("chunk_block_stride"), py::arg("stream"));
  m.def("word_sums", &word_sums,
        "Queue the two word-mix sums of a device buffer (the device checksum) into out[0:2], "
        "then, if host_out is not 0, a copy of them into pinned host memory at host_out.",
        py::arg("data"), py::arg("nbytes"), py::arg("out"), py::arg("host_out"),
        py::arg("position0"),
        py::arg("multiply1_0"), py::arg("multiply2_0"), py::arg("position1"),
        py::arg("multiply1_1"), py::arg("multiply2_1"), py::arg("stream"));
}
