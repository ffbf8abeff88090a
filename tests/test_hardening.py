"""Hostile files in the shared directory: planted symlinks and malformed leases, pins, manifests.

Anyone who can write the cache directory can plant files there. A planted
symlink must never redirect one of our writes outside the cache, and a
planted record (deep JSON, a huge file, wrong types, bytes that are not
UTF-8) must read as "no record", never stop eviction or an engine's start.
"""

import json
import logging
import os
import shutil
import time

import pytest
from cachedir import make_store, prefix_keys, save_prefix, set_mtime

from lmcache_fs.config import load_config
from lmcache_fs.ops import eviction
from lmcache_fs.ops.inventory import scan_chunks, total_size
from lmcache_fs.ops.lease import Lease, read_lease
from lmcache_fs.ops.pins import PinStore
from lmcache_fs.storage.layout import HASH_SEED_MARKER_PREFIX, MANIFEST_NAME, PINS_DIR, TEMP_PREFIX, lease_path
from lmcache_fs.storage.manifest import read_manifest, write_manifest

CHUNK_BYTES = 4096 + 1024  # header page + 1 KiB of data (cachedir.SHAPE)
DEEP = b"[" * 200_000 + b"]" * 200_000  # past any recursion limit: RecursionError in json

MALFORMED = {
    "deeply nested": DEEP,
    "deep object": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "nested within the limit of json, beyond ours": b'{"host": ' + b"[" * 500 + b"]" * 500 + b"}",
    "not UTF-8": b'{"host": "\xff\xfe", "pid": 1}',
    "not JSON": b"\x00\x01garbage",
    "a list": b"[1, 2, 3]",
    "wrong types": b'{"host": 1, "pid": "x", "token": [], "expires_at": {}, "keys": "ab"}',
    "huge number": b'{"expires_at": 1e999, "pid": 1, "host": "h", "token": "t"}',
    "empty": b"",
}


@pytest.fixture
def outside(tmp_path):
    """A file outside the cache directory that a planted symlink points at."""
    target = tmp_path / "outside" / "victim.txt"
    target.parent.mkdir()
    target.write_text("precious")
    return target


def _untouched(path):
    return path.read_text() == "precious"


# -- item 1: planted symlinks ---------------------------------------------------------------

def test_a_symlink_planted_at_the_manifest_name_is_never_written_through(tmp_path, outside):
    store = make_store(tmp_path / "cache")  # writes the manifest once
    manifest = store.layout.directory / MANIFEST_NAME
    manifest.unlink()
    manifest.symlink_to(outside)
    write_manifest(store.layout)
    assert _untouched(outside)
    assert manifest.is_symlink()  # left as planted; the first entry at the name wins
    assert read_manifest(store.layout.directory) is None  # and it is not read through either


def test_a_symlink_planted_at_the_temporary_name_is_never_written_through(tmp_path, outside):
    store = make_store(tmp_path / "cache")
    directory = store.layout.directory
    (directory / MANIFEST_NAME).unlink()
    # The name the manifest's temporary used to have (predictable: the pid).
    (directory / f"{TEMP_PREFIX}{os.getpid()}.{MANIFEST_NAME}").symlink_to(outside)
    write_manifest(store.layout)
    assert _untouched(outside)
    manifest = directory / MANIFEST_NAME
    assert not manifest.is_symlink()
    assert read_manifest(directory) == store.layout.namespace.fields


def test_a_symlink_planted_at_the_namespace_directory_is_never_written_through(tmp_path, outside):
    root = tmp_path / "cache"
    store = make_store(root)
    layout = store.layout
    shutil.rmtree(layout.directory)
    layout.directory.symlink_to(outside.parent, target_is_directory=True)
    write_manifest(layout)
    assert sorted(p.name for p in outside.parent.iterdir()) == ["victim.txt"]


def test_a_symlink_planted_at_the_hash_seed_marker_is_never_followed(tmp_path, outside):
    pytest.importorskip("vllm")
    from lmcache_fs.connector.namespace import check_hash_seed, hash_seed_fingerprint

    root = tmp_path / "cache"
    root.mkdir()
    marker = root / f"{HASH_SEED_MARKER_PREFIX}{hash_seed_fingerprint('sha256')}"
    marker.symlink_to(outside)
    dangling = tmp_path / "outside" / "created-by-us"
    before = outside.stat().st_mtime_ns
    time.sleep(0.01)
    check_hash_seed(root, "sha256")
    assert _untouched(outside) and outside.stat().st_mtime_ns == before  # not even touched
    marker.unlink()
    marker.symlink_to(dangling)
    check_hash_seed(root, "sha256")
    assert not dangling.exists()


def test_hash_seed_markers_of_other_shapes_are_not_reported(tmp_path, caplog):
    pytest.importorskip("vllm")
    from lmcache_fs.connector.namespace import check_hash_seed

    (tmp_path / f"{HASH_SEED_MARKER_PREFIX}\x1b[2Jfake\nWARNING forged").write_text("")
    with caplog.at_level(logging.WARNING):
        check_hash_seed(tmp_path, "sha256")
    assert "different seed" not in caplog.text


# -- item 2: malformed records read as none, eviction goes on -------------------------------

@pytest.mark.parametrize("content", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_lease_file_reads_as_no_lease(tmp_path, content):
    path = tmp_path / "eviction.lease"
    path.write_bytes(content)
    assert read_lease(path) is None


@pytest.mark.parametrize("content", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_manifest_reads_as_none(tmp_path, content):
    (tmp_path / MANIFEST_NAME).write_bytes(content)
    assert read_manifest(tmp_path) is None


def test_a_manifest_with_nested_values_is_not_a_manifest(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"model": "m", "num_layers": [2]}))
    assert read_manifest(tmp_path) is None


def test_a_huge_lease_file_is_not_read_whole(tmp_path):
    path = tmp_path / "eviction.lease"
    with open(path, "wb") as f:
        f.truncate(8 << 30)  # sparse: 8 GiB that would take memory and minutes to read
    start = time.monotonic()
    assert read_lease(path) is None
    assert time.monotonic() - start < 1.0


def test_a_lease_symlinked_to_an_endless_device_is_not_read(tmp_path):
    path = tmp_path / "eviction.lease"
    path.symlink_to("/dev/zero")
    assert read_lease(path) is None


def test_a_lease_that_is_a_fifo_is_not_waited_on(tmp_path):
    path = tmp_path / "eviction.lease"
    os.mkfifo(path)  # no writer: a blocking open or read would hang the evictor
    assert read_lease(path) is None


def test_a_planted_deep_lease_is_taken_over_once_a_ttl_old(tmp_path):
    path = tmp_path / "eviction.lease"
    path.write_bytes(DEEP)
    lease = Lease(path, ttl_s=30)
    assert lease.acquire() is False  # young garbage: maybe a lease being replaced
    set_mtime(path, time.time() - 60)
    assert lease.acquire() is True
    assert read_lease(path).token == lease.holder().token


@pytest.mark.parametrize("content", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_pin_file_is_skipped(tmp_path, content):
    pins = PinStore(tmp_path)
    key = "ab" * 32
    assert pins.pin([key])
    (tmp_path / PINS_DIR / f"{'cd' * 32}.json").write_bytes(content)
    assert pins.pinned_keys() == {key}


def test_a_pin_whose_keys_nest_is_skipped(tmp_path):
    key = "cd" * 32
    (tmp_path / PINS_DIR).mkdir()
    (tmp_path / PINS_DIR / f"{key}.json").write_text(json.dumps({"keys": [[key], key]}))
    assert PinStore(tmp_path).pins() == []


def _over_budget(root, store, n=12):
    for i in range(n):
        save_prefix(store, prefix_keys(f"p{i}", 1))
    for entry in scan_chunks(store.layout.directory):
        set_mtime(entry.path, time.time() - 3600)


def test_the_background_evictor_keeps_evicting_past_planted_deep_lease_and_pin(tmp_path):
    store = make_store(tmp_path)
    lease = lease_path(tmp_path)
    lease.write_bytes(DEEP)
    set_mtime(lease, time.time() - 3600)  # a planted lease, long stale
    (store.layout.directory / PINS_DIR).mkdir()
    (store.layout.directory / PINS_DIR / f"{'ee' * 32}.json").write_bytes(DEEP)
    _over_budget(tmp_path, store)
    budget = 4 * CHUNK_BYTES
    cfg = load_config({"storage_path": str(tmp_path), "max_disk_size_gb": budget / 1e9,
                       "eviction_interval_s": 0.05})
    daemon = eviction.start_background_evictor(cfg)
    try:
        _wait_until_within(store, budget)
        _over_budget(tmp_path, store)  # more stores later: the same thread evicts them too
        _wait_until_within(store, budget)
        assert daemon._thread.is_alive()
    finally:
        daemon.stop()


def _wait_until_within(store, budget):
    deadline = time.time() + 10
    while total_size(scan_chunks(store.layout.directory)) > budget and time.time() < deadline:
        time.sleep(0.05)
    assert total_size(scan_chunks(store.layout.directory)) <= budget


def test_the_background_evictor_survives_an_unexpected_error_and_logs_it(tmp_path, monkeypatch,
                                                                          caplog):
    store = make_store(tmp_path)
    _over_budget(tmp_path, store)
    real, calls = eviction.scan_or_stop, []

    def broken_once(root, keep_going):
        calls.append(root)
        if len(calls) == 1:
            raise RecursionError("maximum recursion depth exceeded")  # not an OSError
        return real(root, keep_going)

    monkeypatch.setattr(eviction, "scan_or_stop", broken_once)
    budget = 4 * CHUNK_BYTES
    cfg = load_config({"storage_path": str(tmp_path), "max_disk_size_gb": budget / 1e9,
                       "eviction_interval_s": 0.05})
    with caplog.at_level(logging.ERROR):
        daemon = eviction.start_background_evictor(cfg)
        try:
            _wait_until_within(store, budget)  # a later pass of the same thread evicted
        finally:
            daemon.stop()
    assert "failed unexpectedly" in caplog.text and "RecursionError" in caplog.text
