"""CPU block copies: numpy (what lmcache-fs does) against one torch ``copy_`` per page.

    python -m bench.run block-copy-cpu [--rounds 30]

Gathers (a save) and scatters (a load) one 256-token chunk of the demo's
SmolLM2-135M geometry (30 layers, 3 KV heads, head size 64, bf16, 16-token
blocks: 5.9 MB), for contiguous block ids (a fresh request's) and scattered
ones, both ways interleaved in one run. The page loop is the previous
implementation, kept here as the baseline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from bench.common import (
    BenchOptions,
    md_table,
    median,
    progress,
    results_header,
    timed,
    write_markdown,
)
from lmcache_fs.transfer.block_copy import gather_blocks, scatter_blocks

LAYERS, HEADS, BLOCK, HEAD2, BLOCKS_PER_CHUNK, CACHE_BLOCKS = 30, 3, 16, 128, 16, 2048


def page_gather(layers: list[torch.Tensor], ids: torch.Tensor, out: torch.Tensor) -> None:
    for i, kv in enumerate(layers):
        for pos, block in enumerate(ids.tolist()):
            out[i, pos].copy_(kv[block])


def page_scatter(src: torch.Tensor, layers: list[torch.Tensor], ids: torch.Tensor) -> None:
    for i, kv in enumerate(layers):
        for pos, block in enumerate(ids.tolist()):
            kv[block].copy_(src[i, pos])


def run(opts: BenchOptions) -> list[Path]:
    """Time both ways of both directions; write bench/results/block-copy-cpu.md."""
    layers = [torch.randn(CACHE_BLOCKS, HEADS, BLOCK, HEAD2).to(torch.bfloat16)
              for _ in range(LAYERS)]
    chunk = torch.empty(LAYERS, BLOCKS_PER_CHUNK, HEADS, BLOCK, HEAD2, dtype=torch.bfloat16)
    id_sets = {"contiguous": torch.arange(100, 100 + BLOCKS_PER_CHUNK),
               "scattered": torch.randperm(CACHE_BLOCKS)[:BLOCKS_PER_CHUNK]}
    ways: dict[str, Callable[[torch.Tensor], object]] = {
        "gather, numpy": lambda ids: gather_blocks(layers, ids, chunk),
        "gather, torch copy_ per page": lambda ids: page_gather(layers, ids, chunk),
        "scatter, numpy": lambda ids: scatter_blocks(chunk, layers, ids),
        "scatter, torch copy_ per page": lambda ids: page_scatter(chunk, layers, ids),
    }
    rounds = 3 if opts.quick else max(opts.rounds, 30)
    samples: dict[tuple[str, str], list[float]] = {}
    for round_no in range(rounds):
        if round_no % 10 == 0:
            progress(f"block-copy-cpu: round {round_no + 1}/{rounds}")
        for id_name, ids in id_sets.items():
            for way, copy in ways.items():  # interleaved: the machine's noise hits all alike
                samples.setdefault((way, id_name), []).append(timed(lambda: copy(ids)))
    rows = []
    for way in ways:
        for id_name in id_sets:
            ms = median(samples[(way, id_name)]) * 1e3
            baseline = median(samples[(way.split(",")[0] + ", torch copy_ per page", id_name)])
            rows.append([way, id_name, f"{ms:.2f}", f"{chunk.nbytes / ms / 1e6:.2f}",
                         f"{baseline * 1e3 / ms:.1f}x"])
    lines = results_header("CPU block copies: numpy against a torch copy_ per page", opts, [
        f"- Chunk: {LAYERS} layers x {BLOCKS_PER_CHUNK} blocks x [{HEADS}, {BLOCK}, {HEAD2}] "
        f"bf16 = {chunk.nbytes / 1e6:.1f} MB (SmolLM2-135M, 256 tokens); median of {rounds} "
        "interleaved rounds"])
    lines += md_table(["copy", "block ids", "ms per chunk", "GB/s", "speed-up over the page loop"],
                      rows)
    return [write_markdown(opts.results_dir / "block-copy-cpu.md", lines)]
