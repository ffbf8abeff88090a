"""The integrity key: only holders of the key publish chunks that keyed engines load."""

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Callable

import blake3
import pytest
import torch
from cachedir import chunk, flip_byte, make_store, prefix_keys, read_chunk_file, save_prefix

from lmcache_fs.config import ConfigError, load_config
from lmcache_fs.ops.verify import verify_namespace
from lmcache_fs.storage import mac
from lmcache_fs.storage.codec import ALIGNMENT, ChunkFileError, byte_view, write_chunk_file
from lmcache_fs.storage.integrity import key_id, read_key_file
from lmcache_fs.storage.quarantine import quarantine_dir
from lmcache_fs.storage.store import ChunkStore

KEY = b"k" * 32
OTHER = b"o" * 32
# Written by commit 90ed35d (HMAC-SHA256, before keyed BLAKE3) with the integrity key of
# LEGACY_SECRET: ChunkStore-style metadata for key "ab" * 32 in namespace m-0123456789abcdef.
LEGACY_FILE = Path(__file__).parent / "data" / "hmac-sha256-chunk.safetensors"
LEGACY_SECRET = b"lmcache-fs legacy fixture secret\n"
LEGACY_META = {"namespace": "m-0123456789abcdef", "key": "ab" * 32}


def _keyed(store: ChunkStore, key: bytes | None) -> ChunkStore:
    return ChunkStore(store.layout, store.file_mode, mac_key=key)


def _header(path: Path) -> dict:
    raw = path.read_bytes()
    (length,) = struct.unpack_from("<Q", raw)
    return json.loads(raw[8:8 + length])


def _edit_metadata(path: Path, edit: Callable[[dict], None]) -> None:
    """Rewrite the header's metadata in place as a neighbour would (the data stays at 4096)."""
    raw = path.read_bytes()
    header = _header(path)
    edit(header["__metadata__"])
    text = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(raw[:8] + text.ljust(ALIGNMENT - 8) + raw[ALIGNMENT:])


def _save_with(store: ChunkStore, key: str, algorithm: str) -> Path:
    """Chunk ``key`` written into ``store`` as a keyed engine using ``algorithm`` writes it."""
    path = store.layout.chunk_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_chunk_file(path, chunk(key), {"parent_key": "", "chunk_index": "0", "num_tokens": "16",
                                        **store.identity(key)}, store.mac_key, algorithm)
    return path


def _loads(store: ChunkStore, key: str) -> bool:
    out = torch.empty_like(chunk(key))
    store.load(key, out)
    return torch.equal(out.view(torch.uint8), chunk(key).view(torch.uint8))


def _quarantined(store: ChunkStore, key: str) -> bool:
    root = store.layout.root
    return not store.layout.chunk_path(key).exists() and any(quarantine_dir(root).iterdir())


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


def test_files_written_before_keyed_blake3_still_load_with_the_key(tmp_path):
    # A directory keyed engines filled before the upgrade must not turn into misses.
    integrity_key = read_key_file(_key_file(tmp_path, LEGACY_SECRET))
    assert _header(LEGACY_FILE)["__metadata__"]["mac"].startswith("hmac-sha256:")
    out = torch.empty_like(chunk(LEGACY_META["key"]))
    read_chunk_file(LEGACY_FILE, out, LEGACY_META, mac_key=integrity_key)
    assert torch.equal(out.view(torch.uint8), chunk(LEGACY_META["key"]).view(torch.uint8))
    with pytest.raises(ChunkFileError, match="MAC mismatch"):
        read_chunk_file(LEGACY_FILE, out, LEGACY_META, mac_key=OTHER)
    altered = shutil.copy(LEGACY_FILE, tmp_path / "altered")
    flip_byte(altered, ALIGNMENT + 100)
    with pytest.raises(ChunkFileError, match="mismatch"):
        read_chunk_file(altered, out, LEGACY_META, mac_key=integrity_key)


def test_new_files_carry_keyed_blake3_under_a_key_derived_for_it(tmp_path):
    # The format, pinned: a tag anyone holding the key can recompute from the docs.
    store = _keyed(make_store(tmp_path), KEY)
    [k] = prefix_keys("p", 1)
    save_prefix(store, [k])
    meta = _header(store.layout.chunk_path(k))["__metadata__"]
    algorithm, tag = meta.pop("mac").split(":")
    mac_key = blake3.blake3(KEY, derive_key_context="lmcache-fs 2026-12-06 chunk file MAC, "
                                                    "keyed BLAKE3").digest()
    signed = json.dumps([meta, "BF16", list(chunk(k).shape)], sort_keys=True,
                        separators=(",", ":")).encode()
    assert algorithm == "blake3" and mac_key != KEY
    assert tag == blake3.blake3(signed + bytes(byte_view(chunk(k))), key=mac_key).hexdigest()
    assert _loads(store, k)


@pytest.mark.parametrize("algorithm", mac.ACCEPTED)
@pytest.mark.parametrize("where", ["data", "metadata"])
def test_a_tampered_keyed_chunk_is_a_miss_and_quarantined(tmp_path, algorithm, where):
    # A neighbour edits one byte of a chunk a key holder wrote: its data, or a header
    # field whose change keeps the file well-formed (the xxh3 checksum still matches).
    store = _keyed(make_store(tmp_path), KEY)
    [k] = prefix_keys("p", 1)
    path = _save_with(store, k, algorithm)
    if where == "data":
        flip_byte(path, ALIGNMENT + 7)
    else:
        _edit_metadata(path, lambda meta: meta.update(chunk_index="1"))
    with pytest.raises(ChunkFileError, match="MAC mismatch"):
        store.load(k, torch.empty_like(chunk(k)))
    assert _quarantined(store, k)


@pytest.mark.parametrize("declared", [
    None, "", "none", "none:", "xxh3_64:{checksum}", "sha256:{tag}", "BLAKE3:{tag}", "blake3",
    "hmac-sha256:{tag}", "blake3:{tag}0", "blake3:é{tag}", "blake3:\ud800",
], ids=["stripped", "empty", "none", "none with colon", "the xxh3 checksum", "unknown name",
        "other case", "no tag", "relabelled", "tag extended", "non-ASCII", "lone surrogate"])
def test_a_keyed_reader_refuses_any_other_claim_in_the_mac_field(tmp_path, declared):
    # Downgrade: whatever a neighbour writes in the MAC field (strip it, name no check,
    # a checksum, an unknown or relabelled algorithm, odd text) is a miss and quarantined.
    store = _keyed(make_store(tmp_path), KEY)
    [k] = prefix_keys("p", 1)
    path = _save_with(store, k, mac.WRITTEN)
    meta = _header(path)["__metadata__"]
    tag, checksum = meta["mac"].split(":")[1], meta["checksum"].split(":")[1]

    def claim(fields: dict) -> None:
        del fields["mac"]
        if declared is not None:
            fields["mac"] = declared.format(tag=tag, checksum=checksum)
    _edit_metadata(path, claim)
    with pytest.raises(ChunkFileError, match="MAC"):
        store.load(k, torch.empty_like(chunk(k)))
    assert _quarantined(store, k)


@pytest.mark.parametrize("declared", ["none:", "xxh3_64:0", "sha256:00"])
def test_an_unknown_mac_algorithm_is_named_as_such(tmp_path, declared):
    # The quarantine's reason says what was wrong, not that some tag mismatched.
    store = _keyed(make_store(tmp_path), KEY)
    [k] = prefix_keys("p", 1)
    _edit_metadata(_save_with(store, k, mac.WRITTEN), lambda meta: meta.update(mac=declared))
    with pytest.raises(ChunkFileError, match="unknown MAC algorithm .*accepts blake3, hmac-sha256"):
        store.load(k, torch.empty_like(chunk(k)))


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
