"""Chunk reads into GPU staging slots: path choice, pipelining, verification, saves.

Everything above the ``gpu`` mark runs on any machine: the POSIX path on a CPU
"device", and the kvikio path through a stand-in kvikio that reads into host
memory (same calls, same offsets), so the header checks and the checksum of
kvikio reads are exercised without a GPU.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest
import torch
from cachedir import flip_byte

from lmcache_fs.storage.codec import ChunkFileError
from lmcache_fs.storage.layout import ChunkLayout, Namespace
from lmcache_fs.storage.store import ChunkStore
from lmcache_fs.config import TriState
from lmcache_fs.transfer import read_paths
from lmcache_fs.transfer.chunk_reader import MAX_SLOTS, ChunkReader
from lmcache_fs.transfer.read_paths import (
    GdsUnavailableError,
    ReadBackend,
    ReadPath,
    choose_read_backend,
    kvikio_backend,
    kvikio_threads,
)

SHAPE = (2, 3, 4, 16, 32)  # layers, blocks, heads, tokens, 2*head_size
NBYTES = 2 * 3 * 4 * 16 * 32 * 2


@pytest.fixture
def store(tmp_path: Path) -> ChunkStore:
    return ChunkStore(ChunkLayout(tmp_path, Namespace({"model": "m"})))


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """This test's log records, even after log.init_logging() stopped propagation."""
    monkeypatch.setattr(logging.getLogger("lmcache_fs"), "propagate", True)
    caplog.set_level(logging.INFO, logger="lmcache_fs.transfer.read_paths")
    return caplog


@pytest.fixture(autouse=True)
def fresh_probe():
    """Each test probes and logs as if in a new process."""
    read_paths._probe_once.cache_clear()
    read_paths._log_once.cache_clear()
    yield
    read_paths._probe_once.cache_clear()
    read_paths._log_once.cache_clear()


def _key(i: int) -> str:
    return f"{i:016x}"


def _save(store: ChunkStore, n: int) -> list[torch.Tensor]:
    chunks = [torch.randn(SHAPE).to(torch.bfloat16) for _ in range(n)]
    for i, chunk in enumerate(chunks):
        store.save(_key(i), chunk, {"chunk_index": str(i)})
    return chunks


def _flip_a_data_byte(store: ChunkStore, key: str) -> None:
    flip_byte(store.layout.chunk_path(key), 4096 + 100)


class FakeKvikio:
    """kvikio's CuFile/pread/memory_register surface, reading into host tensors at once."""

    __version__ = "fake"

    class CuFile:
        def __init__(self, path, flags="r"):
            self._fd = os.open(path, os.O_RDONLY)

        def fileno(self):
            return self._fd

        def pread(self, buf, size, file_offset=0):
            got = os.preadv(self._fd, [memoryview(buf.numpy())[:size]], file_offset)
            return type("Future", (), {"get": lambda self: got})()

        def close(self):
            os.close(self._fd)

    @staticmethod
    def memory_register(buf):
        pass

    @staticmethod
    def memory_deregister(buf):
        pass


def _reader(store, backend, staging_bytes=MAX_SLOTS * NBYTES, verify=True) -> ChunkReader:
    return ChunkReader(store, SHAPE, torch.bfloat16, "cpu", backend, staging_bytes=staging_bytes,
                       verify=verify)


# -- choosing the read path ---------------------------------------------------------

def test_failed_probe_falls_back_to_posix_with_one_warning(monkeypatch, records):
    # Guards against a machine without kvikio losing the GPU path, or flooding the log.
    def no_kvikio():
        raise ImportError("libkvikio.so: cannot open shared object file")
    monkeypatch.setattr(read_paths, "probe_kvikio", no_kvikio)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    first = choose_read_backend(TriState.AUTO, torch.device("cuda"))
    second = choose_read_backend(TriState.AUTO, torch.device("cuda"))
    assert first.path is second.path is ReadPath.POSIX and first.kvikio is None
    warnings = [r for r in records.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "libkvikio.so" in warnings[0].getMessage() and "POSIX" in warnings[0].getMessage()


def test_use_gds_true_refuses_to_run_without_kvikio(monkeypatch):
    # Guards against "true" silently meaning "maybe".
    def no_kvikio():
        raise ImportError("no module named kvikio")
    monkeypatch.setattr(read_paths, "probe_kvikio", no_kvikio)
    with pytest.raises(GdsUnavailableError, match="use_gds=true.*set use_gds to auto"):
        choose_read_backend(TriState.TRUE, torch.device("cuda"))


def test_use_gds_true_refuses_kvikio_compatibility_mode(monkeypatch):
    monkeypatch.setattr(read_paths, "probe_kvikio", lambda: (FakeKvikio, False))
    with pytest.raises(GdsUnavailableError, match="compatibility mode"):
        choose_read_backend(TriState.TRUE, torch.device("cuda"))


def test_auto_uses_kvikio_when_it_reports_gds(monkeypatch, records):
    fake = type("K", (FakeKvikio,), {"defaults": type("D", (), {"get": staticmethod(lambda k: 8)})})
    monkeypatch.setattr(read_paths, "probe_kvikio", lambda: (fake, True))
    backend = choose_read_backend(TriState.AUTO, torch.device("cuda"))
    assert backend == ReadBackend(ReadPath.GDS, fake)
    assert any("GPUDirect Storage, 8 threads" in r.getMessage() for r in records.records)


def test_use_gds_false_and_cpu_devices_never_probe(monkeypatch):
    def must_not_probe():
        raise AssertionError("probed")
    monkeypatch.setattr(read_paths, "probe_kvikio", must_not_probe)
    assert choose_read_backend(TriState.FALSE, torch.device("cuda")).path is ReadPath.POSIX
    assert choose_read_backend(TriState.AUTO, torch.device("cpu")).path is ReadPath.POSIX


def test_kvikio_thread_count_is_not_kvikios_default_of_one():
    assert 4 <= kvikio_threads() <= 16


# -- reading through the POSIX path and a stand-in kvikio ------------------------------

BACKENDS = [ReadBackend(ReadPath.POSIX), ReadBackend(ReadPath.KVIKIO_POSIX, FakeKvikio)]


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.path.value)
@pytest.mark.parametrize("num_keys", [0, 1, 7])
def test_reads_every_chunk_in_order_through_fewer_slots(store, backend, num_keys):
    # Guards against slot reuse overwriting a chunk before the caller used it.
    chunks = _save(store, num_keys)
    reader = _reader(store, backend, staging_bytes=2 * NBYTES)
    assert reader.slots == 2
    seen = []
    for i, chunk in reader.read([_key(i) for i in range(num_keys)]):
        assert isinstance(chunk, torch.Tensor) and torch.equal(chunk, chunks[i])
        seen.append(i)
    assert seen == list(range(num_keys))
    reader.close()


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.path.value)
def test_a_missing_or_corrupt_chunk_is_a_miss_for_that_chunk_only(store, backend):
    chunks = _save(store, 4)
    _flip_a_data_byte(store, _key(2))
    reader = _reader(store, backend, staging_bytes=2 * NBYTES)
    results = {i: c.clone() if isinstance(c, torch.Tensor) else c
               for i, c in reader.read([_key(0), _key(9), _key(2), _key(3)])}
    assert torch.equal(results[0], chunks[0]) and torch.equal(results[3], chunks[3])
    assert isinstance(results[1], ChunkFileError) and "missing" in str(results[1])
    assert isinstance(results[2], ChunkFileError) and "checksum" in str(results[2])
    reader.close()


def test_kvikio_reads_check_the_header_before_reading_data(store, tmp_path):
    # Guards against loading another namespace's chunk or a truncated file onto the GPU.
    _save(store, 1)
    other = ChunkStore(ChunkLayout(tmp_path, Namespace({"model": "other"})))
    other.layout.chunk_path(_key(0)).parent.mkdir(parents=True)
    os.link(store.layout.chunk_path(_key(0)), other.layout.chunk_path(_key(0)))
    reader = _reader(other, BACKENDS[1])
    [(_, foreign)] = reader.read([_key(0)])
    assert isinstance(foreign, ChunkFileError) and "namespace" in str(foreign)

    path = store.layout.chunk_path(_key(0))
    os.truncate(path, os.path.getsize(path) - 1)
    [(_, truncated)] = _reader(store, BACKENDS[1]).read([_key(0)])
    assert isinstance(truncated, ChunkFileError) and "size" in str(truncated)


def test_kvikio_reads_never_go_through_a_symlink(store, tmp_path):
    # kvikio opens by path, following links: a valid chunk planted outside must not load.
    _save(store, 1)
    path = store.layout.chunk_path(_key(0))
    outside = tmp_path / "outside.safetensors"
    os.replace(path, outside)
    os.symlink(outside, path)
    [(_, got)] = _reader(store, BACKENDS[1]).read([_key(0)])
    assert isinstance(got, ChunkFileError) and "symlink" in str(got)
    assert not os.path.lexists(path) and outside.exists()  # the link was quarantined


def test_kvikio_reads_find_data_behind_a_header_longer_than_a_page(store):
    # The header is read through the open file in one page; a longer one must still work.
    chunk = torch.randn(SHAPE).to(torch.bfloat16)
    store.save(_key(0), chunk, {"note": "x" * 5000})
    assert os.path.getsize(store.layout.chunk_path(_key(0))) == 8192 + NBYTES
    [(_, got)] = _reader(store, BACKENDS[1]).read([_key(0)])
    assert isinstance(got, torch.Tensor) and torch.equal(got, chunk)


def test_unverified_kvikio_reads_are_an_explicit_choice(store):
    # verify=False trusts the filesystem: a flipped data byte is loaded as is.
    chunks = _save(store, 1)
    _flip_a_data_byte(store, _key(0))
    [(_, chunk)] = _reader(store, BACKENDS[1], verify=False).read([_key(0)])
    assert isinstance(chunk, torch.Tensor) and not torch.equal(chunk, chunks[0])
    posix = _reader(store, BACKENDS[0], verify=False)
    assert posix.verify, "POSIX reads are verified on the host whatever the setting"


class CountingKvikio(FakeKvikio):
    """The stand-in kvikio, counting files still open."""

    open_files = 0

    class CuFile(FakeKvikio.CuFile):
        def __init__(self, path, flags="r"):
            super().__init__(path, flags)
            CountingKvikio.open_files += 1

        def close(self):
            super().close()
            CountingKvikio.open_files -= 1


@pytest.mark.parametrize("backend,verify", [(BACKENDS[0], True),
                                            (ReadBackend(ReadPath.KVIKIO_POSIX, CountingKvikio), True),
                                            (ReadBackend(ReadPath.KVIKIO_POSIX, CountingKvikio), False)],
                         ids=["posix", "kvikio-pool", "kvikio-inline"])
def test_stopping_early_leaves_the_reader_usable_and_no_read_running(store, backend, verify):
    chunks = _save(store, 6)
    reader = _reader(store, backend, staging_bytes=3 * NBYTES, verify=verify)
    for _ in range(20):  # the reads still pending at the break vary from run to run
        for i, _ in reader.read([_key(i) for i in range(6)]):
            if i == 1:
                break
        assert CountingKvikio.open_files == 0  # every read started was finished and closed
    again = [torch.equal(c, chunks[5 - i]) for i, c in reader.read([_key(5), _key(4)])]
    assert again == [True, True]
    reader.close()


def test_kvikio_reads_with_no_host_hash_finish_on_the_callers_thread(store, monkeypatch):
    # No pool thread means no GIL hand-off per chunk; the reads still overlap in kvikio.
    chunks = _save(store, 5)
    reader = _reader(store, BACKENDS[1], verify=False, staging_bytes=2 * NBYTES)

    def no_thread(*args, **kwargs):
        raise AssertionError("a pool thread was used")

    monkeypatch.setattr(reader._pool, "submit", no_thread)
    got = [(i, c.clone()) for i, c in reader.read([_key(i) for i in range(5)])]
    assert [i for i, _ in got] == list(range(5))
    assert all(torch.equal(c, chunks[i]) for i, c in got)
    reader.close()


def test_an_unexpected_error_in_a_read_is_a_miss_for_that_chunk_only(store, monkeypatch):
    chunks = _save(store, 3)
    real_open = store.open_chunk

    def buggy_for_key_1(key, *args):
        if key == _key(1):
            raise ValueError("a bug, not a bad file")
        return real_open(key, *args)

    monkeypatch.setattr(store, "open_chunk", buggy_for_key_1)
    results = {i: c.clone() if isinstance(c, torch.Tensor) else c
               for i, c in _reader(store, BACKENDS[0]).read([_key(i) for i in range(3)])}
    assert torch.equal(results[0], chunks[0]) and torch.equal(results[2], chunks[2])
    assert isinstance(results[1], ChunkFileError) and "internal error" in str(results[1])


# -- on a GPU ------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _gpu_backends() -> list[ReadBackend]:
    backends = [ReadBackend(ReadPath.POSIX)]
    try:
        return backends + [kvikio_backend()]
    except Exception:  # noqa: BLE001 - kvikio not installed here: test the POSIX path only
        return backends


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("verify", [True, False])
def test_gpu_reads_then_scatter_reproduce_the_saved_blocks(store, verify):
    from lmcache_fs.transfer.block_copy import gather_blocks, scatter_blocks

    layers, blocks, heads, tokens, width = SHAPE
    paged = [torch.randn(64, tokens, heads, width, device="cuda").to(torch.bfloat16)
             .permute(0, 2, 1, 3) for _ in range(layers)]  # vLLM's NHD view
    ids = [torch.randperm(64, device="cuda")[:blocks] for _ in range(5)]
    for n, block_ids in enumerate(ids):
        chunk = torch.empty(SHAPE, dtype=torch.bfloat16, device="cuda")
        gather_blocks(paged, block_ids, chunk)
        store.save(_key(n), chunk.cpu(), {})
    for backend in _gpu_backends():
        target = [torch.zeros_like(kv) for kv in paged]
        reader = ChunkReader(store, SHAPE, torch.bfloat16, "cuda", backend,
                             staging_bytes=2 * NBYTES, verify=verify)
        for n, chunk in reader.read([_key(n) for n in range(len(ids))]):
            assert isinstance(chunk, torch.Tensor), chunk
            scatter_blocks(chunk, target, ids[n])
        torch.cuda.synchronize()
        for kv, want in zip(target, paged):
            for block_ids in ids:
                assert torch.equal(kv[block_ids], want[block_ids]), backend.path
        reader.close()


@pytest.mark.gpu
@cuda
def test_device_saver_publishes_what_was_on_the_gpu(store):
    from lmcache_fs.storage.writer import BackgroundWriter
    from lmcache_fs.transfer.device_saver import DeviceChunkSaver

    writer = BackgroundWriter(store, max_queue=8)
    saver = DeviceChunkSaver(writer, "cuda", max_pending=4)
    chunks = [torch.randn(SHAPE, device="cuda").to(torch.bfloat16) for _ in range(6)]
    for i, chunk in enumerate(chunks):
        assert saver.submit(_key(i), chunk, {"chunk_index": str(i)})
    del chunk
    chunks_host = [c.cpu() for c in chunks]
    del chunks  # the saver must keep the device memory alive until its copy is done
    saver.flush()
    writer.flush()
    for i, want in enumerate(chunks_host):
        out = torch.empty(SHAPE, dtype=torch.bfloat16)
        store.load(_key(i), out)
        assert torch.equal(out, want)
    saver.close()
    writer.close()


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.path.value)
def test_reads_with_a_deadline_run_on_pool_threads_and_read_the_same(store, backend):
    # With a deadline no part of a read may run on the caller's thread (kvikio's open and
    # header read did): a hung mount would hold the engine there.
    chunks = _save(store, 5)
    reader = _reader(store, backend, staging_bytes=2 * NBYTES)
    callers = set()
    real_reading = store.reading

    def reading(*args, **kwargs):
        callers.add(threading.get_ident())
        return real_reading(*args, **kwargs)

    store.reading = reading
    got = {i: c.clone() for i, c in reader.read([_key(i) for i in range(5)], deadline_s=30.0)}
    assert all(torch.equal(got[i], chunks[i]) for i in range(5))
    assert threading.get_ident() not in callers and not reader.abandoned
    reader.close()


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.path.value)
def test_a_read_past_its_deadline_makes_the_rest_misses_and_retires_the_reader(store, backend):
    _save(store, 3)
    reader = _reader(store, backend, staging_bytes=2 * NBYTES)
    release = threading.Event()
    real_reading = store.reading

    def hung(key, *args, **kwargs):
        if key == _key(1):
            release.wait()  # a read stuck in the kernel
        return real_reading(key, *args, **kwargs)

    store.reading = hung
    results = list(reader.read([_key(i) for i in range(3)], deadline_s=0.3))
    assert isinstance(results[0][1], torch.Tensor)
    assert [i for i, r in results if isinstance(r, ChunkFileError)] == [1, 2]
    assert "no answer within the load deadline" in str(results[1][1]) and reader.abandoned
    release.set()
    reader.close()
