"""Check every chunk file of a namespace as the loader would, and say what is wrong.

Each file is read in full with the loader's own checks (size, header,
namespace and key, checksum) plus the shape and dtype that the namespace's
manifest implies. Symlinks, directories and files where a chunk or fan-out
directory should be are findings too. Temporaries are not: eviction cleans
them up after their grace period. A file that could not be read (EIO,
ESTALE, EACCES) is a finding that is not proven damaged: it may be a good
chunk behind a flaky mount or the wrong user, so nothing may remove it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from lmcache_fs.ops.inspection import read_header
from lmcache_fs.ops.inventory import expected_chunk_geometry, scan_chunks, scan_irregular
from lmcache_fs.storage.codec import ChunkFileError, read_chunk_file
from lmcache_fs.storage.layout import read_manifest
from lmcache_fs.storage.quarantine import is_bad_entry


@dataclass(frozen=True)
class Finding:
    """A bad entry: where, and what is wrong with it."""

    path: str
    problem: str
    damaged: bool = True
    """True if the entry is proven bad (safe to quarantine or delete); False if it
    merely could not be read (see :func:`lmcache_fs.storage.quarantine.is_bad_entry`)."""


class ReadBuffers:
    """One reusable read buffer per (shape, dtype): verifying a million files allocates a few."""

    def __init__(self) -> None:
        self._by_geometry: dict[tuple[tuple[int, ...], torch.dtype], torch.Tensor] = {}

    def get(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buf = self._by_geometry.get((shape, dtype))
        if buf is None:
            buf = self._by_geometry[(shape, dtype)] = torch.empty(shape, dtype=dtype)
        return buf


def check_chunk(path: str | os.PathLike[str], namespace: str, key: str,
                geometry: tuple[tuple[int, ...], str] | None = None,
                buffers: ReadBuffers | None = None) -> Finding | None:
    """What is wrong with one chunk file, or None if the loader would accept it.

    Args:
        path: the chunk file.
        namespace, key: what its metadata must say.
        geometry: the shape and dtype name the namespace expects, if known.
        buffers: read buffers to reuse across calls.
    """
    buffers = buffers or ReadBuffers()
    try:
        header = read_header(path)
        if geometry is not None:
            shape, dtype_name = geometry
            if header.shape != shape or str(header.dtype).removeprefix("torch.") != dtype_name:
                return Finding(str(path), f"holds {header.dtype} {list(header.shape)}, the "
                                          f"namespace expects {dtype_name} {list(shape)}")
        read_chunk_file(path, buffers.get(header.shape, header.dtype),
                        {"namespace": namespace, "key": key})
    except ChunkFileError as exc:
        return Finding(str(path), str(exc), is_bad_entry(exc))
    return None


def count_entries(namespace_dir: str | os.PathLike[str]) -> int:
    """How many chunk files :func:`verify_namespace` will read (for a progress bar)."""
    return sum(1 for _ in scan_chunks(namespace_dir))


def verify_namespace(namespace_dir: str | os.PathLike[str],
                     on_checked: Callable[[], None] = lambda: None) -> Iterator[Finding]:
    """Yield a :class:`Finding` for each bad entry of a namespace.

    Args:
        namespace_dir: the namespace directory.
        on_checked: called after each chunk file (progress).
    """
    directory = Path(namespace_dir)
    geometry = expected_chunk_geometry(read_manifest(directory) or {})
    for entry in scan_irregular(directory):
        yield Finding(entry.path, "a symlink, directory or file where the cache expects "
                                  "something else: never read through")
    buffers = ReadBuffers()
    for chunk in scan_chunks(directory):
        finding = check_chunk(chunk.path, directory.name, chunk.key, geometry, buffers)
        on_checked()
        if finding is not None and finding.problem != "missing":  # "missing": evicted mid-verify
            yield finding
