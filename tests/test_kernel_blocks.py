"""Caches that vLLM split into kernel blocks: whole blocks are copied, and nothing else is touched.

The caches are built by vLLM's own allocator code (``create_kv_cache_views``)
from one random byte buffer, shaped and strided as vLLM builds them for
FlashAttention (NHD), FlashInfer (HND, or NHD) and Triton (NHD), with the
kernel block size below the block size where the backend needs it.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from vllm.v1.attention.backend import MultipleOf  # noqa: E402
from vllm.v1.kv_cache_interface import (  # noqa: E402
    FullAttentionSpec,
    KVCacheTensor,
    create_kv_cache_views,
)
from vllm.v1.kv_cache_layout import KVCacheLayout  # noqa: E402

from lmcache_fs.connector.metadata import LMCacheFSMetadata, LoadOp, SaveOp  # noqa: E402
from lmcache_fs.connector.namespace import namespace_fields, rank_namespace  # noqa: E402
from lmcache_fs.connector.worker import ReadOptions, WorkerSide  # noqa: E402
from lmcache_fs.storage.layout import ChunkLayout, Namespace  # noqa: E402
from lmcache_fs.storage.store import ChunkStore  # noqa: E402
from lmcache_fs.transfer.block_copy import gather_blocks, scatter_blocks  # noqa: E402
from lmcache_fs.transfer.kernel_blocks import KernelBlockError, whole_block_view  # noqa: E402

LAYERS, BLOCKS, HEADS, HEAD_SIZE = 3, 12, 4, 16
NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
KEYS = [f"{i:02x}" * 32 for i in range(2)]

# (backend, layout, block size, kernel block size): what each backend gets from vLLM 0.32.
CASES = {
    "flash_attn": (KVCacheLayout.LBNHC, 16, 16),
    "flash_attn-128": (KVCacheLayout.LBNHC, 128, 128),
    "flash_attn-fa4-split": (KVCacheLayout.LBNHC, 128, 64),  # FA4 takes fixed kernel block sizes
    "flashinfer-hnd-split": (KVCacheLayout.LBHNC, 128, 64),  # --block-size 128, pages <= 64
    "flashinfer-hnd-split4": (KVCacheLayout.LBHNC, 64, 16),
    "flashinfer-nhd-split": (KVCacheLayout.LBNHC, 128, 64),
    "flashinfer-hnd": (KVCacheLayout.LBHNC, 32, 32),
    "triton": (KVCacheLayout.LBNHC, 64, 64),  # MultipleOf(16): never split
}


def _spec(block_size: int, kernel: int | None = None) -> FullAttentionSpec:
    return FullAttentionSpec(block_size=block_size, num_kv_heads=HEADS, head_size=HEAD_SIZE,
                             dtype=torch.bfloat16,
                             block_stride_alignment=MultipleOf(kernel) if kernel else None)


class Caches:
    """vLLM's per-layer views of one random buffer (layer-compact: the layouts that split)."""

    def __init__(self, layout: KVCacheLayout, block_size: int, kernel: int, seed: int = 0):
        spec = _spec(block_size)
        self.page = spec.page_size_bytes
        self.layer_stride = self.page * BLOCKS
        generator = torch.Generator().manual_seed(seed)
        self.raw = torch.randint(-128, 128, (LAYERS * self.layer_stride,), dtype=torch.int8,
                                 generator=generator)
        tensor = KVCacheTensor(size=self.raw.numel(), layers=NAMES, layer_stride=self.layer_stride,
                               block_stride=self.page)
        self.registered = create_kv_cache_views(self.raw, spec, BLOCKS, layout, tensor,
                                                kernel_block_size=kernel)
        self.block_size, self.kernel = block_size, kernel

    def logical(self, layer: int) -> torch.Tensor:
        """Layer ``layer`` as ``[blocks, heads, block_size, C]`` in token order (a copy)."""
        kv = self.registered[layer]
        ratio = self.block_size // self.kernel
        return (kv.unflatten(0, (BLOCKS, ratio)).permute(0, 2, 1, 3, 4)
                .reshape(BLOCKS, HEADS, self.block_size, 2 * HEAD_SIZE))

    def block_bytes(self, layer: int, block: int) -> slice:
        start = layer * self.layer_stride + block * self.page
        return slice(start, start + self.page)


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
            page = whole[block].reshape(HEADS, caches.block_size, 2 * HEAD_SIZE)
            assert torch.equal(_bits(page), _bits(logical[block])), (layer, block)


def test_gather_and_scatter_move_whole_blocks_and_nothing_else(caches):
    layers = [whole_block_view(kv, caches.block_size) for kv in caches.registered]
    ids = torch.tensor([7, 2, 11])
    chunk = torch.empty(LAYERS, len(ids), *layers[0].shape[1:], dtype=torch.bfloat16)
    gather_blocks(layers, ids, chunk)
    # The chunk holds the blocks' tokens in logical order, whatever the split or layout.
    as_logical = chunk.view(LAYERS, len(ids), HEADS, caches.block_size, 2 * HEAD_SIZE)
    for layer in range(LAYERS):
        assert torch.equal(_bits(as_logical[layer]), _bits(caches.logical(layer)[ids]))

    before = caches.raw.clone()
    targets = torch.tensor([3, 4, 10])
    scatter_blocks(chunk, layers, targets)
    written = torch.zeros_like(caches.raw, dtype=torch.bool)
    for layer in range(LAYERS):
        for block in targets.tolist():
            written[caches.block_bytes(layer, block)] = True
    assert torch.equal(caches.raw[~written], before[~written])  # no other block's byte moved
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
        whole_block_view(torch.zeros(BLOCKS * 2 + 1, HEADS, 8, 2 * HEAD_SIZE), 16)


# -- the namespace ------------------------------------------------------------------------

def _fields(layout: KVCacheLayout | None, block_size: int, kernel: int | None) -> dict:
    vllm_config = SimpleNamespace(
        model_config=SimpleNamespace(model="org/M", revision=None, dtype=torch.bfloat16,
                                     quantization=None, hf_overrides={},
                                     hf_config=SimpleNamespace(_commit_hash="abc")),
        cache_config=SimpleNamespace(cache_dtype="auto", prefix_caching_hash_algo="sha256",
                                     kv_cache_layout=None),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1))
    kv_cache_config = SimpleNamespace(
        kv_cache_groups=[SimpleNamespace(kv_cache_spec=_spec(block_size, kernel), layer_names=NAMES)],
        kv_cache_layout=layout.name if layout else None)
    return namespace_fields(vllm_config, kv_cache_config, 4 * block_size)


@pytest.mark.parametrize("case", list(CASES))
def test_the_namespace_names_the_page_the_worker_will_view(case):
    layout, block_size, kernel = CASES[case]
    fields = _fields(layout, block_size, kernel)
    whole = whole_block_view(Caches(layout, block_size, kernel).registered[0], block_size)
    page = "x".join(map(str, whole.shape[1:]))
    if whole.shape[2] == block_size:  # whole [heads, block_size, C] pages: no field, old names
        assert "page_shape" not in fields
        assert rank_namespace(fields, 0, 0).name == rank_namespace(
            _fields(layout, block_size, None), 0, 0).name
    else:
        assert fields["page_shape"] == page


def test_the_namespace_differs_when_the_page_shape_differs():
    def name(layout, kernel):
        return rank_namespace(_fields(layout, 128, kernel), 0, 0).name
    unsplit = name(KVCacheLayout.LBHNC, None)
    assert name(KVCacheLayout.LBHNC, 64) != unsplit
    assert name(KVCacheLayout.LBHNC, 32) not in (unsplit, name(KVCacheLayout.LBHNC, 64))
    # NHD kernel blocks hold the same bytes in the same shape as whole blocks: one namespace.
    assert name(KVCacheLayout.LBNHC, 64) == name(KVCacheLayout.LBNHC, None)


# -- the worker ---------------------------------------------------------------------------

def _worker(root, caches: Caches, fields: dict, layerwise: str = "auto") -> WorkerSide:
    store = ChunkStore(ChunkLayout(root, Namespace(fields)))
    side = WorkerSide(store, NAMES, 4, caches.block_size, save_queue_size=8, can_save=True,
                      read_options=ReadOptions(layerwise=layerwise))
    side.register_kv_caches(dict(zip(NAMES, caches.registered)))
    return side


@pytest.mark.parametrize("layerwise", ["auto", "false"], ids=["layerwise", "whole-chunks"])
@pytest.mark.parametrize("saver_case,loader_case", [
    ("flashinfer-hnd-split", "flashinfer-hnd-split"),
    ("flashinfer-nhd-split", "flash_attn-128"),  # NHD kernel blocks share an unsplit engine's chunks
])
def test_chunks_saved_from_kernel_blocks_load_into_the_right_tokens(tmp_path, layerwise,
                                                                    saver_case, loader_case):
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
    written = torch.zeros_like(dst.raw, dtype=torch.bool)
    for layer in range(LAYERS):
        for block in (0, 9, 4):
            written[dst.block_bytes(layer, block)] = True
    assert torch.equal(dst.raw[~written], before[~written])


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
