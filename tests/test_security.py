"""Security: keys never become paths unchecked, nothing is read or written through a symlink,
files are not world-writable, only safetensors is parsed, and headers are checked first."""

import ast
import contextlib
import os
import pickle
import stat
from pathlib import Path

import pytest
import torch
from cachedir import (
    SHAPE,
    chunk,
    files_under,
    load_ok,
    make_store,
    prefix_keys,
    save_prefix,
)

from lmcache_fs.ops.pins import PinStore
from lmcache_fs.storage.codec import ChunkFileError, write_chunk_file
from lmcache_fs.storage.layout import ChunkLayout, Namespace, is_temporary
from lmcache_fs.storage.store import ChunkStore

PACKAGE = Path(__file__).resolve().parent.parent / "lmcache_fs"


@pytest.fixture
def store(tmp_path):
    return make_store(tmp_path / "kv")


def _outside_copy(tmp_path, store, key):
    """A valid chunk file for ``key``, but outside the storage path."""
    outside = tmp_path / "outside" / key[:2]
    outside.mkdir(parents=True)
    target = outside / f"{key}.safetensors"
    write_chunk_file(target, chunk(key), store.identity(key))
    return target


@pytest.mark.parametrize("key", ["../../../etc/passwd", "/etc/passwd", "ab" * 16 + "/../x",
                                 "AB" * 32, "ab" * 32 + "\x00", ""])
def test_a_key_that_is_not_strict_hex_never_reaches_the_filesystem(store, key, monkeypatch):
    opened = []
    monkeypatch.setattr(os, "open", lambda *a, **k: opened.append(a) or 1 / 0)
    with pytest.raises(ChunkFileError, match="not a chunk key"):
        store.load(key, torch.empty(SHAPE, dtype=torch.bfloat16))
    assert opened == []


def test_a_valid_chunk_behind_a_symlink_is_not_read(tmp_path, store):
    key = prefix_keys("p", 1)[0]
    path = store.layout.chunk_path(key)
    path.parent.mkdir(parents=True)
    os.symlink(_outside_copy(tmp_path, store, key), path)
    with pytest.raises(ChunkFileError, match="a symlink, not read through"):
        load_ok(store, key)


@pytest.mark.parametrize("level", ["fan-out", "namespace"])
def test_a_symlinked_directory_is_neither_read_nor_written_through(tmp_path, level):
    root = tmp_path / "kv"
    layout = ChunkLayout(root, Namespace({"model": "m"}))
    key = prefix_keys("p", 1)[0]
    outside_file = _outside_copy(tmp_path, ChunkStore(layout), key)
    link = layout.chunk_path(key).parent if level == "fan-out" else layout.directory
    target = outside_file.parent if level == "fan-out" else outside_file.parent.parent
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, link)
    store = ChunkStore(layout)
    with pytest.raises(ChunkFileError, match="symlink or not a directory"):
        load_ok(store, key)
    assert not os.path.lexists(link) and outside_file.exists()  # the link was quarantined, not its target
    os.symlink(target, link)  # planted again
    before = files_under(tmp_path / "outside")
    with pytest.raises(OSError, match="symlink or not a directory"):
        store.save(key[:2] + "0" * 62, chunk(key), {})  # a key whose path goes through the link
    assert files_under(tmp_path / "outside") == before  # nothing written outside the storage path


def test_a_directory_that_cannot_be_checked_is_a_miss_and_nothing_is_quarantined(store, monkeypatch):
    [key] = prefix_keys("p", 1)
    save_prefix(store, [key])
    real_open = os.open

    def stale_fan_out(p, *args, **kwargs):
        if os.fspath(p) == key[:2]:
            raise OSError(116, "Stale file handle")  # ESTALE: what NFS says after a server restart
        return real_open(p, *args, **kwargs)

    monkeypatch.setattr(os, "open", stale_fan_out)
    with pytest.raises(ChunkFileError, match="cannot open its directory: Stale file handle"):
        load_ok(store, key)
    monkeypatch.setattr(os, "open", real_open)
    assert load_ok(store, key)  # still there, unharmed


def test_published_files_are_not_world_writable_whatever_the_umask(store):
    old = os.umask(0)
    try:
        save_prefix(store, prefix_keys("p", 1))
        PinStore(store.layout.directory).pin(prefix_keys("p", 1))
    finally:
        os.umask(old)
    for path in files_under(store.layout.root):
        assert not stat.S_IMODE(path.stat().st_mode) & 0o002, path


def test_the_file_mode_is_configurable(tmp_path):
    store = ChunkStore(ChunkLayout(tmp_path, Namespace({"model": "m"})), file_mode=0o640)
    key = prefix_keys("p", 1)[0]
    store.save(key, chunk(key), {})
    assert stat.S_IMODE(store.layout.chunk_path(key).stat().st_mode) == 0o640


def test_a_pickle_at_a_chunk_path_is_a_miss_and_never_unpickled(store, monkeypatch):
    key = prefix_keys("p", 1)[0]
    path = store.layout.chunk_path(key)
    path.parent.mkdir(parents=True)
    torch.save({"kv": chunk(key)}, path)
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    with pytest.raises(ChunkFileError):
        load_ok(store, key)


def test_no_module_of_the_package_can_unpickle():
    """Only safetensors is parsed: no pickle, torch.load or numpy allow_pickle anywhere."""
    banned_imports = {"pickle", "cPickle", "dill", "shelve", "marshal"}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = {a.name.split(".")[0] for a in node.names}
                if isinstance(node, ast.ImportFrom) and node.module:
                    names.add(node.module.split(".")[0])
                assert not names & banned_imports, f"{path}: imports {names & banned_imports}"
            if isinstance(node, ast.Attribute) and node.attr == "load":
                owner = node.value
                assert not (isinstance(owner, ast.Name) and owner.id == "torch"), f"{path}: torch.load"
            if isinstance(node, ast.keyword) and node.arg == "allow_pickle":
                pytest.fail(f"{path}: allow_pickle")


def test_a_header_promising_another_shape_is_refused(tmp_path, store):
    key = prefix_keys("p", 1)[0]
    path = store.layout.chunk_path(key)
    path.parent.mkdir(parents=True)
    huge = torch.zeros(4, 1, 1, 16, 16, dtype=torch.bfloat16)  # twice the namespace's layers
    write_chunk_file(path, huge, store.identity(key))
    with pytest.raises(ChunkFileError, match="expected torch.bfloat16"):
        store.load(key, torch.empty(SHAPE, dtype=torch.bfloat16))


def test_every_reader_opens_through_the_store_and_finishes_there(tmp_path, store):
    """Readers with their own I/O (kvikio, layer-wise) get the same checks, quarantine and touch."""
    key, other = prefix_keys("p", 2)
    save_prefix(store, [key])
    path = store.layout.chunk_path(key)
    os.utime(path, (0, 0))
    with store.reading(key):
        pass
    assert path.stat().st_mtime > 0  # used now, for eviction on every node
    with pytest.raises(ChunkFileError), store.reading(key):
        raise ChunkFileError("checksum mismatch: the data is corrupt")
    assert not path.exists()  # quarantined
    fanout = store.layout.chunk_path(other).parent
    fanout.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(tmp_path, fanout)
    with pytest.raises(ChunkFileError, match="symlink or not a directory"):
        store.open_chunk(other)


@pytest.mark.parametrize("ending", ["a hit", "an error raised", "an error recorded", "a bug"])
def test_a_read_block_finishes_its_chunk_however_it_ends(store, ending):
    # Guards against a read path that forgets to finish: a hit marks the chunk used, a
    # failure (raised, or recorded by a reader of several chunks) quarantines it, and a bug
    # closes it without a verdict on the file.
    key = prefix_keys("p", 1)[0]
    save_prefix(store, [key])
    path = store.layout.chunk_path(key)
    os.utime(path, (0, 0))
    bad = ChunkFileError("checksum mismatch: the data is corrupt")
    with contextlib.suppress(ChunkFileError, RuntimeError), store.reading(key) as chunk:
        if ending == "an error raised":
            raise bad
        if ending == "an error recorded":
            chunk.error = bad
        if ending == "a bug":
            raise RuntimeError("a bug")
    assert chunk.fd == chunk.dir_fd == -1  # closed
    assert path.exists() == (ending in ("a hit", "a bug"))
    if path.exists():
        assert (path.stat().st_mtime > 0) == (ending == "a hit")


def test_a_bad_file_replaced_by_a_good_copy_meanwhile_is_not_quarantined(store):
    # The loader found its copy bad, but eviction removed it and a writer published a
    # good one under the same name before the loader finished: only the bad copy may go.
    key = prefix_keys("p", 1)[0]
    save_prefix(store, [key])
    chunk = store.open_chunk(key)
    store.layout.chunk_path(key).unlink()
    save_prefix(store, [key])
    store.finish(chunk, ChunkFileError("checksum mismatch: the data is corrupt"))
    assert load_ok(store, key)


def test_a_fan_out_directory_swapped_for_a_link_mid_store_is_never_written_through(
        tmp_path, store, monkeypatch):
    # The race of issue #17: checked, then swapped, then written. Directories are
    # held open by descriptor, so the write lands in the directory that was opened.
    import lmcache_fs.storage.publish as publish_module

    key = prefix_keys("p", 1)[0]
    fanout = store.layout.chunk_path(key).parent
    fanout.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    real_open = os.open

    def swap_then_open(path, *args, **kwargs):
        if is_temporary(os.path.basename(os.fspath(path))) and not fanout.is_symlink():
            os.rename(fanout, tmp_path / "moved")  # after the checks, before the temporary
            os.symlink(outside, fanout)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(publish_module.os, "open", swap_then_open)
    assert store.save(key, chunk(key), {})
    assert list(outside.iterdir()) == []  # nothing written through the link
    assert (tmp_path / "moved" / f"{key}.safetensors").exists()
