"""The cache directory's size as the last eviction pass measured it: stores stop at the budget.

Eviction is a pass every ``eviction_interval_s`` under one lease (see
:mod:`lmcache_fs.ops.eviction`), so between passes, and for a lease TTL after
the evicting process dies, nothing else would hold the directory to
``max_disk_size_gb``: a soak run measured the directory at 2.5x its high
watermark. The pass therefore leaves its result in ``<storage_path>/eviction.usage``
(a small JSON file, replaced atomically), and every writer's
:class:`BudgetGuard` adds what it stored since it read that file: a store that
would take the sum past the budget is skipped (a future miss, never a stall)
until the next pass makes room.

Each worker process (one per tensor-parallel rank; its KV cache groups share
one guard) counts only its own stores, so N of them writing at once can together
pass the budget by up to N - 1 times the room the last pass left (the budget
minus what it measured, at least ``1 - eviction_low_watermark`` of it after an
eviction): a bound in bytes of the budget, not in time.

Anyone who can write the cache directory can plant this file; it is read
capped and parsed as untrusted. A planted small size is what having no file
means (stores go on, the next pass rewrites it); a planted large one pauses
stores until the next pass, which anyone able to plant it could do more simply
by filling the disk.

Example:
    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> write_usage(root, 900)
    >>> guard = BudgetGuard(root, max_bytes=1000)
    >>> guard.allows(60), guard.allows(60)
    (True, False)
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Callable

from lmcache_fs.log import human_bytes
from lmcache_fs.storage.publish import temp_name
from lmcache_fs.storage.untrusted import parse_json_object, read_capped

USAGE_NAME = "eviction.usage"
_MAX_USAGE_FILE = 4096
_RECHECK_S = 1.0  # a stat of the file at most this often: new passes are seen within a second


def usage_path(root: str | os.PathLike[str]) -> Path:
    """The usage file of the cache at ``root``."""
    return Path(root) / USAGE_NAME


def write_usage(root: str | os.PathLike[str], directory_bytes: int, mode: int = 0o644) -> None:
    """Replace the usage file with ``directory_bytes`` (readers see the old file or the new one).

    Raises:
        OSError: the write or the rename failed (ENOSPC...); nothing is left behind.
    """
    tmp = Path(root) / temp_name(USAGE_NAME)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        try:
            os.fchmod(fd, mode)  # exact bits, whatever the process umask (as chunk files)
            os.write(fd, json.dumps({"directory_bytes": directory_bytes,
                                     "measured_at": time.time()}).encode())
        finally:
            os.close(fd)
        os.replace(tmp, usage_path(root))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_usage(root: str | os.PathLike[str]) -> int | None:
    """The directory's size in the usage file; None if missing, unreadable or not a usage record."""
    data = read_capped(usage_path(root), _MAX_USAGE_FILE)
    record = None if data is None else parse_json_object(data, _MAX_USAGE_FILE, max_depth=1)
    size = None if record is None else record.get("directory_bytes")
    return size if type(size) is int and size >= 0 else None


class BudgetGuard:
    """Says whether a store of ``nbytes`` keeps the directory within ``max_bytes``.

    The directory's size is the last pass's measure (re-read when the file
    changes, looked at once a second at most) plus what this guard let through
    since. Without a budget (0) or before any pass has measured, every store
    is allowed: the guard never blocks a cache that no pass looks after.
    """

    reason = "budget"

    def __init__(self, root: str | os.PathLike[str], max_bytes: int,
                 clock: Callable[[], float] = time.monotonic):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._clock = clock
        self._checked_at: float | None = None
        self._version: tuple[int, int, int] | None = None  # of the file last read
        self._measured: int | None = None
        self._added = 0
        self._lock = threading.Lock()  # one guard serves the writers of all of a worker's groups

    def allows(self, nbytes: int) -> bool:
        """True (and counted) if ``nbytes`` more stay within the budget."""
        if self.max_bytes <= 0:
            return True
        with self._lock:
            now = self._clock()
            if self._checked_at is None or now - self._checked_at >= _RECHECK_S:
                self._checked_at = now
                self._refresh()
            if (self._measured is not None
                    and self._measured + self._added + nbytes > self.max_bytes):
                return False
            self._added += nbytes
            return True

    def refund(self, nbytes: int) -> None:
        """Give back ``nbytes`` that :meth:`allows` counted but no file took."""
        with self._lock:  # (a new measure may have restarted the count meanwhile)
            self._added = max(0, self._added - nbytes)

    def why_paused(self) -> str:
        """What a log line says while stores are skipped."""
        return (f"the cache directory is at its budget of {human_bytes(self.max_bytes)} "
                f"({human_bytes(self._measured or 0)} at the last eviction pass, "
                f"{human_bytes(self._added)} stored here since): stores paused until the next "
                "pass makes room (eviction_interval_s)")

    def _refresh(self) -> None:
        """Re-read the usage file if a pass replaced it; a new measure restarts the count.

        A removed file (``lmcache-fs clear``) forgets the measure until the next pass.
        """
        try:
            st = os.stat(usage_path(self.root), follow_symlinks=False)
        except FileNotFoundError:
            self._version = self._measured = None
            return
        except OSError:  # the share briefly unreachable: keep what we know
            return
        version = (st.st_ino, st.st_mtime_ns, st.st_size)
        if version == self._version:
            return
        self._version = version
        measured = read_usage(self.root)
        if measured is not None:
            self._measured, self._added = measured, 0
