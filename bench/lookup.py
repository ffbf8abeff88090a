"""Lookup and index: prefix lookup of a 128k-token prompt, start-up scan, index memory.

A 128k-token prompt in 256-token chunks is 512 keys. For each directory size
(empty files, :mod:`bench.tree`) the suite times a prefix lookup through ``ChunkIndex.contains``:

- set path: the index scanned at start-up, keys answered from memory; a key
  missing from the set is still stat'ed once (another NFS client may have
  written it), then remembered as absent for ``negative_ttl_s``;
- stat path: an empty set (nothing scanned, no events), so every key is a
  stat of its expected path, as for chunks that another node just wrote;

each with all 512 keys present ("all hit") and with the first key absent
("first miss"). Beside it, LMCache 0.5.6's own lookups on 512 chunks it
stored itself. Then ``ChunkIndex.scan`` time (directory cached, and after
dropping every cache where permitted), the index's memory and watchdog's
start-up on the same tree.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from bench.common import (
    BenchOptions,
    md_table,
    median,
    progress,
    results_header,
    timed,
    write_markdown,
)
from bench.lmcache_env import ensure_lmcache
from bench.lmcache_proxy import LMCacheError, LMCacheWorker
from bench.plot import Panel, Series, grouped_bars
from bench.tree import chunk_key, ensure_tree
from lmcache_fs.storage.index import ChunkIndex
from lmcache_fs.storage.breaker import Breaker
from lmcache_fs.storage.layout import ChunkLayout, chunk_location

PROMPT_KEYS = 512  # 131,072 tokens / 256 tokens per chunk
FULL_SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (600,)
LOOKUP_GOAL_MS = 1.0
SCAN_GOAL_S = 2.0
SCAN_GOAL_FILES = 100_000
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


@dataclass(frozen=True)
class Method:
    """One way to answer "how long a prefix is on disk"."""

    name: str
    prepare: Callable[[ChunkLayout], Callable[[Sequence[str]], int]]
    fresh_per_call: bool = False
    """Prepare again before every call: one call changes the state being measured."""


def _longest_prefix(index: ChunkIndex) -> Callable[[Sequence[str]], int]:
    """How many keys are on disk from the start: the scheduler's lookup loop."""
    def lookup(keys: Sequence[str]) -> int:
        return next((i for i, key in enumerate(keys) if not index.contains(key)), len(keys))
    return lookup


def _scanned(negative_ttl_s: float) -> Callable[[ChunkLayout], Callable[[Sequence[str]], int]]:
    def prepare(layout: ChunkLayout) -> Callable[[Sequence[str]], int]:
        index = ChunkIndex(layout, negative_ttl_s=negative_ttl_s)
        index.scan()
        return _longest_prefix(index)
    return prepare


def _stat_only(layout: ChunkLayout) -> Callable[[Sequence[str]], int]:
    return _longest_prefix(ChunkIndex(layout, negative_ttl_s=0.0))


def _stat_with_deadline(layout: ChunkLayout) -> Callable[[Sequence[str]], int]:
    """The stat fallback as engines run it: each stat on a helper thread, within its deadline."""
    return _longest_prefix(ChunkIndex(layout, negative_ttl_s=0.0, breaker=_BREAKER,
                                      lookup_deadline_s=0.2))


def _bare_stats(layout: ChunkLayout) -> Callable[[Sequence[str]], int]:
    """The floor for the stat fallback: one os.stat per key on a string path, nothing else."""
    directory = str(layout.directory)

    def lookup(keys: Sequence[str]) -> int:
        for i, key in enumerate(keys):
            try:
                os.stat(chunk_location(key).under(directory))
            except OSError:
                return i
        return len(keys)
    return lookup


# A stat hit adds the key to the set, which would make the next call a set lookup.
STAT_PATH = Method("stat fallback (empty set)", _stat_only, fresh_per_call=True)
BOUNDED_STAT_PATH = Method("stat fallback within the deadline (engines)", _stat_with_deadline,
                           fresh_per_call=True)
BARE_STATS = Method("bare os.stat loop (reference)", _bare_stats)
METHODS = (
    Method("set (scanned index)", _scanned(negative_ttl_s=2.0)),
    Method("set, no negative cache (ttl 0)", _scanned(negative_ttl_s=0.0)),
    STAT_PATH,
    BOUNDED_STAT_PATH,
    BARE_STATS,
)
CASES = ("all hit", "first miss")
_BREAKER = Breaker(tempfile.gettempdir())  # a healthy directory: it only bounds each stat


def prompt(case: str) -> list[str]:
    """The 512 keys of the prompt: all present, or the first one absent."""
    keys = [chunk_key(i) for i in range(PROMPT_KEYS)]
    if case == "first miss":
        keys[0] = chunk_key(-1)  # never created
    return keys


@dataclass
class SizeResult:
    """Figures for one directory size."""

    files: int
    lookup_us: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    scan_s: list[float] = field(default_factory=list)
    cold_scan_s: float | None = None
    index_bytes: int = 0
    watch_start_s: float | None = None


def _time_lookups(layout: ChunkLayout, method: Method, keys: list[str], reps: int,
                  expect: int) -> list[float]:
    """Microseconds per prefix lookup, over ``reps`` calls."""
    lookup = method.prepare(layout)
    times = []
    for _ in range(reps):
        if method.fresh_per_call:
            lookup = method.prepare(layout)
        start = time.perf_counter()
        found = lookup(keys)
        times.append((time.perf_counter() - start) * 1e6)
        if found != expect:
            raise RuntimeError(f"{method.name}: found {found} of {len(keys)} keys, expected {expect}")
    return times


def _index_bytes(layout: ChunkLayout) -> int:
    """Memory the scanned index keeps (tracemalloc, after the scan's temporaries are freed)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        index = ChunkIndex(layout)
        index.scan()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def _cold_scan(layout: ChunkLayout) -> float | None:
    """Scan seconds with nothing cached, or None if dropping caches is not permitted.

    Directory blocks live in the block device's page cache, which no per-file
    hint reaches (and ``echo 2`` keeps), so this drops every clean cache of the
    machine: once per directory size, never in --quick runs.
    """
    os.sync()
    try:
        DROP_CACHES.write_text("3\n")
    except OSError:
        return None
    return timed(ChunkIndex(layout).scan)


def _watch_start(layout: ChunkLayout) -> float | None:
    """Seconds to start watchdog on the namespace, or None if it cannot watch here."""
    index = ChunkIndex(layout)
    start = time.perf_counter()
    if not index.start_watching():
        return None
    seconds = time.perf_counter() - start
    index.stop_watching()
    return seconds


def measure_size(files: int, opts: BenchOptions) -> SizeResult:
    """Lookups, scan time, index memory and watch start-up at one directory size."""
    layout = ensure_tree(opts.work_dir / "lookup-trees", files)
    res = SizeResult(files)
    reps = 20 if opts.quick else 200
    for r in range(opts.rounds):
        for method in METHODS[r % len(METHODS):] + METHODS[:r % len(METHODS)]:
            for case in CASES:
                expect = PROMPT_KEYS if case == "all hit" else 0
                res.lookup_us.setdefault((method.name, case), []).extend(
                    _time_lookups(layout, method, prompt(case), reps, expect))
        res.scan_s.append(timed(ChunkIndex(layout).scan))
    # Dropping the machine's caches is for measurements, not for smoke tests.
    res.cold_scan_s = None if opts.quick else _cold_scan(layout)
    res.index_bytes = _index_bytes(layout)
    res.watch_start_s = _watch_start(layout)
    progress(f"lookup {files:,} files: scan {median(res.scan_s):.2f} s, set all-hit "
             f"{median(res.lookup_us[(METHODS[0].name, 'all hit')]):.0f} us")
    return res


LMCACHE_PATHS = {"local_disk": "LMCache LocalDiskBackend.contains",
                 "fs_connector": "LMCache FSConnector.exists (fs://)",
                 "native": "LMCache native client submit_batch_exists"}


def measure_lmcache(worker: LMCacheWorker, opts: BenchOptions) -> dict[tuple[str, str], list[float]]:
    """LMCache's prefix lookups over 512 small chunks each path stored itself (microseconds)."""
    scratch = opts.work_dir / "lookup-lmcache"
    count = 8 if opts.quick else PROMPT_KEYS
    worker.call("case", shape=[1, 2, 16, 1, 8], count=count, seed=0, dir=str(scratch / "cpu"))
    hashes = {"all hit": list(range(1, count + 1)), "first miss": [10**9] + list(range(1, count))}
    out: dict[tuple[str, str], list[float]] = {}
    for path, name in LMCACHE_PATHS.items():
        worker.call("open", path=path, dir=str(scratch / path))
        worker.call("store")
        for case, keys in hashes.items():
            reply = worker.call("lookup", hashes=keys, repeats=5 if opts.quick else 30)
            expect = count if case == "all hit" else 0
            if reply["found"] != expect:
                raise LMCacheError(f"{name} found {reply['found']} of {count}, expected {expect}")
            out[(name, case)] = [s * 1e6 for s in reply["seconds"]]
        worker.call("close")
    shutil.rmtree(scratch, ignore_errors=True)
    return out


def _fmt_us(values: list[float]) -> str:
    if not values:
        return "-"
    m = median(values)
    if m >= 1000:
        return f"{m / 1000:.2f} ms"
    return f"{m:.1f} us" if m < 10 else f"{m:.0f} us"


def _cold_cell(seconds: float | None, quick: bool) -> str:
    if seconds is not None:
        return f"{seconds:.3f} s"
    return "not run (--quick)" if quick else "not permitted here"


def _report(results: list[SizeResult], peers: dict[tuple[str, str], list[float]],
            opts: BenchOptions, lmcache_note: str) -> list[str]:
    lines = results_header("Lookup and index: lmcache-fs ChunkIndex beside LMCache 0.5.6", opts,
                           [f"- LMCache: {lmcache_note}"])
    lines += [
        f"A prompt of {PROMPT_KEYS * 256:,} tokens is {PROMPT_KEYS} chunk keys (256 tokens each). "
        "Directories hold that many empty files named as the layout names chunks (the index "
        "reads names only), in 256 fan-out directories. Cells are medians over "
        f"{opts.rounds} rounds x {'20' if opts.quick else '200'} calls, methods interleaved.", ""]
    headers = ["files", *(f"{m.name}: {c}" for m in METHODS for c in CASES)]
    rows = [[f"{r.files:,}", *(_fmt_us(r.lookup_us.get((m.name, c), [])) for m in METHODS for c in CASES)]
            for r in results]
    lines += ["## Prefix lookup of 512 keys through `ChunkIndex.contains`", "", *md_table(headers, rows)]
    lines += ["A first miss on the set path still stats the absent key once (another node may "
              "have written it); the negative cache then answers repeats for 2 s, which is what "
              "a scheduler asking every step sees. `ttl 0` shows the cost without it.", ""]
    if peers:
        lines += ["## LMCache 0.5.6 lookups of 512 keys (512 chunks it stored itself)", "",
                  *md_table(["path", *CASES],
                            [[name, *(_fmt_us(peers.get((name, c), [])) for c in CASES)]
                             for name in LMCACHE_PATHS.values()]),
                  "LocalDiskBackend answers from an in-memory dict that it fills only with its own "
                  "writes (it never rescans, so a restarted or second instance sees nothing); the "
                  "fs:// connector stats one key per await; the native client stats a batch on "
                  "its worker threads. None of these depends on the number of files.", ""]
    lines += ["## Start-up scan and index memory", "",
              *md_table(["files", "ChunkIndex.scan (directory cached)", "scan after `sync; echo 3 > drop_caches`",
                         "index memory (tracemalloc)", "bytes per key", "watchdog start_watching"],
                        [[f"{r.files:,}", f"{median(r.scan_s):.3f} s",
                          _cold_cell(r.cold_scan_s, opts.quick),
                          f"{r.index_bytes / 2**20:.1f} MiB", f"{r.index_bytes / r.files:.0f}",
                          f"{r.watch_start_s:.3f} s" if r.watch_start_s is not None else "unavailable"]
                         for r in results])]
    lines += ["## Goals", "", *_goal_lines(results)]
    return lines


def _goal_lines(results: list[SizeResult]) -> list[str]:
    lines = []
    biggest = max(results, key=lambda r: r.files)
    for case in CASES:
        values = biggest.lookup_us[(METHODS[0].name, case)]
        met = median(values) / 1000 < LOOKUP_GOAL_MS
        lines.append(f"- Lookup of {PROMPT_KEYS} keys at {biggest.files:,} files, set path, {case}: "
                     f"{_fmt_us(values)} ({'met' if met else 'MISSED'}, goal < {LOOKUP_GOAL_MS:g} ms)")
    def all_hit(method: Method) -> str:
        return _fmt_us(biggest.lookup_us[(method.name, "all hit")])

    lines.append(f"- The stat fallback (nothing in the set) takes {all_hit(STAT_PATH)} for "
                 f"{PROMPT_KEYS} hits against {all_hit(BARE_STATS)} for the bare stats (the rest "
                 "is ChunkIndex's own work per key). It is the path for chunks that another NFS "
                 "client wrote and no event reported, so it is not held to the 1 ms goal; on NFS "
                 "each stat is a round trip.")
    lines.append(f"- As engines run it, each stat on a helper thread within the lookup deadline "
                 f"(so a hung mount cannot hold the scheduler), it takes "
                 f"{all_hit(BOUNDED_STAT_PATH)}: the hand-off to the thread, per key, is the "
                 "difference. A hit joins the set, so a prompt pays it once.")
    at = [r for r in results if r.files == SCAN_GOAL_FILES]
    if at:
        s = median(at[0].scan_s)
        cold = f", {at[0].cold_scan_s:.2f} s with all caches dropped" if at[0].cold_scan_s else ""
        lines.append(f"- Start-up scan of {SCAN_GOAL_FILES:,} files: {s:.2f} s{cold} "
                     f"({'met' if max(s, at[0].cold_scan_s or 0) < SCAN_GOAL_S else 'MISSED'}, "
                     f"goal < {SCAN_GOAL_S:g} s)")
    return lines + [""]


def _plot(results: list[SizeResult], peers: dict[tuple[str, str], list[float]],
          path: Path) -> Path | None:
    sizes = [f"{r.files:,} files" for r in results]

    def series(name: str, values: list[list[float]]) -> Series:
        # Error bars from the 10th to the 90th percentile: over hundreds of
        # microsecond calls, min-max only shows the rare preemption.
        ms = [sorted(v / 1000 for v in vs) or [float("nan")] for vs in values]
        return Series(name, [statistics.median(v) for v in ms], [v[len(v) // 10] for v in ms],
                      [v[(len(v) * 9) // 10] for v in ms])

    panels = []
    for case in CASES:
        rows = [series(m.name, [r.lookup_us.get((m.name, case), []) for r in results]) for m in METHODS]
        rows += [series(name, [peers.get((name, case), [])] * len(results))
                 for name in LMCACHE_PATHS.values() if (name, case) in peers]
        panels.append(Panel(f"512-key prefix lookup, {case}", sizes, rows))
    panels.append(Panel("ChunkIndex.scan at start-up", sizes,
                        [series("scan (directory cached)", [[s * 1e6 for s in r.scan_s] for r in results])]))
    return grouped_bars(path, "Lookup and index (median, 10th-90th percentile; ms, log scale). "
                        "LMCache's figures do not depend on the file count", panels, "ms", log_y=True)


def run(opts: BenchOptions) -> list[Path]:
    """Measure every directory size; write lookup.md and lookup.png."""
    results = [measure_size(n, opts) for n in (QUICK_SIZES if opts.quick else FULL_SIZES)]
    peers: dict[tuple[str, str], list[float]] = {}
    note = "not measured (--no-lmcache)"
    if opts.lmcache:
        python, why = ensure_lmcache()
        note = f"skipped: {why}"
        if python is not None:
            try:
                with LMCacheWorker(python, opts.work_dir / "lmcache-lookup.log") as worker:
                    peers = measure_lmcache(worker, opts)
                    note = f"LMCache {worker.versions['lmcache']}, its own venv"
            except LMCacheError as exc:
                note = f"failed: {exc}"
    written = [write_markdown(opts.results_dir / "lookup.md", _report(results, peers, opts, note))]
    png = _plot(results, peers, opts.results_dir / "lookup.png")
    return written + ([png] if png else [])
