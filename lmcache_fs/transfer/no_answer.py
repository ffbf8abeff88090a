"""The misses a directory that does not answer leaves: never proven-bad files.

A read into a filesystem that hangs (see :mod:`lmcache_fs.storage.breaker`) is
waited for until the step's deadline, then abandoned; while the breaker has the
directory switched off, no read is tried at all. Either way the chunk is a miss
whose cause, :class:`DirectoryUnavailable`, says it was not read, so the
store's ``finish`` never quarantines it (its bytes are unknown, not wrong).
"""

from __future__ import annotations

import os

from lmcache_fs.storage.breaker import DirectoryUnavailable
from lmcache_fs.storage.codec import ChunkFileError


def past_deadline(deadline_s: float) -> ChunkFileError:
    """The error of a chunk whose load passed the ``deadline_s`` (seconds) it had."""
    error = ChunkFileError(f"no answer within the load deadline ({deadline_s:.1f} s)")
    error.__cause__ = DirectoryUnavailable("the load was abandoned at its deadline")
    return error


def switched_off(directory: str | os.PathLike[str]) -> ChunkFileError:
    """The error of a chunk not read because ``directory`` is switched off after an outage."""
    error = ChunkFileError(f"not read: {os.fspath(directory)} is switched off after an outage")
    error.__cause__ = DirectoryUnavailable("switched off")
    return error
