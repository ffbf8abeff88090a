"""Atomic publish: readers never see a partial file, and the first writer wins.

(:func:`replace` is the same write for records that a newer one supersedes:
there the last writer wins.)

A writer creates a uniquely named temporary (host, pid, random) in the target
directory, writes and closes it, then hard-links it to the final name. ``link``
fails if the name exists, so of two racing writers exactly one publishes; the
other's temporary is removed. Close-to-open consistency makes the published
file complete for every NFS client that opens it afterwards. On filesystems
without hard links, ``os.replace`` publishes instead (both writers hold the
same bytes for the same key, so replacing is harmless).

Example:
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a" / "x.bin"
    >>> publish(p, lambda fd: os.write(fd, b"hi"))
    True
    >>> publish(p, lambda fd: os.write(fd, b"hi"))
    False
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Callable

from lmcache_fs.storage.layout import temp_name

_NO_LINK_ERRNOS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK}


def publish(final: str | os.PathLike[str], write: Callable[[int], object],
            mode: int = 0o644) -> bool:
    """Write a file through ``write(fd)`` and publish it at ``final`` atomically.

    Args:
        final: the published path; its directory is created if missing.
        write: writes the whole content to the open descriptor.
        mode: permission bits of the published file.

    Returns:
        True if this call published the file, False if it already existed
        (another writer won; nothing of ours is left behind).

    Raises:
        OSError: from writing (ENOSPC, EDQUOT, EIO...); the temporary is removed.
    """
    final = Path(final)
    try:
        dir_fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        # The directory's first file. Creating it only then spares every other
        # store a mkdir that fails with EEXIST: one round trip each on NFS.
        final.parent.mkdir(parents=True, exist_ok=True)
        dir_fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return publish_at(dir_fd, final.name, write, mode)
    finally:
        os.close(dir_fd)


def publish_at(dir_fd: int, name: str, write: Callable[[int], object], mode: int = 0o644) -> bool:
    """:func:`publish` into the directory open at ``dir_fd``: no path is resolved by name.

    The temporary is created with ``O_EXCL | O_NOFOLLOW`` and linked, and
    removed, relative to ``dir_fd``, so a directory swapped for a symlink
    after it was opened cannot redirect the write.
    """
    tmp = temp_name(name)
    try:
        _write_temporary(dir_fd, tmp, write, mode)
        try:
            os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_LINK_ERRNOS:
                raise
            try:
                os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                return False
            except FileNotFoundError:
                os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                return True
    finally:
        _remove(dir_fd, tmp)


def replace(final: str | os.PathLike[str], write: Callable[[int], object],
            mode: int = 0o644) -> None:
    """Write a file through ``write(fd)`` and put it at ``final`` atomically, replacing
    whatever is there: readers see the old file or the new one, the last writer wins
    (for records that a newer one supersedes, such as the eviction pass's measure).

    Raises:
        OSError: from writing or renaming (ENOSPC...); the temporary is removed.
    """
    final = Path(final)
    dir_fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
    tmp = temp_name(final.name)
    try:
        _write_temporary(dir_fd, tmp, write, mode)
        os.replace(tmp, final.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    finally:
        _remove(dir_fd, tmp)
        os.close(dir_fd)


def _write_temporary(dir_fd: int, tmp: str, write: Callable[[int], object], mode: int) -> None:
    """Create ``tmp`` (``O_EXCL | O_NOFOLLOW``) with exactly ``mode`` and write it whole."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)  # exact bits, whatever the process umask
        write(fd)
    finally:
        os.close(fd)


def _remove(dir_fd: int, name: str) -> None:
    """Remove a temporary if it is still there (it is not once linked-and-replaced or renamed).

    Where the directory does not answer (ENOTCONN, EIO on a sick mount), the temporary
    is remembered and removed by :func:`remove_left_temporaries` once it answers again
    (the error that made the write fail is the one raised).
    """
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError:
        try:
            directory = os.readlink(f"/proc/self/fd/{dir_fd}")
        except OSError:
            return  # (not Linux: eviction removes it after temp_file_grace_s)
        with _LEFT_LOCK:
            _LEFT_BEHIND.add(os.path.join(directory, name))


_LEFT_BEHIND: set[str] = set()
_LEFT_LOCK = threading.Lock()


def left_temporaries() -> int:
    """How many temporaries a failed write could not remove (see :func:`_remove`)."""
    with _LEFT_LOCK:
        return len(_LEFT_BEHIND)


def remove_left_temporaries() -> int:
    """Remove the temporaries failed writes left; returns how many are gone now."""
    with _LEFT_LOCK:
        paths = list(_LEFT_BEHIND)
    removed = 0
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError:
            continue  # still no answer: tried again later
        removed += 1
        with _LEFT_LOCK:
            _LEFT_BEHIND.discard(path)
    return removed
