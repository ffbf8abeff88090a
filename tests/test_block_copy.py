"""Whole-block copies between paged caches and chunk buffers, for CPU and CUDA NHD layouts."""

import pytest
import torch

from lmcache_fs.transfer.block_copy import block_ids_on, gather_blocks, scatter_blocks

NUM_BLOCKS, HEADS, BLOCK, HEAD2 = 12, 2, 16, 64


def _contiguous_layers(n):
    return [torch.randn(NUM_BLOCKS, HEADS, BLOCK, HEAD2).to(torch.bfloat16) for _ in range(n)]


def _nhd_layers(n):
    # vLLM's CUDA FlashAttention cache: physically [blocks, tokens, heads, C],
    # handed to connectors as a strided logical [blocks, heads, tokens, C] view.
    return [torch.randn(NUM_BLOCKS, BLOCK, HEADS, HEAD2).to(torch.bfloat16).permute(0, 2, 1, 3)
            for _ in range(n)]


@pytest.mark.parametrize("make_layers", [_contiguous_layers, _nhd_layers])
def test_gather_then_scatter_moves_exactly_the_chosen_blocks(make_layers):
    src_layers = make_layers(3)
    ids = torch.tensor([7, 2, 9])
    buf = torch.empty(3, len(ids), HEADS, BLOCK, HEAD2, dtype=torch.bfloat16)
    gather_blocks(src_layers, ids, buf)
    for layer, kv in enumerate(src_layers):
        for i, block in enumerate(ids.tolist()):
            assert torch.equal(buf[layer, i], kv[block])

    dst_layers = make_layers(3)
    before = [kv.clone() for kv in dst_layers]
    targets = torch.tensor([0, 5, 11])
    scatter_blocks(buf, dst_layers, targets)
    for layer, kv in enumerate(dst_layers):
        for i, block in enumerate(targets.tolist()):
            assert torch.equal(kv[block], src_layers[layer][ids[i]])
        untouched = [b for b in range(NUM_BLOCKS) if b not in targets.tolist()]
        assert torch.equal(kv[untouched], before[layer][untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float8_e4m3fn])
def test_every_kv_dtype_moves_bit_for_bit(dtype):
    """The CPU copies move same-size integers (numpy knows no bf16 or fp8): bits, not values."""
    layers = [torch.randn(NUM_BLOCKS, HEADS, BLOCK, HEAD2).to(dtype) for _ in range(2)]
    buf = torch.empty(2, 3, HEADS, BLOCK, HEAD2, dtype=dtype)
    gather_blocks(layers, torch.tensor([4, 0, 11]), buf)
    dst = [torch.zeros_like(kv) for kv in layers]
    scatter_blocks(buf, dst, torch.tensor([1, 2, 3]))
    for kv, out in zip(layers, dst):
        assert torch.equal(out[1:4].view(torch.uint8), kv[[4, 0, 11]].view(torch.uint8))


@pytest.mark.parametrize("bad", [NUM_BLOCKS, -1])
def test_a_block_id_outside_the_cache_is_an_error_not_another_block(bad):
    layers = _contiguous_layers(2)
    buf = torch.empty(2, 2, HEADS, BLOCK, HEAD2, dtype=torch.bfloat16)
    with pytest.raises(IndexError):
        gather_blocks(layers, torch.tensor([0, bad]), buf)
    before = [kv.clone() for kv in layers]
    with pytest.raises(IndexError):
        scatter_blocks(buf, layers, torch.tensor([0, bad]))
    assert all(torch.equal(kv, b) for kv, b in zip(layers, before))


def test_nhd_view_keeps_its_strides_after_scatter():
    layers = _nhd_layers(1)
    strides = layers[0].stride()
    scatter_blocks(torch.zeros(1, 1, HEADS, BLOCK, HEAD2, dtype=torch.bfloat16), layers, torch.tensor([3]))
    assert layers[0].stride() == strides and not layers[0].is_contiguous()
    assert torch.count_nonzero(layers[0][3]) == 0


def test_block_ids_are_an_int64_tensor_on_the_device():
    ids = block_ids_on([7, 3, 5], torch.device("cpu"))
    assert ids.dtype == torch.int64 and ids.tolist() == [7, 3, 5]



def test_pool_threads_of_a_gpu_worker_start_on_its_device(monkeypatch):
    # Else rank 3's pool threads would open a CUDA context on GPU 0.
    from lmcache_fs.gpu.threads import device_thread_pool

    devices = []
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    pool = device_thread_pool(2, "test", torch.device("cuda", 3))
    for _ in range(4):
        pool.submit(lambda: None).result()
    pool.shutdown()
    assert devices and set(devices) == {3}
    cpu_pool = device_thread_pool(1, "test", torch.device("cpu"))
    cpu_pool.submit(lambda: None).result()
    cpu_pool.shutdown()
    assert set(devices) == {3}  # CPU pools set nothing
