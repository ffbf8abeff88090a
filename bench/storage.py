"""Storage throughput: lmcache-fs's real store and load paths against raw I/O and LMCache.

Every competitor writes the same chunk bytes (:mod:`bench.chunkdata`) into a
fresh directory on the same filesystem, then loads them back twice:

- store: all chunks written to the page cache, as every path here does (none
  of them fsyncs);
- store + fsync: the same plus an fsync of every file (done the same way for
  all paths), what a store costs where close() flushes, as on NFS; it also
  keeps writeback out of the loads;
- warm load: straight after the store, from the page cache;
- cold load: after evicting every file (:mod:`bench.pagecache`).

Competitors run interleaved within each round, in a rotated order, and the
figures reported are medians over rounds, with per-round ratios to raw
single-threaded pwrite/preadv (the fairest baseline for lmcache-fs, whose
connector stores and loads one chunk at a time).
"""

from __future__ import annotations

import cProfile
import hashlib
import io
import math
import os
import pstats
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch

from bench import chunkdata, pagecache
from bench.common import (
    BenchOptions,
    md_table,
    median,
    progress,
    results_header,
    spread,
    timed,
    write_markdown,
)
from bench.lmcache_env import ensure_lmcache
from bench.lmcache_proxy import LMCacheError, LMCacheWorker
from bench.plot import Panel, Series, grouped_bars
from lmcache_fs.config import LMCacheFSConfig
from lmcache_fs.storage.codec import checksum
from lmcache_fs.storage.layout import ChunkLayout, Namespace
from lmcache_fs.storage.manifest import write_manifest
from lmcache_fs.storage.store import ChunkStore
from lmcache_fs.storage.writer import BackgroundWriter
from lmcache_fs.transfer.chunk_reader import ChunkReader
from lmcache_fs.transfer.layer_reader import LayerLoadJob, LayerwiseReader
from lmcache_fs.transfer.read_paths import ReadBackend, ReadPath

PHASES = ("store", "store + fsync", "warm load", "cold load")
BASELINE = "raw pwrite/preadv, 1 thread"
CONNECTOR_PATH = "lmcache-fs LayerwiseReader, 1 thread (connector's CPU path)"
CONNECTOR_PATH_MAC = "the same, with integrity_key_file (AES-256-GMAC)"
BENCH_MAC_KEY = bytes(range(32))
BLOCK_TOKENS = 128  # vLLM's CPU block size: a chunk of 256 tokens is 2 pages per layer
LMCACHE_PATHS = {"local_disk": "LMCache LocalDiskBackend (4 threads)",
                 "fs_connector": "LMCache fs:// FSConnector (asyncio)",
                 "native": "LMCache native fs client (4 workers)"}
SEED = 1234
GOAL_OF_RAW = 0.9


@dataclass(frozen=True)
class Case:
    """A chunk size: ``count`` chunks of ``layers`` layers of one 256-token KV chunk."""

    label: str
    layers: int
    count: int
    tokens: int = chunkdata.TOKENS

    @property
    def shape(self) -> tuple[int, ...]:
        return chunkdata.chunk_shape(self.layers, self.tokens)

    @property
    def chunk_bytes(self) -> int:
        return math.prod(self.shape) * chunkdata.DTYPE.itemsize

    @property
    def total_bytes(self) -> int:
        return self.chunk_bytes * self.count


# 1 GiB per size: larger than any CPU cache, small enough for 2 cores and shared RAM.
FULL_CASES = (Case("2 MiB", layers=2, count=512), Case("32 MiB", layers=32, count=32))
QUICK_CASES = (Case("64 KiB", layers=1, count=4, tokens=16),)


class Trial(Protocol):
    """One competitor on one fresh directory: timed store and load, untimed check."""

    def store(self) -> float:
        """Write every chunk; returns seconds."""

    def load(self) -> float | None:
        """Read every chunk back; seconds, or None if this competitor only stores."""

    def check(self) -> None:
        """Raise unless the last load returned the right bytes (untimed)."""

    def close(self) -> None:
        """Release buffers and handles (files are removed by the caller)."""


def _flat_bytes(t: torch.Tensor) -> memoryview:
    """A flat byte view of a contiguous CPU tensor (no copy)."""
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


def _slices(count: int, threads: int) -> list[range]:
    step = -(-count // threads)
    return [range(s, min(s + step, count)) for s in range(0, count, step)]


def _in_threads(count: int, threads: int, work: Callable[[int, range], None]) -> None:
    """Run ``work(slot, indices)`` over ``threads`` contiguous slices of ``range(count)``."""
    if threads == 1:
        work(0, range(count))
        return
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(threads), _slices(count, threads)))


class _LocalTrial:
    """Shared set-up of the in-process competitors: sources, read buffers, the check."""

    def __init__(self, chunks: list[torch.Tensor], threads: int):
        self.chunks = chunks
        self.threads = threads
        # One reusable read buffer per thread, as the connector reuses its staging
        # buffer; touched now so that page faults do not land inside a timing.
        self.outs = [torch.zeros_like(chunks[0]) for _ in range(threads)]

    def check(self) -> None:
        """Raise unless thread slot 0's buffer holds the last chunk of its slice."""
        last = _slices(len(self.chunks), self.threads)[0][-1]
        if not torch.equal(self.outs[0].view(torch.uint8), self.chunks[last].view(torch.uint8)):
            raise RuntimeError(f"chunk {last} did not load back intact")

    def close(self) -> None:
        self.outs = []


class RawTrial(_LocalTrial):
    """The ceiling: one pwrite and one preadv per file, nothing else."""

    def __init__(self, chunks: list[torch.Tensor], directory: Path, threads: int):
        super().__init__(chunks, threads)
        directory.mkdir(parents=True, exist_ok=True)
        self.paths = [str(directory / f"chunk-{i:06d}.bin") for i in range(len(chunks))]

    def store(self) -> float:
        def write(_slot: int, indices: range) -> None:
            for i in indices:
                view = _flat_bytes(self.chunks[i])
                fd = os.open(self.paths[i], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    done = 0
                    while done < len(view):
                        done += os.pwrite(fd, view[done:], done)
                finally:
                    os.close(fd)
        return timed(lambda: _in_threads(len(self.chunks), self.threads, write))

    def load(self) -> float:
        def read(slot: int, indices: range) -> None:
            view = _flat_bytes(self.outs[slot])
            for i in indices:
                fd = os.open(self.paths[i], os.O_RDONLY)
                try:
                    if os.preadv(fd, [view], 0) != len(view):
                        raise RuntimeError(f"short read of {self.paths[i]}")
                finally:
                    os.close(fd)
        return timed(lambda: _in_threads(len(self.chunks), self.threads, read))


def _chunk_keys(count: int) -> list[str]:
    """sha256-like hex keys, as vLLM's block hashes are."""
    return [hashlib.sha256(f"bench-chunk-{i}".encode()).hexdigest() for i in range(count)]


def _metadata(i: int, keys: list[str], tokens: int) -> dict[str, str]:
    """The metadata the connector writes with each chunk."""
    return {"parent_key": keys[i - 1] if i else "", "chunk_index": str(i), "num_tokens": str(tokens)}


class ChunkStoreTrial(_LocalTrial):
    """lmcache-fs's real paths: ChunkStore.save -> publish, ChunkStore.load -> reading (open, read_checked, finish)."""

    def __init__(self, chunks: list[torch.Tensor], directory: Path, threads: int, tokens: int,
                 mac_key: bytes | None = None):
        super().__init__(chunks, threads)
        layout = ChunkLayout(directory, Namespace({"model": "bench/storage", "tokens": tokens}))
        write_manifest(layout)
        self.store_ = ChunkStore(layout, mac_key=mac_key)
        self.keys = _chunk_keys(len(chunks))
        self.meta = [_metadata(i, self.keys, tokens) for i in range(len(chunks))]

    def store(self) -> float:
        def save(_slot: int, indices: range) -> None:
            for i in indices:
                if not self.store_.save(self.keys[i], self.chunks[i], self.meta[i]):
                    raise RuntimeError(f"chunk {i} already existed in a fresh directory")
        return timed(lambda: _in_threads(len(self.chunks), self.threads, save))

    def load(self) -> float:
        def load(slot: int, indices: range) -> None:
            for i in indices:
                self.store_.load(self.keys[i], self.outs[slot])
        return timed(lambda: _in_threads(len(self.chunks), self.threads, load))


class LayerwiseTrial(ChunkStoreTrial):
    """The connector's CPU load path: every chunk of the pass in one step, read layer by
    layer straight into the pages of a vLLM-like paged cache (1 thread, as an engine
    bound to one core runs it)."""

    CACHED_CHUNKS = 16  # chunk i lands in the pages of slot i % 16: a cache, not a copy of the pass

    def __init__(self, chunks: list[torch.Tensor], directory: Path, tokens: int,
                 mac_key: bytes | None = None):
        layers, per_chunk = chunks[0].shape[0], tokens // min(BLOCK_TOKENS, tokens)
        # The same bytes, shaped as the connector stores them: [layers, blocks, page].
        super().__init__([c.view(layers, per_chunk, -1) for c in chunks], directory, 1, tokens,
                         mac_key)
        page = self.chunks[0].shape[2]
        self.outs = []
        self.cache = [torch.zeros(self.CACHED_CHUNKS * per_chunk, page, dtype=chunks[0].dtype)
                      for _ in range(layers)]
        self.reader = LayerwiseReader(self.store_, self.cache, per_chunk, threads=1,
                                      staging_bytes=LMCacheFSConfig.staging_buffer_mb << 20)
        self.jobs = [LayerLoadJob(key, 0, [(i % self.CACHED_CHUNKS) * per_chunk + b
                                           for b in range(per_chunk)])
                     for i, key in enumerate(self.keys)]

    def load(self) -> float:
        def load_all() -> None:
            errors = [e for e in self.reader.start(self.jobs).finish() if e is not None]
            if errors:
                raise RuntimeError(f"{len(errors)} chunks failed to load: {errors[0]}")
        return timed(load_all)

    def check(self) -> None:
        last = len(self.chunks) - 1
        blocks = self.jobs[last].block_ids
        for layer, kv in enumerate(self.cache):
            if not torch.equal(kv[blocks].view(torch.uint8), self.chunks[last][layer].view(torch.uint8)):
                raise RuntimeError(f"chunk {last} layer {layer} did not load back intact")

    def close(self) -> None:
        self.reader.close()
        self.cache = []


class WholeChunkTrial(ChunkStoreTrial):
    """The connector's whole-chunk path (CUDA's, here on the CPU with POSIX reads):
    ChunkReader with 16 chunks in flight, each verified."""

    IN_FLIGHT = 16

    def __init__(self, chunks: list[torch.Tensor], directory: Path, tokens: int):
        super().__init__(chunks, directory, 1, tokens)
        self.reader = ChunkReader(self.store_, chunks[0].shape, chunks[0].dtype, "cpu",
                                  ReadBackend(ReadPath.POSIX),
                                  staging_bytes=self.IN_FLIGHT * chunks[0].numel()
                                  * chunks[0].element_size(), verify=True)

    def load(self) -> float:
        def load_all() -> None:
            for i, chunk in self.reader.read(self.keys):
                if isinstance(chunk, Exception):
                    raise RuntimeError(f"chunk {i} failed to load: {chunk}")
                if i == len(self.keys) - 1:
                    self.outs[0].copy_(chunk)  # what check() compares (one chunk, untimed cost)
        return timed(load_all)

    def check(self) -> None:
        if not torch.equal(self.outs[0].view(torch.uint8), self.chunks[-1].view(torch.uint8)):
            raise RuntimeError("the last chunk did not load back intact")

    def close(self) -> None:
        self.reader.close()
        super().close()


class WriterTrial(ChunkStoreTrial):
    """The BackgroundWriter the connector stores through: submit all, then flush."""

    def __init__(self, chunks: list[torch.Tensor], directory: Path, tokens: int):
        super().__init__(chunks, directory, 1, tokens)

    def store(self) -> float:
        writer = BackgroundWriter(self.store_, max_queue=len(self.chunks))

        def submit_and_flush() -> None:
            for i, chunk in enumerate(self.chunks):
                writer.submit(self.keys[i], chunk, self.meta[i])
            writer.flush()
        try:
            seconds = timed(submit_and_flush)
        finally:
            writer.close()
        if writer.stats.published != len(self.chunks):
            raise RuntimeError(f"the writer published {writer.stats.published} of "
                               f"{len(self.chunks)} chunks ({writer.stats})")
        return seconds

    def load(self) -> None:
        return None  # loads do not go through the writer


class LMCacheTrial:
    """One of LMCache's paths in the worker process (it times its own calls)."""

    def __init__(self, worker: LMCacheWorker, path: str, directory: Path):
        self.worker = worker
        worker.call("open", path=path, dir=str(directory))

    def store(self) -> float:
        return self.worker.call("store")["seconds"]

    def load(self) -> float:
        return self.worker.call("load")["seconds"]

    def check(self) -> None:
        return None  # the worker checks the bytes itself, after its timing

    def close(self) -> None:
        self.worker.call("close")


@dataclass
class CaseResult:
    """GB/s per competitor and phase over rounds, and the per-round ratios to raw."""

    case: Case
    gbps: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    ratio: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    resident_after_evict: list[float] = field(default_factory=list)
    checksum_gbps: list[float] = field(default_factory=list)
    profiles: dict[str, str] = field(default_factory=dict)

    def add_round(self, figures: dict[str, dict[str, float]]) -> None:
        base = figures.get(BASELINE, {})
        for name, phases in figures.items():
            for phase, value in phases.items():
                self.gbps.setdefault(name, {}).setdefault(phase, []).append(value)
                if phase in base:
                    self.ratio.setdefault(name, {}).setdefault(phase, []).append(value / base[phase])


def fresh_directory(directory: Path) -> Path:
    """``directory``, emptied (created if missing)."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return directory


STORE_ATTEMPTS = 2


def _store_once(make: Callable[[Path], Trial], directory: Path,
                nbytes: int) -> tuple[Trial, float, float]:
    """A fresh trial in a fresh directory, timed store and then timed fsync of every file."""
    trial = make(fresh_directory(directory))
    try:
        pagecache.back_free_memory(nbytes + nbytes // 4)
        store_s = trial.store()
        # On NFS close() flushes, so "stored" means on the server: time the write-back too.
        files = pagecache.files_under(directory)
        return trial, store_s, timed(lambda: pagecache.write_back(files))
    except BaseException:
        trial.close()
        raise


def run_trial(make: Callable[[Path], Trial], directory: Path, nbytes: int,
              result: CaseResult) -> dict[str, float]:
    """Store (best of two), warm load, evict, cold load; GB/s per phase. Removes the files.

    Each store goes to a fresh directory through a fresh trial, and the faster
    one counts: identical store loops on this VM varied 0.4-4.7 GB/s with the
    state of guest memory, and the first store after a change often pays it.
    """
    stores = []
    for attempt in range(STORE_ATTEMPTS):
        trial, store_s, flush_s = _store_once(make, directory, nbytes)
        stores.append((store_s, flush_s))
        if attempt < STORE_ATTEMPTS - 1:
            trial.close()
    figures = {"store": nbytes / min(s for s, _ in stores) / 1e9,
               "store + fsync": nbytes / min(s + f for s, f in stores) / 1e9}
    try:
        warm = trial.load()
        if warm is not None:
            trial.check()
            figures["warm load"] = nbytes / warm / 1e9
            files = pagecache.files_under(directory)
            pagecache.evict(files)
            sample = max(files, key=lambda p: p.stat().st_size)
            resident = pagecache.resident_fraction(sample)
            if resident is not None:
                result.resident_after_evict.append(resident)
            pagecache.back_free_memory(nbytes + nbytes // 4)
            figures["cold load"] = nbytes / trial.load() / 1e9
            trial.check()
    finally:
        trial.close()
        shutil.rmtree(directory, ignore_errors=True)
        os.sync()  # finish the deletion's journal and discard I/O before the next store
    return figures


def _profile_connector_path(chunks: list[torch.Tensor], directory: Path, tokens: int) -> dict[str, str]:
    """cProfile of one store and one warm load through ChunkStore: the top functions by own time."""
    trial = ChunkStoreTrial(chunks, fresh_directory(directory), 1, tokens)
    out = {}
    try:
        for phase, fn in (("store", trial.store), ("warm load", trial.load)):
            prof = cProfile.Profile()
            prof.runcall(fn)
            text = io.StringIO()
            pstats.Stats(prof, stream=text).strip_dirs().sort_stats("tottime").print_stats(6)
            out[phase] = "\n".join(line for line in text.getvalue().splitlines()
                                   if line.strip() and not line.startswith(("   Ordered", "   List")))
    finally:
        trial.close()
        shutil.rmtree(directory, ignore_errors=True)
    return out


def _competitors(case: Case, chunks: list[torch.Tensor],
                 worker: LMCacheWorker | None) -> dict[str, Callable[[Path], Trial]]:
    tokens = case.tokens
    comps: dict[str, Callable[[Path], Trial]] = {
        BASELINE: lambda d: RawTrial(chunks, d, 1),
        "raw pwrite/preadv, 4 threads": lambda d: RawTrial(chunks, d, 4),
        CONNECTOR_PATH: lambda d: LayerwiseTrial(chunks, d, tokens),
        CONNECTOR_PATH_MAC: lambda d: LayerwiseTrial(chunks, d, tokens, BENCH_MAC_KEY),
        "lmcache-fs ChunkReader on CPU, 16 in flight (CUDA's path)":
            lambda d: WholeChunkTrial(chunks, d, tokens),
        "lmcache-fs ChunkStore, 1 thread": lambda d: ChunkStoreTrial(chunks, d, 1, tokens),
        "lmcache-fs ChunkStore, 4 threads": lambda d: ChunkStoreTrial(chunks, d, 4, tokens),
        "lmcache-fs BackgroundWriter (store only)": lambda d: WriterTrial(chunks, d, tokens),
    }
    if worker is not None:
        for path, name in LMCACHE_PATHS.items():
            comps[name] = lambda d, path=path: LMCacheTrial(worker, path, d)
    return comps


def measure_case(case: Case, opts: BenchOptions, worker: LMCacheWorker | None) -> CaseResult:
    """All competitors on one chunk size, interleaved over ``opts.rounds`` rounds."""
    result = CaseResult(case)
    chunks = chunkdata.make_chunks(case.shape, case.count, SEED)
    scratch = opts.work_dir / "storage"
    if worker is not None:
        worker.call("case", shape=list(case.shape), count=case.count, seed=SEED,
                    dir=str(scratch / "lmcache-cpu"))
    comps = _competitors(case, chunks, worker)
    names = list(comps)
    for r in range(opts.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        figures = {}
        for name in order:
            figures[name] = run_trial(comps[name], scratch / "trial", case.total_bytes, result)
        result.add_round(figures)
        result.checksum_gbps.append(
            case.total_bytes / timed(lambda: [checksum(c) for c in chunks]) / 1e9)
        progress(f"storage {case.label} round {r + 1}/{opts.rounds}: " + ", ".join(
            f"{n.split(',')[0]} {figures[n].get('warm load', figures[n]['store']):.2f}"
            for n in names[:3]))
    result.profiles = _profile_connector_path(chunks, scratch / "profile", case.tokens)
    return result


def _cell(values: list[float]) -> str:
    return f"{median(values):.2f} ({spread(values)})" if values else "-"


def _ratio_cell(values: list[float]) -> str:
    return f"{median(values):.0%}" if values else "-"


def _case_table(res: CaseResult) -> list[str]:
    rows = []
    for name, phases in res.gbps.items():
        ratios = res.ratio.get(name, {})
        rows.append([name, *(_cell(phases.get(p, [])) for p in PHASES),
                     *(_ratio_cell(ratios.get(p, [])) for p in PHASES)])
    return md_table(["path", *(f"{p} GB/s" for p in PHASES), *(f"{p} / raw" for p in PHASES)], rows)


def _checksum_lines(res: CaseResult) -> list[str]:
    """What one xxh3 pass over the data costs, against the warm-load gap it explains."""
    hash_gbps = median(res.checksum_gbps)
    raw = median(res.gbps.get(BASELINE, {}).get("warm load", []))
    ours = median(res.gbps.get(CONNECTOR_PATH, {}).get("warm load", []))
    predicted = 1 / (1 / raw + 1 / hash_gbps)
    return [f"xxh3-64 over the same bytes alone: {hash_gbps:.2f} GB/s on one core. Every lmcache-fs "
            "load hashes every byte it reads, one more pass over memory: raw warm read "
            f"plus one hash pass predicts {predicted:.2f} GB/s; the connector's path measured "
            f"{ours:.2f} GB/s " + ("(below: per-file work, open, header, the store's books)."
                                   if ours < predicted else
                                   "(above: it hashes each page while it is still in the CPU's "
                                   "cache).")]


def _goal_lines(res: CaseResult) -> list[str]:
    """Goals: the connector's path >= 90% of raw, and >= LMCache's best path, per phase."""
    lines = []
    ours = res.gbps.get(CONNECTOR_PATH, {})
    ours_ratio = res.ratio.get(CONNECTOR_PATH, {})
    for phase in PHASES:
        ratio = median(ours_ratio.get(phase, []))
        verdict = "met" if ratio >= GOAL_OF_RAW else "MISSED"
        text = f"- {phase}: {ratio:.1%} of raw single-threaded ({verdict}, goal {GOAL_OF_RAW:.0%})"
        peers = {n: median(res.gbps[n].get(phase, [])) for n in LMCACHE_PATHS.values() if n in res.gbps}
        if peers:
            best = max(peers, key=peers.__getitem__)
            mine = median(ours.get(phase, []))
            text += (f"; {mine:.2f} GB/s against LMCache's best, {best} at {peers[best]:.2f} "
                     f"({'met' if mine >= peers[best] else 'MISSED'})")
        lines.append(text)
    return lines


def _report(results: list[CaseResult], opts: BenchOptions, lmcache_note: str) -> list[str]:
    order = pagecache.page_reporting_order()
    extra = [f"- LMCache: {lmcache_note}",
             f"- Cold loads: page cache evicted with {pagecache.METHOD}",
             "- Guest memory: " + ("this VM reports free pages of order "
                                   f"{order} to its host, whose first touch is slow; "
                                   if order is not None else "") +
             "1.25x the pass size is touched and freed before each store and cold load, "
             "so that page-cache allocation does not time the hypervisor"]
    lines = results_header("Storage throughput: lmcache-fs, raw I/O and LMCache 0.5.6", opts, extra)
    lines += [
        "Every path writes the same bytes (bf16 KV chunks of 256 tokens, 8 KV heads x 128) into a "
        "fresh directory on the filesystem above. GB/s are decimal (1e9 bytes) of chunk payload; "
        f"cells are the median over {opts.rounds} interleaved rounds with (min-max). Ratios are "
        "medians of per-round ratios to raw single-threaded pwrite/preadv. `store` lands in the "
        "page cache (no path fsyncs); `store + fsync` adds one fsync per file, the same for every "
        "path (on NFS close() flushes, so this is what a store costs there). Each trial stores "
        f"{STORE_ATTEMPTS} times into a fresh directory and keeps the faster: on this VM identical "
        "store loops varied 0.4-4.7 GB/s with the state of guest memory, so store columns are "
        "the least conclusive here. The connector "
        "stores through the BackgroundWriter (its row; the connector's-path row stores with "
        "ChunkStore.save, what the writer's thread runs). CPU engines load with the "
        "LayerwiseReader: one thread here (an engine bound to one core), each chunk and layer one "
        "preadv straight into the pages of a paged cache, hashed as it lands. CUDA engines load "
        "with the ChunkReader, 16 chunks in flight (its row reads into host memory with POSIX, "
        "CUDA's path without kvikio; bench/results/gpu_path.md has it on a GPU). The ChunkStore "
        "rows are one whole-file load at a time (the connector's path before both readers) and "
        "four threads of it. LMCache loads go in batches of at most 256 MiB (its CPU pool must hold about "
        "three times the chunks in flight).", "",
        "Reading the goals: only lmcache-fs verifies data. Its loads hash every byte (xxh3-64, "
        "see each section), which raw I/O and all three LMCache paths skip, so warm loads, "
        "which run at memory speed, pay one more pass over memory. The disk here rewards queue "
        "depth (cold loads): LMCache's paths, the `4 threads` rows and the ChunkReader keep "
        "several requests in flight, the LayerwiseReader's one thread one at a time; stores "
        "overlap hashing with writing.",
        ""]
    for res in results:
        case = res.case
        lines += [f"## {case.label} chunks x {case.count} ({case.total_bytes / 2**20:g} MiB per pass)", ""]
        lines += _case_table(res)
        resident = f"{max(res.resident_after_evict):.0%}" if res.resident_after_evict else "not checked"
        lines += [f"Page cache after eviction (fincore, largest file): at most {resident} resident.",
                  "", *_checksum_lines(res), "", "Goals for the connector's path:",
                  *_goal_lines(res), ""]
        for phase, text in res.profiles.items():
            lines += [f"cProfile of one {phase} pass through ChunkStore (top functions by own time):",
                      "", "```", text, "```", ""]
    return lines


def _plot(results: list[CaseResult], path: Path) -> Path | None:
    panels = []
    for res in results:
        series = [Series(name, [median(p.get(ph, [])) for ph in PHASES],
                         [min(p.get(ph, [float("nan")])) for ph in PHASES],
                         [max(p.get(ph, [float("nan")])) for ph in PHASES])
                  for name, p in res.gbps.items()]
        panels.append(Panel(f"{res.case.label} chunks x {res.case.count}", PHASES, series))
    # Log scale: warm loads run at page-cache speed, 10-50x the store and cold figures.
    return grouped_bars(path, "Storage throughput (median, min-max; log scale)", panels, "GB/s",
                        log_y=True)


def run(opts: BenchOptions) -> list[Path]:
    """Measure every case; write storage.md and storage.png. Returns the files written."""
    worker, note = None, "not measured (--no-lmcache)"
    if opts.lmcache:
        python, why = ensure_lmcache()
        if python is None:
            note = f"skipped: {why}"
        else:
            worker = LMCacheWorker(python, opts.work_dir / "lmcache-storage.log")
            note = f"LMCache {worker.versions['lmcache']}, its own venv (torch {worker.versions['torch']})"
    try:
        results = []
        for case in QUICK_CASES if opts.quick else FULL_CASES:
            try:
                results.append(measure_case(case, opts, worker))
            except LMCacheError as exc:  # measure the rest without LMCache, and say so
                note += f"; failed during {case.label}: {exc}"
                if worker is not None:
                    worker.close()
                worker = None
                results.append(measure_case(case, opts, None))
    finally:
        if worker is not None:
            worker.close()
        shutil.rmtree(opts.work_dir / "storage", ignore_errors=True)
    written = [write_markdown(opts.results_dir / "storage.md", _report(results, opts, note))]
    png = _plot(results, opts.results_dir / "storage.png")
    return written + ([png] if png else [])
