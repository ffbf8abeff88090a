"""Whole-block views of caches that vLLM split into kernel blocks.

When an attention backend cannot use the configured block size (FlashInfer
with ``--block-size 128`` on most GPUs takes at most 64 tokens), vLLM 0.32
splits each block into ``ratio = block_size / kernel_block_size`` kernel
blocks, and the views it registers with a connector are
``[num_blocks * ratio, heads, kernel_block_size, C]``: row ``b * ratio + j`` is
kernel block ``j`` of block ``b`` (``create_kv_cache_views`` in
``vllm/v1/kv_cache_interface.py``). Indexing such a view by block id reads and
writes other blocks' tokens.

:func:`whole_block_view` regroups the rows the way vLLM's offloading worker
does (``group_kernel_blocks``: ``ratio`` consecutive rows per block) and puts
the tokens back in order, as a view on the same memory, so ``kv[block_id]``
and the CUDA copy kernel address whole blocks:

- NHD (``LBNHC``): a kernel block's tokens follow the previous one's, so the
  view is ``[num_blocks, heads, block_size, C]``, exactly what an unsplit engine
  registers: its chunks are byte- and shape-identical.
- HND (``LBHNC``): each head's tokens are split in ``ratio`` runs of
  ``kernel_block_size * C``, so the view is ``[num_blocks, heads, ratio,
  kernel_block_size * C]``. A chunk holds the same bytes in the same (logical)
  order as an unsplit engine's, but its shape differs, which the namespace's
  ``page_shape`` records.
"""

from __future__ import annotations

import torch


class KernelBlockError(ValueError):
    """A cache whose kernel blocks cannot be viewed as whole blocks; the message says why and what to do."""


def _refuse(reason: str, block_size: int, kernel_block_size: int) -> KernelBlockError:
    return KernelBlockError(
        f"lmcache-fs cannot view this KV cache as whole {block_size}-token blocks: {reason}. "
        f"Start vLLM with --block-size {kernel_block_size} (the attention backend's kernel "
        "block size) or VLLM_KV_CACHE_LAYOUT=NHD, or remove the kv-transfer-config")


def whole_block_view(kv: torch.Tensor, block_size: int) -> torch.Tensor:
    """``kv`` (vLLM's ``[rows, heads, tokens, C]`` layer view) with one row per ``block_size``-token block.

    A view whose rows are already whole blocks is returned as is.

    Raises:
        KernelBlockError: the rows are not kernel blocks of equal stride (vLLM
            never registers such views; a future layout might).
    """
    if kv.dim() != 4 or kv.shape[2] == block_size:
        return kv
    rows, heads, tokens, content = kv.shape
    if block_size % tokens or rows % (block_size // tokens):
        raise _refuse(f"its rows hold {tokens} tokens, not a divisor of the block size, or "
                      f"{rows} rows are no whole number of blocks", block_size, tokens)
    ratio = block_size // tokens
    s_row, s_head, s_token, s_content = kv.stride()
    if s_content != 1:
        raise _refuse("the last dimension of a page is not contiguous", block_size, tokens)
    size: tuple[int, ...]
    stride: tuple[int, ...]
    if s_row == tokens * s_token:  # NHD: kernel blocks follow each other token by token
        size, stride = (heads, block_size, content), (s_head, s_token, s_content)
    elif s_token == content:  # HND: each head's kernel-block tokens form one contiguous run
        size, stride = (heads, ratio, tokens * content), (s_head, s_row, s_content)
    else:
        raise _refuse(f"its strides {kv.stride()} are neither vLLM's NHD nor HND layout",
                      block_size, tokens)
    return kv.as_strided((rows // ratio, *size), (ratio * s_row, *stride), kv.storage_offset())
