"""LayerwiseReader: chunk files read layer by layer straight into CPU paged caches."""

import os
import threading

import pytest
import torch

from lmcache_fs import layer_reader
from lmcache_fs.layer_reader import LayerLoadJob, LayerwiseReader, reads_layerwise
from lmcache_fs.layout import ChunkLayout, Namespace
from lmcache_fs.quarantine import quarantine_dir
from lmcache_fs.store import ChunkStore

LAYERS, BLOCKS, PAGE, PER_CHUNK = 4, 64, (2, 16, 32), 4
KEYS = [f"{i:02x}" * 32 for i in range(6)]


def _store(root, name="m"):
    return ChunkStore(ChunkLayout(root, Namespace({"model": name})))


def _caches(fill=0.0):
    return [torch.full((BLOCKS, *PAGE), fill, dtype=torch.bfloat16) for _ in range(LAYERS)]


def _chunks(store, n):
    chunks = [torch.randn(LAYERS, PER_CHUNK, *PAGE).to(torch.bfloat16) for _ in range(n)]
    for key, chunk in zip(KEYS, chunks):
        store.save(key, chunk, {})
    return chunks


def _data_offset(path):
    from lmcache_fs.codec import read_chunk_header
    return read_chunk_header(path).data_offset


@pytest.mark.parametrize("threads", [1, 3])
def test_blocks_land_in_their_pages_bit_exactly(tmp_path, threads):
    store = _store(tmp_path)
    chunks = _chunks(store, 5)
    caches = _caches()
    reader = LayerwiseReader(store, caches, PER_CHUNK, threads)
    jobs = [LayerLoadJob(KEYS[0], 1, (40, 3, 17)),  # first block already cached locally
            LayerLoadJob(KEYS[1], 0, (60, 61, 62, 63)),
            LayerLoadJob(KEYS[2], 0, (0, 1, 2, 5)),
            LayerLoadJob(KEYS[3], 0, (8, 9)),  # the end of a chunk not wanted
            LayerLoadJob(KEYS[4], 0, (30, 31, 32, 33))]
    assert reader.start(jobs).finish() == [None] * 5
    for chunk, job in zip(chunks, jobs):
        for layer in range(LAYERS):
            for pos, block in enumerate(job.block_ids):
                assert torch.equal(caches[layer][block], chunk[layer, job.first_block + pos])
    written = {b for job in jobs for b in job.block_ids}
    assert all(torch.count_nonzero(kv[[b for b in range(BLOCKS) if b not in written]]) == 0
               for kv in caches)
    reader.close()


def test_a_layer_is_released_before_the_next_one_is_read(tmp_path, monkeypatch):
    store = _store(tmp_path)
    _chunks(store, 2)
    gate = threading.Event()
    real = LayerwiseReader.read_layer

    def read_layer(self, chunk, job, layer, scratch):
        if layer == 2:
            gate.wait(30)
        real(self, chunk, job, layer, scratch)

    monkeypatch.setattr(LayerwiseReader, "read_layer", read_layer)
    reader = LayerwiseReader(store, _caches(), PER_CHUNK, threads=2)
    load = reader.start([LayerLoadJob(KEYS[0], 0, (0, 1, 2, 3)), LayerLoadJob(KEYS[1], 0, (4, 5, 6, 7))])
    load.wait_layer(0)
    load.wait_layer(1)  # returns while layer 2 is still held back
    waiter = threading.Thread(target=load.wait_layer, args=(2,))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive(), "layer 2 was released before it was read"
    gate.set()
    waiter.join(30)
    assert not waiter.is_alive()
    assert load.finish() == [None, None]
    reader.close()


@pytest.mark.parametrize("damage", ["flip-last-layer", "truncate", "foreign", "missing"])
def test_a_bad_file_is_a_miss_and_the_others_load(tmp_path, damage):
    store = _store(tmp_path)
    chunks = _chunks(store, 2)
    path = store.layout.chunk_path(KEYS[0])
    if damage == "flip-last-layer":  # found only by the checksum, after the last layer
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) - 3)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0x10]))
    elif damage == "truncate":
        os.truncate(path, _data_offset(path) + 1000)
    elif damage == "foreign":
        _store(tmp_path / "other", name="other-model").save(KEYS[0], chunks[0], {})
        os.replace(_store(tmp_path / "other", name="other-model").layout.chunk_path(KEYS[0]), path)
    else:
        os.unlink(path)
    caches = _caches()
    reader = LayerwiseReader(store, caches, PER_CHUNK, threads=1)
    errors = reader.start([LayerLoadJob(KEYS[0], 0, (0, 1, 2, 3)),
                           LayerLoadJob(KEYS[1], 0, (4, 5, 6, 7))]).finish()
    assert errors[0] is not None and errors[1] is None
    assert torch.equal(caches[LAYERS - 1][7], chunks[1][LAYERS - 1, 3])
    if damage != "missing":
        assert not path.exists(), "a bad file must be quarantined"
        assert any(quarantine_dir(tmp_path).iterdir())
    reader.close()


def test_more_chunks_than_open_files_are_read_in_waves(tmp_path, monkeypatch):
    monkeypatch.setattr(layer_reader, "MAX_OPEN_PER_THREAD", 2)
    store = _store(tmp_path)
    chunks = _chunks(store, 5)
    caches = _caches()
    reader = LayerwiseReader(store, caches, PER_CHUNK, threads=1)
    jobs = [LayerLoadJob(k, 0, tuple(range(4 * i, 4 * i + 4))) for i, k in enumerate(KEYS[:5])]
    load = reader.start(jobs)
    load.wait_layer(LAYERS - 1)
    assert load.finish() == [None] * 5
    assert all(torch.equal(caches[2][4 * i + 1], chunks[i][2, 1]) for i in range(5))
    reader.close()


def test_an_unexpected_error_is_a_miss_and_never_a_hang(tmp_path, monkeypatch):
    store = _store(tmp_path)
    _chunks(store, 2)

    def broken(self, chunk, job, layer, scratch):
        raise RuntimeError("a bug")

    monkeypatch.setattr(LayerwiseReader, "read_layer", broken)
    reader = LayerwiseReader(store, _caches(), PER_CHUNK, threads=1)
    load = reader.start([LayerLoadJob(KEYS[0], 0, (0, 1, 2, 3)), LayerLoadJob(KEYS[1], 0, (4, 5, 6, 7))])
    load.wait_layer(LAYERS - 1)  # released although nothing was read
    errors = load.finish()
    assert all("internal error" in str(e) for e in errors)
    reader.close()


def test_only_contiguous_cpu_caches_are_read_layerwise():
    assert reads_layerwise(_caches())
    strided = [torch.zeros(PAGE[1], BLOCKS, PAGE[0], PAGE[2]).transpose(0, 1) for _ in range(2)]
    assert not reads_layerwise(strided)
    assert not reads_layerwise([])
