"""The minimum free-space guard: stop storing before the filesystem is full.

A full shared filesystem hurts more than the cache: other tenants' writes
fail too, and every store then costs a doomed write. The guard asks
``statvfs`` at most once a second and, in between, subtracts what it let
through, so a burst of stores cannot overshoot the reserve by much.
:class:`StoreGuard` is that pattern for any measure of room (the budget's
guard, :mod:`lmcache_fs.storage.usage`, is the other).

Example:
    >>> guard = FreeSpaceGuard("/", min_free_bytes=0)
    >>> guard.allows(1 << 20)
    True
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

from lmcache_fs.log import human_bytes

_RECHECK_S = 1.0


def free_bytes(path: str | os.PathLike[str],
               statvfs: Callable[[str], os.statvfs_result] = os.statvfs) -> int:
    """Bytes an unprivileged process may still write on the filesystem holding ``path``."""
    st = statvfs(os.fspath(path))
    return st.f_bavail * st.f_frsize


class StoreGuard:
    """Room left for stores, measured at most once a second, less what it let through since.

    The writer asks each guard before every store (:meth:`allows`) and gives
    back what no file took (:meth:`refund`); one guard serves the writers of
    all of a worker's KV cache groups, hence the lock. Subclasses say how to
    measure (:meth:`_measure_room`) and name the ``reason`` label of the
    stores they skip in the metrics.
    """

    reason: str

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._checked_at: float | None = None
        self._room: int | None = None  # None: unknown, every store goes ahead
        self._lock = threading.Lock()

    def allows(self, nbytes: int) -> bool:
        """True (and counted) if a store of ``nbytes`` may go ahead now."""
        with self._lock:
            now = self._clock()
            if self._checked_at is None or now - self._checked_at >= _RECHECK_S:
                self._checked_at = now
                self._room = self._measure_room(self._room)
            if self._room is None:
                return True
            if nbytes > self._room:
                return False
            self._room -= nbytes
            return True

    def refund(self, nbytes: int) -> None:
        """Give back ``nbytes`` that :meth:`allows` counted but no file took (already stored
        elsewhere, failed, or refused by another guard)."""
        with self._lock:
            if self._room is not None:
                self._room += nbytes

    def why_paused(self) -> str:
        """What a log line says while this guard skips stores."""
        raise NotImplementedError

    def _measure_room(self, room: int | None) -> int | None:
        """The room now (``room``: the count so far, to keep when nothing new is known)."""
        raise NotImplementedError


class FreeSpaceGuard(StoreGuard):
    """Says whether a store of ``nbytes`` keeps at least ``min_free_bytes`` free."""

    reason = "disk_guard"

    def __init__(self, path: str | os.PathLike[str], min_free_bytes: int,
                 statvfs: Callable[[str], os.statvfs_result] = os.statvfs,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(clock)
        self.path = os.fspath(path)
        self.min_free_bytes = min_free_bytes
        self._statvfs = statvfs

    def _measure_room(self, room: int | None) -> int | None:
        if self.min_free_bytes <= 0:
            return None  # no reserve
        try:
            return free_bytes(self.path, self._statvfs) - self.min_free_bytes
        except OSError:  # cannot tell (a briefly unreachable share): let the writes decide
            return None

    def why_paused(self) -> str:
        """What a log line says while stores are skipped."""
        return (f"less than {human_bytes(self.min_free_bytes)} free under {self.path}: "
                "stores paused, serving continues")
