"""The chunk file format: a safetensors file with its data at a 4096-byte boundary.

A matching write/read pair for one file layout; it knows nothing of vLLM,
directories or the index. Any safetensors reader can open the file:

    [8-byte little-endian header length N]
    [JSON header, space-padded so that 8 + N is a multiple of 4096]
    [tensor "kv": raw bytes, C order]

The header's ``__metadata__`` (strings only, as safetensors requires) carries
the format name and version, the caller's fields (namespace, key, parent key,
chunk index, tokens; GPU writers add a ``device_checksum``, see
:mod:`lmcache_fs.gpu.device_checksum`) and an xxh3-64 checksum of the data.
Aligned data lets O_DIRECT and GPUDirect Storage read it in place.

Reading is one ``preadv`` into a caller-owned buffer (never a memory map: too
slow for many small cold files), then checks in this order: size, header,
expected metadata, dtype and shape, checksum. Any failure raises
:class:`ChunkFileError`, which callers treat as a cache miss.

Example:
    >>> import torch, tempfile, os
    >>> t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    >>> p = os.path.join(tempfile.mkdtemp(), "c.safetensors")
    >>> write_chunk_file(p, t, {"key": "ab"})
    >>> out = torch.empty_like(t)
    >>> read_chunk_file(p, out, {"key": "ab"}).metadata["key"]
    'ab'
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import xxhash

ALIGNMENT = 4096
FORMAT_NAME = "lmcache-fs"
FORMAT_VERSION = "1"
TENSOR_NAME = "kv"
_MAX_HEADER = 1 << 20  # a real header is < 2 KiB; anything larger is not ours

_DTYPE_TO_ST: dict[torch.dtype, str] = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_ST_TO_DTYPE = {v: k for k, v in _DTYPE_TO_ST.items()}


class ChunkFileError(Exception):
    """A chunk file is missing, truncated, foreign or corrupt (a cache miss)."""


@dataclass(frozen=True)
class ChunkHeader:
    """What a chunk file's header says about its data."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    data_offset: int
    nbytes: int
    metadata: dict[str, str]


_CHECKSUM_PREFIX = "xxh3_64:"


def checksum(data: torch.Tensor) -> str:
    """xxh3-64 of a contiguous CPU tensor's bytes, as ``"xxh3_64:<hex>"``."""
    return _CHECKSUM_PREFIX + xxhash.xxh3_64_hexdigest(_byte_view(data))


def new_checksum() -> xxhash.xxh3_64:
    """A streaming xxh3-64: ``update()`` it with the data in file order, in any pieces."""
    return xxhash.xxh3_64()


def checksum_text(streamed: xxhash.xxh3_64) -> str:
    """What :func:`checksum` would say of the bytes fed to ``streamed``."""
    return _CHECKSUM_PREFIX + streamed.hexdigest()


def _byte_view(data: torch.Tensor) -> memoryview:
    # numpy has no bfloat16/float8: view the bytes as uint8 first (no copy).
    return memoryview(data.reshape(-1).view(torch.uint8).numpy())


def _check_tensor(data: torch.Tensor) -> None:
    if data.device.type != "cpu":
        raise ValueError(f"tensor '{TENSOR_NAME}' is on {data.device}; copy it to the CPU first (.cpu())")
    if not data.is_contiguous():
        raise ValueError(f"tensor '{TENSOR_NAME}' is not contiguous; call .contiguous() first")
    if data.dtype not in _DTYPE_TO_ST:
        raise ValueError(f"tensor '{TENSOR_NAME}' has dtype {data.dtype}, which safetensors "
                         f"cannot name; supported: {sorted(str(d) for d in _DTYPE_TO_ST)}")


def encode_header(data: torch.Tensor, metadata: Mapping[str, str]) -> bytes:
    """The 8-byte length plus padded JSON header for ``data`` (a multiple of 4096 bytes).

    Raises:
        ValueError: the tensor is not a contiguous CPU tensor of a known dtype,
            or a metadata value is not a string.
    """
    _check_tensor(data)
    for k, v in metadata.items():
        if not isinstance(v, str):
            raise ValueError(f"metadata[{k!r}] must be a str (safetensors rule), got {type(v).__name__}")
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **metadata,
            "checksum": checksum(data)}
    nbytes = data.numel() * data.element_size()
    header = {"__metadata__": meta,
              TENSOR_NAME: {"dtype": _DTYPE_TO_ST[data.dtype], "shape": list(data.shape),
                            "data_offsets": [0, nbytes]}}
    raw = json.dumps(header, separators=(",", ":")).encode()
    total = -(-(8 + len(raw)) // ALIGNMENT) * ALIGNMENT
    return struct.pack("<Q", total - 8) + raw + b" " * (total - 8 - len(raw))


def write_chunk_to_fd(fd: int, data: torch.Tensor, metadata: Mapping[str, str]) -> int:
    """Write header and data to an open file descriptor; returns bytes written."""
    header = encode_header(data, metadata)
    body = _byte_view(data)
    total = len(header) + len(body)
    written = os.writev(fd, [header, body])
    while written < total:  # a short write is legal for large buffers
        if written < len(header):
            written += os.write(fd, header[written:])
        else:
            written += os.write(fd, body[written - len(header):])
    return total


def write_chunk_file(path: str | os.PathLike[str], data: torch.Tensor,
                     metadata: Mapping[str, str]) -> None:
    """Write a chunk file at ``path`` in place (callers that share a directory publish instead)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_chunk_to_fd(fd, data, metadata)
    finally:
        os.close(fd)


def parse_header(blob: bytes) -> ChunkHeader:
    """Parse the first bytes of a chunk file (at least up to the data offset)."""
    if len(blob) < 8:
        raise ChunkFileError("truncated: shorter than the 8-byte header length")
    (hlen,) = struct.unpack_from("<Q", blob)
    if hlen > _MAX_HEADER:
        raise ChunkFileError(f"header length {hlen} is implausible: not an lmcache-fs chunk")
    if len(blob) < 8 + hlen:
        raise ChunkFileError("truncated inside the header")
    try:
        header = json.loads(blob[8:8 + hlen])
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise ChunkFileError(f"header is not JSON: not an lmcache-fs chunk ({exc!r})") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ChunkFileError("foreign safetensors file (no lmcache-fs format tag)")
    try:
        info = header[TENSOR_NAME]
        dtype = _ST_TO_DTYPE[info["dtype"]]
        shape = tuple(int(d) for d in info["shape"])
        start, end = (int(x) for x in info["data_offsets"])
    except (ValueError, KeyError, TypeError, OverflowError) as exc:  # json reads 1e999 as inf
        raise ChunkFileError(f"header is not an lmcache-fs safetensors header ({exc!r})") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise ChunkFileError(f"format version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    nbytes = end - start
    expected = dtype.itemsize
    for d in shape:
        expected *= d
    if start != 0 or nbytes != expected:
        raise ChunkFileError(f"data_offsets {start}..{end} do not match shape {shape} {dtype}")
    return ChunkHeader(dtype, shape, 8 + hlen, nbytes, {str(k): str(v) for k, v in meta.items()})


def read_chunk_header(path: str | os.PathLike[str]) -> ChunkHeader:
    """Read and parse only the header of a chunk file (for inspection tools)."""
    with open(path, "rb") as f:
        head = f.read(ALIGNMENT)
        if len(head) >= 8:
            (hlen,) = struct.unpack_from("<Q", head)
            if 8 + hlen > len(head) and hlen <= _MAX_HEADER:
                head += f.read(8 + hlen - len(head))
    return parse_header(head)


def open_chunk_file(path: str | os.PathLike[str]) -> int:
    """Open a chunk file for reading, never through a symlink; returns the descriptor.

    Raises:
        ChunkFileError: missing, a symlink, a directory, unreadable.
    """
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError as exc:
        raise ChunkFileError("missing") from exc
    except OSError as exc:  # ELOOP (a symlink), ESTALE, EACCES, EISDIR, ...
        raise ChunkFileError(f"cannot open: {exc.strerror}") from exc


def read_header_fd(fd: int, path: str | os.PathLike[str]) -> ChunkHeader:
    """The header through an open descriptor (one pread); longer than a page: through ``path``."""
    try:
        return parse_header(os.pread(fd, ALIGNMENT, 0))
    except ChunkFileError:
        return read_chunk_header(path)  # raises again if the header is bad, not just long


def check_header(header: ChunkHeader, file_size: int, dtype: torch.dtype,
                 shape: Sequence[int], expect: Mapping[str, str]) -> None:
    """Raise :class:`ChunkFileError` unless a chunk's header fits what the caller expects.

    Every reader (POSIX here, kvikio in :mod:`lmcache_fs.transfer.chunk_reader`) runs these
    checks before any byte of the file reaches the KV cache.
    """
    if file_size != header.data_offset + header.nbytes:
        raise ChunkFileError(f"size {file_size} bytes, header promises "
                             f"{header.data_offset + header.nbytes}")
    if header.dtype != dtype or header.shape != tuple(shape):
        raise ChunkFileError(f"holds {header.dtype} {list(header.shape)}, "
                             f"expected {dtype} {list(shape)}")
    for k, v in expect.items():
        if header.metadata.get(k) != v:
            raise ChunkFileError(f"metadata {k}={header.metadata.get(k)!r}, expected {v!r}")


def read_chunk_file(path: str | os.PathLike[str], out: torch.Tensor,
                    expect: Mapping[str, str], *, check_data: bool = True) -> ChunkHeader:
    """Read a chunk file into ``out`` and verify it completely.

    Args:
        path: the chunk file.
        out: a contiguous CPU tensor with the expected dtype and shape; filled
            in place. Its contents are undefined if this raises.
        expect: metadata fields that must match exactly (namespace, key, ...).
        check_data: False leaves the data's checksum to the caller (GPU
            readers check the device checksum after the copy to the GPU, or
            call :func:`check_checksum`); everything else is still checked.

    Raises:
        ChunkFileError: missing, vanished mid-read, truncated, foreign, of
            another namespace/key/shape/dtype, or failing its checksum.
    """
    _check_tensor(out)
    body = _byte_view(out)
    head = bytearray(ALIGNMENT)
    fd = open_chunk_file(path)
    try:
        size = os.fstat(fd).st_size
        got = os.preadv(fd, [head, body], 0)
        head_bytes = bytes(head[:got])  # a file shorter than a page leaves the rest unread
        if len(head_bytes) >= 8:
            (hlen,) = struct.unpack_from("<Q", head_bytes)
            if 8 + hlen > ALIGNMENT and hlen <= _MAX_HEADER:
                head_bytes = os.pread(fd, 8 + hlen, 0)  # a header longer than one page
        header = parse_header(head_bytes)
        if header.data_offset != ALIGNMENT:
            # A header longer than one page: read the data where it really starts.
            got = header.data_offset + os.preadv(fd, [body], header.data_offset)
    except OSError as exc:  # ESTALE/ENOENT on NFS when deleted mid-read
        raise ChunkFileError(f"read failed: {exc.strerror}") from exc
    finally:
        os.close(fd)
    check_header(header, size, out.dtype, out.shape, expect)
    if got != header.data_offset + header.nbytes:
        raise ChunkFileError(f"short read: {got} of {size} bytes")
    if check_data:
        check_checksum(header, out)
    return header


def check_checksum(header: ChunkHeader, data: torch.Tensor) -> None:
    """Raise :class:`ChunkFileError` unless ``data`` (on the host) has the header's xxh3-64."""
    if header.metadata.get("checksum") != checksum(data):
        raise ChunkFileError("checksum mismatch: the data is corrupt")
