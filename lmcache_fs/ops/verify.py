"""Check every chunk file of a namespace as the loader would, and say what is wrong.

Each file is read in full with the loader's own checks: its size against its
header, the namespace and key it names, its checksum (and MAC, with an
integrity key). The block geometry is not checked here: only an engine knows
it for sure (sliding-window groups hold fewer blocks, split pages have
another shape, MLA pages no K/V halves), and a manifest anyone can plant must
never make ``verify --delete`` remove a good chunk; a chunk of the wrong
shape is still refused, and quarantined, by the loader. Data is read in
pieces of :data:`PIECE_BYTES`, so a huge (sparse) file costs time, never
memory. Foreign entries where chunks or fan-out directories should be are
findings too. Temporaries are not: eviction cleans them up after their grace
period. A file that could not be read (EIO, ESTALE, EACCES) is a finding that
is not proven damaged: it may be a good chunk behind a flaky mount or the wrong
user, so nothing may remove it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from lmcache_fs.ops.inspection import open_chunk_path
from lmcache_fs.ops.inventory import scan_namespace
from lmcache_fs.storage.codec import ChunkFileError
from lmcache_fs.storage.quarantine import is_bad_entry

PIECE_BYTES = 8 << 20


@dataclass(frozen=True)
class Finding:
    """A bad entry: where, and what is wrong with it."""

    path: str
    problem: str
    damaged: bool = True
    """True if the entry is proven bad (safe to quarantine or delete); False if it
    merely could not be read (see :func:`lmcache_fs.storage.quarantine.is_bad_entry`)."""


def check_chunk(path: str | os.PathLike[str], namespace: str, key: str,
                buffer: bytearray | None = None, mac_key: bytes | None = None) -> Finding | None:
    """What is wrong with one chunk file, or None if the loader's checks of its file pass.

    Args:
        path: the chunk file.
        namespace, key: what its metadata must say.
        buffer: a read buffer of :data:`PIECE_BYTES` to reuse across calls.
        mac_key: the integrity key, to check MACs too.
    """
    piece = memoryview(buffer if buffer is not None else bytearray(PIECE_BYTES))
    try:
        # The header's size is checked against the file's before any byte is read.
        chunk = open_chunk_path(path, {"namespace": namespace, "key": key}, mac_key=mac_key)
        try:
            check = chunk.data_check()
            for offset in range(0, chunk.header.nbytes, len(piece)):
                part = piece[:min(len(piece), chunk.header.nbytes - offset)]
                chunk.read_at([part], offset)
                check.update(part)
            check.verify()
        finally:
            chunk.close()
    except ChunkFileError as exc:
        return Finding(str(path), str(exc), is_bad_entry(exc))
    return None


def count_entries(namespace_dir: str | os.PathLike[str]) -> int:
    """How many chunk files :func:`verify_namespace` will read (for a progress bar)."""
    return len(scan_namespace(namespace_dir).chunks)


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
    contents = scan_namespace(directory)
    for entry in contents.foreign:
        yield Finding(entry.path, "a symlink, FIFO, directory or file where the cache expects "
                                  "something else: never read through")
    for entry in contents.unreadable:
        yield Finding(entry.path, "cannot be read by this user", damaged=False)
    buffer = bytearray(PIECE_BYTES)
    for chunk in contents.chunks:
        finding = check_chunk(chunk.path, directory.name, chunk.key, buffer, mac_key)
        on_checked()
        if finding is not None and finding.problem != "missing":  # "missing": evicted mid-verify
            yield finding
