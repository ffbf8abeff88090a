"""The index: start-up scan, own writes, file events, and the stat fallback for NFS."""

import os
import time

import torch
from cachedir import FakeClock

from lmcache_fs.storage.index import ChunkIndex
from lmcache_fs.storage.layout import ChunkLayout, Namespace
from lmcache_fs.storage.store import ChunkStore

KEYS = [f"{i:02x}" * 32 for i in range(6)]


def _store(tmp_path):
    return ChunkStore(ChunkLayout(tmp_path, Namespace({"model": "m", "num_layers": 1})))


def _save(store, key):
    store.save(key, torch.zeros(4), {})


def test_start_up_scan_finds_what_is_on_disk(tmp_path):
    store = _store(tmp_path)
    for key in KEYS[:3]:
        _save(store, key)
    index = ChunkIndex(store.layout)
    assert index.scan() == 3
    assert [index.contains(k) for k in KEYS[:3]] == [True] * 3
    assert index.stats["stat_hits"] == 0  # all from the scan


def test_a_gap_is_absent_and_the_chunks_after_it_present(tmp_path):
    store = _store(tmp_path)
    for key in (KEYS[0], KEYS[1], KEYS[3]):
        _save(store, key)
    index = ChunkIndex(store.layout)
    index.scan()
    assert [index.contains(k) for k in KEYS[:4]] == [True, True, False, True]


def test_file_from_another_node_is_found_by_stat_after_the_negative_ttl(tmp_path):
    store = _store(tmp_path)
    calls = []

    def counting_stat(path):
        calls.append(path)
        return os.stat(path)

    clock = FakeClock(100.0)
    index = ChunkIndex(store.layout, negative_ttl_s=2.0, stat=counting_stat, clock=clock)
    assert not index.contains(KEYS[0])
    _save(store, KEYS[0])  # "another node" publishes; no event reaches us
    assert not index.contains(KEYS[0])  # negative cache: no second stat yet
    assert len(calls) == 1
    clock.now += 2.5
    assert index.contains(KEYS[0])
    assert len(calls) == 2
    assert index.contains(KEYS[0]) and len(calls) == 2  # now in the set: no stat


def test_own_writes_and_discards_update_the_set(tmp_path):
    index = ChunkIndex(_store(tmp_path).layout, stat=lambda p: (_ for _ in ()).throw(OSError()))
    index.add(KEYS[0])
    assert index.contains(KEYS[0])
    index.discard(KEYS[0])
    assert not index.contains(KEYS[0])


def test_watch_events_add_and_remove_keys_without_stat(tmp_path):
    store = _store(tmp_path)
    index = ChunkIndex(store.layout, stat=lambda p: (_ for _ in ()).throw(OSError()))
    assert index.start_watching()
    try:
        _save(store, KEYS[4])
        deadline = time.monotonic() + 5
        while KEYS[4] not in index._keys and time.monotonic() < deadline:
            time.sleep(0.02)
        assert KEYS[4] in index._keys
        os.unlink(store.layout.chunk_path(KEYS[4]))
        deadline = time.monotonic() + 5
        while KEYS[4] in index._keys and time.monotonic() < deadline:
            time.sleep(0.02)
        assert KEYS[4] not in index._keys
    finally:
        index.stop_watching()
