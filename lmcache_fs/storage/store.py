"""Read and write the chunk files of one namespace: codec + layout + publish.

Besides moving bytes, the store keeps the directory healthy for everyone who
shares it:

- a load never reads through a symlinked or non-directory namespace or
  fan-out directory (``O_NOFOLLOW`` in the codec guards only the file itself);
- a file that proves bad on load is quarantined (see :mod:`lmcache_fs.storage.quarantine`),
  so it costs one miss, not one per request;
- a load hit or a store of an existing chunk sets the file's mtime, which is
  what eviction orders by on every node (atime is unreliable on NFS).

Example:
    >>> import torch, tempfile
    >>> from lmcache_fs.storage.layout import ChunkLayout, Namespace
    >>> store = ChunkStore(ChunkLayout(tempfile.mkdtemp(), Namespace({"model": "m"})))
    >>> t = torch.ones(2, 4)
    >>> store.save("ab" * 8, t, {"chunk_index": "0"})
    True
    >>> out = torch.empty(2, 4)
    >>> _ = store.load("ab" * 8, out)
"""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path
from typing import Callable, Mapping

import torch

from lmcache_fs.storage.codec import ChunkFileError, ChunkHeader, read_chunk_file, write_chunk_to_fd
from lmcache_fs.storage.layout import BadKeyError, ChunkLayout
from lmcache_fs.storage.publish import publish
from lmcache_fs.storage.quarantine import is_bad_entry, quarantine

# A chunk's mtime is set at most once a minute per process: minute resolution
# is plenty to order eviction, and it spares NFS a SETATTR on every load.
TOUCH_INTERVAL_S = 60.0
_TOUCHED_MAX = 100_000  # remembered keys; cleared wholesale past this (only a rate limit)


class ChunkStore:
    """Chunk files of one namespace: publish atomically, load with full verification."""

    def __init__(self, layout: ChunkLayout, file_mode: int = 0o644,
                 clock: Callable[[], float] = time.monotonic):
        self.layout = layout
        self.file_mode = file_mode
        self._clock = clock
        self._touched: dict[str, float] = {}

    def identity(self, key: str) -> dict[str, str]:
        """Metadata every chunk file of ``key`` must carry to be loaded here."""
        return {"namespace": self.layout.namespace.name, "key": key}

    def save(self, key: str, data: torch.Tensor, metadata: Mapping[str, str]) -> bool:
        """Publish ``data`` as chunk ``key``; False if it already existed (its mtime is then set).

        Raises:
            OSError: the write failed (disk full, permissions, a symlinked
                directory on the path...); nothing is left behind.
        """
        path = self.layout.chunk_path(key)
        bad = self._unsafe_directory(path)
        if bad is not None:
            quarantine(self.layout.root, bad, "not a real directory")
            raise OSError(errno.ELOOP, f"{bad} is a symlink or not a directory; store skipped")
        meta = {**metadata, **self.identity(key)}
        published = publish(path, lambda fd: write_chunk_to_fd(fd, data, meta), self.file_mode)
        if not published:
            self._touch(key, path)
        return published

    def load(self, key: str, out: torch.Tensor, *, check_data: bool = True) -> ChunkHeader:
        """Fill ``out`` with chunk ``key`` and mark the chunk as recently used.

        A file that proves damaged or foreign is quarantined before the error
        is raised, so the next lookup misses and a writer can store it again.
        ``check_data=False`` leaves the data's checksum to the caller (see
        :func:`~lmcache_fs.storage.codec.read_chunk_file`), who then quarantines with
        :meth:`load_failed` what fails it.

        Raises:
            ChunkFileError: missing, truncated, corrupt, foreign, of another
                shape, or reached through a symlinked directory.
        """
        path = self.path_for_read(key)
        try:
            header = read_chunk_file(path, out, self.identity(key), check_data=check_data)
        except ChunkFileError as exc:
            self.load_failed(path, exc)
            raise
        self.loaded(key, path)
        return header

    # The three steps of :meth:`load`, for readers with their own I/O (kvikio/GDS).

    def path_for_read(self, key: str) -> Path:
        """The chunk file of ``key``, once no directory on the way to it is a symlink.

        Raises:
            ChunkFileError: ``key`` is not a key, or a directory on the way is a
                symlink or a file (that entry is quarantined).
        """
        try:
            path = self.layout.chunk_path(key)
        except BadKeyError as exc:
            raise ChunkFileError(str(exc)) from exc
        bad = self._unsafe_directory(path)
        if bad is not None:
            quarantine(self.layout.root, bad, "not a real directory")
            raise ChunkFileError(f"{bad} is a symlink or not a directory: not read through")
        return path

    def loaded(self, key: str, path: Path) -> None:
        """Mark chunk ``key`` (read from ``path``) as just used, for eviction on every node."""
        self._touch(key, path)

    def load_failed(self, path: Path, exc: ChunkFileError) -> None:
        """Quarantine ``path`` if ``exc`` proves it bad (a missing file is left alone)."""
        if is_bad_entry(exc):
            quarantine(self.layout.root, path, str(exc))

    def _unsafe_directory(self, path: Path) -> Path | None:
        """The namespace or fan-out directory above ``path`` that is a symlink or a file, if any."""
        for directory in (path.parent.parent, path.parent):
            try:
                mode = os.lstat(directory).st_mode
            except FileNotFoundError:
                return None  # nothing below it exists, so nothing can be read through it
            except OSError as exc:  # EACCES, ESTALE on NFS: unreachable, not proven bad
                raise ChunkFileError(f"cannot check {directory}: {exc.strerror}") from exc
            if not stat.S_ISDIR(mode):  # lstat: a symlink is S_ISLNK, never S_ISDIR
                return directory
        return None

    def _touch(self, key: str, path: Path) -> None:
        now = self._clock()
        if now - self._touched.get(key, -TOUCH_INTERVAL_S) < TOUCH_INTERVAL_S:
            return
        if len(self._touched) > _TOUCHED_MAX:
            self._touched.clear()
        self._touched[key] = now
        try:
            os.utime(path, follow_symlinks=False)
        except OSError:  # read-only mount, or evicted meanwhile: the LRU order is only a hint
            pass
