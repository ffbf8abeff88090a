"""The local demo: four vLLM engines and the Streamlit page as processes (no GPU, no Docker).

Two engines (A, B) use the lmcache-fs connector on one shared directory, two
(C, D) are plain vLLM: the topology of docker-compose.yml, on the CPU build.
By default it serves SmolLM2-135M-Instruct, a real chat model converted once
from a PyPI wheel (real_model.py); ``MODEL=synthetic`` serves a random-weight
model instead (meaningless answers, real prefill time).

    python frontend/launcher.py                  # engines + page; Ctrl-C stops everything
    python frontend/launcher.py --headless       # scripted TTFT comparison, table, exit
    MODEL=synthetic python frontend/launcher.py          # the random-weight model
    MODEL=/models/my-llama python frontend/launcher.py   # serve a local model folder

Every process it starts runs in its own process group and is stopped (TERM,
then KILL) when the launcher exits for any reason.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
import webbrowser
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import requests
from ask import EngineAnswer, ask_one
from cache_panel import summarize_cache, wait_for_new_chunks
from demo_config import CONFIG_ENV, DemoConfig, EngineConfig, sample_documents, write_demo_config
from engine_client import check_health

REPO = Path(__file__).resolve().parent.parent
FRONTEND = REPO / "frontend"
SYNTHETIC_MODEL_DIR = REPO / ".cache" / "tiny-llama"
CONNECTOR_NAME = "LMCacheFSConnector"
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")

# Sized for a 2-core, few-GiB machine shared with others: a fixed KV pool per engine
# (on CPU, --gpu-memory-utilization is a fraction of the whole node's RAM that must also
# cover the worker's own ~0.7 GiB, so a small fraction fails and a large one is greedy).
CPU_KV_CACHE_BYTES = 256 * 1024 * 1024
MAX_MODEL_LEN = 8192
# The synthetic model's tokenizer makes one token per byte: the longest sample document
# (25k bytes) must fit, and 28k tokens of its float32 KV (8 KiB each) fit the pool above.
SYNTHETIC_MAX_MODEL_LEN = 28 * 1024
SYNTHETIC = "synthetic"
# On CPU every model is served in float32 unless --dtype/DTYPE says otherwise: an engine that
# continues from cached KV (B, from the shared directory) computes the new tokens in other, smaller
# matrix products than one that prefills the whole prompt, and bf16 rounds those sums differently
# enough to part greedy answers after a few words (B said "201 members" where A, C and D said
# "1996" on the GPL-2). In float32 they give the same answer; docs/demo.md has the cost.
DEFAULT_DTYPE = "float32"
COMPARISON_QUESTION = "What is this document about? Answer in one sentence."


@dataclass(frozen=True)
class EngineSpec:
    """One engine of the topology: its page label, port and whether it shares the cache."""

    name: str
    label: str
    port: int
    uses_cache: bool

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def as_config(self) -> EngineConfig:
        return EngineConfig(self.label, self.url, self.uses_cache)


@dataclass(frozen=True)
class ComparisonRow:
    """One engine's results in the headless comparison, one list entry per round."""

    label: str
    role: str
    uses_cache: bool
    ttft_s: list[float]
    prompt_tokens: list[int]
    shared_hit_tokens: list[int]
    local_hit_tokens: list[int]
    same_answer_as_writer: bool

    @property
    def median_ttft_s(self) -> float:
        return statistics.median(self.ttft_s)


def free_port(preferred: int = 0) -> int:
    """``preferred`` if nothing listens there, else any free port."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise OSError("no free TCP port")


def resolve_model(model: str) -> tuple[Path, bool]:
    """The folder to serve and whether it is the synthetic model.

    A ``model`` naming a local folder is served as is; ``synthetic`` gets the
    locally built random-weight model; anything else (empty, or a hub id such as
    docker compose's default) gets SmolLM2-135M-Instruct, converted once from its
    PyPI wheel.
    """
    from real_model import DEFAULT_MODEL_DIR, build_real_model
    from synthetic_model import MARKER, build_synthetic_model

    if model and Path(model).is_dir():
        folder = Path(model).resolve()
        return folder, (folder / MARKER).exists()
    if model == SYNTHETIC:
        print(f"Building the synthetic model in {SYNTHETIC_MODEL_DIR} (once) ...", flush=True)
        return build_synthetic_model(SYNTHETIC_MODEL_DIR), True
    if model:
        print(f"MODEL={model} is not a local folder and the local demo downloads no model "
              "from a hub: serving SmolLM2-135M-Instruct instead.", flush=True)
    return build_real_model(DEFAULT_MODEL_DIR, say=lambda line: print(line, flush=True)), False


def kv_pool_bytes(model: Path, dtype: str, max_model_len: int) -> int:
    """One engine's KV pool: CPU_KV_CACHE_BYTES, or more where one longest prompt needs it
    (vLLM refuses to start otherwise; SmolLM2 in float32 needs 46 KB a token, 377 MB at 8k)."""
    try:
        config = json.loads((model / "config.json").read_text())
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        per_token = 2 * config["num_hidden_layers"] * config.get("num_key_value_heads", heads) * head_dim
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return CPU_KV_CACHE_BYTES  # not a plain decoder's config: the fixed pool
    item_bytes = 4 if dtype == "float32" else 2
    return max(CPU_KV_CACHE_BYTES, per_token * item_bytes * max_model_len * 5 // 4)


def engine_command(model: Path, spec: EngineSpec, kv_dir: Path, synthetic: bool = False,
                   dtype: str = "", max_model_len: int = 0,
                   connector_settings: Mapping[str, object] = {},
                   extra_args: Sequence[str] = ()) -> list[str]:
    """The ``vllm serve`` command line of one engine (via the module: the ``vllm`` script
    of the CPU wheel looks up package metadata named "vllm" and fails).

    Served in :data:`DEFAULT_DTYPE` unless ``dtype`` says otherwise (the synthetic model's
    nearly tied logits are the most sensitive to bf16's rounding); ``max_model_len``
    overrides the model's default. ``connector_settings`` add lmcache-fs settings to
    ``storage_path``; ``extra_args`` go to vLLM as they are (e.g.
    ``--tensor-parallel-size 2``).
    """
    dtype = dtype or DEFAULT_DTYPE
    max_model_len = max_model_len or (SYNTHETIC_MAX_MODEL_LEN if synthetic else MAX_MODEL_LEN)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           "--model", str(model), "--served-model-name", model.name,
           "--host", "127.0.0.1", "--port", str(spec.port),
           "--enforce-eager", "--max-model-len", str(max_model_len),
           "--kv-cache-memory-bytes", str(kv_pool_bytes(model, dtype, max_model_len)),
           "--dtype", dtype, "--disable-uvicorn-access-log", *extra_args]
    if spec.uses_cache:
        cmd += ["--kv-transfer-config", json.dumps({
            "kv_connector": CONNECTOR_NAME, "kv_role": "kv_both",
            "kv_connector_extra_config": {"storage_path": str(kv_dir), **connector_settings}})]
    return cmd


class ProcessGroup:
    """Child processes, each in its own session, all stopped by :meth:`stop_all`."""

    def __init__(self) -> None:
        self.procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}

    def start(self, name: str, cmd: Sequence[str], log_path: Path, env: dict[str, str]) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, cwd=REPO,
                                    start_new_session=True)
        self.procs[name] = (proc, log_path)

    def exited(self) -> list[str]:
        """Names of children that are no longer running."""
        return [name for name, (proc, _) in self.procs.items() if proc.poll() is not None]

    def describe_exit(self, name: str, lines: int = 15) -> str:
        proc, log_path = self.procs[name]
        tail = log_path.read_text(errors="replace").splitlines()[-lines:]
        return (f"{name} exited with code {proc.returncode}; last lines of {log_path}:\n  "
                + "\n  ".join(tail))

    def kill(self, name: str) -> None:
        """SIGKILL one child's whole process group at once (a vLLM server's engine core and
        workers too), as a crash would; :meth:`stop_all` still reaps it."""
        proc, _ = self.procs[name]
        _signal_group(proc, signal.SIGKILL)
        proc.wait()

    def stop_all(self, grace_s: float = 30.0) -> None:
        """TERM every child's process group, then KILL what is left after ``grace_s``."""
        for proc, _ in self.procs.values():
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc, _ in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)  # stragglers in the group (engine workers)
            proc.wait()


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def wait_until_healthy(engines: Sequence[EngineSpec], group: ProcessGroup, timeout_s: float,
                       say: Callable[[str], None] = print) -> None:
    """Poll every engine's /health until all answer; raise if one exits or time runs out."""
    start = time.monotonic()
    ready: set[str] = set()
    last_report = 0.0
    while len(ready) < len(engines):
        dead = [name for name in group.exited() if name in {e.name for e in engines}]
        if dead:
            raise RuntimeError(group.describe_exit(dead[0]))
        elapsed = time.monotonic() - start
        if elapsed > timeout_s:
            missing = ", ".join(e.label for e in engines if e.name not in ready)
            raise TimeoutError(f"engines not healthy after {timeout_s:.0f} s: {missing} "
                               f"(logs in {group.procs[engines[0].name][1].parent})")
        for engine in engines:
            if engine.name not in ready and check_health(engine.as_config(), timeout=1.0).ok:
                ready.add(engine.name)
                say(f"  {engine.label} ready at {engine.url} after {elapsed:.0f} s")
        if elapsed - last_report >= 15 and len(ready) < len(engines):
            waiting = ", ".join(e.label for e in engines if e.name not in ready)
            say(f"  waiting for engines ({elapsed:.0f} s of {timeout_s:.0f} s): {waiting}")
            last_report = elapsed
        time.sleep(1.0)


def measure(engine: EngineSpec, context: str, max_tokens: int) -> EngineAnswer:
    """One streamed request, with the engine's cache-hit counters read around it."""
    answer = ask_one(engine.as_config(), context, COMPARISON_QUESTION, max_tokens)
    if answer.error:
        raise RuntimeError(answer.error)
    return answer


def run_comparison(engines: Sequence[EngineSpec], kv_dir: Path, rounds: int,
                   max_tokens: int = 16, say: Callable[[str], None] = print) -> list[ComparisonRow]:
    """The fair comparison: every engine meets each round's prompt for the first time.

    Each round takes a sample document behind a fresh random tag, so no engine and
    no cache file has seen it. The writer (the first cache engine) answers first
    and stores the prompt's chunks; every other engine then answers the same
    prompt once, in order: cache engines load the writer's chunks, plain engines
    prefill from scratch. Requests run one at a time, so engines do not share cores.
    """
    writer = next(e for e in engines if e.uses_cache)
    ordered = [writer] + [e for e in engines if e is not writer]
    documents = list(sample_documents().values())
    run_tag = uuid.uuid4().hex[:12]
    for engine in ordered:  # first-request overheads stay out of the timings
        measure(engine, f"[warm-up {run_tag} {engine.name}]", 2)

    results: dict[str, list[EngineAnswer]] = {e.name: [] for e in ordered}
    for r in range(rounds):
        context = f"[document {run_tag}-{r}]\n{documents[r % len(documents)]}"
        for engine in ordered:
            chunks_before = summarize_cache(kv_dir).chunks
            m = measure(engine, context, max_tokens)
            results[engine.name].append(m)
            note = ""
            if engine is writer:
                note = f", {wait_for_new_chunks(kv_dir, chunks_before)} chunk files published"
            say(f"  round {r + 1}: {engine.label}: TTFT {m.ttft_s:.3f} s, {m.prompt_tokens} "
                f"prompt tokens, {m.shared_hit_tokens} from the shared directory{note}")

    rows = []
    for engine in ordered:
        ms = results[engine.name]
        if engine is writer:
            role = "cold; stores the prompt's chunks"
        elif engine.uses_cache:
            role = f"first sight; loads {writer.name.upper()}'s chunks"
        else:
            role = "first sight; plain prefill"
        same = all(m.text == w.text for m, w in zip(ms, results[writer.name]))
        rows.append(ComparisonRow(engine.label, role, engine.uses_cache,
                                  [m.ttft_s or 0.0 for m in ms], [m.prompt_tokens or 0 for m in ms],
                                  [m.shared_hit_tokens or 0 for m in ms],
                                  [m.local_hit_tokens or 0 for m in ms], same))
    return rows


def format_table(rows: Sequence[ComparisonRow]) -> str:
    """The comparison as a fixed-width text table, with B's speed-up over the plain median."""
    header = ("engine", "role", "TTFT median", "TTFT per round (s)", "prompt tokens",
              "from shared dir", "from own cache", "same answer")
    body = [(r.label, r.role, f"{r.median_ttft_s:.3f} s", " ".join(f"{t:.3f}" for t in r.ttft_s),
             " ".join(map(str, r.prompt_tokens)), " ".join(map(str, r.shared_hit_tokens)),
             " ".join(map(str, r.local_hit_tokens)), "yes" if r.same_answer_as_writer else "NO")
            for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    readers = [r for r in rows[1:] if r.uses_cache]
    plain = [r.median_ttft_s for r in rows if not r.uses_cache]
    if readers and plain:
        speedup = statistics.median(plain) / readers[0].median_ttft_s
        lines.append(f"\n{readers[0].label} vs plain vLLM on a prompt neither had seen: "
                     f"{speedup:.1f}x faster to the first token")
    return "\n".join(lines)


def start_page(group: ProcessGroup, config_path: Path, port: int, log_dir: Path,
               timeout_s: float = 120.0) -> str:
    """Start the Streamlit page (no secrets in its environment); return its URL once up."""
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    env[CONFIG_ENV] = str(config_path)
    group.start("page", [sys.executable, "-m", "streamlit", "run", str(FRONTEND / "frontend.py"),
                         "--server.port", str(port), "--server.address", "127.0.0.1",
                         "--server.headless", "true", "--browser.gatherUsageStats", "false"],
                log_dir / "page.log", env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if "page" in group.exited():
            raise RuntimeError(group.describe_exit("page"))
        try:
            if requests.get(url + "/_stcore/health", timeout=1).ok:
                return url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the page did not come up in {timeout_s:.0f} s; log: {log_dir / 'page.log'}")


def has_display() -> bool:
    """Whether a graphical browser can open (without one, webbrowser would start a text
    browser such as lynx in this terminal)."""
    return sys.platform in ("darwin", "win32") or bool(
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def serve_until_interrupted(group: ProcessGroup) -> None:
    """Block until Ctrl-C (or SIGTERM) or until a child dies, which is reported."""
    while True:
        dead = group.exited()
        if dead:
            print(group.describe_exit(dead[0]), flush=True)
            return
        time.sleep(1.0)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("MODEL", ""),
                        help="local model folder to serve, or 'synthetic' for a random-weight "
                             "model (default: $MODEL; otherwise SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default=os.environ.get("DTYPE", ""),
                        help=f"the engines' dtype (default: $DTYPE, else {DEFAULT_DTYPE}, where an "
                             "engine that continues from cached KV gives the plain engines' answer; "
                             "in bfloat16 (faster) rounding can part their answers after a few words)")
    parser.add_argument("--workdir", type=Path, default=REPO / ".cache" / "demo",
                        help="logs, the page's config and (by default) the shared cache")
    parser.add_argument("--kv-dir", type=Path, default=None,
                        help="shared cache directory of engines A and B (default: WORKDIR/kv)")
    parser.add_argument("--page-port", type=int, default=8501)
    parser.add_argument("--start-timeout", type=float, default=600.0,
                        help="seconds to wait for all engines to become healthy")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser window")
    parser.add_argument("--headless", action="store_true",
                        help="run the scripted TTFT comparison, print the table and exit")
    parser.add_argument("--rounds", type=int, default=3, help="comparison rounds (--headless)")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the comparison rows as JSON here (--headless)")
    parser.add_argument("--keep-serving", action="store_true",
                        help="with --headless: afterwards serve the page until Ctrl-C")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Ctrl-C raises KeyboardInterrupt even where SIGINT was inherited as ignored (a job
    # started with `&`), and TERM exits through the same clean-up (the finally below).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = args.workdir.resolve()
    kv_dir = (args.kv_dir or workdir / "kv").resolve()
    log_dir = workdir / "logs"
    kv_dir.mkdir(parents=True, exist_ok=True)
    model_dir, synthetic = resolve_model(args.model)

    engines = [EngineSpec("a", "A · lmcache-fs", free_port(), True),
               EngineSpec("b", "B · lmcache-fs", free_port(), True),
               EngineSpec("c", "C · plain vLLM", free_port(), False),
               EngineSpec("d", "D · plain vLLM", free_port(), False)]
    config_path = workdir / "demo-config.yaml"
    write_demo_config(config_path, DemoConfig(tuple(e.as_config() for e in engines),
                                              cache_dir=str(kv_dir), synthetic_model=synthetic,
                                              sequential=True))
    group = ProcessGroup()
    try:
        print(f"Starting 4 engines on {model_dir.name} (shared cache of A and B: {kv_dir}; "
              f"logs: {log_dir}) ...", flush=True)
        # vLLM's CPU build gives an engine with a KV connector one more core than a
        # plain one; the same single compute core for all four keeps TTFTs comparable.
        engine_env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": str((os.cpu_count() or 1) - 1)}
        for engine in engines:
            group.start(engine.name, engine_command(model_dir, engine, kv_dir, synthetic, args.dtype),
                        log_dir / f"engine-{engine.name}.log", engine_env)
        wait_until_healthy(engines, group, args.start_timeout,
                           say=lambda line: print(line, flush=True))
        if args.headless:
            print(f"TTFT comparison, {args.rounds} rounds, one request at a time:", flush=True)
            rows = run_comparison(engines, kv_dir, args.rounds,
                                  say=lambda line: print(line, flush=True))
            print("\n" + format_table(rows), flush=True)
            if args.json:
                args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
            if not args.keep_serving:
                return 0
        url = start_page(group, config_path, free_port(args.page_port), log_dir)
        print(f"\nDemo page: {url}\nPress Ctrl-C to stop the engines and the page.", flush=True)
        if not (args.no_browser or args.headless) and has_display():
            webbrowser.open(url)
        serve_until_interrupted(group)
        return 1  # a child died
    except KeyboardInterrupt:
        print("\nStopping ...", flush=True)
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        # A second Ctrl-C (or a TERM) must not cut the clean-up short and leave engines behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        group.stop_all()
        print("All demo processes stopped.", flush=True)


if __name__ == "__main__":
    sys.exit(main())
