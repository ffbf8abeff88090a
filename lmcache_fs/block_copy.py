"""Move whole KV blocks between per-layer paged caches and one chunk buffer.

A chunk buffer has shape ``[num_layers, num_blocks, *page_shape]`` where
``page_shape`` is a layer's logical per-block shape (vLLM:
``[num_kv_heads, block_size, 2 * head_size]``). Copying whole blocks through
the logical view is correct for every vLLM layout: contiguous CPU pages and
CUDA's strided NHD/HND views alike, since indexing follows strides. These are
the pure-torch reference and fallback; CUDA kernels in ``cuda/`` do the same
in one launch per chunk.
"""

from __future__ import annotations

from typing import Sequence

import torch


def gather_blocks(layers: Sequence[torch.Tensor], block_ids: torch.Tensor,
                  out: torch.Tensor) -> None:
    """Copy blocks ``block_ids`` of every layer into ``out[layer, i]``.

    Args:
        layers: per-layer caches, each ``[num_blocks_total, *page_shape]`` (any strides).
        block_ids: int64 block ids on the caches' device.
        out: ``[len(layers), len(block_ids), *page_shape]``, contiguous.
    """
    for i, kv in enumerate(layers):
        torch.index_select(kv, 0, block_ids, out=out[i])


def scatter_blocks(src: torch.Tensor, layers: Sequence[torch.Tensor],
                   block_ids: torch.Tensor) -> None:
    """Copy ``src[layer, i]`` into block ``block_ids[i]`` of every layer (the inverse of gather)."""
    for i, kv in enumerate(layers):
        kv.index_copy_(0, block_ids, src[i])
