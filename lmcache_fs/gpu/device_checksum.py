"""A checksum a GPU can compute in one launch: verify chunks where they land.

xxh3-64, the file format's checksum, folds its input in sequence, so a GPU
cannot compute it; verifying a kvikio read with it means copying every chunk
back to the host and hashing it there, which halves page-cache reads and puts
the host CPU back into GPUDirect Storage's path (``bench/results/gpu_path.md``).
So a writer that holds the chunk on a GPU also stores a second checksum, in
the header field :data:`FIELD`, that GPU readers check on the GPU:

    every 32-bit little-endian word w at word index i gives, in two lanes,
        h = w + i * P (mod 2^32); h *= C1; h ^= h >> 15; h *= C2; h ^= h >> 13
    and the checksum is the exact sum of h over all words, per lane.

Each step is a bijection of the word, so any one changed word always changes
its lane sums; ``i * P`` ties every word to its place (swapped or shifted
pages are caught), and zeroed or foreign data changes both 64-bit sums
except with negligible chance. Exact sums do not depend on the order of
their terms, so the CUDA kernel (``cuda/word_sums_kernels.cu``) adds them with
thousands of threads and :func:`word_sums` (torch, any device: the reference
and the test oracle) gets the same numbers. Like xxh3 it guards against
accidents (torn writes, bit rot, stale or foreign files), not against an
adversary who can write the directory.

The field is optional: files from CPU writers, or from GPU hosts without the
kernels, carry only xxh3, and GPU readers then verify on the host as before.
xxh3 stays in every file: CPU readers and ``lmcache-fs verify`` use it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lmcache_fs.gpu.kernels import load_cuda_kernels

FIELD = "device_checksum"
"""Header metadata field that holds :func:`checksum_text` of the data."""

_PREFIX = "wordsum2x32:"
_MASK32 = 0xFFFFFFFF
_SEGMENT_WORDS = 1 << 23  # the torch reference works in 64 MiB int64 pieces
MAX_WORDS = 1 << 31  # below this the lane sums cannot leave 63 bits


class WordMix(NamedTuple):
    """One lane's constants: all odd (bijective) and below 2^31 (exact int64 products)."""

    position: int
    multiply1: int
    multiply2: int


LANES = (WordMix(0x3C6EF35F, 0x2C1B3C6D, 0x297A2D39),
         WordMix(0x1B873593, 0x5BD1E995, 0x27D4EB2F))


def supports(data: torch.Tensor) -> bool:
    """Whether ``data`` (contiguous) is a whole number of 4-byte words the sums can cover."""
    nbytes = data.numel() * data.element_size()
    return (data.is_contiguous() and nbytes % 4 == 0 and nbytes // 4 < MAX_WORDS
            and data.data_ptr() % 4 == 0)


def available_for(data: torch.Tensor) -> bool:
    """Whether :func:`start_word_sums` can check ``data`` (a CUDA tensor; the kernels built)."""
    return data.is_cuda and supports(data) and load_cuda_kernels() is not None


def _words(data: torch.Tensor) -> torch.Tensor:
    return data.reshape(-1).view(torch.uint8).view(torch.int32)


def word_sums(data: torch.Tensor) -> tuple[int, int]:
    """The two lane sums of ``data`` computed with torch ops on its own device (reference)."""
    if not supports(data):
        raise ValueError("data must be contiguous, 4-byte aligned and a whole number of words")
    words = _words(data)
    sums = [0, 0]
    for start in range(0, words.numel(), _SEGMENT_WORDS):
        piece = words[start:start + _SEGMENT_WORDS].to(torch.int64) & _MASK32
        index = torch.arange(start, start + piece.numel(), dtype=torch.int64, device=data.device)
        for lane, mix in enumerate(LANES):
            h = (piece + (index * mix.position & _MASK32)) & _MASK32
            h = (h * mix.multiply1) & _MASK32
            h ^= h >> 15
            h = (h * mix.multiply2) & _MASK32
            h ^= h >> 13
            sums[lane] += int(h.sum())
    return sums[0], sums[1]


def checksum_text(sums: tuple[int, int]) -> str:
    """The header field's value for two lane sums."""
    return f"{_PREFIX}{sums[0]:016x}{sums[1]:016x}"


def start_word_sums(data: torch.Tensor, out: torch.Tensor | None = None, *,
                    host_out: torch.Tensor | None = None,
                    stream: torch.cuda.Stream | None = None) -> torch.Tensor | None:
    """Queue the kernel on ``stream``; the two sums land in ``out`` (returned).

    ``data`` is a CUDA tensor; ``out`` an int64 tensor of 2 on its device
    (default: a new one); ``stream`` defaults to the current stream.
    ``host_out``, a pinned int64 host tensor of 2, also receives the sums,
    copied on the same stream. Returns None where the kernels are unavailable
    or ``data`` is not whole aligned words: callers then verify on the host.
    The sums are ready in the stream's order (synchronize before reading
    ``host_out``).
    """
    if not available_for(data):
        return None
    module = load_cuda_kernels()
    assert module is not None  # available_for() loaded it
    if stream is None:
        stream = torch.cuda.current_stream(data.device)
    if out is None:
        with torch.cuda.stream(stream):  # the allocator ties it to the stream that uses it
            out = torch.empty(2, dtype=torch.int64, device=data.device)
    (p0, a0, b0), (p1, a1, b1) = LANES
    module.word_sums(data=data.data_ptr(), nbytes=data.numel() * data.element_size(),
                     out=out.data_ptr(), host_out=host_out.data_ptr() if host_out is not None else 0,
                     position0=p0, multiply1_0=a0, multiply2_0=b0,
                     position1=p1, multiply1_1=a1, multiply2_1=b1, stream=stream.cuda_stream)
    return out


class SlotChecker:
    """Computes device checksums of one staging slot's chunks, on the slot's side stream.

    The sums' device and pinned host buffers are allocated once, and the
    launch takes the stream's handle directly (torch's stream context costs
    more per call than the kernel on a 2 MiB chunk), so a check costs one
    launch, one 16-byte copy and a wait for this stream only (never the
    engine's).
    """

    def __init__(self, stream: torch.cuda.Stream):
        self._sums = torch.empty(2, dtype=torch.int64, device=stream.device)
        self._host = torch.empty(2, dtype=torch.int64, pin_memory=True)
        self._stream = stream

    def checksum_of(self, data: torch.Tensor, *, upload_from: torch.Tensor | None = None
                    ) -> str | None:
        """:func:`checksum_text` of ``data``, computed on the GPU; None if it cannot be.

        ``upload_from``: a (pinned) host tensor copied into ``data`` first, on
        the same stream; the copy has finished when this returns, either way.
        """
        if upload_from is not None:
            with torch.cuda.stream(self._stream):
                data.copy_(upload_from, non_blocking=True)
        sums = start_word_sums(data, self._sums, host_out=self._host, stream=self._stream)
        self._stream.synchronize()
        return text_of(self._host) if sums is not None else None


def text_of(sums: torch.Tensor) -> str:
    """:func:`checksum_text` of a (host) tensor filled by :func:`start_word_sums`."""
    first, second = (int(v) for v in sums.tolist())
    return checksum_text((first, second))
