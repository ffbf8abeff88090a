"""The device checksum: its definition, what it catches, the kernel, and its use in reads and saves.

Above the ``gpu`` mark: the torch reference against a plain-Python reading of
the definition, and the corruptions it must catch. Below: the CUDA kernel
against the reference, saves that store it, and kvikio reads that check it on
the GPU (and fall back to host xxh3 for files without it).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from cachedir import flip_byte

from lmcache_fs.gpu import device_checksum
from lmcache_fs.gpu.device_checksum import FIELD, checksum_text, supports, word_sums
from lmcache_fs.storage import codec
from lmcache_fs.storage.codec import ALIGNMENT, ChunkFileError
from lmcache_fs.storage.layout import ChunkLayout, Namespace
from lmcache_fs.storage.store import ChunkStore
from lmcache_fs.transfer.chunk_reader import MAX_SLOTS, ChunkReader
from lmcache_fs.transfer.read_paths import ReadBackend, ReadPath, kvikio_backend

M32 = 0xFFFFFFFF


def python_word_sums(data: bytes) -> tuple[int, int]:
    """The module docstring's definition, word by word, in plain Python (the oracle)."""
    sums = [0, 0]
    for i in range(len(data) // 4):
        (w,) = struct.unpack_from("<I", data, 4 * i)
        for lane, (p, c1, c2) in enumerate(device_checksum.LANES):
            h = (w + i * p) & M32
            h = (h * c1) & M32
            h ^= h >> 15
            h = (h * c2) & M32
            h ^= h >> 13
            sums[lane] += h
    return sums[0], sums[1]


def _bytes_of(t: torch.Tensor) -> bytes:
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("dtype,shape", [(torch.uint8, (0,)), (torch.uint8, (4,)),
                                         (torch.bfloat16, (3, 6)), (torch.int32, (257,)),
                                         (torch.float8_e4m3fn, (2, 64))])
def test_reference_follows_the_definition(dtype, shape):
    raw = torch.randint(0, 256, (torch.Size(shape).numel() * dtype.itemsize,), dtype=torch.uint8)
    data = raw.view(dtype).view(shape)
    assert word_sums(data) == python_word_sums(_bytes_of(data))


def test_reference_is_exact_across_its_segments(monkeypatch):
    # The torch reference adds per-segment sums: the split must not change them.
    data = torch.randint(0, 256, (4 * 1000,), dtype=torch.uint8)
    whole = word_sums(data)
    monkeypatch.setattr(device_checksum, "_SEGMENT_WORDS", 77)
    assert word_sums(data) == whole == python_word_sums(_bytes_of(data))


def test_text_is_fixed_width_hex_with_a_named_scheme():
    assert checksum_text((1, 2**40)) == "wordsum2x32:0000000000000001" + "0000010000000000"


def test_every_single_byte_change_is_caught():
    data = torch.randint(0, 256, (1024,), dtype=torch.uint8)
    good = word_sums(data)
    for position in range(0, 1024, 37):
        bad = data.clone()
        bad[position] ^= 1 << (position % 8)
        assert word_sums(bad) != good, position


@pytest.mark.parametrize("damage", ["swap pages", "zero page", "shift", "other chunk",
                                    "truncate"])
def test_page_scale_damage_is_caught(damage):
    data = torch.randint(0, 256, (8 * ALIGNMENT,), dtype=torch.uint8)
    good = checksum_text(word_sums(data))
    bad = data.clone()
    if damage == "swap pages":
        bad[:ALIGNMENT], bad[ALIGNMENT:2 * ALIGNMENT] = data[ALIGNMENT:2 * ALIGNMENT], data[:ALIGNMENT]
    elif damage == "zero page":
        bad[3 * ALIGNMENT:4 * ALIGNMENT] = 0
    elif damage == "shift":
        bad = torch.cat([data[4:], data[:4]])
    elif damage == "other chunk":
        bad = torch.randint(0, 256, data.shape, dtype=torch.uint8)
    else:
        bad = torch.cat([data[:-ALIGNMENT], torch.zeros(ALIGNMENT, dtype=torch.uint8)])
    assert checksum_text(word_sums(bad)) != good


def test_data_that_is_not_whole_aligned_words_is_refused():
    assert not supports(torch.zeros(6, dtype=torch.uint8))
    assert not supports(torch.zeros(12, dtype=torch.uint8)[1:9])  # misaligned start
    assert not supports(torch.zeros(4, 4, dtype=torch.uint8).t())  # not contiguous
    with pytest.raises(ValueError, match="whole number of words"):
        word_sums(torch.zeros(6, dtype=torch.uint8))


def test_cpu_tensors_get_no_kernel_launch():
    assert device_checksum.start_word_sums(torch.zeros(16, dtype=torch.uint8)) is None


# -- on a GPU ------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
SHAPE = (2, 3, 4, 16, 32)


@pytest.fixture
def store(tmp_path: Path) -> ChunkStore:
    return ChunkStore(ChunkLayout(tmp_path, Namespace({"model": "m"})))


def _backend(path: str) -> ReadBackend:
    if path == "posix":
        return ReadBackend(ReadPath.POSIX)
    try:
        return kvikio_backend()
    except Exception as exc:  # noqa: BLE001 - kvikio not installed here: nothing to test
        pytest.skip(f"kvikio unavailable: {exc}")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("nbytes,offset", [(0, 0), (4, 0), (12, 0), (16, 0), (4100, 0),
                                           (4100, 4), (1 << 20, 12), (32 << 20, 0)])
def test_kernel_matches_the_reference(nbytes, offset):
    base = torch.randint(0, 256, (nbytes + offset,), dtype=torch.uint8, device="cuda")
    data = base[offset:]  # offset 4 or 12: word-aligned, not 16-byte aligned (scalar path)
    host = torch.empty(2, dtype=torch.int64, pin_memory=True)
    sums = device_checksum.start_word_sums(data, host_out=host)
    assert sums is not None, "kernels did not build"
    torch.cuda.current_stream().synchronize()
    want = word_sums(data.cpu())
    assert device_checksum.text_of(sums.cpu()) == device_checksum.text_of(host) == checksum_text(want)
    assert word_sums(data) == want  # the torch reference agrees with itself on the GPU


@pytest.mark.gpu
@cuda
def test_saves_from_the_gpu_store_the_device_checksum(store):
    from lmcache_fs.ops.inspection import read_header
    from lmcache_fs.storage.writer import BackgroundWriter
    from lmcache_fs.transfer.device_saver import DeviceChunkSaver

    writer = BackgroundWriter(store, max_queue=8)
    saver = DeviceChunkSaver(writer, "cuda", max_pending=4)
    chunk = torch.randn(SHAPE, device="cuda").to(torch.bfloat16)
    assert saver.submit("00" * 8, chunk, {})
    saver.flush()
    writer.flush()
    header = read_header(store.layout.chunk_path("00" * 8))
    assert header.metadata[FIELD] == checksum_text(word_sums(chunk.cpu()))
    saver.close()
    writer.close()


def _rewrite_field(path: Path, value: str | None) -> None:
    """Set (or drop) the device checksum in a chunk file's header, keeping its length."""
    blob = bytearray(path.read_bytes())
    (hlen,) = struct.unpack_from("<Q", blob)
    header = json.loads(blob[8:8 + hlen])
    if value is None:
        header["__metadata__"].pop(FIELD, None)
    else:
        header["__metadata__"][FIELD] = value
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= hlen
    blob[8:8 + hlen] = raw + b" " * (hlen - len(raw))
    path.write_bytes(bytes(blob))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("read_path", ["posix", "kvikio"])
def test_reads_check_the_device_checksum_on_the_gpu(store, monkeypatch, read_path):
    chunk = torch.randn(SHAPE).to(torch.bfloat16)
    keys = [f"{i:016x}" for i in range(3)]
    for key in keys:
        store.save(key, chunk, {FIELD: checksum_text(word_sums(chunk))})
    # 1: xxh3 right, device checksum wrong: only a check on the GPU rejects it.
    _rewrite_field(store.layout.chunk_path(keys[1]), checksum_text((0, 0)))
    # 2: no device checksum (a CPU writer's file): verified on the host.
    _rewrite_field(store.layout.chunk_path(keys[2]), None)
    hashed_on_host = []
    real_checksum = codec.checksum
    monkeypatch.setattr(codec, "checksum", lambda t: hashed_on_host.append(1) or real_checksum(t))
    reader = ChunkReader(store, SHAPE, torch.bfloat16, "cuda", _backend(read_path),
                         staging_bytes=4 * chunk.numel() * 2, verify=True)
    got = {i: c.cpu() if isinstance(c, torch.Tensor) else c for i, c in reader.read(keys)}
    reader.close()
    assert torch.equal(got[0], chunk) and torch.equal(got[2], chunk)
    assert isinstance(got[1], ChunkFileError) and "device checksum mismatch" in str(got[1])
    assert len(hashed_on_host) == 1  # only the file without a device checksum
    assert not store.layout.chunk_path(keys[1]).exists()  # quarantined: proven bad


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("read_path", ["posix", "kvikio"])
def test_corrupt_data_fails_the_device_checksum(store, read_path):
    chunk = torch.randn(SHAPE).to(torch.bfloat16)
    store.save("ab" * 8, chunk, {FIELD: checksum_text(word_sums(chunk))})
    flip_byte(store.layout.chunk_path("ab" * 8), ALIGNMENT + 100)
    reader = ChunkReader(store, SHAPE, torch.bfloat16, "cuda", _backend(read_path),
                         staging_bytes=MAX_SLOTS * chunk.numel() * 2, verify=True)
    [(_, result)] = list(reader.read(["ab" * 8]))
    reader.close()
    assert isinstance(result, ChunkFileError) and "checksum mismatch" in str(result)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("read_path", ["posix", "kvikio"])
def test_without_the_kernels_reads_are_hashed_on_the_host(store, monkeypatch, read_path):
    # Kernels that failed to build: the device checksum is not consulted, xxh3 decides.
    monkeypatch.setattr(device_checksum, "available_for", lambda data: False)
    chunk = torch.randn(SHAPE).to(torch.bfloat16)
    store.save("cd" * 8, chunk, {FIELD: checksum_text((0, 0))})  # a wrong device checksum
    reader = ChunkReader(store, SHAPE, torch.bfloat16, "cuda", _backend(read_path),
                         staging_bytes=MAX_SLOTS * chunk.numel() * 2, verify=True)
    [(_, result)] = [(i, c.cpu() if isinstance(c, torch.Tensor) else c)
                     for i, c in reader.read(["cd" * 8])]
    reader.close()
    assert isinstance(result, torch.Tensor) and torch.equal(result, chunk)
