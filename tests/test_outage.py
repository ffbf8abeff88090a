"""A sick shared filesystem costs misses, never a stall: lookups, loads, stores and eviction.

The directory is seen through a real FUSE mount (bindfs) whose daemon the tests
stop (SIGSTOP: every call blocks, as with a hung NFS server or a GlusterFS
volume waiting out a dead brick) and kill (ENOTCONN at once). Engines on such
mounts: tests/test_outage_engines.py.
"""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest
import torch
from cachedir import FakeClock, make_store, prefix_keys, save_prefix
from mounts import freezable_view
from test_worker_side import BLOCK, KEYS, LAYERS, NAMES, PER_CHUNK, _caches

from lmcache_fs.config import load_config
from lmcache_fs.connector.group_worker import GroupFiles, WorkerContext
from lmcache_fs.connector.metadata import LMCacheFSMetadata, LoadOp, SaveOp
from lmcache_fs.connector.worker import WorkerSide
from lmcache_fs.ops.eviction import Evictor
from lmcache_fs.storage import publish
from lmcache_fs.storage.breaker import Breaker
from lmcache_fs.storage.index import ChunkIndex
from lmcache_fs.storage.layout import ChunkLayout, Namespace, quarantine_dir
from lmcache_fs.storage.store import ChunkStore
from lmcache_fs.storage.writer import BackgroundWriter

NAMESPACE = Namespace({"model": "m"})


def _worker(root, layers, breaker, layerwise="auto", **settings):
    config = load_config({"storage_path": str(root), "save_queue_size": 8,
                          "layerwise_load": layerwise, "load_deadline_s": 0.5, **settings})
    side = WorkerSide(WorkerContext(config, BLOCK, True, (), breaker=breaker),
                      [GroupFiles(ChunkStore(ChunkLayout(root, NAMESPACE)), NAMES, PER_CHUNK)])
    side.register_kv_caches(dict(zip(NAMES, layers)))
    return side


def _save_three(root):
    src = _caches()
    saver = _worker(root, src, None)
    saver.save(LMCacheFSMetadata(saves=[SaveOp("w", k, "", i, tuple(range(4 * i, 4 * i + 4)))
                                        for i, k in enumerate(KEYS)]))
    saver.close()
    return src


def _read_threads() -> int:
    """Live threads of the loads' readers (whole chunks or layer by layer)."""
    return sum(t.name.startswith(("lmcache-fs-read", "lmcache-fs-layers"))
               for t in threading.enumerate())


LOADS = [LoadOp("r", k, 0, tuple(range(20 + 4 * i, 24 + 4 * i))) for i, k in enumerate(KEYS)]


def _loaded(dst, src) -> bool:
    return all(torch.equal(dst[layer][20 + b], src[layer][b])
               for layer in range(LAYERS) for b in range(12))


@pytest.mark.parametrize("layerwise", ["auto", "false"], ids=["layerwise", "whole-chunks"])
def test_a_frozen_mount_costs_a_load_its_deadline_and_its_late_bytes_never_land(
        tmp_path, layerwise):
    source = tmp_path / "source"
    src = _save_three(source)
    with freezable_view(source, tmp_path / "mnt") as view:
        clock = FakeClock(0.0)
        breaker = Breaker(view.path, cooldown_s=1.0, clock=clock)
        dst = _caches(fill=0.0)
        loader = _worker(view.path, dst, breaker, layerwise)
        group = loader.groups[0]
        assert group.layer_reader is None or not group.layer_reader.into_pages  # staging on FUSE
        loader.load(LMCacheFSMetadata(loads=LOADS))
        assert loader.take_failed_blocks() == set() and _loaded(dst, src)  # healthy: a hit
        readers = _read_threads()
        for kv in dst:
            kv.zero_()
        os.sync()
        view.freeze()
        start = time.monotonic()
        loader.load(LMCacheFSMetadata(loads=LOADS))
        failed = loader.take_failed_blocks()
        assert time.monotonic() - start < 3.0  # the deadline (0.5 s and the bytes), not a stall
        assert failed == set(range(20, 32)) and not breaker.available
        stats = loader.take_stats().data
        assert stats["load_errors_by_reason"] == {"unavailable": 1}
        assert stats["directory_timeouts"] == 1 and stats["directory_trips"] == 1
        start = time.monotonic()  # switched off: the next load tries nothing
        loader.load(LMCacheFSMetadata(loads=LOADS))
        assert loader.take_failed_blocks() == set(range(20, 32)) and time.monotonic() - start < 0.5
        view.thaw()
        time.sleep(0.5)  # the abandoned reads return now: their bytes must land nowhere
        assert all(torch.count_nonzero(kv) == 0 for kv in dst)
        assert _read_threads() == readers  # the abandoned reader's threads are gone
        assert not quarantine_dir(view.path).exists()  # nothing taken for a bad file
        clock.now += 1.0
        deadline = time.monotonic() + 10
        while not breaker.available and time.monotonic() < deadline:
            time.sleep(0.05)
        loader.load(LMCacheFSMetadata(loads=LOADS))
        assert loader.take_failed_blocks() == set() and _loaded(dst, src)  # hits again
        loader.close()


def test_a_dead_mount_fails_loads_at_once_and_switches_the_directory_off(tmp_path):
    source = tmp_path / "source"
    _save_three(source)
    with freezable_view(source, tmp_path / "mnt") as view:
        breaker = Breaker(view.path, cooldown_s=60.0)
        loader = _worker(view.path, _caches(fill=0.0), breaker)
        view.kill()
        start = time.monotonic()
        loader.load(LMCacheFSMetadata(loads=LOADS))
        assert loader.take_failed_blocks() == set(range(20, 32))
        assert time.monotonic() - start < 2.0 and not breaker.available
        assert breaker.errors["ENOTCONN"] >= 1 or breaker.timeouts
        loader.close()


def test_lookups_of_a_frozen_mount_are_misses_within_their_deadline(tmp_path):
    source = tmp_path / "source"
    store = make_store(source)
    keys = prefix_keys("p", 3)
    save_prefix(store, keys)
    with freezable_view(source, tmp_path / "mnt") as view:
        clock = FakeClock(0.0)
        breaker = Breaker(view.path, cooldown_s=1.0, clock=clock)
        index = ChunkIndex(ChunkLayout(view.path, store.layout.namespace), negative_ttl_s=0,
                           breaker=breaker, lookup_deadline_s=0.2)
        assert index.contains(keys[0])  # found by its path, then remembered
        view.freeze()
        start = time.monotonic()
        assert not index.contains(keys[1])
        assert time.monotonic() - start < 1.0 and not breaker.available
        assert not index.contains(keys[0])  # remembered, but switched off: no load planned
        view.thaw()
        clock.now += 1.0
        breaker.available
        deadline = time.monotonic() + 10
        while not breaker.available and time.monotonic() < deadline:
            time.sleep(0.05)
        assert index.contains(keys[0]) and index.contains(keys[1])


def test_stores_are_skipped_while_switched_off_and_left_temporaries_go_when_it_answers(tmp_path):
    store = ChunkStore(ChunkLayout(tmp_path, NAMESPACE))
    clock = FakeClock(0.0)
    breaker = Breaker(tmp_path, cooldown_s=1.0, clock=clock)
    writer = BackgroundWriter(store, 8, breaker=breaker)
    breaker.note_error(OSError(errno.EIO, "Input/output error"), "store")
    writer.submit(KEYS[0], torch.zeros(4), {})
    writer.flush()
    assert writer.stats.skipped["unavailable"] == 1 and writer.stats.published == 0
    # A write that failed with the directory gone left its temporary (its unlink failed too).
    left = tmp_path / ".tmp.host.1.abc.x.safetensors"
    left.write_bytes(b"partial")
    with publish._LEFT_LOCK:
        publish._LEFT_BEHIND.add(str(left))
    clock.now += 1.0
    breaker.available
    deadline = time.monotonic() + 10
    while not breaker.available and time.monotonic() < deadline:
        time.sleep(0.05)
    writer.submit(KEYS[1], torch.zeros(4), {})
    writer.flush()
    assert writer.stats.published == 1 and not left.exists() and publish.left_temporaries() == 0
    writer.close()


def test_a_failed_unlink_is_remembered_not_raised(tmp_path, monkeypatch):
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    (tmp_path / "t").write_bytes(b"x")
    real_unlink = os.unlink

    def unreachable(name, *a, **k):
        raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")

    monkeypatch.setattr(os, "unlink", unreachable)
    try:
        publish._remove(dir_fd, "t")
    finally:
        os.close(dir_fd)
        monkeypatch.setattr(os, "unlink", real_unlink)
    assert publish.left_temporaries() == 1
    assert publish.remove_left_temporaries() == 1 and not (tmp_path / "t").exists()


def test_an_eviction_pass_that_meets_io_errors_evicts_nothing(tmp_path, monkeypatch):
    store = make_store(tmp_path)
    keys = prefix_keys("p", 6)
    save_prefix(store, keys)
    refused = store.layout.chunk_path(keys[0]).parent.name
    real_open = os.open

    def half_answering(path, flags, *args, **kwargs):  # a dead brick: part of it answers EIO
        if path == refused and kwargs.get("dir_fd") is not None:
            raise OSError(errno.EIO, "Input/output error", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", half_answering)
    report = Evictor(tmp_path, max_bytes=1, low_watermark=0.5).run_pass()
    monkeypatch.setattr(os, "open", real_open)
    assert report.evicted_chunks == 0 and all(store.layout.chunk_path(k).exists() for k in keys)


def test_the_scheduler_stops_planning_loads_when_a_worker_reports_a_trip(tmp_path):
    from lmcache_fs.connector.directory_health import DirectoryHealth
    from lmcache_fs.connector.stats import LMCacheFSStats

    breaker = Breaker(tmp_path, cooldown_s=60.0)
    health = DirectoryHealth(breaker)
    worker = LMCacheFSStats()
    worker.record_directory(timeouts=1, trips=1, available=False)
    health.heard_from_workers(worker)
    assert not breaker.available
    reported = health.take_stats().data
    assert reported["directory_trips"] == 1 and reported["directory_off"] == 1
