"""Start and drive real vLLM engines in separate processes (see engine_worker.py)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from engine_worker import REPLY_MARKER
from launcher import EngineSpec, ProcessGroup, engine_command, free_port, wait_until_healthy

START_TIMEOUT_S = 300


def one_thread_per_worker(tensor_parallel_size: int = 1) -> dict[str, str]:
    """The environment that gives each of an engine's workers one compute thread.

    vLLM's CPU build reserves one more core for an engine with a KV connector, so
    by default a connector engine and a plain one compute with different thread
    counts: another summation order (a random model's near-tied logits then pick
    other tokens) and unequal speed. One compute thread on the last core for every
    engine makes "same tokens as plain vLLM" exact and timings comparable. With
    tensor parallelism rank r computes on core r: the CPU build starts more than one
    worker only when each has cores of its own ("Not enough allowed NUMA nodes to
    bind threads of 2 local CPUWorkers" otherwise).

    Raises:
        ValueError: fewer cores than ranks.
    """
    cores = os.cpu_count() or 1
    if tensor_parallel_size == 1:
        return {"VLLM_CPU_OMP_THREADS_BIND": str(cores - 1)}
    if tensor_parallel_size > cores:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} needs a core per rank; "
                         f"this machine has {cores}")
    return {"VLLM_CPU_OMP_THREADS_BIND": "|".join(map(str, range(tensor_parallel_size)))}


class EngineProcess:
    """One engine process; ``generate`` returns token ids and cache counts per prompt."""

    def __init__(self, model: Path, log_path: Path, connector: dict[str, Any] | None = None,
                 max_num_batched_tokens: int = 0, env: dict[str, str] | None = None,
                 max_model_len: int = 8192, dtype: str = "float32",
                 speculative: dict[str, Any] | None = None, tensor_parallel_size: int = 1,
                 engine_args: dict[str, Any] | None = None):
        # float32 by default: a random model's logits are often nearly tied, and in
        # bf16 the rounding of another, equally correct computation order (chunked
        # prefill, a prefix loaded from the cache) can flip a greedy pick. In float32
        # "same tokens as plain vLLM" is an exact check. Benchmarks pass "bfloat16".
        cmd = [sys.executable, str(Path(__file__).with_name("engine_worker.py")),
               "--model", str(model), "--max-model-len", str(max_model_len), "--dtype", dtype,
               "--tensor-parallel-size", str(tensor_parallel_size)]
        if connector is not None:
            cmd += ["--connector-config", json.dumps(connector)]
        if max_num_batched_tokens:
            cmd += ["--max-num-batched-tokens", str(max_num_batched_tokens)]
        if speculative is not None:
            cmd += ["--speculative-config", json.dumps(speculative)]
        if engine_args:
            cmd += ["--engine-args", json.dumps(engine_args)]
        self.log_path = log_path
        self._log = open(log_path, "w")
        # A session of its own: kill() takes the engine core and workers with it.
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     start_new_session=True,
                                     env={**os.environ, **one_thread_per_worker(tensor_parallel_size),
                                          **(env or {})})
        self._read_reply(START_TIMEOUT_S)

    def _read_reply(self, timeout_s: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"engine exited (code {self.proc.poll()}); log: {self.log_path}\n"
                                   + self.log_tail())
            if line.startswith(REPLY_MARKER):
                return json.loads(line[len(REPLY_MARKER):])
            self._log.write(line)
            self._log.flush()
        raise TimeoutError(f"engine did not answer in {timeout_s} s; log: {self.log_path}")

    def log_tail(self, n: int = 40) -> str:
        self._log.flush()
        return "".join(Path(self.log_path).read_text().splitlines(keepends=True)[-n:])

    def log_text(self) -> str:
        self._log.flush()
        return Path(self.log_path).read_text()

    def send(self, op: str, **kwargs: Any) -> None:
        """Send a command without waiting (to run several engines at once)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()

    def receive(self, timeout_s: float = 600) -> dict[str, Any]:
        """The reply to the oldest command sent."""
        return self._read_reply(timeout_s)

    def command(self, op: str, timeout_s: float = 600, **kwargs: Any) -> dict[str, Any]:
        self.send(op, **kwargs)
        return self.receive(timeout_s)

    def generate(self, prompts: list[list[int]], max_tokens: int = 8) -> list[dict[str, Any]]:
        return self.command("generate", prompts=prompts, max_tokens=max_tokens)["outputs"]

    def reset_prefix_cache(self) -> None:
        self.command("reset_prefix_cache")

    def kill(self) -> None:
        """SIGKILL the engine and its engine core and workers at once, as a crash would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.command("quit", timeout_s=60)
                self.proc.wait(timeout=60)
            except Exception:
                self.kill()
        self._log.close()


def start_served(group: ProcessGroup, model: Path, name: str, log: Path,
                 storage: Path | None = None, env: Mapping[str, str] = {},
                 tensor_parallel_size: int = 1, settings: Mapping[str, object] = {},
                 extra_args: Sequence[str] = ()) -> EngineSpec:
    """Start one ``vllm serve`` (the OpenAI API server) of the synthetic model in ``group``
    (wait for it with ``launcher.wait_until_healthy``: several can start at once).

    With lmcache-fs on ``storage`` and its ``settings`` (``None``: plain vLLM). Served
    as the demo serves it (``frontend/launcher.py``), with ``/reset_prefix_cache``
    enabled and one compute thread per worker (:func:`one_thread_per_worker`);
    ``env`` adds to that, ``extra_args`` go to vLLM.
    """
    spec = EngineSpec(name, name, free_port(), uses_cache=storage is not None)
    args = [*extra_args, "--tensor-parallel-size", str(tensor_parallel_size)]
    # (a plain engine gets no kv-transfer-config: its kv_dir is never read)
    group.start(name, engine_command(model, spec, storage or Path(), synthetic=True,
                                     connector_settings=settings, extra_args=args), log,
                {**os.environ, "VLLM_SERVER_DEV_MODE": "1",
                 **one_thread_per_worker(tensor_parallel_size), **env})
    return spec


@contextlib.contextmanager
def served(model: Path, name: str, log: Path, storage: Path | None = None,
           **options: Any) -> Iterator[EngineSpec]:
    """:func:`start_served` in a group of its own, healthy, stopped on exit (``options``:
    its keywords)."""
    group = ProcessGroup()
    try:
        spec = start_served(group, model, name, log, storage, **options)
        wait_until_healthy([spec], group, timeout_s=600, say=lambda _: None)
        yield spec
    finally:
        group.stop_all()
