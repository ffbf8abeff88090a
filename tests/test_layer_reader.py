"""LayerwiseReader: chunk files read layer by layer straight into CPU paged caches."""

import os
import random
import threading
import time
from pathlib import Path

import pytest
import torch
from cachedir import flip_byte

from lmcache_fs.storage.layout import ChunkLayout, Namespace
from lmcache_fs.storage.layout import quarantine_dir
from lmcache_fs.storage.store import ChunkStore
from lmcache_fs.transfer.layer_reader import LayerLoadJob, LayerwiseReader

LAYERS, BLOCKS, PAGE, PER_CHUNK = 4, 64, (2, 16, 32), 4
KEYS = [f"{i:02x}" * 32 for i in range(6)]


def _store(root, name="m"):
    return ChunkStore(ChunkLayout(root, Namespace({"model": name})))


def _caches(fill=0.0, strided=False):
    """Per-layer caches [blocks, *PAGE]; strided: a transposed view, as CUDA's NHD layout is."""
    if not strided:
        return [torch.full((BLOCKS, *PAGE), fill, dtype=torch.bfloat16) for _ in range(LAYERS)]
    heads, block, width = PAGE
    return [torch.full((BLOCKS, block, heads, width), fill, dtype=torch.bfloat16).transpose(1, 2)
            for _ in range(LAYERS)]


def _chunks(store, n):
    chunks = [torch.randn(LAYERS, PER_CHUNK, *PAGE).to(torch.bfloat16) for _ in range(n)]
    for key, chunk in zip(KEYS, chunks):
        store.save(key, chunk, {})
    return chunks


def _data_offset(path):
    from lmcache_fs.ops.inspection import read_header
    return read_header(path).data_offset


PAGE_BYTES = 2 * PAGE[0] * PAGE[1] * PAGE[2]
ROOMY = 1000 * PAGE_BYTES  # staging for whole layers of any step below
# Staging room, in pages, -> groups of chunks per layer (of the 17 blocks below) and slots.
STAGING = {"a-group-per-chunk": (0, 5, 2),  # less than any chunk's layer: the minimum ring
           "three-groups": (16, 3, 2),      # 8 blocks per group: 3+4 | 4+2 | 4
           "whole-layers-2": (34, 1, 2),    # one group, room for two layers
           "whole-layers-all": (1000, 1, LAYERS)}


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("strided", [False, True], ids=["into-pages", "through-staging"])
@pytest.mark.parametrize("staging", STAGING)
def test_blocks_land_in_their_pages_bit_exactly(tmp_path, threads, strided, staging):
    store = _store(tmp_path)
    chunks = _chunks(store, 5)
    caches = _caches(strided=strided)
    pages, groups, ring = STAGING[staging]
    reader = LayerwiseReader(store, caches, PER_CHUNK, threads,
                             staging_bytes=max(1, pages * PAGE_BYTES))
    assert reader.into_pages is not strided
    jobs = [LayerLoadJob(KEYS[0], 1, (40, 3, 17)),  # first block already cached locally
            LayerLoadJob(KEYS[1], 0, (60, 61, 62, 63)),
            LayerLoadJob(KEYS[2], 0, (0, 1, 2, 5)),
            LayerLoadJob(KEYS[3], 0, (8, 9)),  # the end of a chunk not wanted
            LayerLoadJob(KEYS[4], 0, (30, 31, 32, 33))]
    load = reader.start(jobs)
    if strided:
        assert (load.destination.units_per_layer, load.destination.ring) == (groups, ring)
    for layer in range(LAYERS):  # as the forward pass does
        load.wait_layer(layer)
    assert load.finish() == [None] * 5
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

    def read_layer(self, chunk, layer, buffers):
        if layer == 2:
            gate.wait(30)
        real(self, chunk, layer, buffers)

    monkeypatch.setattr(LayerwiseReader, "read_layer", read_layer)
    reader = LayerwiseReader(store, _caches(), PER_CHUNK, threads=2, staging_bytes=ROOMY)
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


@pytest.mark.parametrize("strided", [False, True], ids=["into-pages", "through-staging"])
@pytest.mark.parametrize("damage", ["flip-last-layer", "truncate", "foreign", "missing"])
def test_a_bad_file_is_a_miss_and_the_others_load(tmp_path, damage, strided):
    store = _store(tmp_path)
    chunks = _chunks(store, 2)
    path = store.layout.chunk_path(KEYS[0])
    if damage == "flip-last-layer":  # found only by the checksum, after the last layer
        flip_byte(path, -3)
    elif damage == "truncate":
        os.truncate(path, _data_offset(path) + 1000)
    elif damage == "foreign":
        _store(tmp_path / "other", name="other-model").save(KEYS[0], chunks[0], {})
        os.replace(_store(tmp_path / "other", name="other-model").layout.chunk_path(KEYS[0]), path)
    else:
        os.unlink(path)
    caches = _caches(strided=strided)
    reader = LayerwiseReader(store, caches, PER_CHUNK, threads=1, staging_bytes=ROOMY)
    errors = reader.start([LayerLoadJob(KEYS[0], 0, (0, 1, 2, 3)),
                           LayerLoadJob(KEYS[1], 0, (4, 5, 6, 7))]).finish()
    assert errors[0] is not None and errors[1] is None
    assert torch.equal(caches[LAYERS - 1][7], chunks[1][LAYERS - 1, 3])
    if damage != "missing":
        assert not path.exists(), "a bad file must be quarantined"
        assert any(quarantine_dir(tmp_path).iterdir())
    reader.close()


def test_an_unexpected_error_is_a_miss_and_never_a_hang(tmp_path, monkeypatch):
    store = _store(tmp_path)
    _chunks(store, 2)

    def broken(self, chunk, layer, buffers):
        raise RuntimeError("a bug")

    monkeypatch.setattr(LayerwiseReader, "read_layer", broken)
    reader = LayerwiseReader(store, _caches(), PER_CHUNK, threads=1, staging_bytes=ROOMY)
    load = reader.start([LayerLoadJob(KEYS[0], 0, (0, 1, 2, 3)), LayerLoadJob(KEYS[1], 0, (4, 5, 6, 7))])
    load.wait_layer(LAYERS - 1)  # released although nothing was read
    errors = load.finish()
    assert all("internal error" in str(e) for e in errors)
    reader.close()


def test_the_staging_ring_waits_for_the_forward_pass(tmp_path):
    """With room for 2 layers, layer 2 is not read before layer 0 was handed to the cache."""
    store = _store(tmp_path)
    chunks = _chunks(store, 1)
    caches = _caches(strided=True)
    reader = LayerwiseReader(store, caches, PER_CHUNK, threads=1, staging_bytes=1)
    load = reader.start([LayerLoadJob(KEYS[0], 0, (0, 1, 2, 3))])
    deadline = time.monotonic() + 5
    while min(load._units_read) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert load._units_read == [2], "the reader overran the staging ring"
    load.wait_layer(0)
    assert torch.equal(caches[0][3], chunks[0][0, 3])
    assert load.finish() == [None]
    assert torch.equal(caches[LAYERS - 1][3], chunks[0][LAYERS - 1, 3])
    reader.close()


@pytest.mark.parametrize("seed", range(20))
def test_random_steps_through_staging_load_every_good_chunk_bit_exactly(tmp_path, seed):
    """Random jobs, staging sizes, thread counts and one damaged chunk in some steps."""
    rng = random.Random(seed)
    store = _store(tmp_path)
    chunks = _chunks(store, len(KEYS))
    free = list(range(BLOCKS))
    rng.shuffle(free)
    jobs = []
    for key in rng.sample(KEYS, rng.randint(1, len(KEYS))):
        first = rng.randrange(PER_CHUNK)
        count = rng.randint(1, PER_CHUNK - first)
        jobs.append(LayerLoadJob(key, first, tuple(free.pop() for _ in range(count))))
    damaged = rng.choice([None, *range(len(jobs))])
    if damaged is not None:  # one flipped byte in a random layer of one chunk
        path = store.layout.chunk_path(jobs[damaged].key)
        at = _data_offset(path) + rng.randrange(os.path.getsize(path) - _data_offset(path))
        with open(path, "r+b") as f:
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 0x01]))
    caches = _caches(strided=True)
    reader = LayerwiseReader(store, caches, PER_CHUNK, threads=rng.randint(1, 3),
                             staging_bytes=rng.randint(1, 40) * PAGE_BYTES)
    load = reader.start(jobs)
    for layer in range(LAYERS):
        load.wait_layer(layer)
    errors = load.finish()
    for i, job in enumerate(jobs):
        assert (errors[i] is not None) == (i == damaged), (i, errors[i])
        if i == damaged:
            continue
        chunk = chunks[KEYS.index(job.key)]
        for layer in range(LAYERS):
            for pos, block in enumerate(job.block_ids):
                assert torch.equal(caches[layer][block], chunk[layer, job.first_block + pos])
    reader.close()


def test_staging_stays_within_its_budget_however_long_the_prompt(tmp_path):
    """A step whose one layer is larger than the staging budget is staged in groups of chunks."""
    store = _store(tmp_path)
    chunks = _chunks(store, 6)
    caches = _caches(strided=True)
    budget = 10 * PAGE_BYTES  # one layer of the step is 24 pages
    reader = LayerwiseReader(store, caches, PER_CHUNK, threads=2, staging_bytes=budget)
    jobs = [LayerLoadJob(k, 0, tuple(range(4 * i, 4 * i + 4))) for i, k in enumerate(KEYS)]
    load = reader.start(jobs)
    staged = load.destination._host
    assert staged.numel() <= budget and staged.is_contiguous()
    assert load.destination.units_per_layer == 6  # 4 blocks per group: 5 pages is the limit
    for layer in range(LAYERS):
        load.wait_layer(layer)
        assert all(torch.equal(caches[layer][4 * i + 3], chunk[layer, 3])
                   for i, chunk in enumerate(chunks)), "a layer is whole once wait_layer returns"
    assert load.finish() == [None] * 6
    reader.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_layers_arrive_in_stream_order_through_a_reused_ring(tmp_path):
    """NHD strided CUDA caches: what the 'forward pass' queues right after wait_layer(l)
    on the current stream already sees layer l's loaded blocks, with the ring reused."""
    store = _store(tmp_path)
    chunks = _chunks(store, 5)
    heads, block, width = PAGE
    caches = [torch.zeros(BLOCKS, block, heads, width, dtype=torch.bfloat16, device="cuda")
              .transpose(1, 2) for _ in range(LAYERS)]
    reader = LayerwiseReader(store, caches, PER_CHUNK, threads=2, staging_bytes=1)
    assert not reader.into_pages
    jobs = [LayerLoadJob(k, 0, tuple(range(60 - 4 * i, 64 - 4 * i))) for i, k in enumerate(KEYS[:5])]
    load = reader.start(jobs)
    seen = []
    for layer in range(LAYERS):
        load.wait_layer(layer)
        seen.append(caches[layer][list(jobs[4].block_ids)].clone())  # queued after the scatter
    assert load.finish() == [None] * 5
    torch.cuda.synchronize()
    for layer in range(LAYERS):
        assert torch.equal(seen[layer].cpu(), chunks[4][layer])
        for chunk, job in zip(chunks, jobs):
            assert torch.equal(caches[layer][list(job.block_ids)].cpu(), chunk[layer])
    reader.close()


def test_a_step_with_more_chunks_than_the_soft_open_files_limit_loads_them_all(tmp_path):
    # Every chunk of a step stays open from its first layer to its last (file and
    # directory): the worker's start-up lifts the soft limit, which vLLM raises only in its
    # API server. Run in a child process with a soft limit of 64 and 40 chunks (80 descriptors).
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        import test_layer_reader as t
        from lmcache_fs.transfer.layer_reader import LayerLoadJob, LayerwiseReader
        from lmcache_fs.transfer.open_files import raise_open_files_limit
        assert raise_open_files_limit() > 64  # as the worker's start-up does
        store = t._store({str(tmp_path)!r})
        keys = [("%02x" % i) * 32 for i in range(40)]
        chunks = [t.torch.randn(t.LAYERS, t.PER_CHUNK, *t.PAGE).to(t.torch.bfloat16) for _ in keys]
        for key, chunk in zip(keys, chunks):
            store.save(key, chunk, {{}})
        caches = [t.torch.zeros(40 * t.PER_CHUNK, *t.PAGE, dtype=t.torch.bfloat16)
                  for _ in range(t.LAYERS)]
        reader = LayerwiseReader(store, caches, t.PER_CHUNK, threads=1, staging_bytes=t.ROOMY)
        jobs = [LayerLoadJob(k, 0, tuple(range(i * t.PER_CHUNK, (i + 1) * t.PER_CHUNK)))
                for i, k in enumerate(keys)]
        errors = reader.start(jobs).finish()
        assert errors == [None] * 40, [e for e in errors if e][:2]
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_raising_the_open_files_limit_logs_the_change_once(tmp_path):
    # The worker's start-up lifts it (a side effect no reader may have): one INFO line
    # when it changes, nothing when it is already there. In a child process: a limit lowered
    # here would stay lowered for the other tests.
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import logging, resource
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        from lmcache_fs.transfer.open_files import raise_open_files_limit
        first, again = raise_open_files_limit(), raise_open_files_limit()
        assert first == again == resource.getrlimit(resource.RLIMIT_NOFILE)[0] > 64
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("INFO raised the open files limit from 64 to ")
