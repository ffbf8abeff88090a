"""The integrity key: only holders of the key publish chunks that keyed engines load."""

import json
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Callable

import pytest
import torch
from cachedir import chunk, flip_byte, make_store, prefix_keys, read_chunk_file, save_prefix
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from lmcache_fs.config import ConfigError, load_config
from lmcache_fs.ops.verify import verify_namespace
from lmcache_fs.storage import mac
from lmcache_fs.storage.codec import (ALIGNMENT, ChunkFileError, DataCheck, byte_view,
                                      read_header, write_chunk_file)
from lmcache_fs.storage.integrity import key_id, read_key_file
from lmcache_fs.storage.layout import quarantine_dir
from lmcache_fs.storage.store import ChunkStore

KEY = b"k" * 32
OTHER = b"o" * 32
# Written by commit 90ed35d (HMAC-SHA256, the release before) with the integrity key of
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


def test_files_written_with_hmac_sha256_before_still_load_with_the_key(tmp_path):
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


def _gmac_tag(integrity_key: bytes, salt: bytes, message: bytes) -> bytes:
    """AES-256-GMAC as docs/security.md specifies it, from cryptography's own primitives."""
    file_key = HKDFExpand(hashes.SHA256(), 32, b"lmcache-fs chunk file MAC: gmac-aes256, one "
                                               b"key per file, salt " + salt).derive(integrity_key)
    return AESGCM(file_key).encrypt(bytes(12), b"", message)  # no plaintext: the tag alone


def test_new_files_carry_aes_gmac_under_a_key_of_their_own(tmp_path):
    # The format, pinned: a tag anyone holding the key can recompute from the docs, which
    # covers the header (its own field up to the tag) and the data.
    store = _keyed(make_store(tmp_path), KEY)
    [k] = prefix_keys("p", 1)
    save_prefix(store, [k])
    meta = _header(store.layout.chunk_path(k))["__metadata__"]
    algorithm, salt, tag = meta["mac"].split(":")
    signed = json.dumps([{**meta, "mac": f"gmac-aes256:{salt}"}, "BF16", list(chunk(k).shape)],
                        sort_keys=True, separators=(",", ":")).encode()
    assert algorithm == "gmac-aes256" and len(bytes.fromhex(salt)) == 32
    assert bytes.fromhex(tag) == _gmac_tag(KEY, bytes.fromhex(salt), signed + bytes(byte_view(chunk(k))))
    assert _loads(store, k)


def test_every_file_gets_a_fresh_salt_so_no_two_share_a_gmac_key(tmp_path):
    # The fixed GCM nonce is sound only while no key MACs two messages: the same chunk
    # written twice under the same integrity key must get two salts.
    data = chunk("ab" * 32)
    fields = []
    for name in ("first", "second"):
        write_chunk_file(tmp_path / name, data, LEGACY_META, KEY)
        fields.append(mac.MacField.parse(_header(tmp_path / name)["__metadata__"]["mac"]))
    assert fields[0].salt != fields[1].salt and fields[0].tag != fields[1].tag


def test_a_gmac_fed_in_pieces_is_the_one_shot_gmac():
    # Readers feed the data as it lands (the layer-wise reader a layer at a time), in pieces
    # of any size, also empty or not a multiple of GCM's 16-byte block.
    field = mac.MacField.fresh(mac.GMAC_AES256)
    message = bytes(byte_view(chunk("cd" * 32)))
    piecewise = field.new_mac(KEY)
    for start, end in ((0, 0), (0, 1), (1, 17), (17, 4099), (4099, 4099), (4099, len(message))):
        piecewise.update(memoryview(message)[start:end])
    assert bytes.fromhex(piecewise.hexdigest()) == _gmac_tag(KEY, bytes.fromhex(field.salt), message)


def test_a_keyed_check_takes_the_data_in_any_pieces(tmp_path):
    data = chunk("ab" * 32)
    write_chunk_file(tmp_path / "keyed", data, LEGACY_META, KEY)
    fd = os.open(tmp_path / "keyed", os.O_RDONLY)
    try:
        header = read_header(fd)
    finally:
        os.close(fd)
    check, raw = DataCheck(header, KEY), byte_view(data)
    for start in range(0, len(raw), 777):
        check.update(raw[start:start + 777])
    check.verify()


def _flip_mac_part(at: int) -> Callable[[dict], None]:
    """An edit of the header's MAC field: the first hex digit of its part ``at`` changed."""
    def edit(meta: dict) -> None:
        parts = meta["mac"].split(":")
        parts[at] = ("1" if parts[at][0] == "0" else "0") + parts[at][1:]
        meta["mac"] = ":".join(parts)
    return edit


TAMPERING = {
    "data": lambda path: flip_byte(path, ALIGNMENT + 7),
    "metadata": lambda path: _edit_metadata(path, lambda meta: meta.update(chunk_index="1")),
    "salt": lambda path: _edit_metadata(path, _flip_mac_part(1)),
    "tag": lambda path: _edit_metadata(path, _flip_mac_part(-1)),
}


@pytest.mark.parametrize("algorithm,where", [
    *((mac.GMAC_AES256, where) for where in TAMPERING),
    (mac.HMAC_SHA256, "data"), (mac.HMAC_SHA256, "metadata"), (mac.HMAC_SHA256, "tag"),
])
def test_a_tampered_keyed_chunk_is_a_miss_and_quarantined(tmp_path, algorithm, where):
    # A neighbour edits one byte of a chunk a key holder wrote: its data, a header field
    # whose change keeps the file well-formed (the xxh3 checksum still matches), the salt
    # that picks the file's key, or the tag.
    store = _keyed(make_store(tmp_path), KEY)
    [k] = prefix_keys("p", 1)
    path = _save_with(store, k, algorithm)
    TAMPERING[where](path)
    with pytest.raises(ChunkFileError, match="MAC mismatch"):
        store.load(k, torch.empty_like(chunk(k)))
    assert _quarantined(store, k)


def test_another_files_salt_and_tag_do_not_pass(tmp_path):
    # A neighbour copies a good MAC field, salt and tag, onto another chunk of the same key.
    store = _keyed(make_store(tmp_path), KEY)
    donor, k = prefix_keys("p", 2)
    donated = _header(_save_with(store, donor, mac.WRITTEN))["__metadata__"]["mac"]
    _edit_metadata(_save_with(store, k, mac.WRITTEN), lambda meta: meta.update(mac=donated))
    with pytest.raises(ChunkFileError, match="MAC mismatch"):
        store.load(k, torch.empty_like(chunk(k)))
    assert _quarantined(store, k) and _loads(store, donor)


@pytest.mark.parametrize("declared", [
    None, "", "none", "none:", "xxh3_64:{checksum}", "sha256:{tag}", "GMAC-AES256:{salt}:{tag}",
    "gmac-aes256", "gmac-aes256:{salt}", "gmac-aes256:{tag}", "gmac-aes256::{tag}",
    "gmac-aes256:{salt}:{tag}0", "gmac-aes256:{salt}:{short_tag}", "gmac-aes256:{salt}:{TAG}",
    "gmac-aes256:{salt}0:{tag}", "gmac-aes256:{salt}:{tag}:{tag}", "gmac-aes256:{salt}:é{tag}",
    "gmac-aes256:\ud800", "hmac-sha256:{tag}", "hmac-sha256:{salt}", "hmac-sha256:{salt}:{tag}",
    "blake3:{salt}",
], ids=["stripped", "empty", "none", "none with colon", "the xxh3 checksum", "unknown name",
        "other case", "name alone", "no tag", "no salt", "empty salt", "tag extended",
        "tag cut short", "tag upper case", "salt extended", "two tags", "non-ASCII",
        "lone surrogate", "relabelled hmac, gmac tag", "relabelled hmac, hmac-sized tag",
        "relabelled hmac with a salt", "unreleased blake3"])
def test_a_keyed_reader_refuses_any_other_claim_in_the_mac_field(tmp_path, declared):
    # Downgrade: whatever a neighbour writes in the MAC field (strip it, name no check,
    # a checksum, an unknown or relabelled algorithm, a salt or tag of another length,
    # odd text) is a miss and quarantined.
    store = _keyed(make_store(tmp_path), KEY)
    [k] = prefix_keys("p", 1)
    path = _save_with(store, k, mac.WRITTEN)
    meta = _header(path)["__metadata__"]
    _, salt, tag = meta["mac"].split(":")

    def claim(fields: dict) -> None:
        del fields["mac"]
        if declared is not None:
            fields["mac"] = declared.format(salt=salt, tag=tag, TAG=tag.upper(),
                                            short_tag=tag[:-2], checksum=meta["checksum"])
    _edit_metadata(path, claim)
    with pytest.raises(ChunkFileError, match="MAC"):
        store.load(k, torch.empty_like(chunk(k)))
    assert _quarantined(store, k)


@pytest.mark.parametrize("declared,reason", [
    ("none:", "unknown MAC algorithm 'none': this release accepts gmac-aes256, hmac-sha256"),
    ("blake3:00", "unknown MAC algorithm 'blake3'"),
    ("gmac-aes256:00:00", "a gmac-aes256 salt is 64 lower-case hex digits"),
    ("gmac-aes256:" + "0" * 64 + ":00", "a gmac-aes256 tag is 32 lower-case hex digits"),
    ("hmac-sha256:" + "0" * 32, "a hmac-sha256 tag is 64 lower-case hex digits"),
])
def test_a_refused_mac_field_is_named_as_such(tmp_path, declared, reason):
    # The quarantine's reason says what was wrong, not that some tag mismatched.
    store = _keyed(make_store(tmp_path), KEY)
    [k] = prefix_keys("p", 1)
    _edit_metadata(_save_with(store, k, mac.WRITTEN), lambda meta: meta.update(mac=declared))
    with pytest.raises(ChunkFileError, match=re.escape(reason)):
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
