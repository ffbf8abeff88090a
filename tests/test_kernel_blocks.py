"""Caches that vLLM split into kernel blocks: whole blocks are copied, and nothing else is touched.

The caches are per-layer views of one random byte buffer, shaped and strided as
vLLM 0.32's allocator (``create_kv_cache_views``) builds them for FlashAttention
(NHD), FlashInfer (HND, or NHD) and Triton (NHD), with the kernel block size
below the block size where the backend needs it; a test checks them against
vLLM's own function (the GPU machines have no vLLM, so the views are built here).
"""

from __future__ import annotations

from collections.abc import Sequence
from unittest import mock

import pytest
import torch

from lmcache_fs.gpu import block_copy_cuda
from lmcache_fs.transfer import block_copy
from lmcache_fs.transfer.block_copy import gather_blocks, scatter_blocks
from lmcache_fs.transfer.kernel_blocks import KernelBlockError, whole_block_view

LAYERS, BLOCKS, HEADS, HEAD_SIZE = 3, 12, 4, 16
WIDTH = 2 * HEAD_SIZE  # C: K and V of one token and head
NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
KEYS = [f"{i:02x}" * 32 for i in range(2)]

# (backend, layout, block size, kernel block size): what each backend gets from vLLM 0.32.
CASES = {
    "flash_attn": ("NHD", 16, 16),
    "flash_attn-128": ("NHD", 128, 128),
    "flash_attn-fa4-split": ("NHD", 128, 64),  # FA4 takes fixed kernel block sizes
    "flashinfer-hnd-split": ("HND", 128, 64),  # --block-size 128, pages <= 64
    "flashinfer-hnd-split4": ("HND", 64, 16),
    "flashinfer-nhd-split": ("NHD", 128, 64),
    "flashinfer-hnd": ("HND", 32, 32),
    "triton": ("NHD", 64, 64),  # MultipleOf(16): never split
}


class Caches:
    """Per-layer views of one random bf16 buffer, layer-compact (the layouts vLLM splits)."""

    def __init__(self, layout: str, block_size: int, kernel: int, seed: int = 0,
                 device: str = "cpu"):
        self.layout, self.block_size, self.kernel = layout, block_size, kernel
        page = HEADS * block_size * WIDTH  # elements
        self.page = page * 2  # bytes
        self.layer_stride = self.page * BLOCKS
        generator = torch.Generator().manual_seed(seed)
        self.raw = torch.randint(-128, 128, (LAYERS * self.layer_stride,), dtype=torch.int8,
                                 generator=generator).to(device)
        ratio = block_size // kernel
        # Kernel block j of block b is row b * ratio + j, page / ratio elements apart.
        inner = (HEADS * WIDTH, WIDTH) if layout == "NHD" else (WIDTH, kernel * WIDTH)
        token_stride, head_stride = inner
        self.registered = [
            self.raw.view(torch.bfloat16).as_strided(
                (BLOCKS * ratio, HEADS, kernel, WIDTH), (page // ratio, head_stride, token_stride, 1),
                layer * page * BLOCKS)
            for layer in range(LAYERS)]

    def logical(self, layer: int) -> torch.Tensor:
        """Layer ``layer`` as ``[blocks, heads, block_size, C]`` in token order (a copy)."""
        kv = self.registered[layer]
        ratio = self.block_size // self.kernel
        return (kv.unflatten(0, (BLOCKS, ratio)).permute(0, 2, 1, 3, 4)
                .reshape(BLOCKS, HEADS, self.block_size, WIDTH))

    def only_blocks_changed(self, before: torch.Tensor, blocks: Sequence[int]) -> bool:
        """Whether every byte outside ``blocks`` (of every layer) equals ``before``."""
        written = torch.zeros_like(self.raw, dtype=torch.bool)
        for layer in range(LAYERS):
            for block in blocks:
                start = layer * self.layer_stride + block * self.page
                written[start:start + self.page] = True
        return torch.equal(self.raw[~written], before[~written])


def _vllm_spec(block_size: int, kernel: int | None = None):
    from vllm.v1.attention.backend import MultipleOf
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    return FullAttentionSpec(block_size=block_size, num_kv_heads=HEADS, head_size=HEAD_SIZE,
                             dtype=torch.bfloat16,
                             block_stride_alignment=MultipleOf(kernel) if kernel else None)


def _vllm_layout(name: str):
    from vllm.v1.kv_cache_layout import KVCacheLayout

    return {"NHD": KVCacheLayout.LBNHC, "HND": KVCacheLayout.LBHNC}[name]


@pytest.mark.parametrize("case", list(CASES))
def test_the_caches_here_are_the_views_vllm_registers(case):
    pytest.importorskip("vllm")
    from vllm.v1.kv_cache_interface import KVCacheTensor, create_kv_cache_views

    layout, block_size, kernel = CASES[case]
    ours = Caches(layout, block_size, kernel)
    tensor = KVCacheTensor(size=ours.raw.numel(), layers=NAMES, layer_stride=ours.layer_stride,
                           block_stride=ours.page)
    theirs = create_kv_cache_views(ours.raw, _vllm_spec(block_size), BLOCKS, _vllm_layout(layout),
                                   tensor, kernel_block_size=kernel)
    for mine, vllms in zip(ours.registered, theirs):
        assert (mine.shape, mine.stride(), mine.dtype) == (vllms.shape, vllms.stride(), vllms.dtype)
        assert mine.data_ptr() == vllms.data_ptr()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)  # random bytes hold NaNs: compare bits, not values


@pytest.fixture(params=list(CASES))
def caches(request) -> Caches:
    return Caches(*CASES[request.param])


def test_vllm_registers_kernel_blocks_as_rows(caches):
    # The bug this module fixes: with a split, row b is not block b.
    kv = caches.registered[0]
    assert kv.shape[0] == BLOCKS * caches.block_size // caches.kernel
    assert kv.shape[2] == caches.kernel


def test_whole_block_views_hold_each_block_in_token_order(caches):
    for layer, kv in enumerate(caches.registered):
        whole = whole_block_view(kv, caches.block_size)
        assert whole.shape[0] == BLOCKS and whole.untyped_storage().data_ptr() == caches.raw.data_ptr()
        assert whole.data_ptr() == kv.data_ptr()  # a view, never a copy
        logical = caches.logical(layer)
        for block in range(BLOCKS):
            page = whole[block].reshape(HEADS, caches.block_size, WIDTH)
            assert torch.equal(_bits(page), _bits(logical[block])), (layer, block)


def test_gather_and_scatter_move_whole_blocks_and_nothing_else(caches):
    layers = [whole_block_view(kv, caches.block_size) for kv in caches.registered]
    ids = torch.tensor([7, 2, 11])
    chunk = torch.empty(LAYERS, len(ids), *layers[0].shape[1:], dtype=torch.bfloat16)
    gather_blocks(layers, ids, chunk)
    # The chunk holds the blocks' tokens in logical order, whatever the split or layout.
    as_logical = chunk.view(LAYERS, len(ids), HEADS, caches.block_size, WIDTH)
    for layer in range(LAYERS):
        assert torch.equal(_bits(as_logical[layer]), _bits(caches.logical(layer)[ids]))

    before = caches.raw.clone()
    targets = torch.tensor([3, 4, 10])
    scatter_blocks(chunk, layers, targets)
    assert caches.only_blocks_changed(before, targets.tolist())  # no other block's byte moved
    again = torch.empty_like(chunk)
    gather_blocks(layers, targets, again)
    assert torch.equal(_bits(again), _bits(chunk))
    for layer in range(LAYERS):  # and the blocks now hold the source blocks, token by token
        assert torch.equal(_bits(caches.logical(layer)[targets]), _bits(caches.logical(layer)[ids]))


def test_views_that_are_not_kernel_blocks_are_refused():
    every_other_column = torch.zeros(BLOCKS * 2, HEADS, 8, 4 * HEAD_SIZE)[..., ::2]
    with pytest.raises(KernelBlockError, match="not contiguous.*--block-size 8"):
        whole_block_view(every_other_column, 16)
    with pytest.raises(KernelBlockError, match="no whole number of blocks"):
        whole_block_view(torch.zeros(BLOCKS * 2 + 1, HEADS, 8, WIDTH), 16)


def test_the_cuda_kernel_takes_whole_block_views_as_they_are(caches):
    # Planned on CPU tensors: the kernel accepts the regrouped views (no torch fallback) and
    # steps whole blocks: one page apart, BLOCKS of them.
    layers = [whole_block_view(kv, caches.block_size) for kv in caches.registered]
    plan = block_copy_cuda._make_plan(layers)
    assert plan.num_blocks == BLOCKS and plan.block_stride == caches.page
    assert plan.dim1 * plan.dim2 * plan.row_bytes == caches.page


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", list(CASES))
def test_the_cuda_kernel_moves_whole_blocks_of_split_caches_and_nothing_else(case):
    caches = Caches(*CASES[case], device="cuda")
    layers = [whole_block_view(kv, caches.block_size) for kv in caches.registered]
    ids = torch.tensor([7, 2, 11], device="cuda")
    chunk = torch.empty(LAYERS, len(ids), *layers[0].shape[1:], dtype=torch.bfloat16, device="cuda")
    assert block_copy_cuda.copy_blocks_cuda(True, layers, ids, chunk), "the kernel did not run"
    reference = torch.empty_like(chunk)
    with mock.patch.object(block_copy, "copy_blocks_cuda", lambda *args: False):
        gather_blocks(layers, ids, reference)
    assert torch.equal(_bits(chunk), _bits(reference))
    before = caches.raw.clone()
    targets = torch.tensor([3, 4, 10], device="cuda")
    assert block_copy_cuda.copy_blocks_cuda(False, layers, targets, chunk)
    torch.cuda.synchronize()
    assert caches.only_blocks_changed(before, targets.tolist())
    for layer in range(LAYERS):
        assert torch.equal(_bits(caches.logical(layer)[targets.cpu()]),
                           _bits(caches.logical(layer)[ids.cpu()]))


# -- the namespace ------------------------------------------------------------------------

def _fields(layout: str | None, block_size: int, kernel: int | None) -> dict:
    pytest.importorskip("vllm")
    from vllm_objects import engine_configs

    from lmcache_fs.connector.namespace import namespace_fields

    configs = engine_configs([_vllm_spec(block_size, kernel)], layer_names=NAMES,
                             kv_cache_layout=_vllm_layout(layout).name if layout else None)
    return namespace_fields(*configs, 4 * block_size)


def _name(fields: dict) -> str:
    from lmcache_fs.connector.namespace import rank_namespace

    return rank_namespace(fields, 0, 0).name


@pytest.mark.parametrize("case", list(CASES))
def test_the_namespace_names_the_page_the_worker_will_view(case):
    layout, block_size, kernel = CASES[case]
    fields = _fields(layout, block_size, kernel)
    whole = whole_block_view(Caches(layout, block_size, kernel).registered[0], block_size)
    page = "x".join(map(str, whole.shape[1:]))
    if whole.shape[2] == block_size:  # whole [heads, block_size, C] pages: no field, old names
        assert "page_shape" not in fields
        assert _name(fields) == _name(_fields(layout, block_size, None))
    else:
        assert fields["page_shape"] == page


def test_the_namespace_differs_when_the_page_shape_differs():
    def name(layout, kernel):
        return _name(_fields(layout, 128, kernel))
    unsplit = name("HND", None)
    assert name("HND", 64) != unsplit
    assert name("HND", 32) not in (unsplit, name("HND", 64))
    # NHD kernel blocks hold the same bytes in the same shape as whole blocks: one namespace.
    assert name("NHD", 64) == name("NHD", None)


# -- the worker ---------------------------------------------------------------------------

def _worker(root, caches: Caches, fields: dict, layerwise: str = "auto"):
    pytest.importorskip("vllm")
    from test_worker_side import one_group_worker

    from lmcache_fs.storage.layout import ChunkLayout, Namespace
    from lmcache_fs.storage.store import ChunkStore

    store = ChunkStore(ChunkLayout(root, Namespace(fields)))
    side = one_group_worker(root, store, NAMES, 4, caches.block_size, layerwise_load=layerwise)
    side.register_kv_caches(dict(zip(NAMES, caches.registered)))
    return side


@pytest.mark.parametrize("layerwise", ["auto", "false"], ids=["layerwise", "whole-chunks"])
@pytest.mark.parametrize("saver_case,loader_case", [
    ("flashinfer-hnd-split", "flashinfer-hnd-split"),
    ("flashinfer-nhd-split", "flash_attn-128"),  # NHD kernel blocks share an unsplit engine's chunks
])
def test_chunks_saved_from_kernel_blocks_load_into_the_right_tokens(tmp_path, layerwise,
                                                                    saver_case, loader_case):
    from lmcache_fs.connector.metadata import LMCacheFSMetadata, LoadOp, SaveOp

    src = Caches(*CASES[saver_case], seed=1)
    dst = Caches(*CASES[loader_case], seed=2)
    fields = {"model": "m", **_page_field(src)}
    saver = _worker(tmp_path, src, fields)
    saver.save(LMCacheFSMetadata(saves=[SaveOp("w", KEYS[0], "", 0, (8, 1, 5, 2))]))
    saver.close()
    before = dst.raw.clone()
    loader = _worker(tmp_path, dst, fields, layerwise)
    loader.load(LMCacheFSMetadata(loads=[LoadOp("r", KEYS[0], 1, (0, 9, 4))]))
    assert loader.take_failed_blocks() == set()
    for layer in range(LAYERS):
        assert torch.equal(_bits(dst.logical(layer)[[0, 9, 4]]), _bits(src.logical(layer)[[1, 5, 2]]))
    assert dst.only_blocks_changed(before, (0, 9, 4))


def _page_field(caches: Caches) -> dict:
    whole = whole_block_view(caches.registered[0], caches.block_size)
    return {} if whole.shape[2] == caches.block_size else {"page_shape": "x".join(map(str, whole.shape[1:]))}


def test_a_split_the_namespace_did_not_predict_is_refused_at_start_up(tmp_path):
    split = Caches(*CASES["flashinfer-hnd-split"])
    with pytest.raises(KernelBlockError, match="VLLM_KV_CACHE_LAYOUT=NHD"):
        _worker(tmp_path, split, {"model": "m"})
    unsplit = Caches(*CASES["flashinfer-hnd"])
    with pytest.raises(KernelBlockError, match="namespace was made for pages 4x2x"):
        _worker(tmp_path, unsplit, {"model": "m", "page_shape": "4x2x2048"})
