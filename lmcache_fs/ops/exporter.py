"""Prometheus exporter of a cache directory, served by ``lmcache-fs gc --daemon --metrics-port``.

After each eviction pass :meth:`DirectoryMetrics.observe` sets the series from
what the pass itself scanned (bytes, chunks per namespace, quarantine), so the
exporter adds no scan of its own. A pass that did not run (another process
holds the eviction lease, so this one scanned nothing) is followed by the scan
``lmcache-fs stats`` makes. ``GET /metrics`` renders them (prometheus_client),
``GET /health`` answers 200 while passes keep finishing (503 once the last one
is older than the eviction lease's time to live: three intervals, at least 30 s).

    lmcache_fs_directory_bytes 8.1e+09          every byte the budget counts
    lmcache_fs_namespace_chunks{namespace="..."} 1234
    lmcache_fs_evicted_chunks_total 56
    lmcache_fs_lease_held 1
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from lmcache_fs.config import LMCacheFSConfig
from lmcache_fs.ops.eviction import EvictionReport, Evictor, lease_ttl_s
from lmcache_fs.ops.inventory import scan_directory, total_size
from lmcache_fs.ops.lease import read_lease
from lmcache_fs.storage.layout import lease_path
from lmcache_fs.storage.space import free_bytes

logger = logging.getLogger(__name__)


class DirectoryMetrics:
    """The ``lmcache_fs_*`` series of one cache directory, in a registry of their own."""

    def __init__(self, config: LMCacheFSConfig, evictor: Evictor,
                 clock: Callable[[], float] = time.monotonic):
        self.root = Path(config.storage_path)
        self.evictor = evictor
        self.min_free_bytes = int(config.min_free_disk_gb * 1e9)
        self.stale_after_s = lease_ttl_s(config.eviction_interval_s)
        self._clock = clock
        self._last_pass = clock()  # start-up counts as a finished pass: no 503 while booting
        disable_created_metrics()  # no *_created series beside each counter: nothing reads them
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry

        def gauge(name: str, doc: str, labels: Iterable[str] = ()) -> Gauge:
            return Gauge(name, doc, list(labels), registry=r)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, registry=r)

        self.directory_bytes = gauge("lmcache_fs_directory_bytes",
                                     "Bytes in the cache directory that the budget counts: "
                                     "chunks, quarantine, temporaries, records, foreign entries.")
        self.budget_bytes = gauge("lmcache_fs_budget_bytes",
                                  "max_disk_size_gb in bytes (0: no budget).")
        self.high_watermark_bytes = gauge("lmcache_fs_high_watermark_bytes",
                                          "Bytes above which a pass evicts (budget x high watermark).")
        self.filesystem_free_bytes = gauge("lmcache_fs_filesystem_free_bytes",
                                           "Bytes an unprivileged writer may still write there.")
        self.stores_paused = gauge("lmcache_fs_stores_paused",
                                   "1 while free space is below min_free_disk_gb: engines skip stores.")
        self.namespace_chunks = gauge("lmcache_fs_namespace_chunks", "Chunk files per namespace.",
                                      ["namespace"])
        self.namespace_bytes = gauge("lmcache_fs_namespace_bytes", "Bytes of chunk files per namespace.",
                                     ["namespace"])
        self.quarantined_files = gauge("lmcache_fs_quarantined_files", "Entries in the quarantine.")
        self.quarantined_bytes = gauge("lmcache_fs_quarantined_bytes", "Bytes in the quarantine.")
        self.temporary_files = gauge("lmcache_fs_temporary_files", "Writers' temporary files.")
        self.lease_held = gauge("lmcache_fs_lease_held", "1 if this daemon holds the eviction lease.")
        self.lease_holder = gauge("lmcache_fs_lease_holder_info",
                                  "The eviction lease's holder (value 1; none: nobody holds it).",
                                  ["host", "pid"])
        self.last_pass = gauge("lmcache_fs_last_pass_timestamp_seconds",
                               "Unix time at which this daemon's last pass finished.")
        self.evicted_chunks = counter("lmcache_fs_evicted_chunks", "Chunk files evicted by this daemon.")
        self.evicted_bytes = counter("lmcache_fs_evicted_bytes", "Bytes of chunk files evicted.")
        self.quarantined_removed = counter("lmcache_fs_quarantined_removed",
                                           "Quarantined entries removed to meet the budget.")
        self.temporaries_removed = counter("lmcache_fs_temporaries_removed",
                                           "Stale temporary files removed.")
        self.eviction_passes = counter("lmcache_fs_eviction_passes",
                                       "Passes this daemon ran (not counting those another "
                                       "lease holder ran).")
        self.budget_bytes.set(evictor.max_bytes)
        self.high_watermark_bytes.set(evictor.max_bytes * evictor.high_watermark)

    def observe(self, report: EvictionReport) -> None:
        """Set every series after a pass (called by the daemon loop, once per interval)."""
        if report.ran:
            self.eviction_passes.inc()
            self.evicted_chunks.inc(report.evicted_chunks)
            self.evicted_bytes.inc(report.evicted_bytes)
            self.quarantined_removed.inc(report.removed_quarantined)
            self.temporaries_removed.inc(report.removed_temporaries)
            temporaries = report.temporary_files
            namespaces = {n: (report.namespace_chunks[n], report.namespace_bytes[n])
                          for n in report.namespace_chunks}
            quarantined = (report.quarantined_files, report.quarantined_bytes)
            used = report.bytes_after
        else:  # this process scanned nothing: the scan `lmcache-fs stats` makes
            contents = scan_directory(self.root)
            temporaries = len(contents.temporaries)
            namespaces = {s.name: (s.chunks, s.bytes) for s in contents.namespaces}
            quarantined = (len(contents.quarantined), total_size(contents.quarantined))
            used = contents.bytes
        self.directory_bytes.set(used)
        self.temporary_files.set(temporaries)
        self.quarantined_files.set(quarantined[0])
        self.quarantined_bytes.set(quarantined[1])
        _set_labelled(self.namespace_chunks, {(n,): c for n, (c, _) in namespaces.items()})
        _set_labelled(self.namespace_bytes, {(n,): b for n, (_, b) in namespaces.items()})
        free = free_bytes(self.root)
        self.filesystem_free_bytes.set(free)
        self.stores_paused.set(int(free < self.min_free_bytes))
        self.lease_held.set(int(self.evictor.lease.held))
        holder = read_lease(lease_path(self.root))
        _set_labelled(self.lease_holder, {(holder.host, str(holder.pid)): 1} if holder else {})
        self.last_pass.set(time.time())
        self._last_pass = self._clock()

    def healthy(self) -> bool:
        """True while the last pass finished within the lease's time to live."""
        return self._clock() - self._last_pass <= self.stale_after_s

    def wsgi_app(self) -> Callable[..., Any]:
        """``/health`` here, everything else (``/metrics``) to prometheus_client."""
        metrics = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
            if environ.get("PATH_INFO") == "/health":
                ok = self.healthy()
                start_response("200 OK" if ok else "503 Service Unavailable",
                               [("Content-Type", "text/plain")])
                return [b"ok\n" if ok else b"no eviction pass finished recently\n"]
            return metrics(environ, start_response)

        return app

    def serve(self, host: str, port: int) -> "MetricsServer":
        """Serve in a daemon thread; returns the server (its ``port`` is the one bound)."""
        return MetricsServer(self.wsgi_app(), host, port)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No access log: Prometheus and the kubelet ask every few seconds."""


class MetricsServer:
    """A threaded HTTP server in a daemon thread (IPv6 when ``host`` is an IPv6 address)."""

    def __init__(self, app: Callable[..., Any], host: str, port: int):
        server_class = type("_Server", (ThreadingWSGIServer,), {
            "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
        self._server = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        self.port: int = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="lmcache-fs-metrics", daemon=True)
        self._thread.start()
        logger.info("serving /metrics and /health on http://%s:%d", host, self.port)

    def close(self) -> None:
        """Stop serving and free the port."""
        self._server.shutdown()
        self._server.server_close()


def _set_labelled(gauge: Gauge, values: dict[tuple[str, ...], float]) -> None:
    """Set each label set's value and drop the label sets no longer present."""
    for labels, value in values.items():
        gauge.labels(*labels).set(value)
    for gone in {tuple(s.labels.values()) for m in gauge.collect() for s in m.samples} - values.keys():
        gauge.remove(*gone)
