"""The chunk file: safetensors-compatible, 4096-aligned, and every defect is a miss."""

import json
import os
import struct

import pytest
import torch
from cachedir import flip_byte
from safetensors.torch import load_file, save_file

from lmcache_fs.storage.codec import (
    ALIGNMENT,
    ChunkFileError,
    check_checksum,
    encode_header,
    read_chunk_file,
    read_chunk_header,
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
    header = read_chunk_header(path)
    assert header.shape == tuple(data.shape) and header.metadata["key"] == META["key"]


def _expect_miss(path, data, match, expect=META):
    with pytest.raises(ChunkFileError, match=match):
        read_chunk_file(path, torch.empty_like(data), expect)


def test_bit_flip_in_data_fails_the_checksum(chunk_file):
    path, data = chunk_file
    flip_byte(path, ALIGNMENT + 1000)
    _expect_miss(path, data, "checksum mismatch")


def test_a_caller_that_checks_the_data_itself_gets_every_other_check(chunk_file):
    # GPU readers check the device checksum after the copy to the GPU instead.
    path, data = chunk_file
    flip_byte(path, ALIGNMENT + 1000)
    out = torch.empty_like(data)
    header = read_chunk_file(path, out, META, check_data=False)
    with pytest.raises(ChunkFileError, match="checksum mismatch"):
        check_checksum(header, out)
    with pytest.raises(ChunkFileError, match="metadata key"):
        read_chunk_file(path, out, {**META, "key": "cd" * 32}, check_data=False)
    os.truncate(path, ALIGNMENT + 10)
    with pytest.raises(ChunkFileError, match="size"):
        read_chunk_file(path, out, META, check_data=False)


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


def test_a_header_nested_past_every_pythons_recursion_limit_is_a_miss(tmp_path):
    raw = b"[" * 100_000 + b"]" * 100_000  # a long header: read through its second pread
    (tmp_path / "c").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(64))
    _expect_miss(tmp_path / "c", torch.empty(16), "not JSON")


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
    _expect_miss(tmp_path / "link", data, "cannot open")


def test_non_contiguous_input_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"\.contiguous\(\)"):
        encode_header(torch.zeros(4, 4).t(), {})


def test_non_string_metadata_is_refused():
    with pytest.raises(ValueError, match=r"metadata\['chunk_index'\] must be a str"):
        encode_header(torch.zeros(2), {"chunk_index": 3})
