"""The CUDA block-copy kernels: build fallback everywhere, bit-exactness on a GPU.

The GPU tests compare the kernels with the pure-torch copy (the reference) bit
for bit, for vLLM's CUDA layouts (HND contiguous, NHD strided view, a padded
view), bf16 / fp16 / fp8, random block ids and chunk-buffer slices.
"""

from __future__ import annotations

import logging
import time
from unittest import mock

import pytest
import torch

from lmcache_fs.gpu import block_copy_cuda
from lmcache_fs.gpu import kernels as cuda_build
from lmcache_fs.transfer import block_copy
from lmcache_fs.transfer.block_copy import block_ids_on, gather_blocks, scatter_blocks


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """This test's log records, even after log.init_logging() stopped propagation."""
    monkeypatch.setattr(logging.getLogger("lmcache_fs"), "propagate", True)
    caplog.set_level(logging.INFO, logger="lmcache_fs")
    return caplog


@pytest.fixture
def fresh_loader():
    """Each test loads the extension as if in a new process."""
    cuda_build.load_cuda_kernels.cache_clear()
    yield
    cuda_build.load_cuda_kernels.cache_clear()


# -- everywhere ----------------------------------------------------------------------

def test_kernel_sources_sit_where_the_loader_looks():
    # Guards against moving cuda/ without telling the loader (a silent permanent fallback).
    for name in (*cuda_build.SOURCES, *cuda_build.HEADERS):
        assert (cuda_build.source_dir() / name).is_file(), name


def test_a_failed_build_warns_once_and_the_torch_copy_is_used(monkeypatch, records, fresh_loader):
    def broken_build():
        raise RuntimeError("Error building extension 'lmcache_fs_cuda'\nnvcc not found")
    monkeypatch.setattr(cuda_build, "_load", broken_build)
    assert cuda_build.load_cuda_kernels() is None
    assert cuda_build.load_cuda_kernels() is None
    warnings = [r.getMessage() for r in records.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "nvcc not found" in warnings[0]
    assert "block copies use torch" in warnings[0] and "verify on the host" in warnings[0]


def test_missing_sources_are_named_in_the_reason(tmp_path):
    with pytest.raises(RuntimeError, match="not found in .*reinstall lmcache-fs"):
        cuda_build.compile_kernels(tmp_path / "build", "9.0", tmp_path)


def test_cpu_copies_never_build_kernels(monkeypatch):
    # A CPU-only engine must not try nvcc, nor log about CUDA.
    def must_not_build():
        raise AssertionError("built")
    monkeypatch.setattr(block_copy_cuda, "load_cuda_kernels", must_not_build)
    layers = [torch.randn(6, 2, 4, 8) for _ in range(2)]
    out = torch.empty(2, 2, 2, 4, 8)
    gather_blocks(layers, torch.tensor([4, 1]), out)
    assert torch.equal(out[1, 0], layers[1][4])


def test_torch_fallback_moves_fp8_blocks_as_bytes():
    # torch has no index_copy_ for float8: the fallback must still scatter fp8 caches.
    layers = [_random((6, 2, 4, 8), torch.float8_e4m3fn, "cpu") for _ in range(2)]
    chunk = torch.empty(2, 2, 2, 4, 8, dtype=torch.float8_e4m3fn)
    gather_blocks(layers, torch.tensor([5, 0]), chunk)
    scatter_blocks(chunk, layers, torch.tensor([1, 2]))
    for kv in layers:
        assert torch.equal(_bytes(kv[1]), _bytes(kv[5])) and torch.equal(_bytes(kv[2]), _bytes(kv[0]))


def test_build_dir_follows_its_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv(cuda_build.BUILD_DIR_ENV, str(tmp_path / "b"))
    assert cuda_build.build_dir("sm_90").parent.parent == tmp_path / "b"
    monkeypatch.delenv(cuda_build.BUILD_DIR_ENV)
    assert torch.__version__ in str(cuda_build.build_dir("sm_90"))


def _nhd(num_blocks: int, heads: int, tokens: int, width: int, dtype: torch.dtype,
         device: str = "cpu") -> torch.Tensor:
    # vLLM's CUDA FlashAttention cache: physically [blocks, tokens, heads, C],
    # handed over as a strided logical [blocks, heads, tokens, C] view.
    return _random((num_blocks, tokens, heads, width), dtype, device).permute(0, 2, 1, 3)


def _hnd(num_blocks, heads, tokens, width, dtype, device="cpu"):
    return _random((num_blocks, heads, tokens, width), dtype, device)


def _padded(num_blocks, heads, tokens, width, dtype, device="cpu"):
    # Rows padded by 8 elements: every stride differs from the contiguous one.
    return _random((num_blocks, heads, tokens, width + 8), dtype, device)[..., :width]


def _random(shape, dtype, device) -> torch.Tensor:
    # Random bytes, so every bit pattern (NaNs, fp8 specials) must survive the copy.
    raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * dtype.itemsize), dtype=torch.uint8)
    return raw.view(dtype).to(device)


def test_plan_reads_the_nhd_strides_in_bytes():
    layers = [_nhd(10, 4, 16, 64, torch.bfloat16) for _ in range(3)]
    plan = block_copy_cuda._make_plan(layers)
    assert (plan.dim1, plan.dim2, plan.row_bytes) == (4, 16, 128)
    assert plan.dim1_stride == 64 * 2 and plan.dim2_stride == 4 * 64 * 2
    assert plan.block_stride == 16 * 4 * 64 * 2 and plan.num_blocks == 10
    assert plan.layer_ptrs.tolist() == [kv.data_ptr() for kv in layers]


@pytest.mark.parametrize("width,dtype,alignment", [(64, torch.bfloat16, 16),
                                                    (20, torch.float8_e4m3fn, 4),
                                                    (3, torch.float16, 2)])
def test_plan_picks_the_widest_vector_every_row_and_stride_allows(width, dtype, alignment):
    plan = block_copy_cuda._make_plan([_hnd(4, 2, 16, width, dtype)])
    assert plan.alignment == alignment


def test_plan_refuses_pages_whose_rows_are_not_contiguous():
    layers = [_hnd(4, 2, 16, 64, torch.float16).transpose(2, 3)]
    with pytest.raises(block_copy_cuda._Unsupported, match="not contiguous"):
        block_copy_cuda._make_plan(layers)


# -- on a GPU ------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
LAYOUTS = {"hnd": _hnd, "nhd": _nhd, "padded": _padded}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}
GEOMETRIES = [(8, 16, 256), (2, 16, 128), (1, 32, 40), (3, 5, 6)]  # heads, tokens, 2*head_size


@pytest.fixture
def kernels():
    module = cuda_build.load_cuda_kernels()
    assert module is not None, "the CUDA kernels failed to build on a CUDA machine"
    return module


def torch_reference():
    """Within this block, block_copy's public functions take their pure-torch path."""
    return mock.patch.object(block_copy, "copy_blocks_cuda", lambda *args: False)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.usefixtures("kernels")
@pytest.mark.gpu
@needs_cuda
def test_kernels_match_the_torch_reference_bit_for_bit(layout, dtype, geometry):
    heads, tokens, width = geometry
    make, dt, num_layers, total = LAYOUTS[layout], DTYPES[dtype], 5, 97
    gen = torch.Generator().manual_seed(sum(geometry))
    layers = [make(total, heads, tokens, width, dt, "cuda") for _ in range(num_layers)]
    ids = torch.randperm(total, generator=gen)[:23].cuda()

    got = torch.empty(num_layers, 23, heads, tokens, width, dtype=dt, device="cuda")
    want = torch.empty_like(got)
    assert block_copy_cuda.copy_blocks_cuda(True, layers, ids, got)
    with torch_reference():
        gather_blocks(layers, ids, want)
    assert torch.equal(_bytes(got), _bytes(want))

    # Scatter a slice of a bigger chunk buffer (as a load of a partial chunk does).
    big = make(num_layers * 40, heads, tokens, width, dt, "cuda").contiguous()
    src = big.view(num_layers, 40, heads, tokens, width)[:, 7:30]
    targets = [kv.clone() for kv in layers]
    reference = [kv.clone() for kv in layers]
    assert block_copy_cuda.copy_blocks_cuda(False, targets, ids, src)
    with torch_reference():
        scatter_blocks(src, reference, ids)
    for kv, ref in zip(targets, reference):
        assert torch.equal(_bytes(kv), _bytes(ref))


@pytest.mark.usefixtures("kernels")
@pytest.mark.gpu
@needs_cuda
def test_public_functions_dispatch_to_the_kernel_and_keep_nhd_strides(monkeypatch):
    layers = [_nhd(32, 4, 16, 64, torch.bfloat16, "cuda") for _ in range(3)]
    strides = layers[0].stride()
    ids = torch.tensor([31, 0, 7], device="cuda")
    out = torch.empty(3, 3, 4, 16, 64, dtype=torch.bfloat16, device="cuda")
    calls = []
    real = block_copy_cuda.copy_blocks_cuda
    monkeypatch.setattr(block_copy, "copy_blocks_cuda", lambda *a: calls.append(a[0]) or real(*a))
    gather_blocks(layers, ids, out)
    scatter_blocks(torch.zeros_like(out), layers, ids)
    assert calls == [True, False]
    assert layers[0].stride() == strides
    assert all(torch.count_nonzero(kv[ids]) == 0 for kv in layers)


@pytest.mark.usefixtures("kernels")
@pytest.mark.gpu
@needs_cuda
def test_out_of_range_ids_are_skipped_not_written_out_of_bounds():
    layers = [_hnd(8, 2, 16, 64, torch.float16, "cuda") for _ in range(2)]
    before = [kv.clone() for kv in layers]
    src = torch.zeros(2, 2, 2, 16, 64, dtype=torch.float16, device="cuda")
    assert block_copy_cuda.copy_blocks_cuda(False, layers, torch.tensor([3, 8], device="cuda"), src)
    torch.cuda.synchronize()
    for kv, old in zip(layers, before):
        assert torch.count_nonzero(kv[3]) == 0
        assert torch.equal(_bytes(kv[torch.arange(8) != 3]), _bytes(old[torch.arange(8) != 3]))


@pytest.mark.usefixtures("kernels")
@pytest.mark.gpu
@needs_cuda
def test_unsupported_layouts_fall_back_to_torch_with_one_warning(records, monkeypatch):
    monkeypatch.setattr(block_copy_cuda, "_reported", set())
    layers = [_hnd(8, 2, 16, 64, torch.float16, "cuda").transpose(2, 3) for _ in range(2)]
    ids = torch.tensor([5, 1], device="cuda")
    out = torch.empty(2, 2, 2, 64, 16, dtype=torch.float16, device="cuda")
    gather_blocks(layers, ids, out)
    gather_blocks(layers, ids, out)
    assert torch.equal(_bytes(out[1]), _bytes(layers[1][ids]))
    warnings = [r.getMessage() for r in records.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if "not contiguous" in w]) == 1


@pytest.mark.gpu
@needs_cuda
def test_block_ids_reach_the_gpu_without_waiting_for_queued_work():
    block_ids_on([0], torch.device("cuda"))  # the pinned allocator's first block (cudaHostAlloc syncs)
    torch.cuda.synchronize()
    torch.cuda._sleep(1 << 30)  # about a second of work queued on the stream
    start = time.perf_counter()
    ids = block_ids_on(list(range(64)), torch.device("cuda"))
    queued_s = time.perf_counter() - start
    assert queued_s < 0.1, "the copy waited for the stream"
    assert ids.tolist() == list(range(64))  # (this waits, in stream order)
