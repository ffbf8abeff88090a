"""Hybrid models with lmcache-fs: KV capacity, bytes per chunk of each group, TTFT of a second instance.

On a test model of tests/hybrid_models.py, three real vLLM CPU engines in their
own processes, bf16, the same KV cache memory each:

- ``plain``: no connector; its TTFT is the recompute baseline;
- ``A`` stores each prompt; ``B`` (another instance) then loads it from A's files.

Reports vLLM's own "KV cache size" start-up line for each engine, the bytes of
each KV cache group's chunk file, and B's TTFT against plain recompute (the
wall time of a one-token greedy generation, median of rounds). Families:

- ``gemma3`` (chunks of 512): four sliding-window layers (window 256), two
  full-attention ones; sliding files hold only the window, against one file of
  every layer's whole chunk (what lmcache-fs stored with the hybrid manager off).
- ``qwen3_next`` (chunks of 256, vLLM's block for it): Gated DeltaNet and full
  attention alternating. An attention file per chunk, a state file where vLLM
  kept a state: with one prefill step per prompt, the last block boundary below
  the last token, where the step ends if the prompt ends in the first half of a
  block (so 4,100 tokens: a hit of 4,096).

    flock /tmp/lmcache-engine.lock .venv/bin/python -m bench.hybrid --tokens 3000 --rounds 3
    flock /tmp/lmcache-engine.lock .venv/bin/python -m bench.hybrid --family qwen3_next \\
        --tokens 4100 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench.common import REPO, machine_lines

sys.path.insert(0, str(REPO / "tests"))  # the engine-process harness and the model builder
sys.path.insert(1, str(REPO / "frontend"))
from engines import EngineProcess  # noqa: E402
from hybrid_models import build_hybrid_model  # noqa: E402
from synthetic_model import build_synthetic_model  # noqa: E402

from lmcache_fs.ops.inspection import read_header  # noqa: E402
from lmcache_fs.storage.layout import is_temporary  # noqa: E402


@dataclass(frozen=True)
class Family:
    """A test model as the benchmark runs it."""

    chunk_size: int
    files_per_prompt: Callable[[int, int], int]
    """Files A publishes for a prompt of (tokens, chunk size)."""
    windowed: bool
    """Sliding-window groups: compare with one file of every layer's whole chunk."""
    out: str


FAMILIES = {
    "gemma3": Family(512, lambda tokens, chunk: 3 * (tokens // chunk), True, "hybrid.md"),
    "qwen3_next": Family(256, lambda tokens, chunk: tokens // chunk + 1, False,
                         "hybrid-qwen3-next.md"),
}


def _capacity(engine: EngineProcess) -> int:
    match = re.search(r"KV cache size: ([\d,]+) tokens", engine.log_text())
    return int(match.group(1).replace(",", "")) if match else -1


def _files_by_group(storage: Path) -> dict[int, list[Path]]:
    groups: dict[int, list[Path]] = {}
    for manifest in storage.glob("*/namespace.json"):
        group = int(json.loads(manifest.read_text()).get("kv_group", 0))
        groups.setdefault(group, []).extend(
            p for p in manifest.parent.glob("??/*.safetensors") if not is_temporary(p.name))
    return groups


def _ttft(engine: EngineProcess, prompt: list[int]) -> tuple[float, int]:
    out = engine.generate([prompt], max_tokens=1)[0]
    return out["seconds"], out["num_cached_tokens"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=list(FAMILIES), default="gemma3")
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=0, help="default: the family's")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: bench/results/ and the family's file name")
    args = parser.parse_args()
    family = FAMILIES[args.family]
    chunk_size = args.chunk_size or family.chunk_size
    out = args.out or REPO / "bench" / "results" / family.out

    tokenizer = build_synthetic_model(REPO / ".cache" / "tiny-llama")
    model = build_hybrid_model(REPO / ".cache" / f"hybrid-{args.family}", args.family, tokenizer)
    work = Path(tempfile.mkdtemp(prefix="bench-hybrid-"))
    storage = work / "kv"
    connector = {"kv_connector": "LMCacheFSConnector", "kv_role": "kv_both",
                 "kv_connector_extra_config": {"storage_path": str(storage),
                                               "chunk_size": chunk_size}}
    rng = random.Random(7)
    engines = {"plain": EngineProcess(model, work / "plain.log", dtype="bfloat16"),
               "A": EngineProcess(model, work / "a.log", connector, dtype="bfloat16"),
               "B": EngineProcess(model, work / "b.log", connector, dtype="bfloat16")}
    try:
        warm = [rng.randrange(3, 250) for _ in range(300)]
        for engine in engines.values():
            engine.generate([warm], max_tokens=1)
        plain, loaded, hits = [], [], []
        for _ in range(args.rounds):
            prompt = [rng.randrange(3, 250) for _ in range(args.tokens)]
            before = sum(len(v) for v in _files_by_group(storage).values())
            engines["A"].generate([prompt], max_tokens=1)
            want = before + family.files_per_prompt(args.tokens, chunk_size)
            deadline = time.monotonic() + 60
            while sum(len(v) for v in _files_by_group(storage).values()) < want:
                if time.monotonic() > deadline:
                    raise RuntimeError("A's chunk files did not appear")
                time.sleep(0.05)
            seconds, hit = _ttft(engines["B"], prompt)
            loaded.append(seconds)
            hits.append(hit)
            plain.append(_ttft(engines["plain"], prompt)[0])
        groups = _files_by_group(storage)
        sizes = {g: read_header(paths[0]) for g, paths in sorted(groups.items())}
        file_bytes = {g: paths[0].stat().st_size for g, paths in sorted(groups.items())}
        layers = {g: h.shape[0] for g, h in sizes.items()}
        kinds = {g: json.loads((paths[0].parent.parent / "namespace.json").read_text())
                 .get("state_type", "attention") for g, paths in groups.items()}
        command = ("flock /tmp/lmcache-engine.lock .venv/bin/python -m bench.hybrid "
                   + shlex.join(sys.argv[1:]))
        lines = [
            f"# Hybrid models: capacity, bytes per chunk, TTFT ({args.family}, bench/hybrid.py)", "",
            *machine_lines(work), f"- Command: `{command}`", "",
            "## vLLM's KV cache size (its start-up line; same KV memory for each engine)", "",
            *(f"- {name}: {_capacity(e):,} tokens" for name, e in engines.items()), "",
            f"## Bytes per chunk of {chunk_size} tokens", "",
            *(f"- group {g} ({kinds[g]}): {layers[g]} layers x {h.shape[1]} blocks, "
              f"{h.nbytes:,} bytes of KV ({file_bytes[g]:,} bytes file; {len(groups[g])} files "
              f"for the {args.rounds} prompts and the warm-up)" for g, h in sizes.items())]
        if family.windowed:
            page = {g: h.nbytes // (h.shape[0] * h.shape[1]) for g, h in sizes.items()}
            full = max(sizes, key=lambda g: sizes[g].shape[1])  # a group holding whole chunks
            all_layers = sum(layers.values()) * sizes[full].shape[1] * page[full]
            lines.append(f"- all groups: {sum(h.nbytes for h in sizes.values()):,} bytes of KV "
                         f"per chunk, against {all_layers:,} for every layer's whole chunk "
                         "(hybrid manager off, as before)")
        lines += [
            "", f"## TTFT at {args.tokens} tokens (median of {args.rounds})", "",
            f"- plain vLLM recompute: {statistics.median(plain) * 1e3:.0f} ms "
            f"(rounds: {', '.join(f'{s * 1e3:.0f}' for s in plain)})",
            f"- B loading A's chunks: {statistics.median(loaded) * 1e3:.0f} ms "
            f"(rounds: {', '.join(f'{s * 1e3:.0f}' for s in loaded)}; hit tokens {hits})", ""]
        out.write_text("\n".join(lines))
        print("\n".join(lines))
    finally:
        for engine in engines.values():
            engine.close()


if __name__ == "__main__":
    main()
