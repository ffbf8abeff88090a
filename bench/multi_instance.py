"""Several instances behind a round-robin client: multi-round chat over shared documents.

In the spirit of LMCache's multi-round-qa benchmark: each user has a long
document and asks questions round after round; the history (document,
questions, answers) grows, and a round-robin client sends each request to the
next engine, so a user's next request usually lands on another replica. Run
once on two plain vLLM engines (each has only its own prefix cache) and once
on two lmcache-fs engines sharing a directory. Answers are a fixed number of
random tokens appended to the history (the synthetic model's text is
meaningless; only prefill work matters here).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

from bench.common import BenchOptions, md_table, median, progress, results_header, write_markdown
from bench.engine_set import EngineSet, lmcache_fs_connector

USERS, ROUNDS, DOC_LEN, QUESTION_LEN, ANSWER_LEN = 3, 4, 3000, 64, 64


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


def _workload(engines: EngineSet, names: tuple[str, ...], users: int, rounds: int,
              doc_len: int) -> tuple[list[float], int, int]:
    """Run the chat; returns TTFTs, cached prompt tokens and all prompt tokens."""
    rng = random.Random(7)  # the same conversation for both configurations

    def tokens(n: int) -> list[int]:
        return [rng.randrange(3, 250) for _ in range(n)]

    histories = [tokens(doc_len) for _ in range(users)]
    ttfts, cached, total, turn = [], 0, 0, 0
    for _ in range(rounds):
        for user in range(users):
            prompt = histories[user] + tokens(QUESTION_LEN)
            engine = names[turn % len(names)]
            turn += 1
            out = engines[engine].generate([prompt], max_tokens=1)[0]
            ttfts.append(out["seconds"])
            cached += out["num_cached_tokens"]
            total += len(prompt)
            histories[user] = prompt + tokens(ANSWER_LEN)
    return ttfts, cached, total


def run(opts: BenchOptions) -> list[Path]:
    """Both configurations on the same conversation; write bench/results/multi_instance.md."""
    users, rounds, doc_len = (2, 2, 1024) if opts.quick else (USERS, ROUNDS, DOC_LEN)
    max_len = doc_len + rounds * (QUESTION_LEN + ANSWER_LEN)
    work = opts.work_dir / "multi"
    shutil.rmtree(work, ignore_errors=True)
    configs = {"plain vLLM x2": ("plain1", "plain2"), "lmcache-fs x2": ("lmc1", "lmc2")}
    engines = EngineSet(work, {"plain1": None, "plain2": None,
                               "lmc1": lmcache_fs_connector(work / "kv"),
                               "lmc2": lmcache_fs_connector(work / "kv")}, max_len)
    rows = []
    try:
        for label, names in configs.items():
            progress(f"multi-instance: {label}")
            ttfts, cached, total = _workload(engines, names, users, rounds, doc_len)
            rows.append([label, len(ttfts), f"{cached / total * 100:.0f}%",
                         f"{sum(ttfts) / len(ttfts) * 1e3:.0f}", f"{median(ttfts) * 1e3:.0f}",
                         f"{_p90(ttfts) * 1e3:.0f}"])
    finally:
        engines.close()
    lines = results_header("Several instances, round-robin, multi-round chat", opts, [
        f"- Workload: {users} users x {rounds} rounds, {doc_len}-token document each, "
        f"{QUESTION_LEN}-token questions, {ANSWER_LEN}-token answers, 2 engines, round-robin, "
        "one request at a time"])
    lines += md_table(["configuration", "requests", "prompt tokens cached", "mean TTFT (ms)",
                       "median TTFT (ms)", "p90 TTFT (ms)"], rows)
    return [write_markdown(opts.results_dir / "multi_instance.md", lines)]
