"""What kind of filesystem holds the cache directory: one that can hang on a peer, or not.

A read from a local disk either returns or fails; a read from an NFS server, a
FUSE daemon (bindfs, sshfs, GlusterFS, CephFS's fuse client, virtiofs) or a
parallel filesystem can block for as long as the peer stays away. Readers
that read straight into vLLM's pages do so only where the filesystem is local:
a read abandoned at its deadline would otherwise land in pages that vLLM has
given to other KV meanwhile (see :mod:`lmcache_fs.storage.breaker`).

The type comes from ``/proc/self/mountinfo`` (the mount with the longest
mount point above the path); where that cannot be read, the filesystem is
taken as remote, the safe side.

Example:
    >>> filesystem_type("/proc") == "proc"
    True
"""

from __future__ import annotations

import os

# Filesystems on this machine's own devices or memory: no peer can leave a call hanging.
LOCAL_TYPES = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "zfs", "bcachefs",
                         "tmpfs", "ramfs", "overlay", "jfs", "reiserfs", "nilfs2", "hfsplus",
                         "apfs", "proc", "sysfs", "devtmpfs"})

_MOUNTINFO = "/proc/self/mountinfo"


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \\ooo octal.
    return field.encode().decode("unicode_escape").encode("latin-1").decode("utf-8", "replace")


def filesystem_type(path: str | os.PathLike[str]) -> str | None:
    """The type of the filesystem that holds ``path`` (e.g. ``ext4``, ``nfs4``,
    ``fuse.glusterfs``), or None if the mount table cannot be read."""
    target = os.path.realpath(path)
    best, best_type = "", None
    try:
        with open(_MOUNTINFO, encoding="utf-8", errors="replace") as table:
            for line in table:
                left, _, right = line.partition(" - ")
                fields, rest = left.split(), right.split()
                if len(fields) < 5 or not rest:
                    continue
                point = _unescape(fields[4])
                inside = target == point or target.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, best_type = point, rest[0]
    except OSError:
        return None
    return best_type


def is_local(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is on a local filesystem (see :data:`LOCAL_TYPES`)."""
    return filesystem_type(path) in LOCAL_TYPES
