"""A lease on the shared directory: at most one holder at a time across nodes.

The lease is a small JSON file (host, pid, a random token, expiry in wall-clock
seconds) published atomically (temp + link: of two racing processes exactly
one creates it). The holder renews it before it expires; a holder whose lease
has expired (crashed, hung, its node gone) is taken over.

Renewing rewrites the record in place, at the same length (every record is
padded to ``_RECORD_BYTES``): no new file and no new block, so the holder keeps
its lease on a full filesystem, which is exactly when eviction must run. Other
nodes see the new record on their next open, as before (close-to-open: the
file's mtime changed). The holder checks its token in the file it opened
before writing, so it only ever rewrites its own record. A reader racing the
rewrite may see a mix of the old and new record: they differ only in the
expiry digits, so it reads an expiry near one of the two, or an unparsable
file, which callers treat as a lease being replaced. Taking a free lease does
need a new file; on a full filesystem that fails with ENOSPC (see
:meth:`Lease.acquire`).

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

import errno
import json
import logging
import os
import secrets
import shutil
import socket
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from lmcache_fs.storage.layout import MAX_LEASE_BYTES, temp_name
from lmcache_fs.storage.publish import publish
from lmcache_fs.storage.untrusted import parse_json_object, read_capped

logger = logging.getLogger(__name__)

# A Linux host name is at most 64 bytes, so every record fits: renewals then
# rewrite exactly the bytes the file already has.
_RECORD_BYTES = 256
_MAX_LEASE_FILE = MAX_LEASE_BYTES
_NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


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
    """The record in a lease file, or None if there is none or it is unreadable.

    Anyone who can write the cache directory can plant the lease file, so it
    is read up to ``_MAX_LEASE_FILE`` bytes, without following a symlink, and
    any content that is not a lease record reads as None.
    """
    data = read_capped(path, _MAX_LEASE_FILE)
    return None if data is None else _parse(data)


def _parse(text: bytes) -> LeaseRecord | None:
    data = parse_json_object(text, _MAX_LEASE_FILE, max_depth=1)
    if data is None:
        return None
    host, pid, token, expires_at = (data.get(k) for k in ("host", "pid", "token", "expires_at"))
    if not (isinstance(host, str) and isinstance(token, str) and type(pid) is int
            and type(expires_at) in (int, float)):
        return None
    return LeaseRecord(host, pid, token, float(expires_at))


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
        self._expires_at: float | None = None  # of the record we last wrote; None: not held
        self._next_renewal = 0.0

    @property
    def held(self) -> bool:
        """True if this handle acquired the lease and has not seen it lost or released."""
        return self._expires_at is not None

    def holder(self) -> LeaseRecord | None:
        """The current lease record (any process's), or None."""
        return read_lease(self.path)

    def acquire(self) -> bool:
        """Take the lease if it is free or expired; True if this handle now holds it.

        Raises:
            OSError: ENOSPC or EDQUOT if the lease is free but the filesystem
                has no block left for a new lease file (a live lease held by
                another process is reported as False, without writing).
        """
        # Look before writing: a lease held elsewhere, every node's usual case,
        # then costs one read and no file that a full filesystem would refuse.
        current = read_lease(self.path)
        if current is None:
            if self._publish_new():
                return True
            current = read_lease(self.path)
        if current is not None and current.token == self._token:
            return self.renew()
        if current is not None and current.expires_at > self._clock():
            return False
        if current is None and not (self._planted() or self._unreadable_and_old()):
            return False  # being replaced right now, or garbage younger than a TTL
        return self._take_over() and self._publish_new()

    def renew(self) -> bool:
        """Push the expiry one TTL ahead; False (and no longer held) if another process holds it.

        On a full filesystem (ENOSPC, EDQUOT: possible where even an overwrite
        needs new blocks, as on copy-on-write servers) the lease stays held
        until the expiry last written, with a retry every third of a TTL and
        one at that expiry; past it the error is raised.
        """
        now = self._clock()
        try:
            ours = self._rewrite_own_record(now + self.ttl_s)
        except OSError as exc:
            if exc.errno not in _NO_SPACE_ERRNOS:
                raise
            if self._expires_at is None or now >= self._expires_at:
                self._expires_at = None  # expired unrenewed: anyone may take it now
                raise
            logger.warning("cannot renew the lease %s (%s); still held for %.0f s, retrying",
                           self.path, exc.strerror, self._expires_at - now)
            self._next_renewal = min(now + self.ttl_s / 3, self._expires_at)
            return True
        if not ours:
            self._expires_at = None
            return False
        self._written(now)
        return True

    def renew_if_due(self) -> bool:
        """Renew when a third of the TTL has passed since the last renewal; True while held."""
        if self._expires_at is None:
            return False
        if self._clock() < self._next_renewal:
            return True
        return self.renew()

    def release(self) -> None:
        """Give the lease up (if this handle still holds it)."""
        if self._expires_at is None:
            return
        self._expires_at = None
        current = read_lease(self.path)
        if current is not None and current.token == self._token:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    # -- internals ------------------------------------------------------------

    def _encoded(self, expires_at: float) -> bytes:
        record = LeaseRecord(socket.gethostname(), os.getpid(), self._token, expires_at)
        return json.dumps(asdict(record)).encode().ljust(_RECORD_BYTES)

    def _rewrite_own_record(self, expires_at: float) -> bool:
        """Write a new expiry over our record in place; False if the lease file is not ours."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            # gone, or a planted symlink, directory or device: not ours
            if exc.errno in (errno.ENOENT, errno.ELOOP, errno.EISDIR, errno.ENXIO):
                return False
            raise
        try:
            # The token is checked in the file we opened: if a taker moves it
            # aside meanwhile, our write lands in the moved file, where the
            # taker's expiry check sees it and puts it back.
            current = _parse(os.pread(fd, _MAX_LEASE_FILE, 0))
            if current is None or current.token != self._token:
                return False
            os.pwrite(fd, self._encoded(expires_at), 0)
            return True
        finally:
            os.close(fd)  # on NFS a write error (ENOSPC) may only show here

    def _publish_new(self) -> bool:
        now = self._clock()
        text = self._encoded(now + self.ttl_s)
        if not publish(self.path, lambda fd: os.write(fd, text), self.mode):
            return False
        self._written(now)
        return True

    def _written(self, now: float) -> None:
        """Note a record written at ``now``: held one TTL, renewed after a third of it."""
        self._expires_at, self._next_renewal = now + self.ttl_s, now + self.ttl_s / 3

    def _planted(self) -> bool:
        """Something no lease ever is holds the name (a directory, link, FIFO): take it over."""
        try:
            return not stat.S_ISREG(os.lstat(self.path).st_mode)
        except FileNotFoundError:
            return False

    def _unreadable_and_old(self) -> bool:
        # A lease file is written whole (a reader racing a renewal may see an
        # unparsable mix for an instant, but then its mtime is fresh), so one
        # that stays unreadable was planted or damaged: stale once a TTL old.
        try:
            return self._clock() - os.stat(self.path).st_mtime > self.ttl_s
        except FileNotFoundError:
            return True

    def _take_over(self) -> bool:
        """Move the expired lease aside; True if the lease name is now free for us to publish."""
        aside = self.path.parent / temp_name(self.path.name)  # removed by later passes if left
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
            if stat.S_ISDIR(os.lstat(aside).st_mode):  # planted: all it holds goes too
                shutil.rmtree(aside)
            else:
                os.unlink(aside)
