// The device checksum of a chunk's data: two exact sums of 32-bit word mixes.
//
// Every 32-bit little-endian word w at word index i contributes, in each lane,
//     h = w + i * P (mod 2^32); h *= C1; h ^= h >> 15; h *= C2; h ^= h >> 13
// (each step a bijection of the word, so a changed word always changes its
// term), and the lane's sum is the exact sum of those terms (no wrap below
// 2^31 words). A sum is independent of the order of its terms, so thousands of
// threads can add them in any order, unlike xxh3, which folds its input in
// sequence. lmcache_fs/device_checksum.py holds the same function in torch
// (the reference, any device) and the constants' rationale.
#pragma once

#include <cstdint>

namespace lmcache_fs {

struct WordMix {
  uint32_t position;  // P: odd, so that i * P differs for every word index
  uint32_t multiply1; // C1, C2: odd (invertible mod 2^32) and below 2^31, so
  uint32_t multiply2; // that the torch reference multiplies exactly in int64
};

// Queues, on `stream`, out[0] = lane-0 sum and out[1] = lane-1 sum of the
// `nbytes / 4` words at `data` (nbytes a multiple of 4, data 4-byte aligned).
// `out` is two uint64 in device memory; it is zeroed first on the same stream.
// If `host_out` (pinned host memory) is not null, the sums are then copied
// there on the same stream: the caller only waits for the stream. Returns
// nullptr on success, else the CUDA error text.
const char* launch_word_sums(const uint8_t* data, int64_t nbytes, uint64_t* out,
                             uint64_t* host_out, const WordMix& lane0, const WordMix& lane1,
                             uintptr_t stream);

}  // namespace lmcache_fs
