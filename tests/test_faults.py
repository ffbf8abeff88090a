"""Faults without an engine: killed writers, planted bad files, a full disk, a read-only
directory, many writers at once. Each is a miss or a skipped store, never an error or a
wrong byte. Counts of what was tried go to tests/artifacts/faults.json for the closing note.

The engine-level halves (same tokens with bad files, eviction under a live engine, two
FUSE mounts, restart) are in test_engine_faults.py.
"""

import json
import logging
import math
import multiprocessing
import os
import random
import signal
import threading
import time

import pytest
import torch
import writer_process
from cachedir import SHAPE, chunk, files_under, load_ok, make_store, prefix_keys, save_prefix
from mounts import read_only_view, tmpfs

from lmcache_fs.storage.layout import is_temporary
from lmcache_fs.config import ConfigError, load_config
from lmcache_fs.ops.eviction import Evictor
from lmcache_fs.ops.inventory import scan_chunks, scan_temporaries
from lmcache_fs.ops.verify import verify_namespace
from lmcache_fs.storage.codec import ChunkFileError, write_chunk_file
from lmcache_fs.storage.layout import quarantine_dir
from lmcache_fs.storage.space import FreeSpaceGuard
from lmcache_fs.storage.writer import BackgroundWriter

KILL_TRIALS = int(os.environ.get("LMCACHE_FS_KILL_TRIALS", "300"))


@pytest.fixture(scope="module")
def fault_log(artifacts_dir):
    """What each fault test tried and saw; written to tests/artifacts/faults.json."""
    log: dict = {}
    yield log
    path = artifacts_dir / "faults.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**old, **log}, indent=2) + "\n")


def _temporaries(root):
    return [p for p in files_under(root) if is_temporary(p.name)]


def _writer_processes():
    """A multiprocessing context whose processes start in milliseconds.

    Torch, the store and the main module (pytest) are imported once by the fork
    server instead of by every writer. (Python 3.11's fork server ignores
    sys.path, so only installed modules can be preloaded.)
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", "torch", "lmcache_fs.storage.store"])
    return ctx


def _clean_temporaries(root):
    evictor = Evictor(root, max_bytes=0, temp_grace_s=0)
    try:
        return evictor.run_pass().removed_temporaries
    finally:
        evictor.close()


# -- 1. writers killed with SIGKILL at random moments ------------------------------------


def test_writers_killed_at_random_moments_never_expose_a_partial_file(tmp_path, fault_log):
    root = tmp_path / "kv"
    store = make_store(root, **writer_process.KILL_FIELDS)
    directory = store.layout.directory
    errors, loads, stop = [], [0], threading.Event()

    def reader():  # another instance, loading whatever it sees, the whole time
        out = torch.empty(writer_process.KILL_SHAPE, dtype=torch.bfloat16)
        while not stop.is_set():
            for found in scan_chunks(directory):
                try:
                    store.load(found.key, out)
                    loads[0] += 1
                except ChunkFileError as exc:
                    errors.append(f"{found.key[:12]}: {exc}")
            time.sleep(0.001)  # leave the writers a CPU on a small machine

    ctx = _writer_processes()
    rng = random.Random(0)
    thread = threading.Thread(target=reader)
    thread.start()
    left_behind = 0
    try:
        for trial in range(KILL_TRIALS):
            writer = ctx.Process(target=writer_process.write_until_killed, args=(str(root), trial))
            writer.start()
            time.sleep(rng.uniform(0.0, 0.05))
            os.kill(writer.pid, signal.SIGKILL)
            writer.join()
            if trial % 50 == 49:  # writers are all dead: every temporary is a crashed writer's
                left_behind += _clean_temporaries(root)
    finally:
        stop.set()
        thread.join()
    left_behind += _clean_temporaries(root)
    published = len(list(scan_chunks(directory)))
    fault_log["sigkill_writers"] = {
        "trials": KILL_TRIALS, "chunk_bytes": 4096 + 2 * math.prod(writer_process.KILL_SHAPE), "published_files": published,
        "killed_mid_write_temporaries_cleaned": left_behind, "reader_loads_ok": loads[0],
        "reader_errors": len(errors), "bad_files_after": 0}
    assert errors == []
    assert loads[0] > 0 and published > 0, fault_log["sigkill_writers"]
    assert left_behind > 0, "no kill landed mid-write: the test did not test anything"
    assert list(verify_namespace(directory)) == []
    assert _temporaries(root) == []


# -- 2. bad files planted in the directory ----------------------------------------------


def _rewrite(path, transform):
    raw = bytearray(path.read_bytes())
    path.unlink()
    path.write_bytes(transform(raw))


def _flip(raw, offset):
    raw[offset] ^= 0x10
    return raw


def _plant(kind, store, key, tmp_path):
    path = store.layout.chunk_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind in ("bit flip in the data", "bit flip in the header", "truncated"):
        save_prefix(store, [key])
        header_end = path.read_bytes().index(b'"key":"') + 10
        _rewrite(path, {"bit flip in the data": lambda r: _flip(r, len(r) - 3),
                        "bit flip in the header": lambda r: _flip(r, header_end),
                        "truncated": lambda r: r[:-100]}[kind])
    elif kind == "zero length":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(random.Random(1).randbytes(6000))
    elif kind == "a valid chunk of another namespace":
        other = make_store(tmp_path / "other", model="other-model")
        write_chunk_file(path, chunk(key), other.identity(key))
    elif kind == "a valid chunk of another shape":
        write_chunk_file(path, torch.zeros(1, 1, 1, 16, 16, dtype=torch.bfloat16), store.identity(key))
    elif kind == "a valid chunk of another key":
        other_key = prefix_keys("other", 1)[0]
        write_chunk_file(path, chunk(other_key), store.identity(other_key))
    elif kind == "a directory":
        path.mkdir()
        (path / "x").write_text("x")
    elif kind == "a symlink outside the storage path":
        outside = tmp_path / "outside.safetensors"
        write_chunk_file(outside, chunk(key), store.identity(key))  # even a valid one
        os.symlink(outside, path)
    elif kind == "a pickle":
        torch.save({"kv": chunk(key)}, path)
    return path


BAD_KINDS = ["bit flip in the data", "bit flip in the header", "truncated", "zero length",
             "garbage", "a valid chunk of another namespace", "a valid chunk of another shape",
             "a valid chunk of another key", "a directory", "a symlink outside the storage path",
             "a pickle"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_a_planted_bad_file_is_a_miss_then_quarantined_then_stored_again(tmp_path, kind, fault_log):
    store = make_store(tmp_path / "kv")
    key = prefix_keys("p", 1)[0]
    path = _plant(kind, store, key, tmp_path)
    out = torch.full(SHAPE, 3.0, dtype=torch.bfloat16)
    with pytest.raises(ChunkFileError):
        store.load(key, out)
    assert not os.path.lexists(path)  # moved out of the way: the next lookup misses at once
    assert len(os.listdir(quarantine_dir(store.layout.root))) == 1
    save_prefix(store, [key])  # the next engine that computes it stores a good copy
    assert load_ok(store, key)
    if kind == "a symlink outside the storage path":
        assert (tmp_path / "outside.safetensors").exists()  # the link moved, not its target
    fault_log.setdefault("planted_bad_files", {})[kind] = "miss, quarantined, stored again"


# -- 3. disk full -----------------------------------------------------------------------

_MIB_SHAPE = (8, 1, 1, 128, 512)  # 1 MiB of bf16 (+ a 4 KiB header page)


def _fill(writer, n):
    keys = prefix_keys("fill", n)
    for key in keys:
        assert writer.submit(key, chunk(key, _MIB_SHAPE), {})
        writer.flush()
    return keys


def _published(store, keys):
    found = []
    for key in keys:
        try:
            load_ok(store, key, _MIB_SHAPE)
            found.append(key)
        except ChunkFileError as exc:
            assert str(exc) == "missing"
    return found


def test_a_full_filesystem_fails_stores_cleanly_and_loads_go_on(tmp_path, caplog, fault_log):
    with tmpfs(tmp_path / "small", "8m") as small:
        store = make_store(small)
        writer = BackgroundWriter(store, max_queue=4)
        with caplog.at_level(logging.WARNING, logger="lmcache_fs.storage.writer"):
            keys = _fill(writer, 12)
        writer.close()
        published = _published(store, keys)  # serving goes on: every published chunk loads
        assert writer.stats.failed > 0 and writer.stats.published == len(published) > 0
        assert _temporaries(small) == []  # nothing half-written stays
        assert len([r for r in caplog.records if "failed" in r.message]) == 1  # logged once a minute
        fault_log["disk_full_tmpfs_8m"] = {"stores": 12, "published": len(published),
                                           "failed_cleanly": writer.stats.failed,
                                           "temporaries_left": 0, "loads_after": "all ok"}


def test_the_free_space_guard_pauses_stores_before_the_disk_fills(tmp_path, fault_log):
    with tmpfs(tmp_path / "small", "8m") as small:
        store = make_store(small)
        guard = FreeSpaceGuard(small, min_free_bytes=3 << 20)
        writer = BackgroundWriter(store, max_queue=4, guards=[guard])
        keys = _fill(writer, 12)
        writer.close()
        assert writer.stats.failed == 0 and writer.stats.skipped["disk_guard"] > 0
        assert os.statvfs(small).f_bavail * os.statvfs(small).f_frsize >= 3 << 20
        assert len(_published(store, keys)) == writer.stats.published
        fault_log["free_space_guard_tmpfs_8m"] = {"stores": 12, "published": writer.stats.published,
                                                  "skipped_low_space": writer.stats.skipped["disk_guard"],
                                                  "failed": 0}


def test_an_injected_enospc_mid_write_leaves_nothing_behind(tmp_path, monkeypatch):
    """The same fault where mounting is not allowed: the write itself fails half-way."""
    store = make_store(tmp_path)
    real_writev = os.writev

    def half_then_enospc(fd, buffers):
        real_writev(fd, [buffers[0]])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "writev", half_then_enospc)
    writer = BackgroundWriter(store, max_queue=4)
    key = prefix_keys("p", 1)[0]
    writer.submit(key, chunk(key), {})
    writer.close()
    assert writer.stats.failed == 1
    assert files_under(store.layout.directory) == [store.layout.directory / "namespace.json"]


def test_an_unexpected_error_costs_one_store_and_the_writer_goes_on(tmp_path, monkeypatch):
    store = make_store(tmp_path)
    keys = prefix_keys("p", 2)
    real_save = store.save

    def first_fails(key, data, metadata):
        if key == keys[0]:
            raise ValueError("a bug, not an I/O error")
        return real_save(key, data, metadata)

    monkeypatch.setattr(store, "save", first_fails)
    writer = BackgroundWriter(store, max_queue=4)
    for key in keys:
        writer.submit(key, chunk(key), {})
    writer.flush()  # returns: the thread survived the first store
    writer.close()
    assert (writer.stats.failed, writer.stats.published) == (1, 1)
    assert load_ok(store, keys[1])


# -- 4. a read-only directory -------------------------------------------------------------


def test_a_read_only_directory_is_a_clear_error_for_a_writer_and_loads_for_a_reader(tmp_path, fault_log):
    source = tmp_path / "kv"
    keys = prefix_keys("p", 3)
    save_prefix(make_store(source), keys)
    with read_only_view(source, tmp_path / "ro") as ro:
        cfg = load_config({"storage_path": str(ro)})
        with pytest.raises(ConfigError, match="not writable.*kv_consumer"):
            cfg.check_storage_path(writable=True)
        assert cfg.check_storage_path(writable=False) == ro
        reader = make_store(ro)
        mtime = reader.layout.chunk_path(keys[0]).stat().st_mtime
        assert all(load_ok(reader, k) for k in keys)
        assert reader.layout.chunk_path(keys[0]).stat().st_mtime == mtime  # touch skipped quietly
        with pytest.raises(OSError):
            reader.save(prefix_keys("q", 1)[0], chunk(keys[0]), {})
        _rewrite(make_store(source).layout.chunk_path(keys[1]), lambda r: r[:-1])
        with pytest.raises(ChunkFileError):
            load_ok(reader, keys[1])  # a miss; quarantining is impossible here and is skipped
    fault_log["read_only_directory"] = "writer: ConfigError at start-up; reader: loads, bad file a miss"


# -- 8. many writers ----------------------------------------------------------------------


def test_four_writers_storing_overlapping_prompts_at_once_leave_no_bad_file(tmp_path, fault_log):
    root = tmp_path / "kv"
    ctx = _writer_processes()
    start_at = time.time() + 1  # all four start storing at the same moment
    procs = [ctx.Process(target=writer_process.store_prompts, args=(str(root), w, start_at))
             for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    store = make_store(root, **writer_process.MANY_FIELDS)
    expected = {k for keys in writer_process.overlapping_prompts() for k in keys}
    assert {c.key for c in scan_chunks(store.layout.directory)} == expected
    assert list(verify_namespace(store.layout.directory)) == []
    assert list(scan_temporaries(root)) == []
    fault_log["four_writers"] = {"processes": 4, "distinct_chunks": len(expected),
                                 "saves_attempted": 4 * sum(map(len, writer_process.overlapping_prompts())),
                                 "bad_files": 0, "temporaries_left": 0}
