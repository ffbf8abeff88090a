"""Plan and launch the CUDA block-copy kernel for one gather or scatter.

A plan describes a set of per-layer caches once: a device array of their base
addresses and the byte geometry of one block page. It is cached by the layers'
addresses and the first layer's shape, strides and dtype (vLLM registers its
caches once, so every later call reuses the plan). The copy itself is
byte-wise, so fp8 needs nothing special; the widest vector (up to 16 bytes)
that divides every address, stride and row size is used.

Anything the kernel does not handle (pages whose last dimension is not
contiguous, layers that differ in geometry, a non-int64 id tensor) returns
False so that the caller uses the torch copy; each distinct reason is logged
once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from lmcache_fs.gpu.kernels import load_cuda_kernels

logger = logging.getLogger(__name__)

_MAX_PLANS = 8  # a few layer sets per process at most (tests, benches); vLLM uses one
_plans: dict[tuple, "_LayerPlan"] = {}
_reported: set[str] = set()


class _Unsupported(Exception):
    """The kernel cannot do this copy; the message says why."""


@dataclass(frozen=True)
class _LayerPlan:
    """What the kernel needs to know about one set of per-layer caches."""

    layer_ptrs: torch.Tensor  # int64 base addresses, on the layers' device
    page_shape: tuple[int, ...]
    dtype: torch.dtype
    num_blocks: int
    block_stride: int  # the three strides in bytes
    dim1_stride: int
    dim2_stride: int
    dim1: int
    dim2: int
    row_bytes: int
    alignment: int  # the widest power of two (<= 16) dividing addresses and strides


def _pow2_alignment(*values: int) -> int:
    """The largest of 1, 2, 4, 8, 16 that divides every value."""
    acc = 16
    for v in values:
        acc |= v
    return acc & -acc


def _page_dims(shape: Sequence[int], strides: Sequence[int]) -> tuple[int, int, int, int]:
    """``(dim1, dim2, dim1_stride, dim2_stride)`` in elements of a page's two outer dims.

    Pages of fewer than three dims get leading dims of size 1.
    """
    padded = [(1, 0)] * (2 - len(shape)) + list(zip(shape, strides))
    (dim1, s1), (dim2, s2) = padded[0], padded[1]
    return dim1, dim2, s1, s2


def _make_plan(layers: Sequence[torch.Tensor]) -> _LayerPlan:
    first = layers[0]
    if first.dim() < 2 or first.dim() > 4:
        raise _Unsupported(f"layer caches of {first.dim()} dims (kernel handles 2-4)")
    if first.stride(-1) != 1 and first.shape[-1] != 1:
        raise _Unsupported("the last dimension of a page is not contiguous")
    for kv in layers:
        if (kv.shape != first.shape or kv.stride() != first.stride() or kv.dtype != first.dtype
                or kv.device != first.device):
            raise _Unsupported("layers differ in shape, strides, dtype or device")
    item = first.element_size()
    dim1, dim2, s1, s2 = _page_dims(first.shape[1:-1], first.stride()[1:-1])
    row_bytes = first.shape[-1] * item
    ptrs = [kv.data_ptr() for kv in layers]
    alignment = _pow2_alignment(row_bytes, first.stride(0) * item, s1 * item, s2 * item, *ptrs)
    if dim1 * dim2 * (row_bytes // alignment) >= 2**32:
        raise _Unsupported("a block page is too large for the kernel's 32-bit indexing")
    return _LayerPlan(
        layer_ptrs=torch.tensor(ptrs, dtype=torch.int64, device=first.device),
        page_shape=tuple(first.shape[1:]), dtype=first.dtype, num_blocks=first.shape[0],
        block_stride=first.stride(0) * item, dim1_stride=s1 * item, dim2_stride=s2 * item,
        dim1=dim1, dim2=dim2, row_bytes=row_bytes, alignment=alignment)


def _plan_for(layers: Sequence[torch.Tensor]) -> _LayerPlan:
    first = layers[0]
    key = (tuple(kv.data_ptr() for kv in layers), tuple(first.shape), first.stride(), first.dtype)
    plan = _plans.get(key)
    if plan is None:
        plan = _make_plan(layers)
        if len(_plans) >= _MAX_PLANS:
            _plans.pop(next(iter(_plans)))
        _plans[key] = plan
    return plan


def _chunk_strides(plan: _LayerPlan, chunk: torch.Tensor, layers: int, ids: int) -> tuple[int, int]:
    """Byte strides of the chunk buffer's layer and block dims (its pages must be contiguous)."""
    expected = (layers, ids, *plan.page_shape)
    if tuple(chunk.shape) != expected:
        raise _Unsupported(f"chunk buffer shape {tuple(chunk.shape)} is not {expected}")
    if chunk.dtype != plan.dtype or chunk.device != plan.layer_ptrs.device:
        raise _Unsupported("chunk buffer dtype or device differs from the layers'")
    if not chunk[0, 0].is_contiguous():
        raise _Unsupported("chunk buffer pages are not contiguous")
    return chunk.stride(0) * chunk.element_size(), chunk.stride(1) * chunk.element_size()


def copy_blocks_cuda(gather: bool, layers: Sequence[torch.Tensor], block_ids: torch.Tensor,
                     chunk: torch.Tensor) -> bool:
    """Copy blocks between CUDA caches and ``chunk`` with one kernel launch.

    Called by :func:`lmcache_fs.transfer.block_copy.gather_blocks` and
    :func:`~lmcache_fs.transfer.block_copy.scatter_blocks` for CUDA tensors. The launch
    is asynchronous on the current stream, like the torch copy it replaces.
    Ids outside ``[0, num_blocks)`` are skipped by the kernel (they never
    cause an out-of-bounds write); the torch path raises for them instead.

    Returns:
        True if the kernel ran; False if the kernels are unavailable or this
        copy is outside what they handle (then the caller must use torch).
    """
    if not layers or block_ids.numel() == 0:
        return False
    module = load_cuda_kernels()
    if module is None:
        return False
    try:
        if block_ids.dtype != torch.int64 or block_ids.device != chunk.device:
            raise _Unsupported("block ids are not an int64 tensor on the caches' device")
        plan = _plan_for(layers)
        layer_stride, block_stride = _chunk_strides(plan, chunk, len(layers), block_ids.numel())
        alignment = _pow2_alignment(plan.alignment, chunk.data_ptr(), layer_stride, block_stride)
    except _Unsupported as exc:
        if str(exc) not in _reported:
            _reported.add(str(exc))
            logger.warning("block copy: %s; using the torch copy for such calls", exc)
        return False
    ids = block_ids.contiguous()
    module.copy_blocks(
        gather=gather, vector_bytes=alignment, layer_ptrs=plan.layer_ptrs.data_ptr(),
        num_layers=len(layers), block_ids=ids.data_ptr(), num_ids=ids.numel(),
        chunk=chunk.data_ptr(), block_stride=plan.block_stride, dim1_stride=plan.dim1_stride,
        dim2_stride=plan.dim2_stride, dim1=plan.dim1, dim2=plan.dim2,
        row_vectors=plan.row_bytes // alignment, num_blocks=plan.num_blocks,
        chunk_layer_stride=layer_stride, chunk_block_stride=block_stride,
        stream=torch.cuda.current_stream(chunk.device).cuda_stream)
    return True
