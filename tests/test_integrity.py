"""The integrity key: only holders of the key publish chunks that keyed engines load."""

import os

import pytest
import torch
from cachedir import chunk, make_store, prefix_keys, save_prefix

from lmcache_fs.config import ConfigError, load_config
from lmcache_fs.ops.verify import verify_namespace
from lmcache_fs.storage.codec import ChunkFileError
from lmcache_fs.storage.integrity import key_id, read_key_file
from lmcache_fs.storage.layout import quarantine_dir
from lmcache_fs.storage.store import ChunkStore

KEY = b"k" * 32
OTHER = b"o" * 32


def _keyed(store: ChunkStore, key: bytes | None) -> ChunkStore:
    return ChunkStore(store.layout, store.file_mode, mac_key=key)


def test_a_keyed_store_loads_what_holders_of_the_key_wrote(tmp_path):
    store = _keyed(make_store(tmp_path), KEY)
    [k] = prefix_keys("p", 1)
    save_prefix(store, [k])
    out = torch.empty_like(chunk(k))
    store.load(k, out)
    assert torch.equal(out, chunk(k))


@pytest.mark.parametrize("writer_key", [None, OTHER], ids=["no key", "another key"])
def test_a_chunk_without_the_right_mac_is_a_miss_and_quarantined(tmp_path, writer_key):
    # A neighbour who can write the directory publishes a chunk with a valid key,
    # namespace and checksum but its own KV: a keyed engine never loads it.
    plain = make_store(tmp_path)
    [k] = prefix_keys("p", 1)
    save_prefix(_keyed(plain, writer_key), [k])
    with pytest.raises(ChunkFileError, match="MAC"):
        _keyed(plain, KEY).load(k, torch.empty_like(chunk(k)))
    assert not plain.layout.chunk_path(k).exists() and any(quarantine_dir(tmp_path).iterdir())


def test_verify_checks_macs_with_the_key(tmp_path):
    store = make_store(tmp_path)
    good, planted = prefix_keys("p", 2)
    save_prefix(_keyed(store, KEY), [good])
    save_prefix(store, [planted])
    findings = list(verify_namespace(store.layout.directory, mac_key=KEY))
    assert [f.path for f in findings] == [str(store.layout.chunk_path(planted))]
    assert "no MAC" in findings[0].problem
    assert list(verify_namespace(store.layout.directory)) == []  # without the key: xxh3 only


def _key_file(tmp_path, content: bytes, mode: int = 0o600):
    path = tmp_path / "key"
    path.write_bytes(content)
    os.chmod(path, mode)
    return path


def test_the_key_file_gives_a_stable_key_and_a_public_id(tmp_path):
    first = read_key_file(_key_file(tmp_path, b"0123456789abcdef0123\n"))
    again = read_key_file(_key_file(tmp_path, b"  0123456789abcdef0123  "))
    assert first == again and len(first) == 32
    assert key_id(first) != key_id(read_key_file(_key_file(tmp_path, b"another secret key!!")))
    assert first.hex().find(key_id(first)) == -1


@pytest.mark.parametrize("content,mode,message", [
    (b"short", 0o600, "holds 5 bytes"),
    (b"0123456789abcdef", 0o644, "chmod o-r"),
    (None, 0o600, "cannot be read"),
], ids=["too short", "world-readable", "missing"])
def test_an_unusable_key_file_is_a_clear_start_up_error(tmp_path, content, mode, message):
    path = _key_file(tmp_path, content, mode) if content is not None else tmp_path / "absent"
    cfg = load_config({"storage_path": str(tmp_path / "kv"), "integrity_key_file": str(path)})
    with pytest.raises(ConfigError, match=message):
        cfg.integrity_key()
