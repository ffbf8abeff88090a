"""The cache directory's size as the last eviction pass measured it: stores stop at the budget.

Eviction is a pass every ``eviction_interval_s`` under one lease (see
:mod:`lmcache_fs.ops.eviction`), so between passes, and for a lease TTL after
the evicting process dies, nothing else would hold the directory to
``max_disk_size_gb``: a soak run measured the directory at 2.5x its high
watermark. The pass therefore leaves its result, and the budget it enforced, in
``<storage_path>/eviction.usage`` (a small JSON file, replaced atomically), and
every writer's :class:`BudgetGuard` adds what it stored since it read that file:
a store that would take the sum past the budget (the engine's own, else the
pass's) is skipped (a future miss, never a stall) until the next pass makes room.

Each worker process (one per tensor-parallel rank; its KV cache groups share
one guard) counts only its own stores, so N of them writing at once can together
pass the budget by up to N - 1 times the room the last pass left (the budget
minus what it measured, at least ``1 - eviction_low_watermark`` of it after an
eviction): a bound in bytes of the budget, not in time.

Anyone who can write the cache directory can plant this file; it is read
capped and parsed as untrusted. A planted small size is what having no file
means (stores go on, the next pass rewrites it); a planted large one (or a
small budget, for engines without their own) pauses stores until the next
pass, which anyone able to plant it could do more simply by filling the disk.

Example:
    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> write_usage(root, 900, budget_bytes=1000)
    >>> guard = BudgetGuard(root, max_bytes=1000)
    >>> guard.allows(60), guard.allows(60)
    (True, False)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, NamedTuple

from lmcache_fs.log import human_bytes
from lmcache_fs.storage.layout import MAX_USAGE_BYTES, usage_path
from lmcache_fs.storage.publish import replace
from lmcache_fs.storage.space import StoreGuard
from lmcache_fs.storage.untrusted import parse_json_object, read_capped

_MAX_USAGE_FILE = MAX_USAGE_BYTES


class Usage(NamedTuple):
    """What the last eviction pass measured, and the budget it enforced (0: none recorded)."""

    directory_bytes: int
    budget_bytes: int


def write_usage(root: str | os.PathLike[str], directory_bytes: int, budget_bytes: int = 0,
                mode: int = 0o644) -> None:
    """Replace the usage file (readers see the old file or the new one).

    Raises:
        OSError: the write or the rename failed (ENOSPC...); nothing is left behind.
    """
    record = json.dumps({"directory_bytes": directory_bytes, "budget_bytes": budget_bytes,
                         "measured_at": time.time()}).encode()
    replace(usage_path(root), lambda fd: os.write(fd, record), mode)


def read_usage(root: str | os.PathLike[str]) -> Usage | None:
    """The usage file's record; None if missing, unreadable or not a usage record."""
    data = read_capped(usage_path(root), _MAX_USAGE_FILE)
    record = None if data is None else parse_json_object(data, _MAX_USAGE_FILE, max_depth=1)
    if record is None:
        return None
    size, budget = record.get("directory_bytes"), record.get("budget_bytes", 0)
    if not all(type(n) is int and n >= 0 for n in (size, budget)):
        return None
    return Usage(size, budget)


class BudgetGuard(StoreGuard):
    """Says whether a store of ``nbytes`` keeps the directory within ``max_bytes``.

    The room is the budget less the last pass's measure (re-read when a pass
    replaced the file, looked at once a second at most), less what this guard
    let through since. Without a budget of its own (0) the guard holds the one
    the pass enforced (an engine without ``max_disk_size_gb`` beside a
    ``gc --daemon`` with one); before any pass has measured, or when no pass
    has a budget, every store is allowed: the guard never blocks a cache that
    no pass looks after.
    """

    reason = "budget"

    def __init__(self, root: str | os.PathLike[str], max_bytes: int,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(clock)
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._version: tuple[int, int, int] | None = None  # of the file last read
        self._usage: Usage | None = None

    def why_paused(self) -> str:
        """What a log line says while stores are skipped."""
        usage = self._usage or Usage(0, 0)
        return (f"the cache directory is at its budget of "
                f"{human_bytes(self.max_bytes or usage.budget_bytes)} "
                f"({human_bytes(usage.directory_bytes)} at the last eviction pass, the rest "
                "stored since): stores paused until the next pass makes room "
                "(eviction_interval_s)")

    def _measure_room(self, room: int | None) -> int | None:
        """A new measure restarts the count; a removed file (``lmcache-fs clear``) forgets it."""
        try:
            st = os.stat(usage_path(self.root), follow_symlinks=False)
        except FileNotFoundError:
            self._version = self._usage = None
            return None
        except OSError:  # the share briefly unreachable: keep counting
            return room
        version = (st.st_ino, st.st_mtime_ns, st.st_size)
        if version == self._version:
            return room
        self._version = version
        usage = read_usage(self.root)
        if usage is None:  # a planted record: the last real measure still holds
            return room
        self._usage = usage
        budget = self.max_bytes if self.max_bytes > 0 else usage.budget_bytes
        return budget - usage.directory_bytes if budget > 0 else None
