"""``lmcache-fs gc --daemon --metrics-port``: the directory's series match the directory.

Real daemons (subprocesses) on a temporary cache: two namespaces, a quarantined
file, a budget the directory exceeds. The first daemon holds the lease and
evicts; its series must equal what is left on disk. A second daemon on the same
directory does not get the lease and reports the same directory from its own
scan, naming the first as the holder, until the first stops and it takes over.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from cachedir import make_store, prefix_keys, record_bytes, save_prefix
from prometheus_client.parser import text_string_to_metric_families

from lmcache_fs.config import load_config
from lmcache_fs.ops.eviction import EvictionReport, Evictor
from lmcache_fs.ops.exporter import DirectoryMetrics
from lmcache_fs.ops.inventory import namespace_dirs, scan_quarantine, total_size
from lmcache_fs.storage.quarantine import quarantine

SCRIPT = Path(sys.executable).parent / "lmcache-fs"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _on_disk(root: Path) -> dict[str, tuple[int, int]]:
    """(chunk files, bytes) per namespace, counted here with os.walk."""
    out = {}
    for ns in namespace_dirs(root):
        files = [Path(d) / f for d, _, names in os.walk(ns) for f in names if f.endswith(".safetensors")]
        out[ns.name] = (len(files), sum(f.stat().st_size for f in files))
    return out


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


class Daemon:
    """``lmcache-fs gc --daemon`` with metrics on a free port; waits for its first pass."""

    def __init__(self, root: Path, budget_gb: float, log: Path):
        self.port = _free_port()
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [str(SCRIPT), "gc", "--daemon", "--storage-path", str(root), "--metrics-host",
                 "127.0.0.1", "--metrics-port", str(self.port), "--max-disk-size-gb",
                 str(budget_gb), "--eviction-interval-s", "1"],
                stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:  # the series are set once the first pass is observed
            try:
                if self.metrics().get(("lmcache_fs_last_pass_timestamp_seconds", ()), 0) > 0:
                    return
            except requests.ConnectionError:
                pass
            assert self.proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)

    def metrics(self):
        return _scrape(self.port)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    root = tmp_path / "kv"
    for model, n in (("tiny-a", 6), ("tiny-b", 3)):
        save_prefix(make_store(root, model=model), prefix_keys(model, n))
    victim = next(Path(d) / f for d, _, fs in os.walk(root) for f in fs if f.endswith(".safetensors"))
    quarantine(root, victim, "planted by the test")
    return root


def test_the_daemons_series_match_the_directory_it_evicts_and_the_lease(cache: Path):
    before = sum(b for _, b in _on_disk(cache).values()) + total_size(scan_quarantine(cache))
    budget = before * 0.6  # over the high watermark: the first pass evicts
    first = Daemon(cache, budget / 1e9, cache.parent / "first.log")
    second = None
    try:
        m = first.metrics()
        disk = _on_disk(cache)
        quarantined = list(scan_quarantine(cache))
        assert m[("lmcache_fs_budget_bytes", ())] == int(budget)
        assert m[("lmcache_fs_high_watermark_bytes", ())] == pytest.approx(int(budget) * 0.95)
        for name, (chunks, nbytes) in disk.items():
            assert m[("lmcache_fs_namespace_chunks", (("namespace", name),))] == chunks
            assert m[("lmcache_fs_namespace_bytes", (("namespace", name),))] == nbytes
        assert len({k for k in m if k[0] == "lmcache_fs_namespace_chunks"}) == 2
        assert m[("lmcache_fs_quarantined_files", ())] == len(quarantined) == 0  # removed first
        assert m[("lmcache_fs_quarantined_removed_total", ())] == 1
        left = sum(b for _, b in disk.values()) + record_bytes(cache)
        assert m[("lmcache_fs_directory_bytes", ())] == left <= 0.85 * budget
        assert m[("lmcache_fs_evicted_chunks_total", ())] == 9 - 1 - sum(c for c, _ in disk.values())
        assert m[("lmcache_fs_evicted_bytes_total", ())] > 0
        assert m[("lmcache_fs_lease_held", ())] == 1
        assert m[("lmcache_fs_lease_holder_info", (("host", os.uname().nodename),
                                                   ("pid", str(first.proc.pid))))] == 1
        assert m[("lmcache_fs_eviction_passes_total", ())] >= 1
        assert m[("lmcache_fs_stores_paused", ())] == 0
        assert requests.get(f"http://127.0.0.1:{first.port}/health", timeout=10).status_code == 200

        second = Daemon(cache, budget / 1e9, cache.parent / "second.log")  # the lease is taken: it scans as `stats` does
        m2 = second.metrics()
        assert m2[("lmcache_fs_lease_held", ())] == 0
        assert m2[("lmcache_fs_eviction_passes_total", ())] == 0
        assert m2[("lmcache_fs_lease_holder_info", (("host", os.uname().nodename),
                                                    ("pid", str(first.proc.pid))))] == 1
        for name, (chunks, nbytes) in _on_disk(cache).items():
            assert m2[("lmcache_fs_namespace_chunks", (("namespace", name),))] == chunks
        assert m2[("lmcache_fs_directory_bytes", ())] == m[("lmcache_fs_directory_bytes", ())]

        assert first.stop() == 0  # SIGTERM, as Kubernetes sends: it gives the lease up...
        deadline = time.monotonic() + 15
        while second.metrics()[("lmcache_fs_lease_held", ())] != 1:  # ...the second takes it
            assert time.monotonic() < deadline, "the second daemon never took the lease"
            time.sleep(0.2)
        m2 = second.metrics()
        assert m2[("lmcache_fs_lease_holder_info", (("host", os.uname().nodename),
                                                    ("pid", str(second.proc.pid))))] == 1
        assert not [k for k in m2 if k[0] == "lmcache_fs_lease_holder_info"
                    and ("pid", str(first.proc.pid)) in k[1]], "the old holder is still shown"
        assert second.stop() == 0
    finally:
        for daemon in (first, second):
            if daemon is not None and daemon.proc.poll() is None:
                daemon.proc.kill()
                daemon.proc.wait()


def test_metrics_port_without_daemon_is_a_usage_error(cache: Path):
    done = subprocess.run([str(SCRIPT), "gc", "--storage-path", str(cache), "--metrics-port", "0"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "add --daemon" in done.stderr


def test_health_turns_503_when_no_pass_finished_for_the_leases_lifetime(tmp_path: Path):
    now = [1000.0]
    cfg = load_config({"storage_path": str(tmp_path), "eviction_interval_s": 5})
    metrics = DirectoryMetrics(cfg, Evictor.from_config(cfg), clock=lambda: now[0])
    app = metrics.wsgi_app()

    def status() -> str:
        seen = []
        app({"PATH_INFO": "/health", "REQUEST_METHOD": "GET"}, lambda s, h: seen.append(s))
        return seen[0]

    assert status().startswith("200")  # starting up counts as fresh
    now[0] += 31  # the lease's lifetime: 3 intervals, at least 30 s
    assert status().startswith("503")
    metrics.observe(EvictionReport(ran=True))
    assert status().startswith("200")
