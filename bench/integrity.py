"""What ``integrity_key_file`` costs: the connector's load paths with and without a key.

The same chunk bytes as the storage suite (:mod:`bench.storage`: its cases and
trials) go through:

- raw single-threaded pwrite/preadv, the ceiling;
- the connector's CPU path (the LayerwiseReader, one thread) without a key
  (xxh3), with a key (AES-256-GMAC under a key per file, what keyed engines
  write), and with a key over files written by the release before
  (HMAC-SHA256, which readers still accept);
- whole-chunk loads (``ChunkStore.load``, one thread; the CUDA path's host
  check) without and with a key.

The figure that matters is a keyed path's speed over the same path's without
a key. This 2-core VM is shared and its speed changes within seconds, so the
paths are interleaved phase by phase rather than trial by trial: each round
stores every path into a directory of its own, then loads them all warm in
turn, several sweeps, then cold in turn, and a keyed path is compared with its
unkeyed twin of the same round. Beside them each round times the check alone
over the same bytes, in the pieces the layer-wise reader feeds (one page):
xxh3, AES-256-GMAC (its per-file key derived for every chunk) and
HMAC-SHA256, in wall time and in CPU time, and over one page in the CPU's
cache, where a page the layer-wise reader has just copied is.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import xxhash

from bench import chunkdata, pagecache
from bench.common import (
    BenchOptions,
    md_table,
    median,
    progress,
    results_header,
    timed,
    write_markdown,
)
from bench.storage import (
    BASELINE,
    BENCH_MAC_KEY,
    BLOCK_TOKENS,
    QUICK_CASES,
    SEED,
    Case,
    CaseResult,
    ChunkStoreTrial,
    LayerwiseTrial,
    RawTrial,
    Trial,
    fresh_directory,
)
from lmcache_fs.storage import mac
from lmcache_fs.storage.codec import byte_view, write_chunk_file

LAYERWISE = "LayerwiseReader, 1 thread (connector's CPU path), no key"
LAYERWISE_GMAC = "LayerwiseReader, with integrity_key_file (AES-256-GMAC)"
LAYERWISE_HMAC = "LayerwiseReader, with the key, over files written before (HMAC-SHA256)"
WHOLE = "ChunkStore.load, 1 thread (whole chunks), no key"
WHOLE_GMAC = "ChunkStore.load, with integrity_key_file (AES-256-GMAC)"
KEYED_PAIRS = {LAYERWISE_GMAC: LAYERWISE, LAYERWISE_HMAC: LAYERWISE, WHOLE_GMAC: WHOLE}
"""Each keyed path and the same path without a key, which its ratios are taken to."""
NOT_STORED_BY_THE_CONNECTOR = {LAYERWISE_HMAC}  # written in place by this suite: no store figure
PHASES = {"store": "store GB/s", "warm load": "warm load GB/s",
          "warm load CPU": "warm load GB per CPU-second", "cold load": "cold load GB/s"}
"""Phases, as their columns are headed: CPU time is what a CPU engine's forward pass loses to a
load (its cores are the same), and it holds still where wall time does not on this shared VM."""
WARM_SWEEPS = 3  # warm loads of every path per round, in turn; each path's fastest counts
GOAL_OF_UNKEYED = 0.7
# The storage suite's chunk sizes, 256 MiB a pass: the six paths' files stay in the page
# cache side by side (6 x 1 GiB did not, on this VM shared with others' engines).
CASES = (Case("2 MiB", layers=2, count=128), Case("32 MiB", layers=32, count=8))


class OlderKeyedFilesTrial(LayerwiseTrial):
    """The connector's CPU path with a key, over chunk files as keyed engines of the release
    before wrote them (HMAC-SHA256): what a directory holds on the day it upgrades."""

    def store(self) -> float:
        layout, key = self.store_.layout, self.store_.mac_key

        def write_all() -> None:
            for i, chunk_key in enumerate(self.keys):
                path = layout.chunk_path(chunk_key)
                path.parent.mkdir(exist_ok=True)
                write_chunk_file(path, self.chunks[i],
                                 {**self.meta[i], **self.store_.identity(chunk_key)},
                                 key, mac.HMAC_SHA256)
        return timed(write_all)


def _competitors(case: Case, chunks: list[torch.Tensor]) -> dict[str, Callable[[Path], Trial]]:
    tokens = case.tokens
    return {
        BASELINE: lambda d: RawTrial(chunks, d, 1),
        LAYERWISE: lambda d: LayerwiseTrial(chunks, d, tokens),
        LAYERWISE_GMAC: lambda d: LayerwiseTrial(chunks, d, tokens, BENCH_MAC_KEY),
        LAYERWISE_HMAC: lambda d: OlderKeyedFilesTrial(chunks, d, tokens, BENCH_MAC_KEY),
        WHOLE: lambda d: ChunkStoreTrial(chunks, d, 1, tokens),
        WHOLE_GMAC: lambda d: ChunkStoreTrial(chunks, d, 1, tokens, BENCH_MAC_KEY),
    }


@dataclass(frozen=True)
class Check:
    """A data check timed alone: a fresh hasher per chunk, fed page by page."""

    label: str
    new: Callable[[], mac.Mac]


CHECKS = (
    Check("xxh3-64 (no key)", xxhash.xxh3_64),
    # A fresh field per chunk: its salt, key derivation and AES key schedule are timed too.
    Check("AES-256-GMAC, a key per file (what keyed engines write)",
          lambda: mac.MacField.fresh(mac.GMAC_AES256).new_mac(BENCH_MAC_KEY)),
    Check("HMAC-SHA256 (files written before)",
          lambda: mac.MacField.fresh(mac.HMAC_SHA256).new_mac(BENCH_MAC_KEY)),
)


@dataclass
class CheckTimes:
    """Per check, over rounds: GB/s of wall time and GB per second of CPU time (all threads),
    and GB per CPU-second over a page in the CPU's cache."""

    wall_gbps: dict[str, list[float]] = field(default_factory=dict)
    cpu_gbps: dict[str, list[float]] = field(default_factory=dict)
    cached_cpu_gbps: dict[str, list[float]] = field(default_factory=dict)


def _hash_pages(check: Check, pages_per_chunk: list[list[memoryview]]) -> tuple[float, float]:
    """Wall and CPU seconds of ``check`` over each chunk's pages, a fresh hasher per chunk."""
    wall, cpu = time.perf_counter(), time.process_time()
    for pages in pages_per_chunk:
        hasher = check.new()
        for page in pages:
            hasher.update(page)
        hasher.hexdigest()
    return time.perf_counter() - wall, time.process_time() - cpu


def _time_checks(chunks: list[torch.Tensor], page_bytes: int, times: CheckTimes) -> None:
    """Each check alone over every chunk, fed in ``page_bytes`` pieces, in wall and CPU time;
    then over one page fed as often, which stays in the CPU's cache as a page the layer-wise
    reader has just copied does (xxh3 runs faster there, a MAC's arithmetic does not)."""
    views = [byte_view(c) for c in chunks]
    nbytes = sum(len(v) for v in views)
    pages = [[v[at:at + page_bytes] for at in range(0, len(v), page_bytes)] for v in views]
    cached = [[views[0][:page_bytes]] * len(p) for p in pages]
    for check in CHECKS:
        wall, cpu = _hash_pages(check, pages)
        times.wall_gbps.setdefault(check.label, []).append(nbytes / wall / 1e9)
        times.cpu_gbps.setdefault(check.label, []).append(nbytes / max(cpu, 1e-9) / 1e9)
        cpu = _hash_pages(check, cached)[1]
        times.cached_cpu_gbps.setdefault(check.label, []).append(nbytes / max(cpu, 1e-9) / 1e9)


def keyed_ratios(res: CaseResult, phase: str) -> dict[str, list[float]]:
    """Per keyed path, its per-round GB/s over the unkeyed same path's in ``phase``."""
    out = {}
    for keyed, plain in KEYED_PAIRS.items():
        ours, base = res.gbps.get(keyed, {}).get(phase, []), res.gbps.get(plain, {}).get(phase, [])
        out[keyed] = [a / b for a, b in zip(ours, base)]
    return out


def _load(trial: Trial) -> tuple[float, float]:
    """Wall and CPU seconds (all threads) of one load of every chunk, then its bytes checked."""
    cpu = time.process_time()
    seconds = trial.load()
    cpu = time.process_time() - cpu
    if seconds is None:
        raise RuntimeError("a path of this suite stores without loading")
    trial.check()
    return seconds, cpu


def _round(comps: dict[str, Callable[[Path], Trial]], order: list[str], case: Case,
           scratch: Path) -> dict[str, dict[str, float]]:
    """One round: every path stored, loaded warm in turn (the best of the sweeps), then cold
    in turn; GB/s per path and phase. Removes the files."""
    nbytes = case.total_bytes
    dirs = {name: scratch / f"path-{i}" for i, name in enumerate(comps)}
    trials: dict[str, Trial] = {}
    figures: dict[str, dict[str, float]] = {name: {} for name in order}
    try:
        for name in order:
            pagecache.back_free_memory(nbytes + nbytes // 4)
            trials[name] = comps[name](fresh_directory(dirs[name]))
            figures[name]["store"] = nbytes / trials[name].store() / 1e9
        pagecache.write_back(pagecache.files_under(scratch))  # no write-back during the loads
        warm = {name: [_load(trials[name]) for _ in range(WARM_SWEEPS)] for name in order}
        for name in order:
            figures[name]["warm load"] = nbytes / min(w for w, _ in warm[name]) / 1e9
            figures[name]["warm load CPU"] = nbytes / min(c for _, c in warm[name]) / 1e9
        for name in order:
            pagecache.evict(pagecache.files_under(dirs[name]))
            pagecache.back_free_memory(nbytes + nbytes // 4)
            figures[name]["cold load"] = nbytes / _load(trials[name])[0] / 1e9
    finally:
        for trial in trials.values():
            trial.close()
        shutil.rmtree(scratch, ignore_errors=True)
        os.sync()  # finish the deletion's journal before the next round's stores
    return figures


def measure_case(case: Case, opts: BenchOptions) -> tuple[CaseResult, CheckTimes]:
    """Every path on one chunk size over ``opts.rounds`` rounds, and the checks alone."""
    result, times = CaseResult(case), CheckTimes()
    chunks = chunkdata.make_chunks(case.shape, case.count, SEED)
    page_bytes = case.chunk_bytes // case.layers // (case.tokens // min(BLOCK_TOKENS, case.tokens))
    comps = _competitors(case, chunks)
    names = list(comps)
    for r in range(opts.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        figures = _round(comps, order, case, opts.work_dir / "integrity")
        result.add_round(figures)
        _time_checks(chunks, page_bytes, times)
        progress(f"integrity {case.label} round {r + 1}/{opts.rounds}: warm keyed/unkeyed "
                 + ", ".join(f"{figures[k]['warm load'] / figures[p]['warm load']:.0%}"
                             for k, p in KEYED_PAIRS.items()))
    return result, times


def _cell(values: list[float], fmt: str = "{:.2f}") -> str:
    if not values:
        return "-"
    return f"{fmt.format(median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def _case_lines(res: CaseResult, times: CheckTimes) -> list[str]:
    ratios = {phase: keyed_ratios(res, phase) for phase in PHASES}
    rows = []
    for name, phases in res.gbps.items():
        shown = [p for p in PHASES if not (p == "store" and name in NOT_STORED_BY_THE_CONNECTOR)]
        rows.append([name, *(_cell(phases.get(p, [])) if p in shown else "-" for p in PHASES),
                     *(_cell(ratios[p].get(name, []), "{:.0%}") if p in shown else "-"
                       for p in PHASES)])
    lines = md_table(["path", *PHASES.values(), *(f"{p}, keyed / no key" for p in PHASES)], rows)
    warm = median(ratios["warm load"][LAYERWISE_GMAC])
    cpu = median(ratios["warm load CPU"][LAYERWISE_GMAC])
    lines += [f"Goal: warm loads with a key on the connector's CPU path at {GOAL_OF_UNKEYED:.0%} or "
              f"more of the speed without one: {warm:.0%} "
              f"({'met' if warm >= GOAL_OF_UNKEYED else 'MISSED'}); in CPU time, {cpu:.0%}.", ""]
    lines += ["Each check alone over the same bytes, one page at a time (GB/s of wall time; GB per "
              "second of CPU time, all threads), and over one page fed as often, which stays in "
              "the CPU's cache as a page the layer-wise reader has just copied does:", ""]
    lines += md_table(["check", "GB/s", "GB per CPU-second", "GB per CPU-second, page in cache"],
                      [[label, _cell(times.wall_gbps[label]), _cell(times.cpu_gbps[label]),
                        _cell(times.cached_cpu_gbps[label])] for label in times.wall_gbps])
    return lines


def _report(results: list[tuple[CaseResult, CheckTimes]], opts: BenchOptions) -> list[str]:
    lines = results_header("Keyed and unkeyed loads: what integrity_key_file costs", opts)
    lines += [
        "The same bytes as the storage suite (bf16 KV chunks of 256 tokens, 8 KV heads x 128), "
        "each path in a directory of its own. GB/s are decimal; cells are the median over "
        f"{opts.rounds} rounds with (min-max). A round stores every path once (in an order "
        "rotated each round), writes the files back, loads every path warm in turn "
        f"{WARM_SWEEPS} times (each path's fastest counts), then evicts and loads each path "
        "cold in turn, so a keyed path and its unkeyed twin run seconds apart. `keyed / no "
        "key` is, per round, a keyed path's GB/s over the same path's without a key, then the "
        "median. Without a key every load hashes its data with xxh3-64; with one it computes "
        "the MAC instead, which covers the data and the header (xxh3 checksum included). Files "
        "written by the release before carry HMAC-SHA256; this suite writes them in place (no "
        "store figure) and loads them as an upgraded engine does.", ""]
    for res, times in results:
        case = res.case
        lines += [f"## {case.label} chunks x {case.count} ({case.total_bytes / 2**20:g} MiB per pass)",
                  "", *_case_lines(res, times)]
    return lines


def run(opts: BenchOptions) -> list[Path]:
    """Measure every case; write integrity.md. Returns the files written."""
    try:
        results = [measure_case(case, opts) for case in (QUICK_CASES if opts.quick else CASES)]
    finally:
        shutil.rmtree(opts.work_dir / "integrity", ignore_errors=True)
    return [write_markdown(opts.results_dir / "integrity.md", _report(results, opts))]
