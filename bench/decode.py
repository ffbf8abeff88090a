"""Decoding while storing: inter-token latency with the connector writing, against none.

A request's prompt chunks are queued for the background writer in the step
that finishes its prefill, so the writer publishes them while the request
decodes. Inter-token latency (ITL) is estimated per round as
``(T(prompt, 1 + N tokens) - T(other prompt of the same length, 1 token)) / N``
on fresh prompts, for a plain engine and an lmcache-fs engine, interleaved.
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
from bench.engine_set import EngineSet, lmcache_fs_connector

PROMPT_LEN = 4096
DECODE_TOKENS = 64
ENGINES = ("plain", "lmcache-fs (storing)", "lmcache-fs kv_consumer (connector, no stores)")


def _itl(engines: EngineSet, name: str, rng: random.Random, length: int, tokens: int) -> float:
    def fresh() -> list[int]:
        return [rng.randrange(3, 250) for _ in range(length)]

    long_run = engines.seconds(name, fresh(), max_tokens=1 + tokens)
    prefill = engines.seconds(name, fresh(), max_tokens=1)
    return (long_run - prefill) / tokens


def run(opts: BenchOptions) -> list[Path]:
    """Measure ITL for both engines; write bench/results/decode.md."""
    length, tokens = (1024, 16) if opts.quick else (PROMPT_LEN, DECODE_TOKENS)
    work = opts.work_dir / "decode"
    shutil.rmtree(work, ignore_errors=True)
    consumer = {**lmcache_fs_connector(work / "kv"), "kv_role": "kv_consumer"}
    engines = EngineSet(work, {"plain": None,
                               "lmcache-fs (storing)": lmcache_fs_connector(work / "kv"),
                               ENGINES[2]: consumer}, length)
    rng = random.Random(1)
    samples: dict[str, list[float]] = {name: [] for name in ENGINES}
    try:
        for round_no in range(opts.rounds):
            progress(f"decode: round {round_no + 1}/{opts.rounds}")
            for name in ENGINES:
                samples[name].append(_itl(engines, name, rng, length, tokens))
    finally:
        engines.close()
    med = {name: median(samples[name]) for name in ENGINES}
    lines = results_header("Decoding while storing", opts, [
        f"- Workload: fresh {length}-token prompts, {tokens} decoded tokens, one request at a time"])
    lines += md_table(["engine", "median ITL (ms)", "min-max (ms)"],
                      [[n, f"{med[n] * 1e3:.2f}", spread([v * 1e3 for v in samples[n]])]
                       for n in ENGINES])
    slowdown = (med["lmcache-fs (storing)"] / med["plain"] - 1) * 100
    present = (med[ENGINES[2]] / med["plain"] - 1) * 100
    lines += [f"ITL with the connector storing: {slowdown:+.1f}% against plain vLLM (goal: at most "
              f"+5%). With the connector present but storing nothing (kv_consumer on fresh "
              f"prompts): {present:+.1f}%, the part that does not come from writing."]
    return [write_markdown(opts.results_dir / "decode.md", lines)]
