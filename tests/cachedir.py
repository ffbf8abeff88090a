"""Build small cache directories for tests: namespaces, chained chunk keys, deterministic bytes."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Callable, Sized, TypeVar

import torch

from lmcache_fs.ops.inspection import open_chunk_path
from lmcache_fs.ops.inventory import scan_directory, total_size
from lmcache_fs.storage.codec import ChunkHeader
from lmcache_fs.storage.layout import ChunkLayout, Namespace
from lmcache_fs.storage.manifest import write_manifest
from lmcache_fs.storage.store import ChunkStore

ListingT = TypeVar("ListingT", bound=Sized)

# The manifest fields the vLLM connector writes, for a tiny geometry: chunks of
# 2 layers x 1 block x 1 head x 16 tokens x 2*8 bf16 values = 1 KiB of data.
FIELDS = {"model": "tiny@0123456789ab", "num_layers": 2, "num_kv_heads": 1, "head_size": 8,
          "dtype": "bfloat16", "kv_cache_dtype": "auto", "kv_dtype": "bfloat16",
          "block_size": 16, "kv_layout": "cpu-vec", "tp_size": 1, "pp_size": 1,
          "hash_algo": "sha256", "chunk_size": 16, "tp_rank": 0, "pp_rank": 0}
SHAPE = (2, 1, 1, 16, 16)


def make_store(root: str | os.PathLike[str], **fields: object) -> ChunkStore:
    """A store for a namespace like the connector's (fields override FIELDS), manifest written."""
    layout = ChunkLayout(root, Namespace({**FIELDS, **fields}))
    write_manifest(layout)
    return ChunkStore(layout)


def record_bytes(root: str | os.PathLike[str]) -> int:
    """What the cache's records (each namespace's manifest, markers, pins) add to the budget."""
    return total_size(scan_directory(root).budgeted_records)


def prefix_keys(prompt: str, n: int) -> list[str]:
    """``n`` chained chunk keys for a prompt name (like vLLM's chained block hashes)."""
    keys, parent = [], prompt.encode()
    for _ in range(n):
        parent = hashlib.sha256(parent).digest()
        keys.append(parent.hex())
    return keys


def chunk(key: str, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    """The bytes every writer stores for ``key`` (derived from the key, as KV is from tokens)."""
    gen = torch.Generator().manual_seed(int(key[:15], 16))
    return torch.randn(shape, generator=gen).to(torch.bfloat16)


def save_prefix(store: ChunkStore, keys: list[str], shape: tuple[int, ...] = SHAPE) -> None:
    """Store a prefix's chunks with the connector's metadata (parent key, chunk index)."""
    for i, key in enumerate(keys):
        store.save(key, chunk(key, shape), {
            "parent_key": keys[i - 1] if i else "", "chunk_index": str(i), "num_tokens": "16"})


def load_ok(store: ChunkStore, key: str, shape: tuple[int, ...] = SHAPE) -> bool:
    """Load ``key`` and check the bytes are the ones written for it (raises ChunkFileError)."""
    out = torch.empty(shape, dtype=torch.bfloat16)
    store.load(key, out)
    return torch.equal(out.view(torch.uint8), chunk(key, out.shape).view(torch.uint8))


def flip_byte(path: str | os.PathLike[str], at: int) -> None:
    """Corrupt the byte at offset ``at`` (negative: from the end) in place, and sync it."""
    with open(path, "r+b") as f:
        f.seek(at, os.SEEK_SET if at >= 0 else os.SEEK_END)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
        os.fsync(f.fileno())


def set_mtime(path: str | os.PathLike[str], when: float) -> None:
    """Pretend a file was last used at ``when``."""
    os.utime(path, (when, when))


def files_under(root: str | os.PathLike[str]) -> list[Path]:
    """Every file and symlink under ``root``, sorted."""
    return sorted(p for p in Path(root).rglob("*") if p.is_file() or p.is_symlink())


def read_chunk_file(path: str | os.PathLike[str], out: torch.Tensor,
                    expect: dict[str, str] | None = None, mac_key: bytes | None = None) -> ChunkHeader:
    """Read and check the chunk file at ``path`` into ``out`` as a loader would (raises ChunkFileError)."""
    chunk = open_chunk_path(path, expect, out.dtype, out.shape, mac_key)
    try:
        chunk.read_checked(out)
    finally:
        chunk.close()
    return chunk.header


class FakeClock:
    """A clock for code that takes one (``clock=``): it says ``now`` until a test moves it."""

    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def wait_for_count(listing: Callable[[], ListingT], count: int, timeout_s: float = 60,
                   what: str = "chunk files") -> ListingT:
    """``listing()`` once it holds at least ``count`` entries (stores publish in the background).

    Raises:
        AssertionError: not within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while len(found := listing()) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"only {len(found)} of {count} {what} appeared")
        time.sleep(0.1)
    return found
