"""TTFT with tensor parallelism: a prompt loaded from chunk files against recomputed, TP=2 and TP=1.

Four real vLLM CPU engines on the synthetic model (bf16; 4 attention heads and 2
KV heads, so one KV head per rank at TP=2), all up at once and measured in
interleaved rounds, one request at a time, each round on prompts no engine has seen:

- ``recompute``: plain vLLM (no connector) at TP=1 and at TP=2;
- ``all-miss``: lmcache-fs at the same TP size on a new prompt (lookup and store);
- ``loaded from files``: that engine asked the prompt again after its own prefix
  cache was emptied (vLLM's ``reset_prefix_cache``), so every hit token is read
  from the chunk files it stored (one file per chunk and rank at TP=2), warm in
  the page cache, as a second instance on the node would read them;
- ``same-instance hit``: the prompt a third time, from vLLM's own prefix cache: the floor.

A TP=2 engine computes on both cores, one thread per rank
(``VLLM_CPU_OMP_THREADS_BIND="0|1"``: the CPU build refuses two workers without
cores of their own); a TP=1 engine on one thread on the last core.

    python -m bench.run ttft-tp --rounds 5
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
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
from bench.engine_set import CHUNK, EngineSet, chunk_files, lmcache_fs_connector, wait_for_chunks

LENGTH, QUICK_LENGTH = 4096, 1024
TP_SIZES = (1, 2)
RECOMPUTE, ALL_MISS, LOADED, FLOOR = ("recompute", "all-miss", "loaded from files",
                                      "same-instance hit")
CASES = (RECOMPUTE, ALL_MISS, LOADED, FLOOR)
_READING = """
Reading the results: compare ratios within one TP size, or the same case across TP sizes; all
figures come from one run with every engine up, interleaved. At TP=2 each rank reads its own file
of every chunk (half the KV heads) on its own core while the forward pass runs; recompute at
TP=2 computes on two cores against one at TP=1, with an all-reduce per layer between the ranks.
"""


def _plain(tp: int) -> str:
    return f"plain-tp{tp}"


def _lmcache_fs(tp: int) -> str:
    return f"lmcache-fs-tp{tp}"


def _measure_round(engines: EngineSet, work: Path, length: int, tp_order: tuple[int, ...],
                   fresh: Callable[[], list[int]]) -> dict[tuple[int, str], float]:
    """Every case at each TP size, in ``tp_order``, on fresh prompts of ``length`` tokens."""
    got: dict[tuple[int, str], float] = {}
    for tp in tp_order:
        directory = work / f"tp{tp}"
        got[tp, RECOMPUTE] = engines.seconds(_plain(tp), fresh())
        prompt, before = fresh(), len(chunk_files(directory))
        got[tp, ALL_MISS] = engines.seconds(_lmcache_fs(tp), prompt)
        wait_for_chunks(directory, before + tp * (length // CHUNK))  # a file per chunk and rank
        engines[_lmcache_fs(tp)].reset_prefix_cache()
        got[tp, LOADED] = engines.seconds(_lmcache_fs(tp), prompt)
        got[tp, FLOOR] = engines.seconds(_lmcache_fs(tp), prompt)
    return got


def _write(opts: BenchOptions, length: int, samples: dict[tuple[int, str], list[float]]) -> Path:
    med = {key: median(values) for key, values in samples.items()}
    rows = [[f"TP={tp}", *(f"{med[tp, c] * 1e3:.0f} ({spread([v * 1e3 for v in samples[tp, c]])})"
                           for c in CASES)] for tp in TP_SIZES]
    ratios = [[f"TP={tp}", f"{med[tp, RECOMPUTE] / med[tp, LOADED]:.1f}x",
               f"{med[tp, LOADED] / med[tp, FLOOR]:.2f}x",
               f"{(med[tp, ALL_MISS] / med[tp, RECOMPUTE] - 1) * 100:+.1f}%"] for tp in TP_SIZES]
    across = [[case, f"{med[2, case] / med[1, case]:.2f}x"] for case in CASES]
    title = f"TTFT with tensor parallelism: loaded against recompute at {length} tokens"
    lines = results_header(title, opts, [
        "- Engines: vLLM CPU 0.32 (vllm-cpu), synthetic 8-layer Llama (random weights, 2 KV "
        "heads), bf16, greedy, enforce_eager, one request at a time; TP=2 ranks on cores 0 and 1"])
    lines += [f"Median TTFT in ms at {length} tokens (min-max over {opts.rounds} rounds):", ""]
    lines += md_table(["engine", *CASES], rows)
    lines += ["Ratios (from the medians above):", ""]
    lines += md_table(["engine", "recompute / loaded", "loaded / same-instance hit",
                       "all-miss overhead"], ratios)
    lines += md_table(["case", "TP=2 / TP=1"], across)
    lines += _READING.strip().splitlines()
    return write_markdown(opts.results_dir / "ttft-tp.md", lines)


def run(opts: BenchOptions) -> list[Path]:
    """Every case at TP=1 and TP=2, interleaved; writes bench/results/ttft-tp.md."""
    length = QUICK_LENGTH if opts.quick else LENGTH
    work = opts.work_dir / "ttft-tp"
    shutil.rmtree(work, ignore_errors=True)
    connectors: dict[str, dict | None] = {}
    for tp in TP_SIZES:
        connectors[_plain(tp)] = None
        connectors[_lmcache_fs(tp)] = lmcache_fs_connector(work / f"tp{tp}")
    engines = EngineSet(work, connectors, length,
                        tensor_parallel={name: tp for tp in TP_SIZES
                                         for name in (_plain(tp), _lmcache_fs(tp))})
    rng = random.Random(0)
    samples: dict[tuple[int, str], list[float]] = {(tp, c): [] for tp in TP_SIZES for c in CASES}
    try:
        for round_no in range(opts.rounds):
            progress(f"ttft-tp: round {round_no + 1}/{opts.rounds}, {length} tokens")
            # Which TP size goes first alternates: neither always meets the other's leftovers.
            order = TP_SIZES if round_no % 2 == 0 else TP_SIZES[::-1]
            got = _measure_round(engines, work, length, order,
                                 lambda: [rng.randrange(3, 250) for _ in range(length)])
            for key, seconds in got.items():
                samples[key].append(seconds)
    finally:
        engines.close()
    return [_write(opts, length, samples)]
