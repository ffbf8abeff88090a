"""Move whole KV blocks between per-layer paged caches and one chunk buffer.

A chunk buffer has shape ``[num_layers, num_blocks, *page_shape]`` where
``page_shape`` is a layer's logical per-block shape (vLLM:
``[num_kv_heads, block_size, 2 * head_size]``). Copying whole blocks through
the logical view is correct for every vLLM layout: contiguous CPU pages and
CUDA's strided NHD/HND views alike, since indexing follows strides.

On the CPU, blocks are copied by numpy (``take`` and indexed assignment on
views of the same memory): a ``memcpy`` per page, in C, on the calling thread.
torch's ``index_copy_`` and ``index_select`` go element by element there
(measured 100-500x slower than memcpy for bf16 pages), a ``copy_`` of more than
a page wakes the OpenMP pool (milliseconds when the engine's cores are busy),
and one page-sized ``copy_`` per block costs Python a call per block: 2.8x
(gather) and 3.7x (scatter) numpy's time for a 256-token chunk of 30 layers
(``python -m bench.run block-copy-cpu``).

For CUDA tensors both functions first try the kernels in the repository's
``cuda/`` directory (:mod:`lmcache_fs.gpu.block_copy_cuda`), which do the whole
chunk in one launch; the torch code below is the fallback and the reference
the kernels are tested against, bit for bit.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from lmcache_fs.gpu.block_copy_cuda import copy_blocks_cuda


def block_ids_on(block_ids: Sequence[int], device: torch.device) -> torch.Tensor:
    """``block_ids`` as the int64 tensor the copies below take, on ``device``.

    On CUDA through pinned memory and a non-blocking copy: ``torch.tensor(ids,
    device="cuda")`` copies from pageable memory and waits for everything queued
    on the stream first (in ``wait_for_save``: the whole forward pass, which the
    engine's thread should not wait for).
    """
    ids = torch.tensor(block_ids, dtype=torch.int64)
    if device.type != "cuda":
        return ids
    return ids.pin_memory().to(device, non_blocking=True)


def gather_blocks(layers: Sequence[torch.Tensor], block_ids: torch.Tensor,
                  out: torch.Tensor) -> None:
    """Copy blocks ``block_ids`` of every layer into ``out[layer, i]``.

    Args:
        layers: per-layer caches, each ``[num_blocks_total, *page_shape]`` (any strides).
        block_ids: int64 block ids on the caches' device.
        out: ``[len(layers), len(block_ids), *page_shape]``, contiguous.
    """
    if out.is_cuda and copy_blocks_cuda(True, layers, block_ids, out):
        return
    if not out.is_cuda:
        ids, dst = block_ids.numpy(), host_array(out)
        for i, kv in enumerate(layers):
            src = host_array(kv)
            _check_ids(ids, len(src))
            np.take(src, ids, axis=0, out=dst[i], mode="clip")  # (checked) "raise" buffers out
        return
    out = _as_bytes(out)
    for i, kv in enumerate(layers):
        torch.index_select(_as_bytes(kv), 0, block_ids, out=out[i])


def scatter_blocks(src: torch.Tensor, layers: Sequence[torch.Tensor],
                   block_ids: torch.Tensor) -> None:
    """Copy ``src[layer, i]`` into block ``block_ids[i]`` of every layer (the inverse of gather).

    ``src`` may be a slice ``chunk[:, a:b]`` of a chunk buffer: only each
    block's page must be contiguous.
    """
    if src.is_cuda and copy_blocks_cuda(False, layers, block_ids, src):
        return
    for i, kv in enumerate(layers):
        scatter_layer(src[i], kv, block_ids)


def scatter_layer(src: torch.Tensor, kv: torch.Tensor, block_ids: torch.Tensor) -> None:
    """Copy ``src[i]`` into block ``block_ids[i]`` of one layer's cache ``kv``.

    On CUDA one ``index_copy_`` launch (the kernel's plans are per set of
    layers, built once for all of them, not per layer).
    """
    if not src.is_cuda:
        ids, dst = block_ids.numpy(), host_array(kv)
        _check_ids(ids, len(dst))  # numpy would take a negative id from the end
        dst[ids] = host_array(src)
        return
    _as_bytes(kv).index_copy_(0, block_ids, _as_bytes(src))


_SAME_SIZE_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def host_array(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor's memory, elements as same-size integers (numpy has no
    bf16 or fp8; a copy moves bits, whatever they mean)."""
    return t.view(_SAME_SIZE_INTS[t.element_size()]).numpy()


def _check_ids(ids: np.ndarray, num_blocks: int) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= num_blocks):
        raise IndexError(f"block ids {ids.min()}..{ids.max()} outside 0..{num_blocks - 1}")


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A uint8 view of a one-byte dtype (torch has no index_copy_ for fp8); others unchanged."""
    return t.view(torch.uint8) if t.element_size() == 1 else t
