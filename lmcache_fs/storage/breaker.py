"""Bounded filesystem calls: a sick shared filesystem costs misses, never a stalled engine.

A call into a hung NFS server, a stopped FUSE daemon or a GlusterFS volume
waiting out a dead brick blocks in the kernel, and nothing in Python can
interrupt it. So every filesystem call an engine waits for runs on a helper
thread and is waited for with a deadline: past it, the caller gets
:class:`DirectoryUnavailable` (an ``OSError``, so every caller already treats
it as a miss) and the helper thread is left to finish whenever the kernel lets
it. An abandoned call must therefore never write into memory someone else
uses afterwards: readers read into buffers they retire when a read is
abandoned (see :mod:`lmcache_fs.transfer`).

The :class:`Breaker` then stops using the directory for a while: after a
timeout, or an error that says the filesystem itself is in trouble
(``ENOTCONN``, ``EIO``, ``ESTALE``, ``ETIMEDOUT``...: not ``ENOENT``), every
call fails at once for ``cooldown_s``. Then one canary call (a stat of the
directory) goes out in the background; when it answers in time, calls go
through again, else the cooldown doubles, up to ``max_cooldown_s``. A WARNING
marks the directory going away and coming back. Threads stuck in calls that
never returned are counted, and new calls are refused while
``max_stuck_threads`` are stuck: an outage costs a few threads, not one per
request.

One breaker serves every user of a directory in a process (the scheduler's
indexes, a worker's readers and writers): see :func:`breaker_for`.

Example:
    >>> import tempfile, os
    >>> breaker = Breaker(tempfile.gettempdir())
    >>> breaker.call(os.stat, tempfile.gettempdir(), deadline_s=1.0, what="stat").st_mode > 0
    True
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import threading
import time
from collections import Counter
from typing import Any, Callable, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Errors that say the filesystem is in trouble, not that an entry is missing or bad.
OUTAGE_ERRNOS = frozenset({errno.ENOTCONN, errno.EIO, errno.ESTALE, errno.ETIMEDOUT,
                           errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.ECONNREFUSED,
                           errno.ECONNRESET, errno.ENETUNREACH, errno.ENODEV})


class DirectoryUnavailable(OSError):
    """The cache directory did not answer in time, or is switched off for now (a miss)."""

    def __init__(self, message: str):
        super().__init__(errno.ETIMEDOUT, message)


class _Task:
    __slots__ = ("fn", "args", "done", "result", "error")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]):
        self.fn, self.args = fn, args
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
            self.error = exc
        finally:
            self.done.set()


class _Helpers:
    """Daemon threads that run calls, as many as are busy: one stuck in the kernel is
    simply not there for the next call, which gets another."""

    def __init__(self, name: str):
        self._name = name
        self._tasks: queue.SimpleQueue[_Task] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._busy = 0

    def start(self, task: _Task) -> None:
        with self._lock:
            spawn = self._idle == 0
            if not spawn:
                self._idle -= 1  # an idle thread takes it
            self._busy += 1
        self._tasks.put(task)
        if spawn:
            threading.Thread(target=self._serve, name=self._name, daemon=True).start()

    @property
    def busy(self) -> int:
        """Calls running now (stuck ones included)."""
        with self._lock:
            return self._busy

    def _serve(self) -> None:
        while True:
            self._tasks.get().run()
            with self._lock:
                self._busy -= 1
                self._idle += 1


class Breaker:
    """Deadlines for the calls into one directory, and whether to make them at all."""

    def __init__(self, directory: str | os.PathLike[str], cooldown_s: float = 5.0,
                 max_cooldown_s: float = 60.0, canary_deadline_s: float = 2.0,
                 max_stuck_threads: int = 8, clock: Callable[[], float] = time.monotonic):
        self.directory = os.fspath(directory)
        self.cooldown_s = cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self.canary_deadline_s = canary_deadline_s
        self.max_stuck_threads = max_stuck_threads
        self._clock = clock
        self._helpers = _Helpers("lmcache-fs-fs-call")
        self._lock = threading.Lock()
        self._open_until: float | None = None  # None: closed (the directory is used)
        self._backoff = cooldown_s
        self._canary_running = False
        self.timeouts: Counter[str] = Counter()
        """Calls past their deadline, by what they were."""
        self.errors: Counter[str] = Counter()
        """Calls that failed with an outage error, by errno name."""
        self.trips = 0
        """Times the directory was switched off."""
        self.refused = 0
        """Calls not made while it was off."""

    @property
    def available(self) -> bool:
        """Whether calls go to the directory now (a canary may be due: asking starts it)."""
        with self._lock:
            if self._open_until is None:
                return True
            due = self._clock() >= self._open_until and not self._canary_running
            if due:
                self._canary_running = True
        if due:
            threading.Thread(target=self._probe, name="lmcache-fs-canary", daemon=True).start()
        return False

    def call(self, fn: Callable[..., T], *args: Any, deadline_s: float, what: str) -> T:
        """``fn(*args)`` within ``deadline_s`` seconds.

        Raises:
            DirectoryUnavailable: the directory is switched off, or the call did
                not return in time (it is abandoned, the breaker trips).
            OSError: what ``fn`` raised (an outage errno trips the breaker too).
        """
        if not self.available:
            self.refused += 1
            raise DirectoryUnavailable(f"{self.directory} is switched off after an outage")
        if self._helpers.busy >= self.max_stuck_threads:
            self.refused += 1
            self.switch_off(f"{self._helpers.busy} calls still stuck in it")
            raise DirectoryUnavailable(f"{self.directory}: too many calls stuck")
        task = _Task(fn, args)
        self._helpers.start(task)
        if not task.done.wait(deadline_s):
            self.timeouts[what] += 1
            self.switch_off(f"a {what} did not return within {deadline_s * 1e3:.0f} ms")
            raise DirectoryUnavailable(f"{what} in {self.directory}: no answer within "
                                       f"{deadline_s * 1e3:.0f} ms")
        if task.error is not None:
            if isinstance(task.error, OSError) and task.error.errno in OUTAGE_ERRNOS:
                self.errors[errno.errorcode.get(task.error.errno, str(task.error.errno))] += 1
                self.switch_off(f"a {what} failed: {task.error.strerror or task.error}")
            raise task.error
        return task.result

    def note_error(self, exc: OSError, what: str) -> None:
        """An outage error met outside :meth:`call` (a read in a reader's own thread)."""
        if exc.errno in OUTAGE_ERRNOS:
            self.errors[errno.errorcode.get(exc.errno, str(exc.errno))] += 1
            self.switch_off(f"a {what} failed: {exc.strerror or exc}")

    def note_timeout(self, what: str, deadline_s: float) -> None:
        """A deadline passed outside :meth:`call` (a reader waited for its own threads)."""
        self.timeouts[what] += 1
        self.switch_off(f"a {what} did not return within {deadline_s * 1e3:.0f} ms")

    def switch_off(self, why: str) -> None:
        """Stop using the directory for a cooldown (logged with ``why``); a no-op while off."""
        with self._lock:
            if self._open_until is not None:
                return
            self._open_until = self._clock() + self._backoff
            self.trips += 1
            cooldown = self._backoff
        logger.warning("cache directory %s is not answering (%s): lmcache-fs stops using it "
                       "and requests recompute; it is probed again in %.0f s",
                       self.directory, why, cooldown)

    def _probe(self) -> None:
        task = _Task(os.stat, (self.directory,))
        self._helpers.start(task)
        answered = task.done.wait(self.canary_deadline_s) and not (
            isinstance(task.error, OSError) and task.error.errno in OUTAGE_ERRNOS)
        with self._lock:
            self._canary_running = False
            if answered:
                self._open_until, self._backoff = None, self.cooldown_s
            else:
                self._backoff = min(2 * self._backoff, self.max_cooldown_s)
                self._open_until = self._clock() + self._backoff
        if answered:
            logger.warning("cache directory %s answers again: lmcache-fs uses it again",
                           self.directory)
        else:
            logger.debug("cache directory %s still not answering; next probe in %.0f s",
                         self.directory, self._backoff)


_BREAKERS: dict[str, Breaker] = {}
_BREAKERS_LOCK = threading.Lock()


def breaker_for(directory: str | os.PathLike[str], **settings: Any) -> Breaker:
    """The one breaker of ``directory`` in this process (made with ``settings`` the first time)."""
    key = os.path.abspath(directory)
    with _BREAKERS_LOCK:
        if key not in _BREAKERS:
            _BREAKERS[key] = Breaker(key, **settings)
        return _BREAKERS[key]
