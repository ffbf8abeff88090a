"""The chunk file: safetensors-compatible, 4096-aligned, and every defect is a miss."""

import json
import os
import struct

import pytest
import torch
from cachedir import flip_byte, read_chunk_file
from safetensors.torch import load_file, save_file

from lmcache_fs.ops.inspection import open_chunk_path, read_header
from lmcache_fs.storage.codec import (
    ALIGNMENT,
    ChunkFileError,
    DataCheck,
    byte_view,
    encode_header,
    write_chunk_file,
)

META = {"namespace": "m-0123456789abcdef", "key": "ab" * 32}


def _chunk(dtype=torch.bfloat16, shape=(4, 2, 2, 16, 64)):
    return torch.randn(shape).to(dtype)


@pytest.fixture
def chunk_file(tmp_path):
    data = _chunk()
    path = tmp_path / "c.safetensors"
    write_chunk_file(path, data, META)
    return path, data


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (2, 3, 2, 16, 64), (0, 2, 4)])
def test_round_trip_is_bit_exact(tmp_path, dtype, shape):
    data = _chunk(dtype, shape)
    write_chunk_file(tmp_path / "c", data, META)
    out = torch.empty_like(data)
    header = read_chunk_file(tmp_path / "c", out, META)
    assert torch.equal(out.view(torch.uint8), data.view(torch.uint8))
    assert header.data_offset % ALIGNMENT == 0


def test_any_safetensors_reader_opens_it(chunk_file):
    path, data = chunk_file
    assert torch.equal(load_file(path)["kv"], data)


def test_data_starts_at_4096_for_gds(chunk_file):
    path, _ = chunk_file
    raw = path.read_bytes()
    (hlen,) = struct.unpack_from("<Q", raw)
    assert 8 + hlen == ALIGNMENT
    meta = json.loads(raw[8:8 + hlen])["__metadata__"]
    assert meta["format"] == "lmcache-fs" and meta["checksum"].startswith("xxh3_64:")


def test_header_reader_returns_metadata(chunk_file):
    path, data = chunk_file
    header = read_header(path)
    assert header.shape == tuple(data.shape) and header.metadata["key"] == META["key"]


def _expect_miss(path, data, match, expect=META):
    with pytest.raises(ChunkFileError, match=match):
        read_chunk_file(path, torch.empty_like(data), expect)


def test_bit_flip_in_data_fails_the_checksum(chunk_file):
    path, data = chunk_file
    flip_byte(path, ALIGNMENT + 1000)
    _expect_miss(path, data, "checksum mismatch")


def test_the_open_checks_the_header_before_any_data_is_read(chunk_file):
    # Every reader (POSIX, kvikio, layer-wise, verify) starts from this open.
    path, data = chunk_file
    with pytest.raises(ChunkFileError, match="metadata key"):
        open_chunk_path(path, {**META, "key": "cd" * 32})
    os.truncate(path, ALIGNMENT + 10)
    with pytest.raises(ChunkFileError, match="size"):
        open_chunk_path(path, META)


def test_the_data_check_takes_the_data_in_any_pieces(chunk_file):
    # The layer-wise reader feeds it layer by layer; whole-chunk readers in one piece.
    path, data = chunk_file
    header = read_header(path)
    check = DataCheck(header)
    raw = byte_view(data)
    for start in range(0, len(raw), 777):
        check.update(raw[start:start + 777])
    check.verify()
    flipped = data.clone()
    flipped.view(torch.uint8).view(-1)[1000] ^= 1
    check = DataCheck(header)
    check.update(byte_view(flipped))
    with pytest.raises(ChunkFileError, match="checksum mismatch"):
        check.verify()


def test_a_mac_is_checked_only_with_the_key_and_then_required(tmp_path):
    data = _chunk()
    write_chunk_file(tmp_path / "keyed", data, META, mac_key=b"k" * 32)
    write_chunk_file(tmp_path / "plain", data, META)
    out = torch.empty_like(data)
    read_chunk_file(tmp_path / "keyed", out, META, mac_key=b"k" * 32)
    read_chunk_file(tmp_path / "keyed", out, META)  # a reader without a key checks xxh3 only
    with pytest.raises(ChunkFileError, match="MAC mismatch"):
        read_chunk_file(tmp_path / "keyed", out, META, mac_key=b"x" * 32)
    with pytest.raises(ChunkFileError, match="no MAC"):
        read_chunk_file(tmp_path / "plain", out, META, mac_key=b"k" * 32)


def test_the_mac_covers_the_metadata_too(tmp_path):
    # A writer without the key cannot relabel a keyed chunk as another key's (same data).
    data = _chunk()
    path = tmp_path / "keyed"
    write_chunk_file(path, data, META, mac_key=b"k" * 32)
    raw = bytearray(path.read_bytes())
    at = raw.index(META["key"].encode())
    raw[at:at + 64] = ("cd" * 32).encode()
    path.write_bytes(bytes(raw))
    with pytest.raises(ChunkFileError, match="MAC mismatch"):
        read_chunk_file(path, torch.empty_like(data), {**META, "key": "cd" * 32}, mac_key=b"k" * 32)


@pytest.mark.parametrize("keep", [0, 5, 100, ALIGNMENT, ALIGNMENT + 10])
def test_truncated_file_is_a_miss(chunk_file, keep):
    path, data = chunk_file
    os.truncate(path, keep)
    _expect_miss(path, data, "truncated|size|short")


def test_garbage_is_a_miss(chunk_file):
    path, data = chunk_file
    path.write_bytes(os.urandom(5000))
    _expect_miss(path, data, "implausible|not an lmcache-fs|truncated")


def test_foreign_safetensors_file_is_a_miss(tmp_path):
    data = _chunk()
    save_file({"kv": data}, tmp_path / "foreign")
    _expect_miss(tmp_path / "foreign", data, "foreign")


def _tagged_header(raw: bytes) -> bytes:
    """A first page whose header length is right and whose JSON is ``raw``."""
    return struct.pack("<Q", ALIGNMENT - 8) + raw.ljust(ALIGNMENT - 8) + bytes(64)


@pytest.mark.parametrize("raw", [
    # json reads both as float infinity: int() raises OverflowError, not ValueError
    b'{"__metadata__": {"format": "lmcache-fs", "format_version": "1"},'
    b' "kv": {"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 64]}}',
    b'{"__metadata__": {"format": "lmcache-fs", "format_version": "1"},'
    b' "kv": {"dtype": "F32", "shape": [16], "data_offsets": [0, 1e999]}}',
    # Python 3.11/3.12 stop at json's recursion limit (not JSON); 3.13 parses it (foreign)
    b"[" * 2000 + b"]" * 2000,
], ids=["infinite shape", "infinite offset", "deep nesting"])
def test_crafted_headers_are_misses_not_crashes(tmp_path, raw):
    (tmp_path / "c").write_bytes(_tagged_header(raw))
    _expect_miss(tmp_path / "c", torch.empty(16), "not an lmcache-fs|not JSON|foreign")


@pytest.mark.parametrize("levels", [30_000, 100_000])
def test_a_header_nested_past_every_pythons_recursion_limit_is_a_miss(tmp_path, levels):
    # 30k levels fit the 64 KiB header cap (read through a second pread) and fail to
    # parse; 100k levels are over the cap and never read.
    raw = b"[" * levels + b"]" * levels
    (tmp_path / "c").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(64))
    _expect_miss(tmp_path / "c", torch.empty(16), "not JSON" if levels == 30_000 else "implausible")


def test_a_header_longer_than_a_page_before_little_data_reads(tmp_path):
    data = torch.arange(16, dtype=torch.float32)  # 64 bytes: less than the header's second page
    write_chunk_file(tmp_path / "c", data, {**META, "note": "x" * 6000})
    out = torch.empty_like(data)
    header = read_chunk_file(tmp_path / "c", out, META)
    assert header.data_offset == 2 * ALIGNMENT and torch.equal(out, data)


def test_chunk_of_another_key_is_a_miss(chunk_file):
    path, data = chunk_file
    _expect_miss(path, data, "metadata key", {**META, "key": "cd" * 32})


def test_chunk_of_another_shape_is_a_miss(chunk_file):
    path, _ = chunk_file
    with pytest.raises(ChunkFileError, match="expected"):
        read_chunk_file(path, torch.empty(4, 2, 2, 16, 32, dtype=torch.bfloat16), META)


def test_missing_file_and_symlink_are_misses(chunk_file, tmp_path):
    path, data = chunk_file
    _expect_miss(tmp_path / "absent", data, "missing")
    (tmp_path / "link").symlink_to(path)
    _expect_miss(tmp_path / "link", data, "symlink")


def test_non_contiguous_input_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"\.contiguous\(\)"):
        encode_header(torch.zeros(4, 4).t(), {})


def test_non_string_metadata_is_refused():
    with pytest.raises(ValueError, match=r"metadata\['chunk_index'\] must be a str"):
        encode_header(torch.zeros(2), {"chunk_index": 3})
