"""A lease on the shared directory: at most one holder at a time across nodes.

The lease is a small JSON file (host, pid, a random token, expiry in wall-clock
seconds) published atomically (temp + link: of two racing processes exactly
one creates it). The holder renews it before it expires; a holder whose lease
has expired (crashed, hung, its node gone) is taken over.

Taking over renames the stale file to a private name first. ``rename`` of one
name succeeds for exactly one process, and the taker then checks that what it
moved is still expired, not a lease renewed or published meanwhile (if it is
live, it puts it back). Nothing here needs file locks, which NFS
implements unevenly.

Assumptions, stated where callers can see them: node clocks agree to well
within the TTL (NTP), and a holder renews more often than the TTL. If either
fails, two holders can overlap for a while; for eviction that costs at most
some extra evicted chunks, never a wrong answer.

Example:
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "eviction.lease")
    >>> first, second = Lease(path, ttl_s=30), Lease(path, ttl_s=30)
    >>> first.acquire(), second.acquire()
    (True, False)
    >>> first.release(); second.acquire()
    True
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from lmcache_fs.layout import TEMP_PREFIX
from lmcache_fs.publish import publish, temp_name


@dataclass(frozen=True)
class LeaseRecord:
    """What a lease file says: who holds it and until when (Unix time)."""

    host: str
    pid: int
    token: str
    expires_at: float

    def describe(self, now: float) -> str:
        """``host pid 1234, 42 s left`` (or ``expired 3 s ago``)."""
        left = self.expires_at - now
        when = f"{left:.0f} s left" if left >= 0 else f"expired {-left:.0f} s ago"
        return f"{self.host} pid {self.pid}, {when}"


def read_lease(path: str | os.PathLike[str]) -> LeaseRecord | None:
    """The record in a lease file, or None if there is none or it is unreadable."""
    try:
        data = json.loads(Path(path).read_text())
        return LeaseRecord(str(data["host"]), int(data["pid"]), str(data["token"]),
                           float(data["expires_at"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class Lease:
    """One process's handle on a named lease file."""

    def __init__(self, path: str | os.PathLike[str], ttl_s: float, mode: int = 0o644,
                 clock: Callable[[], float] = time.time):
        if ttl_s <= 0:
            raise ValueError(f"lease ttl_s must be positive, got {ttl_s}")
        self.path = Path(path)
        self.ttl_s = ttl_s
        self.mode = mode
        self._clock = clock
        self._token = secrets.token_hex(8)
        self._renewed_at: float | None = None

    @property
    def held(self) -> bool:
        """True if this handle acquired the lease and has not seen it lost or released."""
        return self._renewed_at is not None

    def holder(self) -> LeaseRecord | None:
        """The current lease record (any process's), or None."""
        return read_lease(self.path)

    def acquire(self) -> bool:
        """Take the lease if it is free or expired; True if this handle now holds it."""
        if self._publish_new():
            return True
        current = read_lease(self.path)
        if current is not None and current.token == self._token:
            return self.renew()
        if current is not None and current.expires_at > self._clock():
            return False
        if current is None and not self._unreadable_and_old():
            return False  # being replaced right now, or garbage younger than a TTL
        return self._take_over() and self._publish_new()

    def renew(self) -> bool:
        """Push the expiry one TTL ahead; False (and no longer held) if another process holds it."""
        current = read_lease(self.path)
        if current is None or current.token != self._token:
            self._renewed_at = None
            return False
        tmp = temp_name(self.path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self.mode)
            try:
                os.write(fd, self._encoded())
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        finally:
            if tmp.exists():
                os.unlink(tmp)
        self._renewed_at = self._clock()
        return True

    def renew_if_due(self) -> bool:
        """Renew when a third of the TTL has passed since the last renewal; True while held."""
        if self._renewed_at is None:
            return False
        if self._clock() - self._renewed_at < self.ttl_s / 3:
            return True
        return self.renew()

    def release(self) -> None:
        """Give the lease up (if this handle still holds it)."""
        if self._renewed_at is None:
            return
        self._renewed_at = None
        current = read_lease(self.path)
        if current is not None and current.token == self._token:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    # -- internals ------------------------------------------------------------

    def _encoded(self) -> bytes:
        record = LeaseRecord(socket.gethostname(), os.getpid(), self._token,
                             self._clock() + self.ttl_s)
        return json.dumps(asdict(record)).encode()

    def _publish_new(self) -> bool:
        text = self._encoded()
        if not publish(self.path, lambda fd: os.write(fd, text), self.mode):
            return False
        self._renewed_at = self._clock()
        return True

    def _unreadable_and_old(self) -> bool:
        # A lease file is published whole, so an unreadable one was planted or
        # damaged: treat it as stale once it is a TTL old.
        try:
            return self._clock() - os.stat(self.path).st_mtime > self.ttl_s
        except FileNotFoundError:
            return True

    def _take_over(self) -> bool:
        """Move the expired lease aside; True if the lease name is now free for us to publish."""
        aside = self.path.parent / f"{TEMP_PREFIX}stale.{self._token}.{self.path.name}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True  # released or taken meanwhile; publishing decides
        try:
            moved = read_lease(aside)
            if moved is not None and moved.expires_at > self._clock():
                # Between our read and the rename, its holder renewed it or another
                # taker published a fresh one: put it back and stand aside.
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
                return False
            return True
        finally:
            os.unlink(aside)
