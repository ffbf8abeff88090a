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

from lmcache_fs.ops.inspection import open_chunk_path
from lmcache_fs.ops.inventory import expected_chunk_geometry, scan_chunks, scan_irregular
from lmcache_fs.storage.codec import ChunkFileError, ChunkHeader
from lmcache_fs.storage.manifest import read_manifest
from lmcache_fs.storage.quarantine import is_bad_entry


@dataclass(frozen=True)
class Finding:
    """A bad entry: where, and what is wrong with it."""

    path: str
    problem: str
    damaged: bool = True
    """True if the entry is proven bad (safe to quarantine or delete); False if it
    merely could not be read (see :func:`lmcache_fs.storage.quarantine.is_bad_entry`)."""


class ReadBuffer:
    """One reusable read buffer, grown to the largest chunk seen: verifying a million
    files (or planted headers of many shapes) allocates a few times at most."""

    def __init__(self) -> None:
        self._bytes = torch.empty(0, dtype=torch.uint8)

    def view(self, header: ChunkHeader) -> torch.Tensor:
        """A tensor of the header's dtype and shape over the buffer's first bytes."""
        if self._bytes.numel() < header.nbytes:
            self._bytes = torch.empty(header.nbytes, dtype=torch.uint8)
        return self._bytes[:header.nbytes].view(header.dtype).view(header.shape)


def check_chunk(path: str | os.PathLike[str], namespace: str, key: str,
                geometry: tuple[tuple[int, ...], str] | None = None,
                buffer: ReadBuffer | None = None, mac_key: bytes | None = None) -> Finding | None:
    """What is wrong with one chunk file, or None if the loader would accept it.

    Args:
        path: the chunk file.
        namespace, key: what its metadata must say.
        geometry: the shape and dtype name the namespace expects, if known.
        buffer: a read buffer to reuse across calls.
        mac_key: the integrity key, to check MACs too.
    """
    buffer = buffer or ReadBuffer()
    dtype, shape = None, None
    if geometry is not None:
        shape, dtype_name = geometry
        dtype = getattr(torch, dtype_name, None)
        dtype = dtype if isinstance(dtype, torch.dtype) else None
    try:
        # The header's size is checked against the file's before anything is
        # allocated: a planted header cannot make verify allocate more.
        chunk = open_chunk_path(path, {"namespace": namespace, "key": key}, dtype, shape, mac_key)
        try:
            chunk.read_checked(buffer.view(chunk.header))
        finally:
            chunk.close()
    except ChunkFileError as exc:
        return Finding(str(path), str(exc), is_bad_entry(exc))
    return None


def count_entries(namespace_dir: str | os.PathLike[str]) -> int:
    """How many chunk files :func:`verify_namespace` will read (for a progress bar)."""
    return sum(1 for _ in scan_chunks(namespace_dir))


def verify_namespace(namespace_dir: str | os.PathLike[str],
                     on_checked: Callable[[], None] = lambda: None,
                     mac_key: bytes | None = None) -> Iterator[Finding]:
    """Yield a :class:`Finding` for each bad entry of a namespace.

    Args:
        namespace_dir: the namespace directory.
        on_checked: called after each chunk file (progress).
        mac_key: the integrity key, to check MACs too.
    """
    directory = Path(namespace_dir)
    geometry = expected_chunk_geometry(read_manifest(directory) or {})
    for entry in scan_irregular(directory):
        yield Finding(entry.path, "a symlink, directory or file where the cache expects "
                                  "something else: never read through")
    buffer = ReadBuffer()
    for chunk in scan_chunks(directory):
        finding = check_chunk(chunk.path, directory.name, chunk.key, geometry, buffer, mac_key)
        on_checked()
        if finding is not None and finding.problem != "missing":  # "missing": evicted mid-verify
            yield finding
