"""The GPU path in one call: build, check bit-exactness, measure kernels and reads.

    python -m bench.gpu_path [--out bench/results/gpu_path.md] [--quick]

On a CUDA machine this

1. builds the block-copy kernels (``cuda/``) and times the build;
2. runs the GPU tests (``pytest -m gpu``): kernels against the torch
   reference, bit for bit, for HND / NHD / padded layouts and bf16 / fp16 / fp8,
   and the read path end to end;
3. times gather and scatter kernels against a device-to-device copy of the
   same bytes (goal: >= 80 %), and against the torch fallback, with the L2
   cache flushed before every timed copy so that neither side reads from L2;
4. times file-to-GPU reads of 2 MiB and 32 MiB chunk files, cold (pages
   evicted) and warm: the disk alone (pread into host memory), a plain read +
   H2D copy, kvikio alone, and lmcache-fs' reader on each path it can take
   (goal: at least the better of plain and kvikio, and >= 90 % of the disk);
5. times a step that loads chunks and runs 32 layers of (simulated) compute:
   whole-chunk loads first against layer-wise loads during the compute;
6. writes a markdown table with the machine, versions and command.

Without CUDA it writes nothing and says so: there is nothing to measure.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Sequence, TypeVar
from unittest import mock

import torch

from bench.common import (
    REPO,
    RESULTS_DIR,
    WORK_DIR,
    machine_lines,
    md_table,
    median,
    progress,
    write_markdown,
)
from bench.pagecache import METHOD as EVICT_METHOD
from bench.pagecache import evict
from lmcache_fs.config import LMCacheFSConfig
from lmcache_fs.gpu import device_checksum
from lmcache_fs.gpu import kernels as cuda_build
from lmcache_fs.log import init_logging
from lmcache_fs.storage.codec import ALIGNMENT, checksum
from lmcache_fs.storage.layout import ChunkLayout, Namespace
from lmcache_fs.storage.store import ChunkStore
from lmcache_fs.storage.writer import BackgroundWriter
from lmcache_fs.transfer import block_copy
from lmcache_fs.transfer.block_copy import gather_blocks, scatter_blocks
from lmcache_fs.transfer.chunk_reader import MAX_SLOTS, ChunkReader
from lmcache_fs.transfer.device_saver import DeviceChunkSaver
from lmcache_fs.transfer.layer_reader import LayerLoadJob, LayerwiseReader
from lmcache_fs.transfer.read_paths import ReadBackend, ReadPath, kvikio_backend, kvikio_threads

T = TypeVar("T")

MIB = 1 << 20
# The engines' default (staging_buffer_mb): 16 slots of 2 MiB, 8 of 32 MiB.
STAGING_BYTES = LMCacheFSConfig.staging_buffer_mb * MIB
L2_FLUSH_BYTES = 256 * MIB  # several times any GPU's L2


# -- kernels ---------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelCase:
    """One model's KV geometry and one chunk of it."""

    name: str
    layers: int
    heads: int
    tokens: int  # per block
    width: int  # 2 * head_size
    dtype: torch.dtype
    blocks: int  # per chunk
    nhd: bool  # vLLM's CUDA FlashAttention layout (a strided view); else HND

    @property
    def chunk_bytes(self) -> int:
        return self.layers * self.blocks * self.heads * self.tokens * self.width * self.dtype.itemsize


KERNEL_CASES = [
    KernelCase("Llama-3-8B bf16 NHD", 32, 8, 16, 256, torch.bfloat16, 16, True),
    KernelCase("Llama-3-8B bf16 HND", 32, 8, 16, 256, torch.bfloat16, 16, False),
    KernelCase("Llama-3-8B fp8 NHD", 32, 8, 16, 256, torch.float8_e4m3fn, 16, True),
    KernelCase("small model bf16 NHD", 16, 2, 16, 128, torch.bfloat16, 16, True),
]


def _paged_layers(case: KernelCase, total_blocks: int) -> list[torch.Tensor]:
    shape = ((total_blocks, case.tokens, case.heads, case.width) if case.nhd
             else (total_blocks, case.heads, case.tokens, case.width))
    layers = []
    for _ in range(case.layers):
        raw = torch.randint(0, 256, (*shape[:-1], case.width * case.dtype.itemsize),
                            dtype=torch.uint8, device="cuda")
        kv = raw.view(case.dtype)
        layers.append(kv.permute(0, 2, 1, 3) if case.nhd else kv)
    return layers


def time_on_gpu(fn: Callable[[], object], iterations: int) -> float:
    """Median seconds of ``fn`` on the current stream, L2 flushed before each call."""
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    times = []
    for i in range(iterations + 3):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i >= 3:  # warm-up: allocator, plan cache, clocks
            times.append(start.elapsed_time(end) / 1e3)
    return median(times)


def bench_kernels(iterations: int) -> tuple[list[list[object]], list[str]]:
    """Rows of the kernel table, and any bit-exactness failure seen while timing."""
    rows, failures = [], []
    torch_only = mock.patch.object(block_copy, "copy_blocks_cuda", lambda *args: False)
    for case in KERNEL_CASES:
        total = max(4 * case.blocks, (2 << 30) // (case.chunk_bytes // case.blocks))
        layers = _paged_layers(case, total)
        ids = torch.randperm(total, device="cuda")[:case.blocks]
        chunk_shape = (case.layers, case.blocks, case.heads, case.tokens, case.width)
        chunk = torch.empty(chunk_shape, dtype=case.dtype, device="cuda")
        reference = torch.empty_like(chunk)
        gather_blocks(layers, ids, chunk)
        with torch_only:
            gather_blocks(layers, ids, reference)
        if not torch.equal(chunk.view(torch.uint8), reference.view(torch.uint8)):
            failures.append(f"{case.name}: gather differs from the torch reference")
        src = torch.empty(case.chunk_bytes, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        d2d = time_on_gpu(lambda: dst.copy_(src), iterations)
        for direction, run in (("gather", lambda: gather_blocks(layers, ids, chunk)),
                               ("scatter", lambda: scatter_blocks(chunk, layers, ids))):
            kernel = time_on_gpu(run, iterations)
            with torch_only:
                fallback = time_on_gpu(run, max(3, iterations // 5))
            rows.append([case.name, direction, f"{case.chunk_bytes / MIB:.0f}",
                         f"{kernel * 1e6:.1f}", f"{case.chunk_bytes / kernel / 1e9:.0f}",
                         f"{case.chunk_bytes / d2d / 1e9:.0f}", f"{d2d / kernel:.0%}",
                         f"{fallback * 1e6:.0f}", f"{fallback / kernel:.1f}x"])
    return rows, failures


# -- saves -----------------------------------------------------------------------------

def bench_saves(work_dir: Path, count: int) -> list[list[object]]:
    """Engine-thread time per save and publish throughput: async D2H vs ``.cpu()``."""
    case = KERNEL_CASES[0]
    total = 64 * case.blocks
    layers = _paged_layers(case, total)
    shape = (case.layers, case.blocks, case.heads, case.tokens, case.width)
    ids = [torch.randperm(total, device="cuda")[:case.blocks] for _ in range(count)]
    directory = work_dir / "saves"
    shutil.rmtree(directory, ignore_errors=True)
    store = ChunkStore(ChunkLayout(directory, Namespace({"model": "bench"})))
    writer = BackgroundWriter(store, max_queue=count)
    saver = DeviceChunkSaver(writer, "cuda", max_pending=count, chunk_bytes=case.chunk_bytes)

    def gathered(i: int) -> torch.Tensor:
        chunk = torch.empty(shape, dtype=case.dtype, device="cuda")
        gather_blocks(layers, ids[i], chunk)
        return chunk

    methods = {
        "gather + DeviceChunkSaver (side-stream D2H)":
            lambda key, i: saver.submit(key, gathered(i), {}),
        "gather + .cpu() (blocking D2H)": lambda key, i: writer.submit(key, gathered(i).cpu(), {}),
    }
    rows = []
    for n, (name, save) in enumerate(methods.items()):
        torch.cuda.synchronize()
        per_call, start = [], time.perf_counter()
        for i in range(count):
            t0 = time.perf_counter()
            save(f"{n:08x}{i:08x}", i)
            per_call.append(time.perf_counter() - t0)
        saver.flush()
        writer.flush()
        seconds = time.perf_counter() - start
        rows.append([name, f"{case.chunk_bytes / MIB:.0f} MiB x {count}",
                     f"{median(per_call) * 1e6:.0f}", f"{max(per_call) * 1e6:.0f}",
                     f"{case.chunk_bytes * count / seconds / 1e9:.2f}",
                     writer.stats.failed + saver.skipped])
    saver.close()
    writer.close()
    shutil.rmtree(directory, ignore_errors=True)
    return rows


# -- reads -----------------------------------------------------------------------------

def save_like_a_gpu_writer(store: ChunkStore, key: str, data: torch.Tensor) -> None:
    """Publish ``data`` (on the host) with the device checksum a GPU writer stores beside xxh3."""
    sums = device_checksum.start_word_sums(data.cuda())
    fields = {device_checksum.FIELD: device_checksum.text_of(sums.cpu())} if sums is not None else {}
    store.save(key, data, fields)


def _chunk_files(store: ChunkStore, count: int, chunk_bytes: int) -> list[str]:
    """Write ``count`` chunk files of ``chunk_bytes`` of data each; returns their keys."""
    base = torch.randint(0, 256, (chunk_bytes,), dtype=torch.uint8)
    keys = []
    for i in range(count):
        base[:8] = torch.tensor(list(i.to_bytes(8, "little")), dtype=torch.uint8)
        key = f"{chunk_bytes:08x}{i:08x}"
        save_like_a_gpu_writer(store, key, base.view(torch.bfloat16).view(1, -1))
        keys.append(key)
    return keys


def _striped(items: Sequence[T], workers: int, work: Callable[[T, int], None]) -> None:
    """``workers`` threads, thread w doing items[w::workers] with its own buffers (slot w)."""
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda w: [work(item, w) for item in items[w::workers]], range(workers)))


def disk_alone(paths: Sequence[Path], nbytes: int, workers: int) -> Callable[[], None]:
    """What the filesystem gives: pread each file's data into host memory, nothing else."""
    buffers = [bytearray(nbytes) for _ in range(workers)]

    def read(path: Path, slot: int) -> None:
        with open(path, "rb", buffering=0) as f:
            os.preadv(f.fileno(), [buffers[slot]], ALIGNMENT)

    return lambda: _striped(paths, workers, read)


def plain_read_h2d(paths: Sequence[Path], nbytes: int, workers: int) -> Callable[[], None]:
    """The obvious way: pread into pinned host memory, then copy to the GPU (no checksum)."""
    host = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(workers)]
    device = [torch.empty(nbytes, dtype=torch.uint8, device="cuda") for _ in range(workers)]
    streams = [torch.cuda.Stream() for _ in range(workers)]

    def read(path: Path, slot: int) -> None:
        with open(path, "rb", buffering=0) as f:
            os.preadv(f.fileno(), [memoryview(host[slot].numpy())], ALIGNMENT)
        with torch.cuda.stream(streams[slot]):
            device[slot].copy_(host[slot], non_blocking=True)
        streams[slot].synchronize()

    return lambda: _striped(paths, workers, read)


def kvikio_alone(kvikio: ModuleType, paths: Sequence[Path], nbytes: int, workers: int,
                 copy_back: bool = False) -> Callable[[], None]:
    """kvikio by itself: ``workers`` preads in flight into GPU buffers (no checksum).

    ``copy_back``: then each chunk is copied back into pinned host memory on a
    side stream, as a verified kvikio read does before hashing: the cost of
    verification without the hash.
    """
    device = [torch.empty(nbytes, dtype=torch.uint8, device="cuda") for _ in range(workers)]
    host = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) if copy_back else None
            for _ in range(workers)]
    streams = [torch.cuda.Stream() if copy_back else None for _ in range(workers)]

    def read(path: Path, slot: int) -> None:
        with kvikio.CuFile(path, "r") as f:
            f.pread(device[slot], nbytes, ALIGNMENT).get()
        host_slot, stream = host[slot], streams[slot]
        if host_slot is not None and stream is not None:
            with torch.cuda.stream(stream):
                host_slot.copy_(device[slot], non_blocking=True)
            stream.synchronize()

    return lambda: _striped(paths, workers, read)


def hash_alone(count: int, nbytes: int, workers: int) -> Callable[[], None]:
    """The ceiling of host-side verification: xxh3-64 of ``count`` chunks already in
    pinned host memory, ``workers`` threads at once, no I/O."""
    host = [torch.randint(0, 256, (nbytes,), dtype=torch.uint8).pin_memory()
            for _ in range(workers)]
    return lambda: _striped(range(count), workers, lambda _, slot: checksum(host[slot]))


def through_reader(reader: ChunkReader, keys: Sequence[str]) -> Callable[[], None]:
    """lmcache-fs' reader as the worker uses it (each chunk consumed on the current stream)."""
    def run() -> None:
        for i, chunk in reader.read(keys):
            if not isinstance(chunk, torch.Tensor):
                raise RuntimeError(f"chunk {keys[i]} failed: {chunk}")
        torch.cuda.synchronize()

    return run


def open_reader(store: ChunkStore, chunk_bytes: int, backend: ReadBackend, verify: bool,
                host_xxh3: bool) -> ChunkReader:
    """The reader for one competitor; ``host_xxh3``: one that verifies as it does where the
    kernels are missing or the files have no device checksum (copy back, xxh3)."""
    with (mock.patch.object(device_checksum, "available_for", lambda data: False)
          if host_xxh3 else contextlib.nullcontext()):
        return ChunkReader(store, (1, chunk_bytes // 2), torch.bfloat16, "cuda", backend,
                           staging_bytes=STAGING_BYTES, verify=verify)


PLAIN, DISK = "plain read + H2D", "disk alone (pread to host)"
COPY_BACK = "kvikio + copy back to host (no hash)"
HASH = "host xxh3 alone (no I/O)"


def bench_reads(work_dir: Path, sizes: Sequence[tuple[int, int]], rounds: int
                ) -> list[list[object]]:
    """Rows of the read table: every competitor, cold and warm, per chunk size."""
    rows = []
    kvikio_backend = _kvikio_backend()
    for chunk_bytes, count in sizes:
        directory = work_dir / f"chunks-{chunk_bytes // MIB}MiB"
        shutil.rmtree(directory, ignore_errors=True)
        store = ChunkStore(ChunkLayout(directory, Namespace({"model": "bench"})))
        progress(f"writing {count} chunk files of {chunk_bytes // MIB} MiB")
        keys = _chunk_files(store, count, chunk_bytes)
        paths = [store.layout.chunk_path(k) for k in keys]
        workers = max(1, min(MAX_SLOTS, STAGING_BYTES // chunk_bytes))
        posix = ReadBackend(ReadPath.POSIX)
        # name: (backend, verify, as without the kernels: host xxh3)
        readers = {"lmcache-fs posix (verified on the GPU)": (posix, True, False),
                   "lmcache-fs posix (verified, host xxh3)": (posix, True, True)}
        competitors: dict[str, Callable[[], None]] = {
            DISK: disk_alone(paths, chunk_bytes, workers),
            PLAIN: plain_read_h2d(paths, chunk_bytes, workers),
        }
        kvikio_name = None
        if kvikio_backend is not None:
            mode = kvikio_backend.path.value
            kvikio_name = f"kvikio alone ({mode})"
            competitors[kvikio_name] = kvikio_alone(kvikio_backend.kvikio, paths, chunk_bytes,
                                                    workers)
            # Where verified warm reads lose time: the copy back, or the hash itself.
            competitors[COPY_BACK] = kvikio_alone(kvikio_backend.kvikio, paths, chunk_bytes,
                                                  workers, copy_back=True)
            readers[f"lmcache-fs {mode} (verified on the GPU)"] = (kvikio_backend, True, False)
            readers[f"lmcache-fs {mode} (verified, host xxh3)"] = (kvikio_backend, True, True)
            readers[f"lmcache-fs {mode} (verify off)"] = (kvikio_backend, False, False)
        competitors[HASH] = hash_alone(count, chunk_bytes, workers)
        opened = {name: open_reader(store, chunk_bytes, *how) for name, how in readers.items()}
        competitors.update({name: through_reader(r, keys) for name, r in opened.items()})

        seconds: dict[tuple[str, str], list[float]] = {}
        for _ in range(rounds):  # interleaved, so drift hits every competitor alike
            for name, run in competitors.items():
                for state in ("cold", "warm"):
                    if state == "cold":
                        evict(paths)
                    else:
                        run()  # every page cached
                    start = time.perf_counter()
                    run()
                    seconds.setdefault((name, state), []).append(time.perf_counter() - start)
        for reader in opened.values():
            reader.close()
        total = chunk_bytes * count

        def gbps(name: str, state: str) -> float:
            return total / median(seconds[(name, state)]) / 1e9

        for state in ("cold", "warm"):
            best = max(gbps(PLAIN, state), gbps(kvikio_name, state) if kvikio_name else 0.0)
            for name in competitors:
                rows.append([f"{chunk_bytes // MIB} MiB x {count}", state, name, workers,
                             f"{gbps(name, state):.2f}", f"{gbps(name, state) / gbps(DISK, state):.0%}",
                             f"{gbps(name, state) / best:.0%}"])
        shutil.rmtree(directory, ignore_errors=True)
    return rows


def _kvikio_backend() -> ReadBackend | None:
    """kvikio on its best path here, or None (with the reason printed) if it cannot run."""
    try:
        return kvikio_backend()
    except Exception as exc:  # noqa: BLE001 - reported, then measured without kvikio
        progress(f"kvikio unavailable: {type(exc).__name__}: {exc}")
        return None


# -- layer-wise loads against a forward pass -------------------------------------------

LAYERWISE_MODEL = dict(layers=32, block=16, heads=8, width=256)  # Llama-3-8B bf16, vLLM CUDA blocks


def _spin(device: torch.device) -> Callable[[float], None]:
    """GPU work of a given length in microseconds on the current stream (a layer's compute)."""
    if device.type != "cuda":
        return lambda us: time.sleep(us / 1e6)  # CPU smoke test of the bench's code
    torch.cuda._sleep(1000)  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 10_000_000
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    per_us = cycles / (start.elapsed_time(end) * 1e3)
    return lambda us: torch.cuda._sleep(int(us * per_us))


def bench_layerwise(work_dir: Path, chunks: int, compute_us: Sequence[int], rounds: int,
                    device: torch.device | str = "cuda") -> list[list[object]]:
    """Rows: a step that loads ``chunks`` warm chunks, then runs 32 layers of compute.

    ``whole chunks``: the worker's default CUDA path (ChunkReader on its best
    backend, verified, scattered, synchronized) before the first layer.
    ``layer by layer``: LayerwiseReader through its pinned staging ring, each
    layer waiting only for its own bytes; once with the default staging, once
    with staging of half a layer of the step (a long prompt's case: each layer
    is read and handed over in 4 groups of chunks). Time: from the start of the
    loads to the last layer's compute done.
    """
    device = torch.device(device)
    m = LAYERWISE_MODEL
    per_chunk = 256 // m["block"]
    directory = work_dir / "layerwise"
    shutil.rmtree(directory, ignore_errors=True)
    store = ChunkStore(ChunkLayout(directory, Namespace({"model": "bench-layerwise"})))
    shape = (m["layers"], per_chunk, m["heads"], m["block"], m["width"])
    keys = [f"{i:064x}" for i in range(chunks)]
    progress(f"writing {chunks} chunk files of {torch.Size(shape).numel() * 2 // MIB} MiB")
    for key in keys:
        save_like_a_gpu_writer(store, key, torch.randn(shape).to(torch.bfloat16))
    order = torch.randperm(chunks * per_chunk).tolist()
    block_ids = [order[i * per_chunk:(i + 1) * per_chunk] for i in range(chunks)]
    caches = [torch.zeros(chunks * per_chunk, m["block"], m["heads"], m["width"],
                          dtype=torch.bfloat16, device=device).transpose(1, 2)
              for _ in range(m["layers"])]  # vLLM's NHD view
    backend = (_kvikio_backend() if device.type == "cuda" else None) or ReadBackend(ReadPath.POSIX)
    whole = ChunkReader(store, shape, torch.bfloat16, device, backend,
                        staging_bytes=STAGING_BYTES, verify=True)
    layerwise = LayerwiseReader(store, caches, per_chunk, threads=kvikio_threads(),
                                staging_bytes=STAGING_BYTES)
    # A quarter of one layer of the step per slot: each layer goes in 4 groups of chunks.
    layer_bytes = chunks * torch.Size(shape[1:]).numel() * 2
    grouped = LayerwiseReader(store, caches, per_chunk, threads=kvikio_threads(),
                              staging_bytes=max(1, layer_bytes // 2))
    ids = [torch.tensor(b, dtype=torch.int64, device=device) for b in block_ids]
    jobs = [LayerLoadJob(k, 0, b) for k, b in zip(keys, block_ids)]
    spin = _spin(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def compute_alone(us: int) -> None:
        for _ in caches:
            spin(us)
        sync()

    def whole_then_compute(us: int) -> None:
        for i, chunk in whole.read(keys):
            if not isinstance(chunk, torch.Tensor):
                raise RuntimeError(f"chunk {i} failed: {chunk}")
            scatter_blocks(chunk, caches, ids[i])
        sync()  # as GroupWorker.load does before the forward pass
        compute_alone(us)

    def layer_by_layer(reader: LayerwiseReader) -> Callable[[int], None]:
        def run(us: int) -> None:
            load = reader.start(jobs)
            for layer in range(len(caches)):
                load.wait_layer(layer)
                spin(us)
            if any(e is not None for e in load.finish()):
                raise RuntimeError(f"layer-wise load failed: {load.errors}")
            sync()
        return run

    competitors = {"compute alone": compute_alone,
                   f"whole chunks ({backend.path.value}, verified), then compute": whole_then_compute,
                   "layer by layer (POSIX into pinned staging, verified)": layer_by_layer(layerwise),
                   "layer by layer, staging of 1/2 layer (4 groups per layer)":
                       layer_by_layer(grouped)}
    rows = []
    try:
        for warm_up in competitors.values():  # every page cached; buffers and kernels warm
            warm_up(0)
        for us in compute_us:
            seconds: dict[str, list[float]] = {}
            for _ in range(rounds):
                for name, run in competitors.items():
                    start = time.perf_counter()
                    run(us)
                    seconds.setdefault(name, []).append(time.perf_counter() - start)
            floor = median(seconds["compute alone"])
            for name, values in seconds.items():
                rows.append([f"{chunks} x {torch.Size(shape).numel() * 2 // MIB} MiB",
                             f"{us} us x {len(caches)}", name, f"{median(values) * 1e3:.1f}",
                             f"{(median(values) - floor) * 1e3:+.1f}"])
    finally:
        whole.close()
        layerwise.close()
        grouped.close()
        shutil.rmtree(directory, ignore_errors=True)
    return rows


# -- the report -----------------------------------------------------------------------

GPU_TEST_FILES = ("tests/test_block_copy_cuda.py", "tests/test_device_checksum.py",
                  "tests/test_gpu_io.py", "tests/test_layer_reader.py")
GPU_TEST_RUNS = 3  # a failure in one run of three is a flake to chase, not a pass


def run_gpu_tests(runs: int = GPU_TEST_RUNS) -> tuple[list[str], list[str]]:
    """Run the GPU-marked tests ``runs`` times, each in a fresh subprocess.

    Returns pytest's summary line of each run and pytest's one-line reason for
    every failure (test id and error), so that the results file itself says
    which test failed, how, and in how many of the runs.
    """
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-m", "gpu", "-p", "no:cacheprovider",
           *GPU_TEST_FILES]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    summaries, failures = [], []
    for run in range(1, runs + 1):
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.strip()]
        if done.returncode != 0:
            print(done.stdout[-6000:], done.stderr[-3000:], file=sys.stderr)
        summaries.append(lines[-1] if lines else f"pytest exited {done.returncode}: "
                                                 f"{done.stderr[-300:]}")
        failures += [f"run {run}: {line}" for line in lines if line.startswith(("FAILED", "ERROR"))]
    return summaries, failures


def software_lines(build_seconds: float | None) -> list[str]:
    """GPU, CUDA, compiler and kvikio versions, as markdown bullets."""
    props = torch.cuda.get_device_properties(0)
    try:
        nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True,
                              check=False).stdout.strip().splitlines()[-1]
    except OSError:
        nvcc = "nvcc not found"
    try:
        import kvikio
        import kvikio.cufile_driver
        import kvikio.defaults

        try:
            gds = kvikio.cufile_driver.get("is_gds_available")
        except Exception as exc:  # noqa: BLE001 - old libcufile: report, don't fail
            gds = f"unknown ({exc})"
        kv = (f"kvikio {kvikio.__version__}, compat mode preferred: "
              f"{kvikio.defaults.is_compat_mode_preferred()}, cuFile reports GDS available: "
              f"{gds}, {kvikio.defaults.get('num_threads')} threads, task size "
              f"{kvikio.defaults.get('task_size') // MIB} MiB")
    except Exception as exc:  # noqa: BLE001 - measured without kvikio
        kv = f"kvikio not usable: {type(exc).__name__}: {exc}"
    build = (f"built in {build_seconds:.0f} s" if build_seconds is not None
             else "FAILED to build (see the log); the torch fallback was measured")
    return [f"- GPU: {props.name}, {props.multi_processor_count} SMs, "
            f"{props.total_memory / 2**30:.0f} GiB; torch CUDA {torch.version.cuda}; {nvcc}",
            f"- Kernels: {build}", f"- {kv}"]


def guarded(what: str, fn: Callable[[], T], fallback: T, problems: list[str]) -> T:
    """``fn()``, or ``fallback`` with the error noted: one broken part must not lose the rest."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - reported in the results file
        traceback.print_exc()
        problems.append(f"{what}: {type(exc).__name__}: {exc}")
        return fallback


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "gpu_path.md")
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR / "gpu_path",
                        help="scratch directory on the filesystem under test")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    args = parser.parse_args(argv)
    init_logging()
    if not torch.cuda.is_available():
        print("bench.gpu_path: no CUDA device here; nothing to measure", file=sys.stderr)
        return 2
    command = "python -m bench.gpu_path " + " ".join(argv if argv is not None else sys.argv[1:])

    progress("building the CUDA kernels")
    start = time.perf_counter()
    built = cuda_build.load_cuda_kernels() is not None
    build_seconds = time.perf_counter() - start if built else None
    problems: list[str] = []
    progress("running the GPU tests")
    test_runs, test_failures = guarded("GPU tests", run_gpu_tests, (["not run"], []), problems)
    progress("timing the kernels")
    kernel_rows, failures = guarded("kernel timing", lambda: bench_kernels(10 if args.quick else 100),
                                    ([], []), problems)
    progress("timing the reads")
    sizes = [(2 * MIB, 16), (32 * MIB, 4)] if args.quick else [(2 * MIB, 256), (32 * MIB, 32)]
    read_rows = guarded("read timing", lambda: bench_reads(args.work_dir, sizes,
                                                            1 if args.quick else 3), [], problems)
    progress("timing the saves")
    save_rows = guarded("save timing", lambda: bench_saves(args.work_dir, 8 if args.quick else 32),
                        [], problems)
    progress("timing layer-wise loads against a forward pass")
    layer_rows = guarded("layer-wise timing", lambda: bench_layerwise(
        args.work_dir, 4 if args.quick else 32, (200,) if args.quick else (100, 500, 2000),
        1 if args.quick else 5), [], problems)
    machine = guarded("machine description",
                      lambda: machine_lines(args.work_dir, software_lines(build_seconds)),
                      software_lines(build_seconds), problems)

    lines = [
        "# The GPU path: block-copy kernels and file-to-GPU reads", "",
        *machine,
        f"- Command: `{command}`" + (" (quick: smoke-test sizes, not a measurement)"
                                     if args.quick else ""),
        *(f"- FAILED: {p}" for p in problems),
        "",
        "## Bit-exactness", "",
        f"- GPU tests (`pytest -m gpu {' '.join(GPU_TEST_FILES)}`), {len(test_runs)} runs: "
        + "; ".join(test_runs),
        *(f"  - {failure}" for failure in test_failures),
        f"- Timed configurations compared with the torch reference: "
        f"{'all identical' if not failures else '; '.join(failures)}", "",
        "## Kernels: one launch per chunk vs a device-to-device copy of the same bytes", "",
        "GB/s = chunk bytes / time (each byte is read once and written once); L2 flushed before "
        "every timed call; median of the timed calls. Goal: kernel >= 80 % of the copy.", "",
        *md_table(["case", "direction", "chunk MiB", "kernel us", "kernel GB/s", "D2D copy GB/s",
                   "kernel / copy", "torch fallback us", "speed-up"], kernel_rows),
        "## Saves: what a save costs the engine's thread", "",
        "Host time of one save call (gather queued, copy to host handed off) and the rate at "
        "which the chunks were published (all files written, the writer's thread included).", "",
        *md_table(["method", "chunks", "engine-thread us per save (median)", "slowest save us",
                   "published GB/s", "failed or skipped"], save_rows),
        "## Reads: chunk files into GPU memory", "",
        f"Cold: pages evicted before each pass ({EVICT_METHOD}); warm: read once before. Every "
        "competitor keeps `in flight` reads going at once (the reader's staging slots). "
        "The files carry both checksums, as a GPU writer stores them. `verified on the GPU`: "
        "the device checksum, one kernel launch per chunk on the slot's side stream (the "
        "default for such files; posix: after its copy to the GPU, with no host hash); "
        "`verified, host xxh3`: as for files from CPU writers or hosts without the kernels, "
        "every chunk hashed on the host (kvikio: after a copy back from the GPU). Goals: the "
        "reader at least as fast as the better of `plain read + H2D` and `kvikio alone`, and "
        ">= 90 % of `disk alone`. `of best baseline`: of the better of those two. Median of the "
        "passes.", "",
        *md_table(["chunks", "cache", "competitor", "in flight", "GB/s", "of disk alone",
                   "of best baseline"], read_rows),
        "## Layer-wise loads against a forward pass", "",
        "A step that loads warm chunks of a Llama-3-8B-like cache (32 layers, NHD blocks of 16) "
        "and then computes 32 layers (simulated: a GPU spin of the given length per layer). "
        "`whole chunks`: the default CUDA path, every chunk read, verified and scattered before "
        "layer 0. `layer by layer` (`layerwise_load: true`): each layer waits only for its own "
        "bytes; `staging of 1/2 layer` is what a prompt too long for `staging_buffer_mb` gets "
        "(each layer in 4 groups of chunks). ms from the first read to the last layer done, "
        "median; `over compute`: what loading added to `compute alone`.", "",
        *md_table(["chunks", "compute per layer", "path", "ms", "over compute"], layer_rows),
        "Reading the numbers: `cold` measures the disk; `warm` measures the page cache and the "
        "CPU work per chunk. Host xxh3 (the format's checksum, which cannot be computed in "
        "parallel on a GPU) bounds warm reads by hashing and the copy back; the device "
        "checksum leaves the host out; `verify off` shows the I/O path alone. Two rows take "
        "host verification apart: `kvikio + copy back` is a host-verified kvikio read without "
        "the hash, `host xxh3 alone` the hash without any I/O (the same threads; no disk, so "
        "its cold and warm rows are alike). Host-side "
        "figures vary between VMs: compare rows within one file only.",
    ]
    text = "\n".join(lines)
    print(text)
    write_markdown(args.out, lines)
    return 0 if not (failures or problems or test_failures) else 1


if __name__ == "__main__":
    sys.exit(main())
