"""Read and write the chunk files of one namespace: codec + layout + publish.

Every reader reads inside :meth:`ChunkStore.reading`, which opens the chunk
(:meth:`ChunkStore.open_chunk`) and finishes it on leaving the block
(:meth:`ChunkStore.finish`), so that no read can forget either; in between it
only moves bytes:

- ``open_chunk`` walks to the file by descriptor: the namespace and fan-out
  directories are opened relative to their parent with ``O_NOFOLLOW``, and the
  file relative to its fan-out directory, so a directory swapped for a
  symlink (at any moment) is never read or written through. It then reads
  the header once and checks size, format, namespace, key, dtype and shape.
  Nothing after it resolves the path by name again.
- the reader fills its buffer from :class:`OpenChunk` (``read_into``,
  ``read_at``) and checks the data with :meth:`OpenChunk.data_check`, the one
  data check (xxh3, and the MAC where the store holds an integrity key).
- ``finish`` either marks the chunk used (its mtime, which eviction orders by
  on every node; atime is unreliable on NFS) or, if the error proves the file
  bad, moves it into the quarantine (see :mod:`lmcache_fs.storage.quarantine`),
  so it costs one miss, not one per request. A missing file, a stale NFS
  handle or a permission error is a plain miss and is left alone.

Stores publish through the same descriptors (:func:`publish_at`).

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

import contextlib
import errno
import os
import stat
import time
from typing import Callable, Iterator, Mapping, Sequence

import torch

from lmcache_fs.storage.codec import (ChunkFileError, ChunkHeader, DataCheck, byte_view,
                                      check_header, read_header, write_chunk_to_fd)
from lmcache_fs.storage.layout import BadKeyError, ChunkLayout, ChunkLocation, chunk_location
from lmcache_fs.storage.publish import publish_at
from lmcache_fs.storage.quarantine import is_bad_entry, quarantine_at

# A chunk's mtime is set at most once a minute per process: minute resolution
# is plenty to order eviction, and it spares NFS a SETATTR on every load.
TOUCH_INTERVAL_S = 60.0
_TOUCHED_MAX = 100_000  # remembered keys; cleared wholesale past this (only a rate limit)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
# O_NONBLOCK: a FIFO planted at a chunk's name would block the open until a writer came;
# on a regular file it changes nothing.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK


class OpenChunk:
    """A chunk file open for reading whose header passed every check; no data read yet.

    Hand it back to :meth:`ChunkStore.finish` (which closes it) whatever happens;
    :meth:`ChunkStore.reading` does both.
    """

    def __init__(self, key: str, header: ChunkHeader, fd: int, dir_fd: int,
                 parts: tuple[str, ...], mac_key: bytes | None):
        self.key = key
        self.header = header
        self.fd = fd
        self.dir_fd = dir_fd  # its fan-out directory: quarantine renames relative to it
        self.parts = parts  # namespace, fan-out, file name: below the root
        self._mac_key = mac_key
        self.error: ChunkFileError | None = None
        """Why this read is a miss, for readers that record a failure instead of raising it
        (several chunks read in turns): :meth:`ChunkStore.reading` finishes with it."""

    @property
    def proc_path(self) -> str:
        """A name that reopens this very file (for readers that open by name: kvikio)."""
        return f"/proc/self/fd/{self.fd}"

    def read_into(self, out: torch.Tensor) -> None:
        """Read the whole data into ``out``, a contiguous CPU tensor of the header's size.

        Raises:
            ChunkFileError: the read failed or fell short (vanished, truncated).
        """
        self.read_at([byte_view(out)], 0)

    def read_checked(self, out: torch.Tensor) -> None:
        """:meth:`read_into`, then the data check over ``out`` (whole-chunk readers on the host).

        Raises:
            ChunkFileError: the read fell short or the data fails its check.
        """
        self.read_into(out)
        check = self.data_check()
        check.update(byte_view(out))
        check.verify()

    def read_at(self, buffers: Sequence[memoryview], offset: int) -> None:
        """Fill ``buffers`` from the data at ``offset`` (bytes from the data's start).

        Raises:
            ChunkFileError: the read failed or fell short.
        """
        want = sum(len(b) for b in buffers)
        try:
            got = os.preadv(self.fd, buffers, self.header.data_offset + offset)
        except OSError as exc:  # ESTALE/EIO on NFS, a file deleted mid-read
            raise ChunkFileError(f"read failed: {exc.strerror}") from exc
        if got != want:
            raise ChunkFileError(f"short read: {got} of {want} bytes at data offset {offset}")

    def data_check(self) -> DataCheck:
        """The data check for this chunk: feed it the data in file order, then ``verify()``."""
        return DataCheck(self.header, self._mac_key)

    @property
    def keyed(self) -> bool:
        """Whether its data check includes a MAC (its data must then be seen on the host)."""
        return self._mac_key is not None

    def close(self) -> None:
        """Close the file and its directory (idempotent)."""
        for fd in (self.fd, self.dir_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.dir_fd = -1


def open_chunk_at(dir_fd: int, name: str, *, key: str = "",
                  expect: Mapping[str, str] | None = None, dtype: torch.dtype | None = None,
                  shape: Sequence[int] | None = None, mac_key: bytes | None = None,
                  parts: tuple[str, ...] = (),
                  reject: Callable[[int | None, ChunkFileError], None] = lambda fd, exc: None
                  ) -> OpenChunk:
    """Open entry ``name`` of the directory open at ``dir_fd`` as a chunk, header checked.

    The one open of a chunk file: ``O_NOFOLLOW`` relative to ``dir_fd``, one
    header read, :func:`~lmcache_fs.storage.codec.check_header` against the
    file's real size, ``expect``, ``dtype`` and ``shape``. On success the
    returned chunk owns ``dir_fd``; on failure the caller keeps it, and
    ``reject(fd, error)`` ran first (``fd`` None if the open itself failed).

    Raises:
        ChunkFileError: missing, a symlink, a directory, unreadable, truncated,
            foreign or not what the caller expects.
    """
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:  # ENOENT, ELOOP (a symlink), ESTALE, EACCES, EMFILE...
        error = ChunkFileError("missing" if exc.errno == errno.ENOENT
                               else "a symlink, not read through" if exc.errno == errno.ELOOP
                               else f"cannot open: {exc.strerror}")
        error.__cause__ = exc
        reject(None, error)
        raise error from exc
    try:
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # planted: proven bad (quarantined)
                raise ChunkFileError("not a regular file (a directory, FIFO, socket or device)")
            header = read_header(fd)
        except OSError as exc:
            raise ChunkFileError(f"read failed: {exc.strerror}") from exc
        size = st.st_size
        check_header(header, size, dtype, shape, expect or {})
    except ChunkFileError as exc:
        reject(fd, exc)
        os.close(fd)
        raise
    return OpenChunk(key, header, fd, dir_fd, parts or (name,), mac_key)


class ChunkStore:
    """Chunk files of one namespace: publish atomically, load with full verification.

    ``mac_key``: the integrity key (see :class:`~lmcache_fs.storage.codec.DataCheck`);
    with it every file written carries a MAC and every file read must.
    """

    def __init__(self, layout: ChunkLayout, file_mode: int = 0o644,
                 clock: Callable[[], float] = time.monotonic, mac_key: bytes | None = None):
        self.layout = layout
        self.file_mode = file_mode
        self.mac_key = mac_key
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
        where = chunk_location(key)
        meta = {**metadata, **self.identity(key)}
        name = where.name
        dir_fd = self._open_fanout(where, create=True)
        try:
            published = publish_at(dir_fd, name,
                                   lambda fd: write_chunk_to_fd(fd, data, meta, self.mac_key),
                                   self.file_mode)
            if not published:
                self._touch(key, lambda: os.utime(name, dir_fd=dir_fd, follow_symlinks=False))
        finally:
            os.close(dir_fd)
        return published

    def open_chunk(self, key: str, dtype: torch.dtype | None = None,
                   shape: Sequence[int] | None = None) -> OpenChunk:
        """Open chunk ``key`` and check its header against this namespace, ``dtype`` and ``shape``.

        ``dtype``/``shape`` None accept the header's (tools that know no
        geometry); its size is still checked against the file's, so nothing a
        header declares is ever allocated beyond the file's real size.

        Raises:
            ChunkFileError: not a key, missing, unreadable, truncated, foreign,
                of another namespace/key/dtype/shape, or reached through a
                symlinked directory (an entry proven bad is quarantined first).
        """
        try:
            where = chunk_location(key)
        except BadKeyError as exc:
            raise ChunkFileError(str(exc)) from exc
        try:
            dir_fd = self._open_fanout(where, create=False)
        except FileNotFoundError as exc:
            raise ChunkFileError("missing") from exc
        except OSError as exc:  # a bad directory is already quarantined
            raise ChunkFileError(f"cannot open its directory: {exc.strerror}") from exc
        parts = (self.layout.namespace.name, where.fanout, where.name)
        try:
            return open_chunk_at(dir_fd, where.name, key=key, expect=self.identity(key), dtype=dtype,
                                 shape=shape, mac_key=self.mac_key, parts=parts,
                                 reject=lambda fd, exc: self._reject(dir_fd, fd, parts, exc))
        except ChunkFileError:
            os.close(dir_fd)
            raise

    def finish(self, chunk: OpenChunk, error: ChunkFileError | None = None) -> None:
        """Close ``chunk``: a hit (``error`` None) marks it used; a proven-bad one is quarantined."""
        try:
            if error is None:
                self._touch(chunk.key, lambda: os.utime(chunk.fd))
            else:
                self._reject(chunk.dir_fd, chunk.fd, chunk.parts, error)
        finally:
            chunk.close()

    @contextlib.contextmanager
    def reading(self, key: str, dtype: torch.dtype | None = None,
                shape: Sequence[int] | None = None) -> Iterator[OpenChunk]:
        """Read chunk ``key`` inside a ``with`` block: :meth:`open_chunk`, then :meth:`finish`.

        On leaving the block the chunk is finished: as a hit, or with the
        :class:`ChunkFileError` the block raised (re-raised) or recorded in
        :attr:`OpenChunk.error` (a proven-bad file is quarantined). Any other
        exception closes the file with no verdict: a bug says nothing about it.

        Example:
            >>> with store.reading(key, out.dtype, out.shape) as chunk:  # doctest: +SKIP
            ...     chunk.read_checked(out)

        Raises:
            ChunkFileError: as :meth:`open_chunk`, or as the block raised it.
        """
        chunk = self.open_chunk(key, dtype, shape)
        try:
            yield chunk
        except ChunkFileError as exc:
            self.finish(chunk, exc)
            raise
        except BaseException:
            chunk.close()
            raise
        self.finish(chunk, chunk.error)

    def load(self, key: str, out: torch.Tensor) -> ChunkHeader:
        """Fill ``out`` (a contiguous CPU tensor) with chunk ``key``, verified, and mark it used.

        Raises:
            ChunkFileError: as :meth:`open_chunk`, or the data fails its check
                (the file is then quarantined).
        """
        with self.reading(key, out.dtype, out.shape) as chunk:
            chunk.read_checked(out)
        return chunk.header

    def _open_fanout(self, where: ChunkLocation, *, create: bool) -> int:
        """A descriptor of a chunk's fan-out directory, reached without following any link.

        Raises:
            FileNotFoundError: a directory on the way is missing (``create`` False).
            OSError: a directory on the way is a symlink or a file (it is
                quarantined: ``ELOOP``/``ENOTDIR``), or cannot be opened.
        """
        try:  # the configured root itself may be a link
            fd = os.open(self.layout.root, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            if not create:
                raise
            self.layout.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.layout.root, os.O_RDONLY | os.O_DIRECTORY)
        namespace = self.layout.namespace.name
        for parts in ((namespace,), (namespace, where.fanout)):
            fd = self._open_subdir(fd, parts, create)
        return fd

    def _open_subdir(self, parent_fd: int, parts: tuple[str, ...], create: bool) -> int:
        """Open directory ``parts[-1]`` of ``parent_fd`` (created if asked); closes ``parent_fd``."""
        name = parts[-1]
        try:
            try:
                return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(name, dir_fd=parent_fd)
                except FileExistsError:
                    pass  # another writer made it first
                return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise  # EACCES, ESTALE on NFS: unreachable, not proven bad
                quarantine_at(self.layout.root, parent_fd, name, parts, "not a real directory")
                raise OSError(exc.errno, f"{'/'.join(parts)} is a symlink or not a directory: "
                                         "never read or written through") from exc
        finally:
            os.close(parent_fd)

    def _reject(self, dir_fd: int, fd: int | None, parts: tuple[str, ...],
                error: ChunkFileError) -> None:
        """Quarantine entry ``parts[-1]`` if ``error`` proves it bad and, if it was opened
        (``fd``), its name still holds that file (another writer may have replaced an
        evicted copy with a good one meanwhile)."""
        if not is_bad_entry(error):
            return
        if fd is not None:
            try:
                named = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
                if not os.path.samestat(named, os.fstat(fd)):
                    return
            except OSError:
                return
        quarantine_at(self.layout.root, dir_fd, parts[-1], parts, str(error))

    def _touch(self, key: str, touch: Callable[[], None]) -> None:
        now = self._clock()
        if now - self._touched.get(key, -TOUCH_INTERVAL_S) < TOUCH_INTERVAL_S:
            return
        if len(self._touched) > _TOUCHED_MAX:
            self._touched.clear()
        self._touched[key] = now
        try:
            touch()
        except OSError:  # read-only mount, or evicted meanwhile: the LRU order is only a hint
            pass
