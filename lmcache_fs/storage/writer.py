"""A background writer with a bounded queue: stores never stall the engine.

The engine hands over a chunk already copied out of the paged cache; if the
queue is full the chunk is skipped and counted (a future miss, never a stall).
While a guard says no (the filesystem below its free-space reserve, the
directory at its budget), or while the directory's breaker has it switched
off after an outage, stores are skipped the same way; temporaries that a
failed write could not remove are removed once the directory answers again. Write failures
(disk full, EIO) are counted; each kind of trouble is logged at most once a
minute. The publish step guarantees that nothing half-written stays behind.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from lmcache_fs.storage.breaker import Breaker
from lmcache_fs.storage.codec import ALIGNMENT
from lmcache_fs.storage.publish import left_temporaries, remove_left_temporaries
from lmcache_fs.storage.space import StoreGuard
from lmcache_fs.storage.store import ChunkStore

logger = logging.getLogger(__name__)

_ERROR_LOG_INTERVAL_S = 60.0
WRITER_NICENESS = 10  # added to the writer thread's nice value (Linux: per thread)


@dataclass
class WriterStats:
    """Counters since start (read by the connector's metrics)."""

    published: int = 0
    already_present: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # by reason: queue_full, a guard's
    failed: int = 0


class BackgroundWriter:
    """One thread that publishes queued chunks through a :class:`ChunkStore`."""

    def __init__(self, store: ChunkStore, max_queue: int, guards: Sequence[StoreGuard] = (),
                 breaker: Breaker | None = None):
        self.store = store
        self.guards = tuple(guards)
        self.breaker = breaker
        self.stats = WriterStats()
        self._queue: queue.Queue[tuple[str, torch.Tensor, Mapping[str, str]] | None] = \
            queue.Queue(maxsize=max_queue)
        self._last_log: dict[str, float] = {}
        self._thread = threading.Thread(target=self._run, name="lmcache-fs-writer", daemon=True)
        self._thread.start()

    def submit(self, key: str, data: torch.Tensor, metadata: Mapping[str, str]) -> bool:
        """Queue a chunk; False (and counted) if the queue is full."""
        try:
            self._queue.put_nowait((key, data, metadata))
            return True
        except queue.Full:
            self.stats.skipped["queue_full"] += 1
            return False

    def flush(self) -> None:
        """Block until every queued chunk is written (tests, shutdown)."""
        self._queue.join()

    def close(self, timeout_s: float | None = None) -> None:
        """Write what is queued, then stop the thread (waiting at most ``timeout_s``: a
        writer stuck in a directory that does not answer is left behind, its stores lost)."""
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            pass
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.warning("the writer did not finish within %.0f s (the directory does not "
                           "answer): %d queued stores are dropped", timeout_s or 0,
                           self._queue.qsize())

    def _run(self) -> None:
        # Writing is never urgent and decoding is: where the writer shares cores with
        # the engine's compute threads (CPU inference, busy hosts), let them win.
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICENESS)
        except (AttributeError, OSError):  # not Linux, or not permitted: run at normal priority
            pass
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            try:
                self._write(*item)
            except Exception:  # noqa: BLE001 - a bug costs one store; a dead writer would hang flush()
                self.stats.failed += 1
                logger.exception("store of chunk %s failed unexpectedly; serving continues",
                                 item[0][:16])
            finally:
                self._queue.task_done()

    def _write(self, key: str, data: torch.Tensor, metadata: Mapping[str, str]) -> None:
        # The file's size: the data and its header, padded to one page (headers fit in one).
        nbytes = data.numel() * data.element_size() + ALIGNMENT
        if self.breaker is not None:
            if not self.breaker.available:
                self.stats.skipped["unavailable"] += 1
                self._log_once_a_minute("unavailable", "the cache directory is switched off after "
                                        "an outage: stores skipped (%d so far)",
                                        self.stats.skipped["unavailable"])
                return
            if left_temporaries():
                remove_left_temporaries()
        for i, guard in enumerate(self.guards):
            if not guard.allows(nbytes):
                self._refund(self.guards[:i], nbytes)
                self.stats.skipped[guard.reason] += 1
                self._log_once_a_minute(guard.reason, "%s (%d skipped so far)",
                                        guard.why_paused(), self.stats.skipped[guard.reason])
                return
        try:
            published = self.store.save(key, data, metadata)
        except OSError as exc:
            self._refund(self.guards, nbytes)
            self.stats.failed += 1
            if self.breaker is not None:
                self.breaker.note_error(exc, "store")
            self._log_once_a_minute("failed", "store of chunk %s failed (%s); serving continues, "
                                    "%d failed so far", key[:16], exc.strerror or exc,
                                    self.stats.failed)
            return
        if published:
            self.stats.published += 1
        else:  # another instance stored it first: no byte of ours on the disk
            self._refund(self.guards, nbytes)
            self.stats.already_present += 1

    @staticmethod
    def _refund(guards: Sequence[StoreGuard], nbytes: int) -> None:
        for guard in guards:
            guard.refund(nbytes)

    def _log_once_a_minute(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last_log.get(kind, -_ERROR_LOG_INTERVAL_S) >= _ERROR_LOG_INTERVAL_S:
            self._last_log[kind] = now
            logger.warning(message, *args)
