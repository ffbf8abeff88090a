"""Plain writer processes for fault tests: no engine, only lmcache_fs.storage.store.

Started from a fork server (see test_faults.py), so hundreds of writers start in
milliseconds with torch already loaded.
"""

from __future__ import annotations

import random
import time

import torch
from cachedir import make_store, prefix_keys, save_prefix

# Every writer draws from these keys: concurrent writers race on the same names, and
# the directory stays small however many writers run (new names would fill the disk).
KEY_POOL = prefix_keys("pool", 32)


def geometry(num_layers: int) -> tuple[dict[str, object], tuple[int, ...]]:
    """Namespace fields and chunk shape of a small real-sized model: 128 KiB per layer."""
    fields = {"num_layers": num_layers, "chunk_size": 256, "block_size": 128,
              "num_kv_heads": 2, "head_size": 64}
    return fields, (num_layers, 2, 2, 128, 128)


# 4 MiB chunks: long enough to write that a random SIGKILL often lands mid-write.
KILL_FIELDS, KILL_SHAPE = geometry(32)
# 1 MiB chunks for the many-writers test.
MANY_FIELDS, MANY_SHAPE = geometry(8)


def write_until_killed(root: str, seed: int) -> None:
    """Store big chunks forever, under keys drawn from the shared pool."""
    store = make_store(root, **KILL_FIELDS)
    rng = random.Random(seed)
    data = torch.full(KILL_SHAPE, float(seed % 100), dtype=torch.bfloat16)
    while True:
        store.save(rng.choice(KEY_POOL), data, {"chunk_index": "0"})


def overlapping_prompts(n: int = 12) -> list[list[str]]:
    """Chunk keys of ``n`` prompts that share a system prompt and, pairwise, a question."""
    system = prefix_keys("system prompt", 3)
    return [system + prefix_keys(f"question {i // 2}", 2) + prefix_keys(f"answer {i}", 2)
            for i in range(n)]


def store_prompts(root: str, worker: int, start_at: float) -> None:
    """At ``start_at``, store every prompt's chunks in a worker-specific order (as engines would)."""
    store = make_store(root, **MANY_FIELDS)
    prompts = overlapping_prompts()
    random.Random(worker).shuffle(prompts)
    time.sleep(max(0.0, start_at - time.time()))
    for keys in prompts:
        save_prefix(store, keys, MANY_SHAPE)

