"""Keep the whole cache directory within one budget, whoever writes to it.

``max_disk_size_gb`` is one budget for the directory, not per instance: a pass
adds up every byte under it (see :mod:`lmcache_fs.ops.inventory`: chunk files,
the quarantine, temporaries, the cache's own records and foreign entries, by the
blocks they occupy). Foreign entries are counted, never removed unless the
pass is asked to (``gc --remove-foreign``); an entry this user cannot read is
skipped and counted. Above the high watermark it removes, until the directory is below the low
watermark, first quarantined files and then chunk files least recently used
first. "Used" is the file's mtime, which every instance sets when it loads
or stores a chunk (atime is unreliable on NFS). Pinned chunks are never
removed, including those of a prefix pinned while the pass runs. Temporaries
older than ``temp_file_grace_s`` (left by writers that crashed) are removed on
every pass, whatever the budget.

At most one process evicts at a time across all nodes: a pass with a budget
runs only under the lease ``<storage_path>/eviction.lease`` (see
:mod:`lmcache_fs.ops.lease`), renewed as the pass goes (a scan of a large
directory on NFS can outlast the lease). A background evictor keeps the lease
between passes, so one node does the scanning while the others only read the
lease file; if it dies, another takes over after ``LEASE_TTL_INTERVALS``
intervals. A pass without a budget never takes the lease: it only cleans
temporaries (harmless to do twice), and holding the lease would keep every
budgeted evictor from running. A pass with a budget leaves what the directory
holds afterwards in ``<storage_path>/eviction.usage``: between passes the
writers' budget guards count their stores from it (see
:mod:`lmcache_fs.storage.usage`).

Removing a chunk while another instance loads it is safe: the loader gets a
missing file (a miss) and recomputes. Just before removing a chunk the pass
checks its mtime again, so a chunk used since the scan stays.

An engine with tensor (or pipeline) parallelism stores each chunk as one file
per rank, each rank in a namespace of its own; a chunk is a hit only while
every rank's file is there. The pass therefore takes a chunk's files of all
ranks as one: its last use is the newest of their mtimes, a pin or a use of
any of them keeps them all, and they are removed together (never a rank's
file alone, which would leave the others' bytes that can no longer hit).

Example:
    >>> import tempfile
    >>> evictor = Evictor(tempfile.mkdtemp(), max_bytes=10**9)
    >>> evictor.run_pass().ran
    True
    >>> evictor.close()
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lmcache_fs.config import LMCacheFSConfig
from lmcache_fs.log import human_bytes
from lmcache_fs.ops.inventory import (
    ChunkEntry,
    DirectoryContents,
    FileEntry,
    rank_sets,
    remove_entry,
    scan_or_stop,
    total_size,
)
from lmcache_fs.ops.lease import Lease
from lmcache_fs.ops.pins import PinStore
from lmcache_fs.storage.breaker import Breaker
from lmcache_fs.storage.layout import PINS_DIR, lease_path, usage_path
from lmcache_fs.storage.usage import write_usage

logger = logging.getLogger(__name__)

LEASE_TTL_INTERVALS = 3  # a silent evictor is replaced after this many intervals
_MIN_LEASE_TTL_S = 30.0


@dataclass
class EvictionReport:
    """What one pass saw and did (``ran`` is False if another process holds the lease)."""

    ran: bool
    budget_bytes: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    evicted_chunks: int = 0
    evicted_bytes: int = 0
    removed_quarantined: int = 0
    removed_temporaries: int = 0
    skipped_pinned: int = 0
    skipped_recently_used: int = 0
    lease_holder: str = ""
    # What the pass leaves (its own scan, less what it removed), for the exporter:
    namespace_chunks: dict[str, int] = field(default_factory=dict)
    namespace_bytes: dict[str, int] = field(default_factory=dict)
    quarantined_files: int = 0
    quarantined_bytes: int = 0
    temporary_files: int = 0
    foreign_files: int = 0
    foreign_bytes: int = 0
    removed_foreign: int = 0
    unreadable_entries: int = 0


def lease_ttl_s(interval_s: float) -> float:
    """The eviction lease's time to live for a given pass interval."""
    return max(LEASE_TTL_INTERVALS * interval_s, _MIN_LEASE_TTL_S)


class Evictor:
    """Eviction passes over one cache directory, each under the cross-node lease."""

    def __init__(self, root: str | os.PathLike[str], max_bytes: int,
                 high_watermark: float = 0.95, low_watermark: float = 0.85,
                 temp_grace_s: float = 600.0, lease_ttl: float = _MIN_LEASE_TTL_S,
                 file_mode: int = 0o644,
                 on_evicted: Callable[[str, str], None] | None = None,
                 clock: Callable[[], float] = time.time, remove_foreign: bool = False):
        """
        Args:
            root: the cache directory (``storage_path``).
            max_bytes: the budget; 0 means none (only temporaries are cleaned).
            high_watermark, low_watermark: fractions of ``max_bytes``.
            temp_grace_s: age after which a temporary file is removed.
            lease_ttl: seconds the eviction lease lasts without renewal.
            file_mode: permission bits of the lease and usage files.
            on_evicted: called with ``(namespace, key)`` for each removed chunk
                (e.g. to drop it from this process's index).
            clock: wall-clock time (mtimes and the lease are wall-clock).
            remove_foreign: also remove every foreign entry (anything the on-disk
                map does not name), whatever the budget.
        """
        if not 0 < low_watermark < high_watermark <= 1:
            raise ValueError(f"need 0 < low_watermark < high_watermark <= 1, got "
                             f"{low_watermark}, {high_watermark}")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.high_watermark = high_watermark
        self.low_watermark = low_watermark
        self.temp_grace_s = temp_grace_s
        self.file_mode = file_mode
        self.lease = Lease(lease_path(root), lease_ttl, file_mode, clock)
        self._on_evicted = on_evicted
        self._clock = clock
        self.remove_foreign = remove_foreign

    @classmethod
    def from_config(cls, config: LMCacheFSConfig,
                    on_evicted: Callable[[str, str], None] | None = None,
                    remove_foreign: bool = False) -> "Evictor":
        """An evictor with the budget, watermarks, grace and interval of ``config``."""
        return cls(config.storage_path, int(config.max_disk_size_gb * 1e9),
                   config.eviction_high_watermark, config.eviction_low_watermark,
                   config.temp_file_grace_s, lease_ttl_s(config.eviction_interval_s),
                   config.file_mode, on_evicted, remove_foreign=remove_foreign)

    def run_pass(self) -> EvictionReport:
        """Clean temporaries and, above the high watermark, evict down to the low one.

        With a budget, the pass runs under the lease and keeps it afterwards
        (call :meth:`close` to give it up). It returns ``ran=False`` and the
        holder if another process holds the lease, or takes it while this pass
        still scans. Without a budget, the pass never takes the lease.

        Raises:
            OSError: e.g. ENOSPC when the lease is free but the filesystem has
                no room for a new lease file (logged with what to do).
        """
        report = EvictionReport(ran=True, budget_bytes=self.max_bytes)
        budgeted = self.max_bytes > 0
        if budgeted and not self._take_lease():
            report.ran, report.lease_holder = False, self._holder_text()
            return report
        # Renewed entry by entry: on NFS one namespace's scan can outlast the lease.
        contents = scan_or_stop(self.root, self.lease.renew_if_due if budgeted else lambda: True)
        if contents is None:
            report.ran = False  # nothing evicted: the new holder enforces the budget
            return self._lost_lease(report)
        contents.temporaries = self._remove_old_temporaries(report, contents.temporaries)
        if self.remove_foreign:
            contents.foreign = self._remove_all(report, contents.foreign)
        report.bytes_before = report.bytes_after = contents.bytes
        for chunk in contents.chunks:
            _count(report, chunk, 1)
        report.quarantined_files = len(contents.quarantined)
        report.quarantined_bytes = total_size(contents.quarantined)
        report.temporary_files = len(contents.temporaries)
        report.foreign_files, report.foreign_bytes = len(contents.foreign), total_size(contents.foreign)
        report.unreadable_entries = len(contents.unreadable)
        if contents.outage:
            # The directory answers in part (a dead brick, a flaky mount): its listing may
            # be short, so what it does not list may not be taken as gone, nor its measure as
            # the directory's. Nothing is evicted, and the writers keep the last measure.
            logger.warning("eviction pass on %s met I/O errors (e.g. %s: %s): evicting nothing "
                           "until the directory answers in full", self.root,
                           contents.unreadable[0].path, os.strerror(contents.unreadable[0].errno))
            return report
        if budgeted and report.bytes_before > self.high_watermark * self.max_bytes:
            self._evict(report, contents)
        self._log(report, contents)
        if budgeted:
            self._share_usage(report.bytes_after)
        return report

    def close(self) -> None:
        """Give the lease up so another process can evict at once."""
        self.lease.release()

    # -- one pass ----------------------------------------------------------------

    def _take_lease(self) -> bool:
        try:
            return self.lease.renew() if self.lease.held else self.lease.acquire()
        except OSError as exc:
            # A held lease is renewed in place, so only a free one needs a new
            # block; there is no way around that without giving up the
            # one-evictor guarantee, so say what frees the first block.
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                logger.error("cannot take the eviction lease %s: the filesystem is full (%s), "
                             "so nothing is evicted until some space is freed by hand, e.g. "
                             "`lmcache-fs clear --namespace NAME` for a namespace no longer "
                             "needed; then the next pass evicts down to the budget",
                             self.lease.path, exc.strerror)
            raise

    def _share_usage(self, directory_bytes: int) -> None:
        """Tell every writer what the directory holds now (their budget guards count from it)."""
        try:
            write_usage(self.root, directory_bytes, self.max_bytes, self.file_mode)
        except OSError as exc:  # e.g. ENOSPC: the writers' guards keep counting from the last one
            logger.warning("cannot write %s (%s): writers keep the previous measure",
                           usage_path(self.root), exc.strerror or exc)

    def _holder_text(self) -> str:
        holder = self.lease.holder()
        return holder.describe(self._clock()) if holder else "unknown (being replaced)"

    def _lost_lease(self, report: EvictionReport) -> EvictionReport:
        """Note that another process took the lease mid-pass: this pass stops, it evicts."""
        report.lease_holder = self._holder_text()
        logger.warning("lost the eviction lease of %s mid-pass (now %s): stopping this pass",
                       self.root, report.lease_holder)
        return report

    def _remove_old_temporaries(self, report: EvictionReport,
                                temporaries: list[FileEntry]) -> list[FileEntry]:
        """Remove temporaries older than the grace period; returns those that stay."""
        cutoff = self._clock() - self.temp_grace_s
        kept = []
        for temp in temporaries:
            if temp.mtime <= cutoff and remove_entry(self.root, temp.parts):
                report.removed_temporaries += 1
            else:
                kept.append(temp)
        return kept

    def _remove_all(self, report: EvictionReport, foreign: list[FileEntry]) -> list[FileEntry]:
        """Remove foreign entries (``gc --remove-foreign``); returns those that stay."""
        kept = []
        for entry in foreign:
            if remove_entry(self.root, entry.parts):
                report.removed_foreign += 1
            else:
                kept.append(entry)
        return kept

    def _evict(self, report: EvictionReport, contents: DirectoryContents) -> None:
        """Remove quarantined entries, then chunks (each one chunk's files of all ranks),
        least recently used first, until the directory is below the low watermark."""
        target = self.low_watermark * self.max_bytes
        pins = _PinnedKeys(self.root)
        for entry in sorted(contents.quarantined, key=lambda e: e.mtime):
            if report.bytes_after <= target:
                return
            if remove_entry(self.root, entry.parts):
                report.removed_quarantined += 1
            report.bytes_after -= entry.size
            report.quarantined_files -= 1
            report.quarantined_bytes -= entry.size
        rank_set = rank_sets(self.root / name for name in {c.namespace for c in contents.chunks})
        # A namespace whose pins this user cannot read keeps every chunk: any may be pinned.
        unknown_pins = {e.parts[0] for e in contents.unreadable
                        if len(e.parts) >= 2 and e.parts[1] == PINS_DIR}
        candidates = [c for c in contents.chunks if c.namespace not in unknown_pins]
        for files in sorted(_by_chunk_of_all_ranks(candidates, rank_set),
                            key=lambda fs: max(f.mtime for f in fs)):
            if report.bytes_after <= target:
                return
            if not self.lease.renew_if_due():
                self._lost_lease(report)
                return
            if any(pins.hold(f) for f in files):
                report.skipped_pinned += len(files)
                continue
            if any(_used_since_scan(f) for f in files):
                report.skipped_recently_used += len(files)  # no longer the LRU
                continue
            for chunk in files:
                removed = remove_entry(self.root, chunk.parts)
                report.bytes_after -= chunk.size  # gone either way (if not by us, by another instance)
                _count(report, chunk, -1)
                if not removed:
                    continue
                report.evicted_chunks += 1
                report.evicted_bytes += chunk.size
                if self._on_evicted is not None:
                    self._on_evicted(chunk.namespace, chunk.key)

    def _log(self, report: EvictionReport, contents: DirectoryContents) -> None:
        if contents.unreadable:
            logger.warning("eviction pass on %s skipped %d entries this user cannot read (e.g. "
                           "%s): their bytes are not counted; give the evicting user read access "
                           "(or run engines with a umask that lets it read)", self.root,
                           len(contents.unreadable), contents.unreadable[0].path)
        if (report.evicted_chunks or report.removed_quarantined or report.removed_temporaries
                or report.removed_foreign):
            logger.info("eviction pass on %s: %s -> %s (budget %s), evicted %d chunks (%s), "
                        "removed %d quarantined, %d stale temporary and %d foreign files, "
                        "%d pinned kept",
                        self.root, human_bytes(report.bytes_before),
                        human_bytes(report.bytes_after), human_bytes(report.budget_bytes),
                        report.evicted_chunks, human_bytes(report.evicted_bytes),
                        report.removed_quarantined, report.removed_temporaries,
                        report.removed_foreign, report.skipped_pinned)
        if self.max_bytes and report.bytes_after > self.high_watermark * self.max_bytes:
            foreign = (f"; {report.foreign_files} foreign entries ({human_bytes(report.foreign_bytes)}) "
                       "count against it: `lmcache-fs gc --remove-foreign` removes them"
                       if report.foreign_files else "")
            logger.warning("%s still holds %s, over %.0f%% of its %s budget: pinned chunks "
                           "(%d seen) or other instances' new files keep it full%s", self.root,
                           human_bytes(report.bytes_after), 100 * self.high_watermark,
                           human_bytes(self.max_bytes), report.skipped_pinned, foreign)


def _by_chunk_of_all_ranks(chunks: list[ChunkEntry], rank_set: dict[str, str]
                           ) -> list[list[ChunkEntry]]:
    """``chunks`` grouped by chunk key and engine: the files of each rank of one chunk."""
    groups: dict[tuple[str, str], list[ChunkEntry]] = {}
    for chunk in chunks:
        groups.setdefault((rank_set[chunk.namespace], chunk.key), []).append(chunk)
    return list(groups.values())


def _used_since_scan(chunk: ChunkEntry) -> bool:
    """The chunk file's mtime moved since the scan (a load or a store used it); False if gone."""
    try:
        return os.lstat(chunk.path).st_mtime > chunk.mtime
    except FileNotFoundError:
        return False


def _count(report: EvictionReport, chunk: ChunkEntry, sign: int) -> None:
    report.namespace_chunks[chunk.namespace] = report.namespace_chunks.get(chunk.namespace, 0) + sign
    report.namespace_bytes[chunk.namespace] = (report.namespace_bytes.get(chunk.namespace, 0)
                                               + sign * chunk.size)


class _PinnedKeys:
    """Each namespace's pinned keys, read again whenever its pins directory changes.

    Asked before each removal, so a prefix pinned (on any node) while a pass
    runs is kept: one ``lstat`` per removal, and the pin files are read again
    only after a pin was made or removed (either changes the directory's mtime).
    """

    def __init__(self, root: Path):
        self._root = root
        self._seen: dict[str, tuple[int | None, set[str]]] = {}

    def hold(self, chunk: ChunkEntry) -> bool:
        """True if a pin holds ``chunk``."""
        store = PinStore(self._root / chunk.namespace)
        try:
            version: int | None = os.lstat(store.directory).st_mtime_ns
        except FileNotFoundError:
            version = None
        seen = self._seen.get(chunk.namespace)
        if seen is None or seen[0] != version:
            seen = self._seen[chunk.namespace] = (version, store.pinned_keys())
        return chunk.key in seen[1]


class BackgroundEvictor:
    """Runs eviction passes every ``interval_s`` in a daemon thread (engine or ``gc --daemon``)."""

    def __init__(self, evictor: Evictor, interval_s: float,
                 on_report: Callable[[EvictionReport], None] | None = None,
                 breaker: Breaker | None = None):
        """``breaker``: the directory's in this process (an engine's): no pass runs while it
        has the directory switched off, and a pass's outage error switches it off."""
        self.evictor = evictor
        self.interval_s = interval_s
        self._on_report = on_report
        self._breaker = breaker
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run_until_stopped,
                                        name="lmcache-fs-evictor", daemon=True)

    def start(self) -> "BackgroundEvictor":
        """Start the thread; returns self."""
        self._thread.start()
        return self

    def run_until_stopped(self) -> None:
        """Pass, wait, repeat, until :meth:`stop` (runs in the caller's thread if called directly)."""
        while not self._stop.is_set():
            try:
                if self._breaker is None or self._breaker.available:
                    report = self.evictor.run_pass()
                    if self._on_report is not None:
                        self._on_report(report)
            except OSError as exc:  # e.g. the share is briefly unreachable: try next interval
                if self._breaker is not None:
                    self._breaker.note_error(exc, "eviction pass")
                logger.warning("eviction pass on %s failed (%s); retrying in %.0f s",
                               self.evictor.root, exc.strerror or exc, self.interval_s)
            except Exception:  # a dead thread would stop eviction for good
                logger.exception("eviction pass on %s failed unexpectedly; retrying in %.0f s "
                                 "(please report this with the traceback)",
                                 self.evictor.root, self.interval_s)
            self._stop.wait(self.interval_s)
        self.evictor.close()

    def stop(self) -> None:
        """Stop after the current pass and give the lease up."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def start_background_evictor(config: LMCacheFSConfig,
                             on_evicted: Callable[[str, str], None] | None = None,
                             breaker: Breaker | None = None) -> BackgroundEvictor | None:
    """Start evicting for ``config`` in a daemon thread (one per engine; the lease picks who works).

    Returns None without a budget (``max_disk_size_gb`` 0): an engine then
    neither scans the directory nor holds the lease, so a ``gc --daemon``
    sidecar with a budget can do the work.
    """
    if config.max_disk_size_gb <= 0:
        return None
    return BackgroundEvictor(Evictor.from_config(config, on_evicted),
                             config.eviction_interval_s, breaker=breaker).start()
