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
from typing import TYPE_CHECKING, Callable

from lmcache_fs.storage.layout import quarantine_dir, quarantined_name

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

    The rename moves a symlink itself, never its target. Failure to move it
    (read-only mount, already moved by another instance) is not an error: the
    entry stays a miss either way.

    Returns:
        The quarantined path, or None if nothing was moved.
    """
    root, path = Path(root), Path(path)
    return _move(root, path.relative_to(root).parts, lambda target: os.rename(path, target), reason)


def quarantine_at(root: str | os.PathLike[str], dir_fd: int, name: str,
                  parts: tuple[str, ...], reason: str) -> Path | None:
    """:func:`quarantine` of entry ``name`` of the directory open at ``dir_fd``.

    ``parts`` is the entry's path below ``root`` (its quarantined name); the
    entry itself is renamed relative to ``dir_fd``, never looked up by path.
    """
    return _move(Path(root), parts, lambda target: os.rename(name, target, src_dir_fd=dir_fd), reason)


def _move(root: Path, parts: tuple[str, ...], rename: Callable[[Path], None],
          reason: str) -> Path | None:
    target = quarantine_dir(root) / quarantined_name(parts, int(time.time()))
    try:
        target.parent.mkdir(exist_ok=True)
        rename(target)
    except OSError as exc:
        logger.debug("could not quarantine %s (%s)", "/".join(parts), exc.strerror)
        return None
    logger.warning("quarantined %s (%s) as %s", root.joinpath(*parts), reason, target.name)
    return target
