"""Which chunks exist: an in-memory set kept fresh three ways, with a stat fallback.

1. A start-up scan of the namespace directory (so a restarted engine reuses
   everything at once).
2. watchdog (inotify) events for files that other instances on this machine
   publish, where the filesystem delivers them.
3. ``add`` and ``discard`` from the owner (e.g. a chunk evicted or found bad). The
   connector's own writes happen in its worker process, which shares no memory with
   the scheduler; for those it asks ``contains(key, recheck=True)``, a fresh stat.

inotify never reports files that another NFS client created, so a key that
misses the set is checked by a stat of its expected path; a miss there is
remembered for ``negative_ttl_s`` seconds so a long prompt does not stat the
same absent chunk on every scheduler step. The filesystem calls and the clock
are parameters, so tests and odd filesystems plug in without monkeypatching.

Example:
    >>> from lmcache_fs.storage.layout import ChunkLayout, Namespace
    >>> idx = ChunkIndex(ChunkLayout("/nonexistent", Namespace({"model": "m"})))
    >>> idx.scan()
    0
    >>> idx.contains("ab" * 8)
    False
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, Iterable

from lmcache_fs.storage.breaker import Breaker
from lmcache_fs.storage.layout import ChunkLayout, chunk_location, key_of

logger = logging.getLogger(__name__)

_NEGATIVE_CACHE_MAX = 200_000  # entries; cleared wholesale past this (it is only a hint)


class ChunkIndex:
    """The set of published chunk keys of one namespace directory."""

    def __init__(self, layout: ChunkLayout, negative_ttl_s: float = 2.0,
                 stat: Callable[[str], os.stat_result] = os.stat,
                 clock: Callable[[], float] = time.monotonic,
                 breaker: Breaker | None = None, lookup_deadline_s: float = 0.2):
        """``breaker``: the directory's (see :mod:`lmcache_fs.storage.breaker`): while it
        has the directory switched off every lookup is a miss, and each stat waits at most
        ``lookup_deadline_s`` (engines pass one; tools that may block do not)."""
        self.layout = layout
        self._directory = str(layout.directory)
        self.negative_ttl_s = negative_ttl_s
        self.breaker = breaker
        if breaker is not None:
            def stat(path: str, stat: Callable[[str], os.stat_result] = stat) -> os.stat_result:
                return breaker.call(stat, path, deadline_s=lookup_deadline_s, what="lookup")
        self._stat = stat
        self._clock = clock
        self._keys: set[str] = set()
        self._absent_until: dict[str, float] = {}
        self._lock = threading.Lock()
        self._observer: object | None = None
        self.stats = {"stat_hits": 0, "stat_misses": 0, "events": 0}

    def __len__(self) -> int:
        return len(self._keys)

    def scan(self) -> int:
        """Add every published chunk file on disk; returns the number found.

        Only regular files count (from the directory listing, no extra stat): a FIFO,
        symlink or directory planted at a chunk's name is never offered as a hit.
        """
        found = [key for key, entry in self.layout.iter_chunk_files()
                 if entry.is_file(follow_symlinks=False)]
        with self._lock:
            self._keys.update(found)
        return len(found)

    def scan_in_background(self, watch: bool) -> threading.Thread:
        """:meth:`scan` (then :meth:`start_watching`, if ``watch``) in a daemon thread, so
        that an engine never waits for a directory at start-up; lookups stat until then."""
        def run() -> None:
            try:
                found = self.scan()
            except OSError as exc:
                logger.warning("start-up scan of %s failed (%s): chunks are found by their "
                               "path meanwhile", self.layout.directory, exc.strerror or exc)
            else:
                logger.info("namespace %s: %d chunks found at start-up in %s",
                            self.layout.namespace.name, found, self.layout.root)
            if watch:
                self.start_watching()

        thread = threading.Thread(target=run, name="lmcache-fs-scan", daemon=True)
        thread.start()
        return thread

    def add(self, key: str) -> None:
        """Record a chunk known to exist (our own write, or an event)."""
        with self._lock:
            self._keys.add(key)
            self._absent_until.pop(key, None)

    def discard(self, key: str) -> None:
        """Forget a chunk (deleted, evicted, or found corrupt at load)."""
        with self._lock:
            self._keys.discard(key)

    def contains(self, key: str, recheck: bool = False) -> bool:
        """True if the chunk is published, checking the disk when the set says no.

        ``recheck`` skips the negative cache (a chunk known to be on its way). While the
        breaker has the directory switched off, nothing is: no load is planned that
        would wait for it.
        """
        if self.breaker is not None and not self.breaker.available:
            return False
        if key in self._keys:
            return True
        now = self._clock()
        if not recheck and self._absent_until.get(key, 0.0) > now:
            return False
        try:
            self._stat(chunk_location(key).under(self._directory))
        except OSError:  # absent, ESTALE, EACCES: all a miss, retried after the TTL
            self.stats["stat_misses"] += 1
            with self._lock:
                if len(self._absent_until) > _NEGATIVE_CACHE_MAX:
                    self._absent_until.clear()
                self._absent_until[key] = now + self.negative_ttl_s
            return False
        self.stats["stat_hits"] += 1
        self.add(key)
        return True

    # -- watching -----------------------------------------------------------

    def start_watching(self) -> bool:
        """Follow file events for this namespace; False (with a log line) if unavailable."""
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:
            logger.warning("watchdog is not installed: only stat lookups will find other "
                           "instances' chunks in %s", self.layout.directory)
            return False

        index = self

        class _Handler(FileSystemEventHandler):
            def on_created(self, event) -> None:  # type: ignore[no-untyped-def]
                index._on_paths((event.src_path,), present=True)

            def on_moved(self, event) -> None:  # type: ignore[no-untyped-def]
                index._on_paths((event.src_path,), present=False)
                index._on_paths((event.dest_path,), present=True)

            def on_deleted(self, event) -> None:  # type: ignore[no-untyped-def]
                index._on_paths((event.src_path,), present=False)

        observer = Observer()
        try:
            self.layout.directory.mkdir(parents=True, exist_ok=True)
            observer.schedule(_Handler(), str(self.layout.directory), recursive=True)
            observer.daemon = True
            observer.start()
        except OSError as exc:  # e.g. inotify watch limit reached
            logger.warning("cannot watch %s for new chunks (%s); falling back to stat lookups",
                           self.layout.directory, exc)
            return False
        self._observer = observer
        return True

    def stop_watching(self) -> None:
        """Stop the event observer, if any."""
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()  # type: ignore[attr-defined]
            observer.join(timeout=2)  # type: ignore[attr-defined]

    def _on_paths(self, paths: Iterable[str | bytes], present: bool) -> None:
        for path in paths:
            fanout, name = os.path.split(os.fsdecode(path))
            key = key_of(name, os.path.basename(fanout))
            if key is None:  # a temporary, a pin, a stray name
                continue
            self.stats["events"] += 1
            if present:
                self.add(key)
            else:
                self.discard(key)
