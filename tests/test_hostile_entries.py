"""Hostile entries, round 2: what a neighbour with write access can plant beside the chunks.

Each test plants one kind of entry at one place of the on-disk map, as a
hostile neighbour (or a careless one: a umask, a stray copy) would, and checks
the promise of docs/security.md: nothing outside the directory is deleted,
moved or written; no good chunk is removed; nothing hangs; an entry this user
cannot read is skipped and counted; every byte counts against the budget.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import struct
import threading
from pathlib import Path

import pytest
import torch
from cachedir import SHAPE, chunk, load_ok, make_store, prefix_keys, record_bytes, save_prefix
from test_lease import fill_filesystem

from lmcache_fs.ops.cli import EXIT_OK, main
from lmcache_fs.ops.eviction import Evictor
from lmcache_fs.ops.inventory import scan_directory
from lmcache_fs.ops.pins import PinStore
from lmcache_fs.ops.verify import verify_namespace
from lmcache_fs.storage.codec import ChunkFileError
from lmcache_fs.storage.index import ChunkIndex
from lmcache_fs.storage.layout import (QUARANTINE_DIR, ChunkLayout, Namespace, lease_path,
                                      pin_file_name, pins_dir)
from lmcache_fs.storage.manifest import write_manifest
from lmcache_fs.storage.store import ChunkStore

CHUNK_BYTES = 4096 + 1024  # header page + 1 KiB of data (cachedir.SHAPE)
MB = 1 << 20


@pytest.fixture
def victim(tmp_path) -> Path:
    """A directory outside the cache, with a file a planted link must never reach."""
    directory = tmp_path / "victim"
    directory.mkdir()
    (directory / "important.txt").write_text("precious")
    return directory


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "kv"


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _within_seconds(fn, seconds: float = 10.0):
    """``fn()``'s result (or its exception); fails instead of hanging the suite if it blocks."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append((fn(), None))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            outcome.append((None, exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn} still blocked after {seconds} s"
    result, error = outcome[0]
    if error is not None:
        raise error
    return result


def _cli(capsys, *argv: str) -> tuple[int, dict]:
    code = _within_seconds(lambda: main([*argv, "--json"]))
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else {}


# -- item 1: a planted quarantine link --------------------------------------------------

def test_a_quarantine_link_makes_eviction_delete_nothing_outside(root, victim):
    store = make_store(root)
    save_prefix(store, prefix_keys("p", 4))
    (root / QUARANTINE_DIR).symlink_to(victim)
    report = Evictor(root, max_bytes=CHUNK_BYTES, low_watermark=0.5).run_pass()
    assert report.ran and report.evicted_chunks == 4
    assert _listing(victim) == ["important.txt"] and (root / QUARANTINE_DIR).is_symlink()
    assert report.foreign_files == 1  # the link itself, counted by its own size


def test_a_quarantine_link_receives_no_corrupt_chunk(root, victim):
    store = make_store(root)
    key = prefix_keys("p", 1)[0]
    save_prefix(store, [key])
    path = store.layout.chunk_path(key)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    (root / QUARANTINE_DIR).symlink_to(victim)
    with pytest.raises(ChunkFileError, match="checksum"):
        store.load(key, torch.empty(SHAPE, dtype=torch.bfloat16))
    assert _listing(victim) == ["important.txt"]
    assert path.exists()  # left in place: a miss, every time, but nothing moved out


def test_clear_all_removes_a_quarantine_link_itself(capsys, root, victim):
    store = make_store(root)
    save_prefix(store, prefix_keys("p", 2))
    (root / QUARANTINE_DIR).symlink_to(victim)
    code, _ = _cli(capsys, "clear", "--all", "--yes", "--storage-path", str(root))
    assert code == EXIT_OK
    assert not os.path.lexists(root / QUARANTINE_DIR) and _listing(victim) == ["important.txt"]


# -- item 2: a FIFO at a chunk's name ---------------------------------------------------

def test_a_fifo_at_a_chunks_name_is_a_miss_not_a_hang(capsys, root):
    store = make_store(root)
    good, fifo_key = prefix_keys("p", 2)
    save_prefix(store, [good])
    fifo = store.layout.chunk_path(fifo_key)
    fifo.parent.mkdir(exist_ok=True)
    os.mkfifo(fifo)
    index = ChunkIndex(store.layout)
    assert index.scan() == 1  # the FIFO is never offered as a hit
    with pytest.raises(ChunkFileError, match="not a regular file"):
        _within_seconds(lambda: store.load(fifo_key, torch.empty(SHAPE, dtype=torch.bfloat16)))
    assert not os.path.lexists(fifo)  # proven bad: quarantined
    os.mkfifo(fifo)
    for argv in (["inspect", fifo_key], ["inspect", "--verify", fifo_key], ["verify"],
                 ["pin", fifo_key]):
        code, _ = _cli(capsys, *argv, "--storage-path", str(root))
        assert code != EXIT_OK, argv  # a problem named, never a hang
        os.path.lexists(fifo) or os.mkfifo(fifo)
    assert load_ok(store, good)


# -- item 3: verify never removes a good chunk its manifest cannot describe -------------

def _sliding_window_store(root: Path) -> ChunkStore:
    """A sliding-window group's namespace: its files hold 2 of a chunk's 4 blocks."""
    groups = json.dumps([{"type": "SlidingWindowSpec", "layers": 2, "window": 20,
                          "extra_retained": 0, "held_blocks": 2, "block_size": 16,
                          "num_kv_heads": 1, "head_size": 8, "dtype": "bfloat16"}])
    layout = ChunkLayout(root, Namespace({"model": "gemma@1", "num_layers": 2, "num_kv_heads": 1,
                                          "head_size": 8, "kv_dtype": "bfloat16",
                                          "block_size": 16, "chunk_size": 64, "kv_group": 0,
                                          "kv_groups": groups}))
    write_manifest(layout)
    return ChunkStore(layout)


def test_verify_delete_keeps_good_sliding_window_chunks(capsys, root):
    store = _sliding_window_store(root)
    keys = prefix_keys("p", 3)
    held = (2, 2, 1, 16, 16)  # 2 of 4 blocks
    save_prefix(store, keys, held)
    code, data = _cli(capsys, "verify", "--delete", "--storage-path", str(root))
    assert code == EXIT_OK and data["bad"] == []
    assert all(load_ok(store, k, held) for k in keys)


def test_a_planted_manifest_never_makes_verify_delete_a_good_chunk(capsys, root):
    store = make_store(root)
    keys = prefix_keys("p", 3)
    save_prefix(store, keys)
    manifest = store.layout.directory / "namespace.json"
    fields = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**fields, "num_layers": 7, "kv_dtype": "float32"}))
    code, data = _cli(capsys, "verify", "--delete", "--storage-path", str(root))
    assert code == EXIT_OK and data["bad"] == []
    assert all(load_ok(store, k) for k in keys)


# -- item 4: an unreadable fan-out directory --------------------------------------------

def test_an_unreadable_fan_out_directory_stops_neither_eviction_nor_a_listing(root, monkeypatch):
    store = make_store(root)
    keys = prefix_keys("p", 8)
    save_prefix(store, keys)
    refused = store.layout.chunk_path(keys[0]).parent
    real_open = os.open

    def as_another_user(path, flags, *args, **kwargs):  # tests run as root, who reads anything
        if path == refused.name and kwargs.get("dir_fd") is not None:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", as_another_user)
    contents = scan_directory(root)
    assert [e.path for e in contents.unreadable] == [str(refused)]
    readable = [k for k in keys if k[:2] != refused.name]
    assert contents.namespaces[0].chunks == len(readable)
    budget = 2 * (CHUNK_BYTES + record_bytes(root))  # half of it: one chunk and the records
    report = Evictor(root, max_bytes=budget, low_watermark=0.5).run_pass()
    assert report.ran and report.unreadable_entries == 1
    assert report.evicted_chunks == len(readable) - 1


# -- item 5: every byte counts ----------------------------------------------------------

def _plant_foreign(root: Path, store: ChunkStore) -> int:
    """Files where the map names none: at the root, in a directory that is no namespace,
    under a name that is no key, and inside a directory at a chunk's name."""
    key = prefix_keys("d", 1)[0]
    at_chunk = store.layout.chunk_path(key)
    at_chunk.mkdir(parents=True)
    places = [root / "stray.bin", root / "not-a-namespace" / "f", store.layout.directory / "zz",
              at_chunk / "inside"]
    for path in places:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(MB))
    return len(places) * MB


def test_the_budget_counts_foreign_files_and_gc_removes_them_only_when_asked(capsys, root):
    store = make_store(root)
    save_prefix(store, prefix_keys("p", 2))
    planted = _plant_foreign(root, store)
    code, data = _cli(capsys, "stats", "--storage-path", str(root))
    assert code == EXIT_OK and data["foreign_bytes"] == planted and data["bytes"] > planted
    budget = str(2 * MB / 1e9)
    code, report = _cli(capsys, "gc", "--storage-path", str(root), "--max-disk-size-gb", budget)
    assert report["evicted_chunks"] == 2 and report["foreign_bytes"] == planted
    assert (root / "stray.bin").exists()  # counted, never removed unasked
    code, report = _cli(capsys, "gc", "--storage-path", str(root), "--max-disk-size-gb", budget,
                        "--remove-foreign")
    assert report["removed_foreign"] == 4 and report["bytes_after"] < 2 * MB
    assert not (root / "stray.bin").exists() and not (root / "not-a-namespace").exists()


def test_pins_planted_in_bulk_count_against_the_budget(capsys, root):
    """A pin file may hold 16 MiB of keys and a neighbour may plant any number of them: records
    of the cache's own, never removed by a pass, but counted like every other byte."""
    store = make_store(root)
    save_prefix(store, prefix_keys("p", 2))
    pins = pins_dir(store.layout.directory)
    pins.mkdir()
    for key in prefix_keys("planted", 3):
        (pins / pin_file_name(key)).write_bytes(os.urandom(MB))
    code, data = _cli(capsys, "stats", "--storage-path", str(root))
    assert code == EXIT_OK and data["bytes"] > 3 * MB and data["foreign"] == 0
    code, report = _cli(capsys, "gc", "--storage-path", str(root), "--max-disk-size-gb",
                        str(2 * MB / 1e9))
    assert report["evicted_chunks"] == 2 and len(list(pins.iterdir())) == 3


def test_a_quarantined_directory_counts_all_it_holds(root):
    store = make_store(root)
    quarantined = root / QUARANTINE_DIR / "ns__ab__key.safetensors.1.x"
    quarantined.mkdir(parents=True)
    for i in range(3):
        (quarantined / f"f{i}").write_bytes(os.urandom(MB))
    contents = scan_directory(root)
    assert sum(e.size for e in contents.quarantined) == 3 * MB
    del store


def test_a_sparse_file_counts_the_blocks_it_uses(root):
    make_store(root)
    sparse = root / "sparse.bin"
    with open(sparse, "wb") as f:
        f.truncate(64 << 30)
    (found,) = scan_directory(root).foreign
    assert found.size < MB  # 64 GiB large, nothing stored


# -- item 6: a huge sparse chunk file ---------------------------------------------------

def test_verify_reads_a_huge_sparse_chunk_file_in_pieces_without_a_crash(root):
    store = make_store(root)
    key = prefix_keys("p", 1)[0]
    save_prefix(store, [key])
    path = store.layout.chunk_path(key)
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    header = json.loads(path.read_bytes()[8:8 + header_len])
    header["kv"]["shape"] = [1 << 30]  # 2 GiB of bf16, and the file really is that long
    header["kv"]["data_offsets"] = [0, 2 << 30]
    text = json.dumps(header).encode().ljust(header_len)
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + (2 << 30))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    (finding,) = _within_seconds(lambda: list(verify_namespace(store.layout.directory)), 60)
    assert finding.damaged and "checksum" in finding.problem
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB


# -- item 9: a full disk at engine start-up ---------------------------------------------

def test_a_full_disk_at_start_up_is_a_warning_not_a_failed_engine(root, monkeypatch, caplog):
    root.mkdir()
    layout = ChunkLayout(root, Namespace({"model": "new-model"}))
    fill_filesystem(monkeypatch)
    with caplog.at_level(logging.WARNING):
        write_manifest(layout)
    assert "No space left on device" in caplog.text


# -- item 11: a directory at the lease's name -------------------------------------------

def test_a_directory_planted_at_the_lease_name_does_not_fail_the_first_gc(capsys, root):
    store = make_store(root)
    save_prefix(store, prefix_keys("p", 3))
    lease_path(root).mkdir()
    (lease_path(root) / "junk").write_bytes(b"x")
    code, report = _cli(capsys, "gc", "--storage-path", str(root),
                        "--max-disk-size-gb", str(CHUNK_BYTES / 1e9))
    assert code == EXIT_OK and report["ran"] and report["evicted_chunks"] >= 2


# -- pins: a link planted at the pins directory -----------------------------------------

def test_a_pin_is_never_written_through_a_planted_pins_link(root, victim):
    store = make_store(root)
    keys = prefix_keys("p", 2)
    save_prefix(store, keys)
    (store.layout.directory / "pins").symlink_to(victim)
    with pytest.raises(OSError):
        PinStore(store.layout.directory).pin(keys)
    assert _listing(victim) == ["important.txt"]
    assert chunk(keys[0]) is not None
