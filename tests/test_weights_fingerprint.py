"""The weights fingerprint sees every weight change, reads the weights once, and names copies alike."""

import os

import pytest

from lmcache_fs import model_identity
from lmcache_fs.model_identity import weights_fingerprint

MIB = 1 << 20


@pytest.fixture(autouse=True)
def digest_cache(tmp_path, monkeypatch):
    """A private digest cache (the real one is under the user's ~/.cache)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    return tmp_path / "xdg-cache" / "lmcache-fs" / "weights.json"


def _model(path, size=4 * MIB):
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(bytes(range(256)) * (size // 256))
    return path


def _edit_in_place(path, offset, restore_mtime):
    """Change one byte in place (same size), as a merged LoRA rewritten over the file would."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    if restore_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("restore_mtime", [False, True], ids=["new mtime", "mtime restored"])
def test_a_fine_tune_replaced_in_place_outside_the_old_sample_regions_gets_a_new_namespace(
        tmp_path, restore_mtime):
    model = _model(tmp_path / "checkpoint")
    before = weights_fingerprint(str(model))
    # 1 MiB in: far from the 64 KiB samples at the start, middle and end that were hashed.
    _edit_in_place(model / "model.safetensors", 1 * MIB + 123, restore_mtime)
    assert weights_fingerprint(str(model)) != before


def test_the_weights_are_read_once_then_only_stat_ed(tmp_path, monkeypatch):
    model = _model(tmp_path / "checkpoint")
    reads = []
    real = model_identity.file_digest
    monkeypatch.setattr(model_identity, "file_digest", lambda p: reads.append(p) or real(p))
    first = weights_fingerprint(str(model))
    assert weights_fingerprint(str(model)) == first and len(reads) == 1
    _edit_in_place(model / "model.safetensors", 10, restore_mtime=True)
    assert weights_fingerprint(str(model)) != first and len(reads) == 2


def test_copies_on_other_paths_and_with_other_mtimes_share_the_fingerprint(tmp_path):
    here = _model(tmp_path / "node-1" / "checkpoint")
    there = _model(tmp_path / "node-2" / "checkpoint")
    os.utime(there / "model.safetensors", (1, 1))
    assert weights_fingerprint(str(here)) == weights_fingerprint(str(there))


@pytest.mark.parametrize("content", [b"[" * 100_000, b"\xff\xfe", b'{"version": 1, "files": []}',
                                     b'{"version": 1, "files": {"0:0": {"stamp": 3}}}'])
def test_a_damaged_digest_cache_is_ignored(tmp_path, digest_cache, content):
    model = _model(tmp_path / "checkpoint")
    right = weights_fingerprint(str(model))
    digest_cache.write_bytes(content)
    assert weights_fingerprint(str(model)) == right


def test_without_a_writable_cache_the_fingerprint_is_still_right(tmp_path, monkeypatch):
    model = _model(tmp_path / "checkpoint")
    right = weights_fingerprint(str(model))
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    assert weights_fingerprint(str(model)) == right
