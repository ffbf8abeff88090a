"""The chunk file format: a safetensors file with its data at a 4096-byte boundary.

A matching write/read pair for one file layout; it knows nothing of vLLM,
directories or the index. Any safetensors reader can open the file:

    [8-byte little-endian header length N]
    [JSON header, space-padded so that 8 + N is a multiple of 4096]
    [tensor "kv": raw bytes, C order]

The header's ``__metadata__`` (strings only, as safetensors requires) carries
the format name and version, the caller's fields (namespace, key, parent key,
chunk index, tokens; GPU writers add a ``device_checksum``, see
:mod:`lmcache_fs.gpu.device_checksum`), an xxh3-64 checksum of the data and,
where the writer holds an integrity key, a MAC of the metadata and the data
that names its algorithm (``"mac": "gmac-aes256:<salt>:<tag>"``; files written
before carry ``hmac-sha256:<tag>``, see :mod:`lmcache_fs.storage.mac` and
:class:`DataCheck`). Aligned data lets GPUDirect Storage (which needs
4096-aligned offsets) read it in place.

This module is the format only: :func:`read_header` parses a header from an
open descriptor and :func:`check_header` / :class:`DataCheck` hold every check
a reader makes. Opening a chunk safely (directories by descriptor, never
through a symlink) is :meth:`lmcache_fs.storage.store.ChunkStore.open_chunk`.

Example:
    >>> import torch, tempfile, os
    >>> t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    >>> p = os.path.join(tempfile.mkdtemp(), "c.safetensors")
    >>> write_chunk_file(p, t, {"key": "ab"})
    >>> fd = os.open(p, os.O_RDONLY)
    >>> read_header(fd).metadata["key"]
    'ab'
    >>> os.close(fd)
"""

from __future__ import annotations

import hmac
import json
import os
import struct
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import xxhash

from lmcache_fs.storage import mac
from lmcache_fs.storage.layout import FORMAT_VERSION as NAMESPACE_FORMAT_VERSION

ALIGNMENT = 4096
FORMAT_NAME = "lmcache-fs"
FORMAT_VERSION = str(NAMESPACE_FORMAT_VERSION)  # the header's field is a string (safetensors)
TENSOR_NAME = "kv"
MAX_HEADER_BYTES = 64 << 10  # a real header is < 2 KiB; anything larger is not ours
CHECKSUM_FIELD = "checksum"
MAC_FIELD = "mac"

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
    return _CHECKSUM_PREFIX + xxhash.xxh3_64_hexdigest(byte_view(data))


def _new_mac(field: mac.MacField, key: bytes, metadata: Mapping[str, str], dtype: str,
             shape: Sequence[int]) -> mac.Mac:
    """A MAC fed with everything a header says but its tag, before the data is fed to it."""
    signed = {k: v for k, v in metadata.items() if k != MAC_FIELD}
    covered = field.covered()
    if covered is not None:
        signed[MAC_FIELD] = covered
    started = field.new_mac(key)
    started.update(json.dumps([signed, dtype, list(shape)], sort_keys=True,
                              separators=(",", ":")).encode())
    return started


def _same(got: str, expected: str) -> bool:
    """Constant-time comparison of a computed check with a header's (any text a writer planted)."""
    return hmac.compare_digest(got.encode(), expected.encode("utf-8", "surrogatepass"))


class DataCheck:
    """The one check of a chunk's data that every reader makes: feed it the data, then verify.

    The data goes in file order, in any pieces (whole-chunk readers feed one
    buffer; the layer-wise reader feeds each layer as it lands).

    Without ``mac_key`` it checks the header's xxh3-64, which catches
    accidents. With ``mac_key`` it checks the header's MAC instead, which the
    file must then carry under one of :data:`lmcache_fs.storage.mac.ACCEPTED`
    in exactly its form (:class:`lmcache_fs.storage.mac.MacField`): a file
    without one, naming another algorithm, with a salt or tag of another
    length, or with a MAC made with another key fails. The MAC covers the data and every other header field,
    the checksum among them, so a good MAC proves the bytes are the ones a
    holder of the key wrote; hashing xxh3 as well would cost keyed loads a
    second pass over every byte and prove nothing more. (GPU readers may
    check the device checksum instead of xxh3, see
    :mod:`lmcache_fs.transfer.chunk_reader`; never instead of the MAC.)

    A file's defects show in :meth:`verify`, never here: readers build a
    check as they open a chunk and count any failure as that chunk's miss.
    """

    def __init__(self, header: "ChunkHeader", mac_key: bytes | None = None):
        self._hash: mac.Mac | None  # xxh3 or the MAC; None: refused
        self._refused = ""  # why the file cannot pass, whatever its data (a keyed check only)
        if mac_key is None:
            self._expected = header.metadata.get(CHECKSUM_FIELD, "")
            self._prefix = _CHECKSUM_PREFIX
            self._hash = xxhash.xxh3_64()
            self._mismatch = "checksum mismatch: the data is corrupt"
            return
        self._expected, self._prefix, self._hash = "", "", None
        self._mismatch = "MAC mismatch: written with another key, or altered"
        declared = header.metadata.get(MAC_FIELD)
        if declared is None:
            self._refused = "no MAC: not written by a holder of the integrity key"
            return
        try:
            field = mac.MacField.parse(declared)
        except mac.MacFieldError as exc:
            self._refused = str(exc)
            return
        self._expected = field.tag
        self._hash = _new_mac(field, mac_key, header.metadata, _DTYPE_TO_ST[header.dtype],
                              header.shape)

    def update(self, data: memoryview | bytes) -> None:
        """Feed the next bytes of the data."""
        if self._hash is not None:
            self._hash.update(data)

    def verify(self) -> None:
        """Raise :class:`ChunkFileError` unless the data fed matches the header (once, at the end)."""
        if self._hash is None:
            raise ChunkFileError(self._refused)
        if not _same(self._prefix + self._hash.hexdigest(), self._expected):
            raise ChunkFileError(self._mismatch)


def byte_view(data: torch.Tensor) -> memoryview:
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


def encode_header(data: torch.Tensor, metadata: Mapping[str, str],
                  mac_key: bytes | None = None, mac_algorithm: str = mac.WRITTEN) -> bytes:
    """The 8-byte length plus padded JSON header for ``data`` (a multiple of 4096 bytes).

    With ``mac_key`` the header also carries the MAC that :class:`DataCheck`
    checks, made with ``mac_algorithm`` (only benchmarks and tests of older
    files pass another than the default).

    Raises:
        ValueError: the tensor is not a contiguous CPU tensor of a known dtype,
            or a metadata value is not a string.
    """
    _check_tensor(data)
    for k, v in metadata.items():
        if not isinstance(v, str):
            raise ValueError(f"metadata[{k!r}] must be a str (safetensors rule), got {type(v).__name__}")
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **metadata,
            CHECKSUM_FIELD: checksum(data)}
    if mac_key is not None:
        field = mac.MacField.fresh(mac_algorithm)
        signer = _new_mac(field, mac_key, meta, _DTYPE_TO_ST[data.dtype], data.shape)
        signer.update(byte_view(data))
        meta[MAC_FIELD] = str(field.signed(signer.hexdigest()))
    nbytes = data.numel() * data.element_size()
    header = {"__metadata__": meta,
              TENSOR_NAME: {"dtype": _DTYPE_TO_ST[data.dtype], "shape": list(data.shape),
                            "data_offsets": [0, nbytes]}}
    raw = json.dumps(header, separators=(",", ":")).encode()
    total = -(-(8 + len(raw)) // ALIGNMENT) * ALIGNMENT
    return struct.pack("<Q", total - 8) + raw + b" " * (total - 8 - len(raw))


def write_chunk_to_fd(fd: int, data: torch.Tensor, metadata: Mapping[str, str],
                      mac_key: bytes | None = None, mac_algorithm: str = mac.WRITTEN) -> int:
    """Write header and data to an open file descriptor; returns bytes written."""
    header = encode_header(data, metadata, mac_key, mac_algorithm)
    body = byte_view(data)
    total = len(header) + len(body)
    written = os.writev(fd, [header, body])
    while written < total:  # a short write is legal for large buffers
        if written < len(header):
            written += os.write(fd, header[written:])
        else:
            written += os.write(fd, body[written - len(header):])
    return total


def write_chunk_file(path: str | os.PathLike[str], data: torch.Tensor,
                     metadata: Mapping[str, str], mac_key: bytes | None = None,
                     mac_algorithm: str = mac.WRITTEN) -> None:
    """Write a chunk file at ``path`` in place (callers that share a directory publish instead)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_chunk_to_fd(fd, data, metadata, mac_key, mac_algorithm)
    finally:
        os.close(fd)


def parse_header(blob: bytes) -> ChunkHeader:
    """Parse the first bytes of a chunk file (at least up to the data offset)."""
    if len(blob) < 8:
        raise ChunkFileError("truncated: shorter than the 8-byte header length")
    (hlen,) = struct.unpack_from("<Q", blob)
    if hlen > MAX_HEADER_BYTES:
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


def read_header(fd: int) -> ChunkHeader:
    """Read and parse the header of the chunk file open at ``fd`` (one ``pread`` unless long).

    Raises:
        ChunkFileError: truncated, foreign, or a header over
            :data:`MAX_HEADER_BYTES` (never read: a planted length cannot make
            a reader allocate more).
        OSError: the read failed.
    """
    head = os.pread(fd, ALIGNMENT, 0)
    if len(head) >= 8:
        (hlen,) = struct.unpack_from("<Q", head)
        if len(head) < 8 + hlen <= 8 + MAX_HEADER_BYTES:
            head = os.pread(fd, 8 + hlen, 0)
    return parse_header(head)


def check_header(header: ChunkHeader, file_size: int, dtype: torch.dtype | None,
                 shape: Sequence[int] | None, expect: Mapping[str, str]) -> None:
    """Raise :class:`ChunkFileError` unless a chunk's header fits what the caller expects.

    :meth:`lmcache_fs.storage.store.ChunkStore.open_chunk` runs these checks
    before any reader moves a byte of the file; ``dtype``/``shape`` None
    accept what the header says (operators' tools that know no geometry).
    """
    if file_size != header.data_offset + header.nbytes:
        raise ChunkFileError(f"size {file_size} bytes, header promises "
                             f"{header.data_offset + header.nbytes}")
    if ((dtype is not None and header.dtype != dtype)
            or (shape is not None and header.shape != tuple(shape))):
        raise ChunkFileError(f"holds {header.dtype} {list(header.shape)}, "
                             f"expected {dtype} {list(shape or header.shape)}")
    for k, v in expect.items():
        if header.metadata.get(k) != v:
            raise ChunkFileError(f"metadata {k}={header.metadata.get(k)!r}, expected {v!r}")
