"""The minimum free-space guard: stop storing before the filesystem is full.

A full shared filesystem hurts more than the cache: other tenants' writes
fail too, and every store then costs a doomed write. The guard asks
``statvfs`` at most once a second and, in between, subtracts what it let
through, so a burst of stores cannot overshoot the reserve by much.

Example:
    >>> guard = FreeSpaceGuard("/", min_free_bytes=0)
    >>> guard.allows(1 << 20)
    True
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable, Protocol

from lmcache_fs.log import human_bytes

_RECHECK_S = 1.0


def free_bytes(path: str | os.PathLike[str],
               statvfs: Callable[[str], os.statvfs_result] = os.statvfs) -> int:
    """Bytes an unprivileged process may still write on the filesystem holding ``path``."""
    st = statvfs(os.fspath(path))
    return st.f_bavail * st.f_frsize


class StoreGuard(Protocol):
    """A reason to skip stores for a while (the writer asks each guard before every store)."""

    reason: str  # the ``reason`` label of the skipped stores in the metrics

    def allows(self, nbytes: int) -> bool:
        """True (and counted) if a store of ``nbytes`` may go ahead now."""

    def refund(self, nbytes: int) -> None:
        """Give back ``nbytes`` that :meth:`allows` counted but no file took (already stored
        elsewhere, failed, or refused by another guard)."""

    def why_paused(self) -> str:
        """What a log line says while this guard skips stores."""


class FreeSpaceGuard:
    """Says whether a store of ``nbytes`` keeps at least ``min_free_bytes`` free."""

    reason = "disk_guard"

    def __init__(self, path: str | os.PathLike[str], min_free_bytes: int,
                 statvfs: Callable[[str], os.statvfs_result] = os.statvfs,
                 clock: Callable[[], float] = time.monotonic):
        self.path = os.fspath(path)
        self.min_free_bytes = min_free_bytes
        self._statvfs = statvfs
        self._clock = clock
        self._free: int | None = None
        self._checked_at = 0.0
        self._lock = threading.Lock()  # one guard serves the writers of all of a worker's groups

    def allows(self, nbytes: int) -> bool:
        """True if writing ``nbytes`` now leaves the reserve intact (always True with no reserve)."""
        if self.min_free_bytes <= 0:
            return True
        with self._lock:
            now = self._clock()
            if self._free is None or now - self._checked_at >= _RECHECK_S:
                try:
                    self._free = free_bytes(self.path, self._statvfs)
                except OSError:  # cannot tell (a briefly unreachable share): let the write decide
                    return True
                self._checked_at = now
            if self._free - nbytes < self.min_free_bytes:
                return False
            self._free -= nbytes
            return True

    def refund(self, nbytes: int) -> None:
        """Give back ``nbytes`` that :meth:`allows` counted but no file took."""
        with self._lock:
            if self._free is not None:
                self._free += nbytes

    def why_paused(self) -> str:
        """What a log line says while stores are skipped."""
        return (f"less than {human_bytes(self.min_free_bytes)} free under {self.path}: "
                "stores paused, serving continues")
