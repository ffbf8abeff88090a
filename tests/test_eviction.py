"""Eviction: one budget for the whole directory, LRU by mtime, pins kept, temporaries cleaned."""

import errno
import logging
import os
import threading
import time

import pytest
from cachedir import (chunk, files_under, load_ok, make_store, prefix_keys, record_bytes,
                      save_prefix, set_mtime)
from test_lease import fill_filesystem

from lmcache_fs.config import load_config
from lmcache_fs.ops import eviction
from lmcache_fs.ops.eviction import BackgroundEvictor, Evictor
from lmcache_fs.storage.layout import is_temporary, lease_path
from lmcache_fs.ops.inventory import scan_chunks, total_size
from lmcache_fs.ops.lease import Lease
from lmcache_fs.ops.pins import PinStore
from lmcache_fs.storage.quarantine import quarantine

CHUNK_BYTES = 4096 + 1024  # header page + 1 KiB of data (cachedir.SHAPE)


def _aged(store, keys, start):
    """Give ``keys`` increasing mtimes from ``start`` (the first is the least recently used)."""
    for i, key in enumerate(keys):
        set_mtime(store.layout.chunk_path(key), start + i)


def _present(store, keys):
    return [k for k in keys if store.layout.chunk_path(k).exists()]


def _keeping(root, chunks):
    """A budget whose low watermark of 0.5 holds exactly ``chunks`` chunks and the records."""
    return 2 * (chunks * CHUNK_BYTES + record_bytes(root))


def _one_pass(root, **kwargs):
    """One pass as ``lmcache-fs gc`` runs it: take the lease, evict, give the lease back."""
    evictor = Evictor(root, **kwargs)
    try:
        return evictor.run_pass()
    finally:
        evictor.close()


@pytest.fixture
def store(tmp_path):
    return make_store(tmp_path)


def test_below_the_high_watermark_nothing_is_evicted(tmp_path, store):
    keys = prefix_keys("p", 10)
    save_prefix(store, keys)
    held = 10 * CHUNK_BYTES + record_bytes(tmp_path)
    report = _one_pass(tmp_path, max_bytes=int(held / 0.95) + 1)
    assert report.ran and report.evicted_chunks == 0
    assert _present(store, keys) == keys


def test_over_budget_the_least_recently_used_go_first_down_to_the_low_watermark(tmp_path, store):
    keys = prefix_keys("p", 10)
    save_prefix(store, keys)
    _aged(store, keys, time.time() - 1000)
    report = Evictor(tmp_path, max_bytes=_keeping(tmp_path, 4), high_watermark=0.9,
                     low_watermark=0.5).run_pass()
    assert report.evicted_chunks == 6  # 10 chunks down to 4
    assert _present(store, keys) == keys[6:]
    assert report.bytes_after == 4 * CHUNK_BYTES + record_bytes(tmp_path)


def test_the_budget_covers_every_namespace_of_the_directory(tmp_path):
    a, b = make_store(tmp_path, model="a"), make_store(tmp_path, model="b")
    keys_a, keys_b = prefix_keys("a", 5), prefix_keys("b", 5)
    save_prefix(a, keys_a)
    save_prefix(b, keys_b)
    now = time.time()
    _aged(a, keys_a, now - 2000)  # all of a is older than all of b
    _aged(b, keys_b, now - 1000)
    _one_pass(tmp_path, max_bytes=_keeping(tmp_path, 3), low_watermark=0.5)
    assert _present(a, keys_a) == [] and _present(b, keys_b) == keys_b[2:]


def test_a_load_hit_makes_a_chunk_recently_used(tmp_path, store):
    keys = prefix_keys("p", 4)
    save_prefix(store, keys)
    _aged(store, keys, time.time() - 1000)
    assert load_ok(store, keys[0])  # the oldest, but used now
    _one_pass(tmp_path, max_bytes=_keeping(tmp_path, 2), low_watermark=0.5)
    assert _present(store, keys) == [keys[0], keys[3]]


def test_storing_a_chunk_that_exists_counts_as_a_use(tmp_path, store):
    keys = prefix_keys("p", 2)
    save_prefix(store, keys)
    _aged(store, keys, time.time() - 1000)
    assert store.save(keys[0], chunk(keys[0]), {}) is False  # another instance stored it again
    _one_pass(tmp_path, max_bytes=_keeping(tmp_path, 1), low_watermark=0.5)
    assert _present(store, keys) == [keys[0]]


def test_pinned_prefixes_are_never_evicted(tmp_path, store):
    pinned, other = prefix_keys("system prompt", 3), prefix_keys("chat", 3)
    save_prefix(store, pinned)
    save_prefix(store, other)
    _aged(store, pinned, time.time() - 2000)  # the pinned ones are the least recently used
    PinStore(store.layout.directory).pin(pinned)
    report = _one_pass(tmp_path, max_bytes=CHUNK_BYTES, low_watermark=0.5)
    assert _present(store, pinned) == pinned and _present(store, other) == []
    assert report.skipped_pinned == 3
    PinStore(store.layout.directory).unpin(pinned[-1])
    _one_pass(tmp_path, max_bytes=CHUNK_BYTES, low_watermark=0.5)
    assert _present(store, pinned) == []


def test_a_chunk_used_while_the_pass_runs_is_kept(tmp_path, store, monkeypatch):
    keys = prefix_keys("p", 2)
    save_prefix(store, keys)
    _aged(store, keys, time.time() - 1000)

    class UsedDuringPass(PinStore):  # pins are read between the scan and the removals
        def pinned_keys(self):
            os.utime(store.layout.chunk_path(keys[0]))
            return set()

    monkeypatch.setattr(eviction, "PinStore", UsedDuringPass)
    report = _one_pass(tmp_path, max_bytes=CHUNK_BYTES, low_watermark=0.5)
    assert report.skipped_recently_used == 1
    assert _present(store, keys) == [keys[0]]


def test_a_prefix_pinned_while_the_pass_runs_is_kept(tmp_path, store):
    old, new = prefix_keys("old", 3), prefix_keys("new", 3)
    save_prefix(store, old)
    save_prefix(store, new)
    _aged(store, old + new, time.time() - 1000)
    pins = PinStore(store.layout.directory)

    def pin_the_rest(ns, key):  # an operator pins on another node while the pass runs
        if key == old[0]:
            pins.pin(old[1:])

    Evictor(tmp_path, max_bytes=CHUNK_BYTES, low_watermark=0.5, on_evicted=pin_the_rest).run_pass()
    assert _present(store, old + new) == old[1:]


def _two_ranks(root):
    """The stores of one tensor-parallel engine's two ranks (namespaces differing in tp_rank)."""
    return [make_store(root, tp_size=2, tp_rank=rank) for rank in (0, 1)]


def test_a_chunk_is_evicted_for_every_rank_or_for_none(tmp_path):
    ranks = _two_ranks(tmp_path)
    keys = prefix_keys("p", 4)
    for rank, store in enumerate(ranks):
        save_prefix(store, keys)
        # Rank 0's files all older than rank 1's: file by file, LRU would take rank 0's
        # four, leaving four rank-1 files of which no chunk can hit.
        _aged(store, keys, time.time() - 1000 + 100 * rank)
    report = _one_pass(tmp_path, max_bytes=_keeping(tmp_path, 4), high_watermark=0.9,
                       low_watermark=0.5)
    assert report.evicted_chunks == 4  # files: the two oldest chunks, on both ranks
    assert [_present(store, keys) for store in ranks] == [keys[2:], keys[2:]]


def test_a_pin_on_one_rank_keeps_the_chunk_on_every_rank(tmp_path):
    ranks = _two_ranks(tmp_path)
    keys = prefix_keys("p", 2)
    for store in ranks:
        save_prefix(store, keys)
        _aged(store, keys, time.time() - 1000)
    PinStore(ranks[1].layout.directory).pin(keys[:1])
    report = _one_pass(tmp_path, max_bytes=CHUNK_BYTES, low_watermark=0.5)
    assert report.skipped_pinned == 2
    assert [_present(store, keys) for store in ranks] == [keys[:1], keys[:1]]


def test_crashed_writers_temporaries_are_removed_after_the_grace_period(tmp_path, store):
    fanout = store.layout.chunk_path(prefix_keys("p", 1)[0]).parent
    fanout.mkdir(parents=True)
    old, fresh = fanout / ".tmp.host.1.aa.x.safetensors", fanout / ".tmp.host.2.bb.y.safetensors"
    old.write_bytes(b"half a chunk")
    fresh.write_bytes(b"being written")
    set_mtime(old, time.time() - 601)
    report = _one_pass(tmp_path, max_bytes=0, temp_grace_s=600)
    assert report.removed_temporaries == 1
    assert not old.exists() and fresh.exists()


def test_quarantined_files_are_evicted_before_any_chunk(tmp_path, store):
    keys = prefix_keys("p", 3)
    save_prefix(store, keys)
    _aged(store, keys, time.time() - 1000)
    quarantine(tmp_path, store.layout.chunk_path(keys[2]), "test")
    report = _one_pass(tmp_path, max_bytes=int(2.5 * CHUNK_BYTES), low_watermark=0.9)
    assert report.removed_quarantined == 1 and report.evicted_chunks == 0
    assert _present(store, keys) == keys[:2]


def test_only_one_process_evicts_at_a_time(tmp_path, store):
    save_prefix(store, prefix_keys("p", 4))
    holder = Lease(lease_path(tmp_path), 60)
    assert holder.acquire()
    report = _one_pass(tmp_path, max_bytes=CHUNK_BYTES)
    assert not report.ran and f"pid {os.getpid()}" in report.lease_holder
    assert len(list(scan_chunks(store.layout.directory))) == 4


def test_an_evictor_that_stopped_renewing_is_taken_over(tmp_path, store):
    clock = [time.time()]
    save_prefix(store, prefix_keys("p", 4))
    hung = Evictor(tmp_path, max_bytes=10**9, lease_ttl=30, clock=lambda: clock[0])
    assert hung.run_pass().ran
    successor = Evictor(tmp_path, max_bytes=CHUNK_BYTES, lease_ttl=30, clock=lambda: clock[0])
    assert not successor.run_pass().ran
    clock[0] += 31
    assert successor.run_pass().evicted_chunks > 0


def test_each_removed_chunk_is_reported_so_an_index_can_drop_it(tmp_path, store):
    keys = prefix_keys("p", 3)
    save_prefix(store, keys)
    _aged(store, keys, time.time() - 1000)
    seen = []
    Evictor(tmp_path, max_bytes=CHUNK_BYTES, low_watermark=0.5,
            on_evicted=lambda ns, key: seen.append((ns, key))).run_pass()
    assert seen == [(store.layout.namespace.name, k) for k in keys]


def test_the_background_evictor_keeps_the_directory_within_budget(tmp_path, store):
    cfg = load_config({"storage_path": str(tmp_path), "max_disk_size_gb": 4 * CHUNK_BYTES / 1e9,
                       "eviction_interval_s": 0.05})
    evictor = eviction.start_background_evictor(cfg)
    try:
        for i in range(20):
            save_prefix(store, prefix_keys(f"p{i}", 2))
        deadline = time.time() + 10
        while total_size(scan_chunks(store.layout.directory)) > 4 * CHUNK_BYTES and time.time() < deadline:
            time.sleep(0.05)
        assert total_size(scan_chunks(store.layout.directory)) <= 4 * CHUNK_BYTES
        assert lease_path(tmp_path).exists()  # kept between passes
    finally:
        evictor.stop()
    assert not lease_path(tmp_path).exists()  # given up on stop


def test_without_a_budget_an_engine_starts_no_evictor(tmp_path):
    assert eviction.start_background_evictor(load_config({"storage_path": str(tmp_path)})) is None


def test_a_failing_pass_is_retried_not_fatal(tmp_path, monkeypatch):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise OSError(116, "Stale file handle")
        return eviction.EvictionReport(ran=True)

    evictor = Evictor(tmp_path, max_bytes=0)
    monkeypatch.setattr(evictor, "run_pass", flaky)
    daemon = BackgroundEvictor(evictor, interval_s=0.01).start()
    deadline = time.time() + 5
    while len(calls) < 3 and time.time() < deadline:
        time.sleep(0.01)
    daemon.stop()
    assert len(calls) >= 3


def test_eviction_racing_with_loads_costs_misses_never_errors(tmp_path, store):
    """Fault 5 at file level: another instance's evictor removes chunks mid-load."""
    from lmcache_fs.storage.codec import ChunkFileError

    keys = prefix_keys("p", 40)
    errors, loads, stop = [], [0, 0], threading.Event()

    def loader():
        while not stop.is_set():
            for key in keys:
                try:
                    assert load_ok(store, key)
                    loads[0] += 1
                except ChunkFileError as exc:
                    loads[1] += 1
                    if str(exc) != "missing":
                        errors.append(str(exc))

    threads = [threading.Thread(target=loader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(30):
            save_prefix(store, keys)
            _one_pass(tmp_path, max_bytes=CHUNK_BYTES, low_watermark=0.01)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert loads[0] > 0 and loads[1] > 0  # both outcomes happened: it really raced
    assert not (tmp_path / "quarantine").exists()  # a vanished file is a miss, not damage
    assert [p.name for p in files_under(tmp_path) if is_temporary(p.name)] == []


def _clocked(root, max_bytes, clock):
    return Evictor(root, max_bytes=max_bytes, lease_ttl=30, clock=lambda: clock[0])


def test_a_scan_that_outlasts_the_lease_renews_it_and_finishes(tmp_path, store, monkeypatch):
    keys = prefix_keys("p", 6)
    save_prefix(store, keys)
    _aged(store, keys, time.time() - 1000)
    clock = [time.time()]
    rival = Lease(lease_path(tmp_path), 30, clock=lambda: clock[0])
    rival_won = []
    real_scan = eviction.scan_or_stop

    def slow_scan(root, keep_going):  # each entry takes 20 s (NFS): the scan lasts 4 lease TTLs
        def each_chunk():
            clock[0] += 20
            rival_won.append(rival.acquire())
            return keep_going()
        return real_scan(root, each_chunk)

    monkeypatch.setattr(eviction, "scan_or_stop", slow_scan)
    report = _clocked(tmp_path, 2 * CHUNK_BYTES, clock).run_pass()
    assert rival_won == [False] * 6
    assert report.ran and report.evicted_chunks == 5
    assert total_size(scan_chunks(store.layout.directory)) <= 2 * CHUNK_BYTES


def test_a_pass_that_loses_the_lease_mid_scan_stops_and_says_it_did_not_run(tmp_path, store,
                                                                            monkeypatch):
    keys = prefix_keys("p", 4)
    save_prefix(store, keys)
    clock = [time.time()]
    rival = Lease(lease_path(tmp_path), 30, clock=lambda: clock[0])
    real_scan = eviction.scan_or_stop

    def stalled_scan(root, keep_going):
        def first_chunk():
            if clock[0] < stalled_at + 31:
                clock[0] += 31  # stalled for longer than the lease: the rival takes it over
                assert rival.acquire()
            return keep_going()
        return real_scan(root, first_chunk)

    stalled_at = clock[0]
    monkeypatch.setattr(eviction, "scan_or_stop", stalled_scan)
    report = _clocked(tmp_path, CHUNK_BYTES, clock).run_pass()
    assert not report.ran and f"pid {os.getpid()}" in report.lease_holder
    assert _present(store, keys) == keys


def test_a_pass_without_a_budget_leaves_the_lease_to_a_budgeted_evictor(tmp_path, store):
    keys = prefix_keys("p", 6)
    save_prefix(store, keys)
    sidecar = Evictor(tmp_path, max_bytes=0, lease_ttl=180)  # `gc --daemon` without a budget
    engine = Evictor(tmp_path, max_bytes=2 * CHUNK_BYTES, lease_ttl=180)
    assert sidecar.run_pass().ran and not sidecar.lease.held
    assert engine.run_pass().ran
    assert sidecar.run_pass().ran  # still cleans temporaries while the engine holds the lease
    assert total_size(scan_chunks(store.layout.directory)) <= 2 * CHUNK_BYTES


def test_the_lease_holder_keeps_evicting_on_a_full_filesystem(tmp_path, store, monkeypatch):
    keys = prefix_keys("p", 6)
    save_prefix(store, keys)
    clock = [time.time()]
    evictor = _clocked(tmp_path, 10**9, clock)
    assert evictor.run_pass().ran  # under budget: holds the lease
    fill_filesystem(monkeypatch)
    evictor.max_bytes = 2 * CHUNK_BYTES
    clock[0] += 20
    assert evictor.run_pass().ran
    assert total_size(scan_chunks(store.layout.directory)) <= 2 * CHUNK_BYTES


def test_a_full_filesystem_that_keeps_the_lease_from_being_taken_says_how_to_free_it(
        tmp_path, store, monkeypatch, caplog):
    monkeypatch.setattr(logging.getLogger("lmcache_fs"), "propagate", True)  # init_logging's
    fill_filesystem(monkeypatch)
    with pytest.raises(OSError) as raised:
        Evictor(tmp_path, max_bytes=CHUNK_BYTES).run_pass()
    assert raised.value.errno == errno.ENOSPC
    assert "lmcache-fs clear --namespace" in caplog.text
