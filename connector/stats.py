"""lmcache-fs counters: vLLM's periodic log line and its Prometheus ``/metrics``.

Each worker records what its steps did into an :class:`LMCacheFSStats`
(``get_kv_connector_stats``); vLLM sums them over workers and steps, logs
``reduce()`` every ``VLLM_LOG_STATS_INTERVAL`` seconds when the engine was busy
("KV Transfer metrics: ..."), and hands the same data to
:class:`LMCacheFSPromMetrics` in the API server, which adds it to these series
(labelled ``model_name`` and ``engine`` like vLLM's own):

    vllm:lmcache_fs_loaded_bytes_total          bytes loaded from chunk files
    vllm:lmcache_fs_loaded_tokens_total         tokens those bytes hold
    vllm:lmcache_fs_load_seconds                histogram, one sample per step that loaded
    vllm:lmcache_fs_load_errors_total{reason}   missing, checksum, shape, io, other
    vllm:lmcache_fs_stored_chunks_total, vllm:lmcache_fs_stored_bytes_total
    vllm:lmcache_fs_store_skipped_total{reason} queue_full, disk_guard, budget, failed_load,
                                                unavailable
    vllm:lmcache_fs_store_failed_total
    vllm:lmcache_fs_directory_timeouts_total    filesystem calls past their deadline
    vllm:lmcache_fs_directory_trips_total       times the directory was switched off
    vllm:lmcache_fs_directory_available         1, or 0 while a process has it switched off

The stats travel between processes as plain data (numbers, lists, dicts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)

from lmcache_fs.log import human_bytes

if TYPE_CHECKING:
    from vllm.config import VllmConfig

    from lmcache_fs.storage.breaker import Breaker

LOAD_ERROR_REASONS = ("missing", "checksum", "shape", "io", "unavailable", "other")
STORE_SKIP_REASONS = ("queue_full", "disk_guard", "budget", "failed_load", "unavailable")

# ChunkFileError messages (lmcache_fs.storage.codec, store, chunk_reader) by cause;
# the first matching fragment wins, anything else is "other".
_REASON_FRAGMENTS = (
    ("unavailable", ("no answer", "switched off")),
    ("missing", ("missing",)),
    ("checksum", ("checksum", "mac")),
    ("shape", ("holds ", "data_offsets", "metadata ", "format version")),
    ("io", ("read failed", "short read", "truncated", "size ", "cannot open")),
)

_SUMS = ("loaded_chunks", "loaded_tokens", "loaded_bytes", "load_seconds", "load_errors",
         "stored_chunks", "stored_bytes", "skipped_stores", "failed_stores",
         "directory_timeouts", "directory_trips", "directory_off", "directory_reports")
_BY_REASON = ("load_errors_by_reason", "skipped_by_reason")
_SAMPLES = "load_step_seconds"

LOAD_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0, 10.0)


def load_error_reason(error: Exception) -> str:
    """The ``reason`` label of a chunk that could not be loaded (see :data:`LOAD_ERROR_REASONS`)."""
    text = str(error).lower()
    for reason, fragments in _REASON_FRAGMENTS:
        if any(f in text for f in fragments):
            return reason
    return "other"


def _zero() -> dict[str, Any]:
    return {**dict.fromkeys(_SUMS, 0), **{name: {} for name in _BY_REASON}, _SAMPLES: []}


def _add_counts(into: dict[str, int], counts: dict[str, int]) -> None:
    for reason, n in counts.items():
        if n:
            into[reason] = into.get(reason, 0) + n


@dataclass
class LMCacheFSStats(KVConnectorStats):
    """Sums over an interval; ``reduce`` gives the log line's figures."""

    data: dict[str, Any] = field(default_factory=_zero)

    def record_load(self, nbytes: int, chunks: int, tokens: int, seconds: float) -> None:
        """One step's loads (on one worker): what loaded and how long the reads took."""
        self.data["loaded_chunks"] += chunks
        self.data["loaded_tokens"] += tokens
        self.data["loaded_bytes"] += nbytes
        self.data["load_seconds"] += seconds
        self.data[_SAMPLES].append(seconds)

    def record_load_error(self, error: Exception) -> None:
        """A chunk that could not be loaded (its prompt recomputes from there)."""
        self.data["load_errors"] += 1
        _add_counts(self.data["load_errors_by_reason"], {load_error_reason(error): 1})

    def record_saves(self, stored: int, stored_bytes: int, skipped: dict[str, int],
                     failed: int) -> None:
        """Stores published, skipped by reason (:data:`STORE_SKIP_REASONS`) and failed."""
        self.data["stored_chunks"] += stored
        self.data["stored_bytes"] += stored_bytes
        self.data["skipped_stores"] += sum(skipped.values())
        _add_counts(self.data["skipped_by_reason"], skipped)
        self.data["failed_stores"] += failed

    def record_directory(self, timeouts: int, trips: int, available: bool | None) -> None:
        """A process's breaker since its last report: calls past their deadline, times it
        switched the directory off, and (where it changed) whether it uses it now."""
        self.data["directory_timeouts"] += timeouts
        self.data["directory_trips"] += trips
        if available is not None:
            self.data["directory_reports"] += 1
            self.data["directory_off"] += not available

    def reset(self) -> None:
        self.data = _zero()

    def aggregate(self, other: KVConnectorStats) -> "LMCacheFSStats":
        for name in _SUMS:
            self.data[name] = self.data.get(name, 0) + other.data.get(name, 0)
        for name in _BY_REASON:
            _add_counts(self.data.setdefault(name, {}), other.data.get(name, {}))
        self.data.setdefault(_SAMPLES, []).extend(other.data.get(_SAMPLES, []))
        return self

    def reduce(self) -> dict[str, int | float | str]:
        d = self.data
        seconds = d.get("load_seconds", 0)
        return {"hit_tokens": d.get("loaded_tokens", 0),
                "loaded": human_bytes(d.get("loaded_bytes", 0)),
                "load_GBps": round(d.get("loaded_bytes", 0) / seconds / 1e9, 2) if seconds else 0.0,
                "load_errors": d.get("load_errors", 0),
                "stored_chunks": d.get("stored_chunks", 0),
                "skipped_stores": d.get("skipped_stores", 0),
                "failed_stores": d.get("failed_stores", 0)}

    def is_empty(self) -> bool:
        return not any(self.data.get(name, 0) for name in _SUMS)


class LMCacheFSPromMetrics(KVConnectorPromMetrics):
    """The ``vllm:lmcache_fs_*`` series, fed by :meth:`observe` in vLLM's API server."""

    def __init__(self, vllm_config: "VllmConfig",
                 metric_types: dict[type[PromMetric], type[PromMetricT]],
                 labelnames: list[str], per_engine_labelvalues: dict[int, list[object]]):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        counter, histogram = self._counter_cls, self._histogram_cls
        by_reason = labelnames + ["reason"]
        self._counters = {
            "loaded_bytes": counter(name="vllm:lmcache_fs_loaded_bytes", labelnames=labelnames,
                                    documentation="Bytes of KV loaded from lmcache-fs chunk files."),
            "loaded_tokens": counter(name="vllm:lmcache_fs_loaded_tokens", labelnames=labelnames,
                                     documentation="Prompt tokens whose KV was loaded from "
                                                   "lmcache-fs chunk files."),
            "stored_chunks": counter(name="vllm:lmcache_fs_stored_chunks", labelnames=labelnames,
                                     documentation="Chunk files published by lmcache-fs."),
            "stored_bytes": counter(name="vllm:lmcache_fs_stored_bytes", labelnames=labelnames,
                                    documentation="Bytes of KV in the chunk files published."),
            "failed_stores": counter(name="vllm:lmcache_fs_store_failed", labelnames=labelnames,
                                     documentation="Chunk stores that failed (I/O error); the "
                                                   "chunk is simply not cached."),
            "directory_timeouts": counter(
                name="vllm:lmcache_fs_directory_timeouts", labelnames=labelnames,
                documentation="Calls into the cache directory (lookups, loads, start-up "
                              "writes) that passed their deadline: misses, recomputed."),
            "directory_trips": counter(
                name="vllm:lmcache_fs_directory_trips", labelnames=labelnames,
                documentation="Times a process switched the cache directory off after a "
                              "timeout or an outage error (ENOTCONN, EIO, ESTALE...)."),
        }
        self._available = self._gauge_cls(
            name="vllm:lmcache_fs_directory_available", labelnames=labelnames,
            multiprocess_mode="mostrecent",
            documentation="1 while every process of the engine uses the cache directory, 0 "
                          "while one has it switched off after an outage (the engine serves, "
                          "recomputing).")
        self._by_reason = {
            "load_errors_by_reason": (counter(
                name="vllm:lmcache_fs_load_errors", labelnames=by_reason,
                documentation="Chunks that could not be loaded (recomputed instead), by reason: "
                              + ", ".join(LOAD_ERROR_REASONS) + "."), LOAD_ERROR_REASONS),
            "skipped_by_reason": (counter(
                name="vllm:lmcache_fs_store_skipped", labelnames=by_reason,
                documentation="Chunk stores skipped, by reason: queue_full (the writer is "
                              "busy), disk_guard (free space below min_free_disk_gb), "
                              "budget (the directory at max_disk_size_gb until the next "
                              "eviction pass), failed_load (held back after a failed load)."),
                STORE_SKIP_REASONS),
        }
        self._load_seconds = histogram(
            name="vllm:lmcache_fs_load_seconds", labelnames=labelnames,
            buckets=LOAD_SECONDS_BUCKETS,
            documentation="Seconds a worker spent reading one step's chunks from lmcache-fs.")
        # Every series exists from start-up (at zero), so rate() has a baseline.
        for values in per_engine_labelvalues.values():
            for metric in self._counters.values():
                metric.labels(*values)
            for metric, reasons in self._by_reason.values():
                for reason in reasons:
                    metric.labels(*values, reason)
            self._load_seconds.labels(*values)
            self._available.labels(*values).set(1)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        values = self.per_engine_labelvalues[engine_idx]
        for name, metric in self._counters.items():
            if amount := transfer_stats_data.get(name, 0):
                metric.labels(*values).inc(amount)
        for name, (metric, _) in self._by_reason.items():
            for reason, amount in transfer_stats_data.get(name, {}).items():
                metric.labels(*values, reason).inc(amount)
        histogram = self._load_seconds.labels(*values)
        for seconds in transfer_stats_data.get(_SAMPLES, []):
            histogram.observe(seconds)
        if transfer_stats_data.get("directory_reports"):
            self._available.labels(*values).set(0 if transfer_stats_data.get("directory_off")
                                                else 1)


class DirectoryReport:
    """What one process's breaker counted since the last report, for :class:`LMCacheFSStats`.

    A process has one breaker per directory (its groups share it), so each process
    reports it once: the worker side with its stats, the scheduler side on its own.
    """

    def __init__(self, breaker: "Breaker"):
        self.breaker = breaker
        self._timeouts = self._trips = 0
        self._available = True

    def take(self, stats: "LMCacheFSStats") -> None:
        """Add what changed since the last call to ``stats``."""
        timeouts, trips = sum(self.breaker.timeouts.values()), self.breaker.trips
        available = self.breaker.available
        changed = None if available == self._available else available
        stats.record_directory(timeouts - self._timeouts, trips - self._trips, changed)
        self._timeouts, self._trips, self._available = timeouts, trips, available
