"""Move provably bad entries out of the cache: a bad chunk costs one miss, not one per request.

A published chunk file never changes (publishing is temp + link), so a file
that fails its checks is bad for good: it is renamed into
``<storage_path>/quarantine/`` where an operator can inspect it, and the path
is free for a writer to publish a good copy. Only proof of damage quarantines:
a missing file, a stale NFS handle or a permission error is a plain miss.

    <storage_path>/quarantine/<namespace>__<fan-out>__<name>.<unix time>.<random>

Quarantined files count against the disk budget and are the first to go when
eviction runs (see :mod:`lmcache_fs.ops.eviction`).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from lmcache_fs.storage.layout import QUARANTINE_DIR, quarantine_dir, quarantined_name

if TYPE_CHECKING:  # the codec imports torch; operators' commands that only list files do not need it
    from lmcache_fs.storage.codec import ChunkFileError

logger = logging.getLogger(__name__)

# open()/read() errors that prove the entry itself is wrong (a symlink, a
# directory where a file should be, a file where a directory should be).
_BAD_ENTRY_ERRNOS = frozenset({errno.ELOOP, errno.EISDIR, errno.ENOTDIR})


def is_bad_entry(exc: ChunkFileError) -> bool:
    """True if ``exc`` proves the file is damaged or foreign (not merely unreachable)."""
    cause = exc.__cause__
    if isinstance(cause, OSError):
        return cause.errno in _BAD_ENTRY_ERRNOS
    # No OS error: the bytes were read and failed a check (size, header,
    # namespace, key, shape, dtype or checksum).
    return True


def quarantine(root: str | os.PathLike[str], path: str | os.PathLike[str], reason: str) -> Path | None:
    """Rename ``path`` (a file, symlink or directory under ``root``) into the quarantine.

    The rename moves a symlink itself, never its target; the directories on
    the way to ``path`` are opened without following links. Failure to move it
    (read-only mount, already moved by another instance) is not an error: the
    entry stays a miss either way.

    Returns:
        The quarantined path, or None if nothing was moved.
    """
    root, path = Path(root), Path(path)
    parts = path.relative_to(root).parts
    try:
        dir_fd = _open_below(root, parts[:-1])
    except OSError as exc:
        logger.debug("could not quarantine %s (%s)", path, exc.strerror)
        return None
    try:
        return quarantine_at(root, dir_fd, parts[-1], parts, reason)
    finally:
        os.close(dir_fd)


def quarantine_at(root: str | os.PathLike[str], dir_fd: int, name: str,
                  parts: tuple[str, ...], reason: str) -> Path | None:
    """:func:`quarantine` of entry ``name`` of the directory open at ``dir_fd``.

    ``parts`` is the entry's path below ``root`` (its quarantined name); the
    entry is renamed relative to ``dir_fd`` into the quarantine directory
    opened with ``O_NOFOLLOW``: a symlink or file planted at the quarantine's
    name is never renamed into (the entry then stays where it is, a miss).
    """
    root = Path(root)
    target = quarantined_name(parts, int(time.time()))
    try:
        quarantine_fd = _open_quarantine(root)
    except OSError as exc:
        logger.warning("cannot quarantine %s: %s is not a directory this process can use (%s); "
                       "it stays a miss (remove what is at that name)", root.joinpath(*parts),
                       quarantine_dir(root), exc.strerror)
        return None
    try:
        os.rename(name, target, src_dir_fd=dir_fd, dst_dir_fd=quarantine_fd)
    except OSError as exc:
        logger.debug("could not quarantine %s (%s)", "/".join(parts), exc.strerror)
        return None
    finally:
        os.close(quarantine_fd)
    logger.warning("quarantined %s (%s) as %s", root.joinpath(*parts), reason, target)
    return quarantine_dir(root) / target


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


def _open_below(root: Path, parts: tuple[str, ...]) -> int:
    """A descriptor of directory ``parts`` below ``root``, no link followed on the way."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for name in parts:
        try:
            next_fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
        finally:
            os.close(fd)
        fd = next_fd
    return fd


def _open_quarantine(root: Path) -> int:
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            os.mkdir(QUARANTINE_DIR, dir_fd=root_fd)
        except FileExistsError:
            pass
        return os.open(QUARANTINE_DIR, _DIR_FLAGS, dir_fd=root_fd)
    finally:
        os.close(root_fd)
