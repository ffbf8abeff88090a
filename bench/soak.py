"""Soak: two lmcache-fs engines on one small directory for minutes, one killed mid-run.

    python -m bench.soak [--duration-s 420] [--clients 4] [--budget-mb 48]   (make soak)

What runs, all real processes on the synthetic model (OpenAI API servers):
- engines A and B with the connector on ONE directory whose budget holds a
  fraction of the working set, with a 1 s eviction interval, so eviction runs
  all the time while both store and load;
- a plain vLLM engine R, the reference: every answer of A and B is compared
  token by token with R's answer to the same prompt (greedy, float32);
- several client threads sending overlapping prompts (documents that share
  prefixes, each followed by one of several questions) to A or B at random;
  each engine's own prefix cache holds about three prompts, so most repeats are
  loaded from the directory (or recomputed where eviction removed them);
- B is SIGKILLed (its whole process group) mid-run, then restarted on the same
  directory; clients keep using A meanwhile;
- a checker thread that keeps reading every published chunk file as ``lmcache-fs
  verify`` does (header, size, checksum) and sums the directory's size.

It prints and writes (``bench/results/soak.json``) wrong tokens, engine crashes
besides the kill, partial or damaged published files seen, the highest
directory size against the high watermark, and the hit rates. It exits 1 if any
of the first three is not 0.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import requests

from bench.common import REPO, RESULTS_DIR, git_commit

sys.path.insert(0, str(REPO / "frontend"))  # the demo's launcher and client (process helpers)
from engine_client import cache_counters  # noqa: E402
from launcher import (  # noqa: E402
    SYNTHETIC,
    EngineSpec,
    ProcessGroup,
    _signal_group,
    engine_command,
    free_port,
    resolve_model,
    wait_until_healthy,
)

from lmcache_fs.ops.inventory import namespace_dirs, scan_chunks  # noqa: E402
from lmcache_fs.ops.verify import PIECE_BYTES, check_chunk  # noqa: E402

HIGH_WATERMARK = 0.95  # lmcache-fs's default eviction_high_watermark
CHUNK = 256  # lmcache-fs's default chunk_size
MAX_MODEL_LEN = 2048  # the longest prompt is about 1,850 tokens
LOCAL_KV_BYTES = 40 << 20  # 5,120 tokens of the synthetic model (8 KiB each in float32)


@dataclass
class SoakResult:
    """What the soak saw; the first three must be 0."""

    wrong_tokens: int = 0
    engine_crashes: int = 0
    partial_files_seen: int = 0
    requests: int = 0
    requests_to_b_after_restart: int = 0
    request_errors_while_killed: int = 0
    request_errors_otherwise: int = 0
    kills: int = 0
    files_checked: int = 0
    max_directory_bytes: int = 0
    budget_bytes: int = 0
    high_watermark_bytes: int = 0
    prompt_tokens: int = 0
    external_hit_tokens: int = 0
    local_hit_tokens: int = 0
    duration_s: float = 0.0
    damaged_examples: list[str] = field(default_factory=list)

    def rate(self, tokens: int) -> float:
        """A share of all prompt tokens sent to A and B."""
        return round(tokens / self.prompt_tokens, 3) if self.prompt_tokens else 0.0


def prompts(seed: int = 0, documents: int = 14, questions: int = 3) -> list[list[int]]:
    """Overlapping prompts: documents of 2-6 chunks, each followed by one of a few questions.

    Document i+1 starts with the first half of document i, so prefixes overlap
    across documents as well as across questions.
    """
    rng = random.Random(seed)
    docs: list[list[int]] = []
    for i in range(documents):
        length = CHUNK * rng.randint(2, 6) + rng.randint(0, CHUNK - 1)
        head = docs[-1][: len(docs[-1]) // 2] if docs and i % 2 else []
        docs.append(head + [rng.randint(3, 250) for _ in range(length - len(head))])
    tails = [[rng.randint(3, 250) for _ in range(rng.randint(5, 40))] for _ in range(questions)]
    return [doc + tail for doc in docs for tail in tails]


class Engines:
    """A, B (connector, one directory) and R (plain), with B's kill and restart."""

    def __init__(self, model: Path, synthetic: bool, kv_dir: Path, log_dir: Path,
                 budget_bytes: int):
        self.model, self.synthetic, self.kv_dir, self.log_dir = model, synthetic, kv_dir, log_dir
        self.budget_bytes = budget_bytes
        self.group = ProcessGroup()
        self.specs = {name: EngineSpec(name, name, free_port(), name != "R") for name in "ABR"}
        # One OpenMP thread per engine (vLLM reserves a core more with a connector: unequal
        # thread counts would sum in another order and flip near-tied greedy picks), A and R
        # on the first core, B on the last: a restarted B does not start beside A's threads.
        last = (os.cpu_count() or 1) - 1
        self.cores = {"A": "0", "R": "0", "B": str(last)}
        self.restarts = {name: 0 for name in self.specs}
        self.killed = threading.Event()  # set while B is down on purpose
        self.counters_before_kill = {"external": 0.0, "local": 0.0}
        self.back_at: float | None = None  # when B answered again after its kill
        self.restart_error = ""

    def command(self, spec: EngineSpec) -> list[str]:
        cmd = engine_command(self.model, spec, self.kv_dir, self.synthetic,
                             max_model_len=MAX_MODEL_LEN)
        # A local prefix cache of about three prompts: repeats must come from the directory.
        cmd[cmd.index("--kv-cache-memory-bytes") + 1] = str(LOCAL_KV_BYTES)
        if spec.uses_cache:
            config_at = cmd.index("--kv-transfer-config") + 1
            config = json.loads(cmd[config_at])
            config["kv_connector_extra_config"].update(
                max_disk_size_gb=self.budget_bytes / 1e9, eviction_interval_s=1.0)
            cmd[config_at] = json.dumps(config)
        return cmd

    def start(self, names: str) -> None:
        for name in names:
            spec = self.specs[name]
            log = self.log_dir / f"engine-{name}-{self.restarts[name]}.log"
            env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": self.cores[name]}
            self.group.start(name, self.command(spec), log, env)
        wait_until_healthy([self.specs[n] for n in names], self.group, 600,
                           say=lambda line: print(line, flush=True))

    def kill_and_restart_b(self) -> None:
        counters = cache_counters(self.specs["B"].as_config())
        self.counters_before_kill["external"] += counters.shared_hit_tokens
        self.counters_before_kill["local"] += counters.local_hit_tokens
        self.killed.set()
        proc, _ = self.group.procs["B"]
        _signal_group(proc, signal.SIGKILL)
        proc.wait()
        print("  B SIGKILLed mid-run; restarting it on the same directory", flush=True)
        self.restarts["B"] += 1
        try:
            self.start("B")
        except (RuntimeError, TimeoutError) as exc:  # counted as a crash by the main loop
            self.restart_error = str(exc)
            return
        self.back_at = time.monotonic()
        self.killed.clear()

    def crashed(self) -> list[str]:
        return [n for n in self.group.exited() if not (n == "B" and self.killed.is_set())]


def complete(spec: EngineSpec, model: str, ids: list[int], max_tokens: int = 8) -> list[int]:
    """Greedy completion of ``ids``; the generated token ids."""
    body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True}
    response = requests.post(f"{spec.url}/v1/completions", json=body, timeout=300)
    response.raise_for_status()
    return list(response.json()["choices"][0]["token_ids"])


def directory_bytes(root: Path) -> int:
    """Bytes of every file under ``root`` (chunks, quarantine, temporaries, leases, pins)."""
    total = 0
    for directory, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except FileNotFoundError:  # evicted meanwhile
                pass
    return total


def check_directory(kv_dir: Path, result: SoakResult, stop: threading.Event) -> None:
    """Verify every published chunk file, again and again; track the directory's size."""
    buffer = bytearray(PIECE_BYTES)
    while not stop.is_set():
        result.max_directory_bytes = max(result.max_directory_bytes, directory_bytes(kv_dir))
        for ns in namespace_dirs(kv_dir):
            for entry in scan_chunks(ns):
                finding = check_chunk(entry.path, ns.name, entry.key, buffer)
                result.files_checked += 1
                if finding is not None and finding.damaged:
                    result.partial_files_seen += 1
                    if len(result.damaged_examples) < 5:
                        result.damaged_examples.append(f"{finding.path}: {finding.problem}")
        stop.wait(1.0)


def run(duration_s: float, clients: int, budget_mb: int, work_dir: Path) -> SoakResult:
    model, synthetic = resolve_model(SYNTHETIC)  # float32: "same tokens" is exact
    kv_dir, log_dir = work_dir / "kv", work_dir / "logs"
    kv_dir.mkdir(parents=True)
    result = SoakResult(budget_bytes=budget_mb << 20,
                        high_watermark_bytes=int(HIGH_WATERMARK * (budget_mb << 20)))
    engines = Engines(model, synthetic, kv_dir, log_dir, budget_mb << 20)
    pool = prompts()
    reference: dict[int, list[int]] = {}
    reference_lock = threading.Lock()
    stop = threading.Event()
    lock = threading.Lock()

    def expected(i: int) -> list[int]:
        with reference_lock:  # one reference request at a time: R answers each prompt once
            if i not in reference:
                reference[i] = complete(engines.specs["R"], model.name, pool[i])
            return reference[i]

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            i = rng.randrange(len(pool))
            name = "A" if engines.killed.is_set() else rng.choice("AB")
            try:
                got = complete(engines.specs[name], model.name, pool[i])
            except requests.RequestException:
                with lock:
                    if name == "B" and engines.killed.is_set():
                        result.request_errors_while_killed += 1
                    else:
                        result.request_errors_otherwise += 1
                continue
            want = expected(i)
            with lock:
                result.requests += 1
                result.requests_to_b_after_restart += name == "B" and engines.back_at is not None
                result.prompt_tokens += len(pool[i])
                if got != want:
                    result.wrong_tokens += sum(a != b for a, b in zip(got, want)) or 1
                    print(f"  WRONG TOKENS from {name} for prompt {i}: {got} vs {want}", flush=True)

    try:
        print(f"starting A, B (lmcache-fs, {budget_mb} MiB budget) and R (plain) ...", flush=True)
        engines.start("ABR")
        checker = threading.Thread(target=check_directory, args=(kv_dir, result, stop), daemon=True)
        threads = [threading.Thread(target=client, args=(s,), daemon=True) for s in range(clients)]
        start = time.monotonic()
        checker.start()
        for thread in threads:
            thread.start()
        kill_at = start + duration_s * 0.3
        restarter = threading.Thread(target=engines.kill_and_restart_b, daemon=True)

        def running() -> bool:  # the duration, and at least a minute of B after its restart
            if time.monotonic() - start < duration_s:
                return True
            if engines.restart_error or not restarter.is_alive() and engines.back_at is None:
                return False
            return engines.back_at is None or time.monotonic() - engines.back_at < 60

        while running():
            time.sleep(1.0)
            crashed = engines.crashed()
            if crashed or engines.restart_error:
                result.engine_crashes += len(crashed) or 1
                print(engines.restart_error or engines.group.describe_exit(crashed[0]), flush=True)
                break
            if not result.kills and time.monotonic() >= kill_at:
                result.kills += 1
                restarter.start()
        stop.set()
        for thread in threads:
            thread.join(timeout=320)
        checker.join(timeout=60)
        result.duration_s = time.monotonic() - start
        for name in "AB":
            counters = cache_counters(engines.specs[name].as_config())
            result.external_hit_tokens += int(counters.shared_hit_tokens)
            result.local_hit_tokens += int(counters.local_hit_tokens)
        result.external_hit_tokens += int(engines.counters_before_kill["external"])
        result.local_hit_tokens += int(engines.counters_before_kill["local"])
    finally:
        stop.set()
        engines.group.stop_all()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=420.0,
                        help="client traffic time, after the engines are up (default 420)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--budget-mb", type=int, default=48,
                        help="the directory's budget (default 48 MiB: about 24 chunks of the "
                             "synthetic model, a fraction of the prompts' chunks)")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR / "soak.json")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lmcache-fs-soak-"))
    print(f"engine logs in {work / 'logs'}", flush=True)
    try:
        result = run(args.duration_s, args.clients, args.budget_mb, work)
    finally:
        shutil.rmtree(work / "kv", ignore_errors=True)
    report = {**asdict(result),
              "hit_rate_from_directory": result.rate(result.external_hit_tokens),
              "hit_rate_from_local_prefix_cache": result.rate(result.local_hit_tokens),
              "command": " ".join(["python -m bench.soak", *(argv if argv is not None
                                                               else sys.argv[1:])]),
              "commit": git_commit()}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    failed = result.wrong_tokens or result.engine_crashes or result.partial_files_seen
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
