"""Real vLLM engines for the engine benchmarks: started together, warmed up, closed together.

Every engine is a separate process (the harness of the end-to-end tests) on
the synthetic model, so benchmarks measure what a user's replicas would do.
"""

from __future__ import annotations

import random
import shutil
import sys
import time
from pathlib import Path
from typing import Mapping

from bench.common import REPO, progress

sys.path.insert(0, str(REPO / "tests"))  # the engine-process harness the e2e tests use
sys.path.insert(1, str(REPO / "frontend"))  # the synthetic model builder (demo tooling)
from engines import EngineProcess  # noqa: E402
from synthetic_model import build_synthetic_model  # noqa: E402

from lmcache_fs.storage.layout import is_temporary  # noqa: E402

CHUNK = 256  # lmcache-fs default chunk_size


def lmcache_fs_connector(directory: Path, **settings: object) -> dict:
    """kv_transfer_config of an lmcache-fs engine on ``directory``, plus lmcache-fs ``settings``."""
    return {"kv_connector": "LMCacheFSConnector", "kv_role": "kv_both",
            "kv_connector_extra_config": {"storage_path": str(directory), **settings}}


def example_connector(directory: Path) -> dict:
    """kv_transfer_config of vLLM's ExampleConnector on ``directory``."""
    return {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
            "kv_connector_extra_config": {"shared_storage_path": str(directory)}}


def chunk_files(directory: Path) -> list[Path]:
    """The published lmcache-fs chunk files under a storage directory."""
    # (pathlib's glob also matches dot files, so writers' temporaries are left out by name)
    return [p for p in directory.glob("*/??/*.safetensors") if not is_temporary(p.name)]


def wait_for_chunks(directory: Path, count: int, timeout_s: float = 120) -> None:
    """Block until ``count`` chunk files exist (writers publish in the background)."""
    deadline = time.monotonic() + timeout_s
    while len(chunk_files(directory)) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(chunk_files(directory))} of {count} chunks were stored")
        time.sleep(0.05)


class EngineSet:
    """Named engines (``None`` connector = plain vLLM), warmed up before any timing."""

    def __init__(self, work_dir: Path, connectors: Mapping[str, dict | None], max_len: int,
                 model: Path | None = None, tensor_parallel: Mapping[str, int] = {},
                 dtype: str = "bfloat16"):
        """``model``: the folder every engine serves (default: the synthetic model);
        ``tensor_parallel``: the tensor-parallel size of engines by name (default 1);
        ``dtype``: what they compute in (default bf16, what a real deployment serves)."""
        model = model or build_synthetic_model(REPO / ".cache" / "tiny-llama")
        logs = work_dir / "logs"
        shutil.rmtree(logs, ignore_errors=True)
        logs.mkdir(parents=True)
        # ExampleConnector fails under chunked prefill: a batch budget that
        # holds the longest prompt keeps every engine from chunking.
        sizes = {"max_model_len": max_len + 128, "max_num_batched_tokens": max_len + 128,
                 "dtype": dtype}
        self.engines: dict[str, EngineProcess] = {}
        try:
            for name, connector in connectors.items():
                progress(f"starting engine {name}")
                self.engines[name] = EngineProcess(
                    model, logs / f"{name}.log", connector, **sizes,
                    tensor_parallel_size=tensor_parallel.get(name, 1))
            # First requests pay one-off costs (allocations, first kernel use): not TTFT.
            rng = random.Random(99)
            for engine in self.engines.values():
                for n in (300, min(1500, max_len)):
                    engine.generate([[rng.randrange(3, 250) for _ in range(n)]], max_tokens=2)
        except BaseException:
            self.close()
            raise

    def __getitem__(self, name: str) -> EngineProcess:
        return self.engines[name]

    def seconds(self, name: str, prompt: list[int], max_tokens: int = 1) -> float:
        """Wall time of one greedy generation (with ``max_tokens=1``: the TTFT)."""
        return self.engines[name].generate([prompt], max_tokens=max_tokens)[0]["seconds"]

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()
