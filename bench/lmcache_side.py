"""LMCache 0.5.6's storage paths, driven for the benchmarks (runs in LMCache's own venv).

Started by :mod:`bench.lmcache_proxy` as ``<lmcache-venv>/bin/python
bench/lmcache_side.py``; reads one JSON command per line on stdin and answers
one JSON line on the original stdout (LMCache's own logging goes to stderr).
It never imports lmcache-fs: the two packages live in different virtualenvs.

The three paths, driven as FIELD-NOTES.md describes:

- ``local_disk``: ``LocalDiskBackend`` (its 4 writer and 4 reader threads),
  ``batched_submit_put_task`` / ``batched_get_blocking`` / ``contains``;
- ``fs_connector``: the ``fs://`` ``FSConnector`` (aiofiles, atomic rename),
  ``put`` / ``get`` / ``exists`` gathered on an asyncio loop in its own thread;
- ``native``: the C++ client ``lmcache.lmcache_fs.LMCacheFSClient`` with 4
  workers, ``submit_batch_set`` / ``submit_batch_get`` / ``submit_batch_exists``.

Timings are taken here, around the calls only, so process start-up and the
pipe never count. Chunk bytes come from :mod:`chunkdata` with the same seed as
the lmcache-fs side: both write the same bytes.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import sys
import threading
import time
from pathlib import Path
from typing import Any

# This script runs from bench/ in a foreign venv: put bench/ last on the path so
# its small helpers import, but no name there can shadow one of LMCache's.
_BENCH_DIR = str(Path(__file__).resolve().parent)
if sys.path and sys.path[0] == _BENCH_DIR:
    sys.path.pop(0)
sys.path.append(_BENCH_DIR)

import chunkdata  # noqa: E402
import torch  # noqa: E402

# The CPU buffer pool must hold about three times the chunks in flight, else
# batched_get_blocking retries forever (FIELD-NOTES.md); loads go in batches.
LOAD_BATCH_BYTES = 256 * 2**20
NATIVE_WORKERS = 4
MODEL = "m"


def _lmcache() -> Any:
    """Import LMCache lazily, after stdout is redirected (it logs on import)."""
    import lmcache
    from lmcache import lmcache_fs as native
    from lmcache.utils import CacheEngineKey
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.memory_management import MemoryFormat
    from lmcache.v1.metadata import LMCacheMetadata
    from lmcache.v1.storage_backend.connector.fs_connector import FSConnector
    from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend
    from lmcache.v1.storage_backend.local_disk_backend import LocalDiskBackend

    return type("LMCache", (), dict(
        version=getattr(lmcache, "__version__", "unknown"), native=native,
        CacheEngineKey=CacheEngineKey, LMCacheEngineConfig=LMCacheEngineConfig,
        MemoryFormat=MemoryFormat, LMCacheMetadata=LMCacheMetadata, FSConnector=FSConnector,
        LocalCPUBackend=LocalCPUBackend, LocalDiskBackend=LocalDiskBackend))


class Case:
    """One chunk shape and count: the CPU buffer pool and the source chunks in it."""

    def __init__(self, lm: Any, shape: list[int], count: int, seed: int, disk_dir: str):
        self.lm = lm
        self.shape = tuple(shape)
        self.count = count
        layers, _, tokens, heads, head_dim = self.shape
        self.md = lm.LMCacheMetadata(MODEL, 1, 1, 0, 0, chunkdata.DTYPE,
                                     (layers, 2, tokens, heads, head_dim), chunk_size=tokens)
        chunk = chunkdata.DTYPE.itemsize
        for d in self.shape:
            chunk *= d
        self.chunk_bytes = chunk
        self.batch = max(1, min(count, LOAD_BATCH_BYTES // chunk))
        pool_gb = ((count + 3 * self.batch) * chunk) / 2**30 + 0.25
        self.cfg = lm.LMCacheEngineConfig.from_defaults(
            chunk_size=tokens, local_cpu=False, max_local_cpu_size=pool_gb,
            local_disk=disk_dir, max_local_disk_size=4 * count * chunk / 2**30 + 1)
        self.cpu = lm.LocalCPUBackend(self.cfg, self.md)
        self.sources = [self.allocate() for _ in range(count)]
        for obj, data in zip(self.sources, chunkdata.make_chunks(self.shape, count, seed)):
            obj.tensor.view(torch.uint8).view(-1).copy_(data.view(torch.uint8).view(-1))
        self.keys = [lm.CacheEngineKey(MODEL, 1, 0, i + 1, chunkdata.DTYPE) for i in range(count)]
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def allocate(self) -> Any:
        obj = self.cpu.allocate(self.md.get_shapes(), self.md.get_dtypes(),
                                self.lm.MemoryFormat.KV_2LTD)
        if obj is None:
            raise MemoryError("LMCache's CPU buffer pool is exhausted")
        return obj

    def batches(self) -> list[range]:
        return [range(i, min(i + self.batch, self.count)) for i in range(0, self.count, self.batch)]

    def check(self, index: int, loaded: Any) -> None:
        """Raise unless a loaded buffer holds source chunk ``index`` (outside timing)."""
        if loaded is None or bytes(loaded[:64]) != bytes(self.sources[index].byte_array[:64]) \
                or bytes(loaded[-64:]) != bytes(self.sources[index].byte_array[-64:]):
            raise RuntimeError(f"chunk {index} did not load back intact")

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()


class LocalDisk:
    """``LocalDiskBackend``: writes on its 4-thread queue, reads on a 4-thread pool."""

    def __init__(self, case: Case, directory: str):
        self.case = case
        cfg = case.cfg
        cfg.local_disk = directory.rstrip("/") + "/"
        self.backend = case.lm.LocalDiskBackend(cfg, case.loop, case.cpu, dst_device="cpu",
                                                metadata=case.md)

    def store(self) -> None:
        done = threading.Semaphore(0)
        self.backend.batched_submit_put_task(self.case.keys, self.case.sources,
                                             on_complete_callback=lambda _key: done.release())
        for _ in self.case.keys:
            done.acquire()

    def load(self) -> tuple[int, Any]:
        last = None
        for batch in self.case.batches():
            objs = self.backend.batched_get_blocking([self.case.keys[i] for i in batch])
            last = _release_all_but_last(objs, last)
        return self.case.count - 1, last

    def release(self, obj: Any) -> None:
        obj.ref_count_down()

    def contains(self, keys: list[Any]) -> int:
        for i, key in enumerate(keys):
            if not self.backend.contains(key):
                return i
        return len(keys)

    def close(self) -> None:
        self.backend.close()


class FSConnectorPath:
    """The ``fs://`` connector: one coroutine per chunk, gathered per batch."""

    def __init__(self, case: Case, directory: str):
        self.case = case
        self.conn = case.lm.FSConnector(case.loop, case.cpu, case.cfg, base_paths_str=directory)

    def store(self) -> None:
        async def put_all() -> None:
            await asyncio.gather(*(self.conn.put(k, o)
                                   for k, o in zip(self.case.keys, self.case.sources)))
        self.case.run(put_all())

    def load(self) -> tuple[int, Any]:
        async def get_batch(batch: range) -> list[Any]:
            return await asyncio.gather(*(self.conn.get(self.case.keys[i]) for i in batch))

        last = None
        for batch in self.case.batches():
            last = _release_all_but_last(self.case.run(get_batch(batch)), last)
        return self.case.count - 1, last

    def release(self, obj: Any) -> None:
        obj.ref_count_down()

    def contains(self, keys: list[Any]) -> int:
        async def prefix() -> int:
            for i, key in enumerate(keys):
                if not await self.conn.exists(key):
                    return i
            return len(keys)
        return self.case.run(prefix())

    def close(self) -> None:
        return None


class Native:
    """The C++ client: one batch call per store, per load batch, per lookup."""

    def __init__(self, case: Case, directory: str):
        self.case = case
        os.makedirs(directory, exist_ok=True)
        self.client = case.lm.native.LMCacheFSClient(directory, NATIVE_WORKERS, "", False, 0)
        self.names = [k.to_string() for k in case.keys]
        self.dest = [case.allocate() for _ in range(case.batch)]

    def _wait(self, future_id: int) -> Any:
        """Block until the client completes ``future_id``; returns its result list."""
        fd = self.client.event_fd()
        while True:
            select.select([fd], [], [], 0.5)
            for fid, ok, error, result in self.client.drain_completions():
                if int(fid) == future_id:
                    if not ok:
                        raise RuntimeError(f"native client failed: {error}")
                    return result

    def store(self) -> None:
        self._wait(self.client.submit_batch_set(
            self.names, [memoryview(o.byte_array) for o in self.case.sources]))

    def load(self) -> tuple[int, Any]:
        batches = self.case.batches()
        for batch in batches:
            self._wait(self.client.submit_batch_get(
                [self.names[i] for i in batch],
                [memoryview(self.dest[j].byte_array) for j in range(len(batch))]))
        return batches[-1][-1], self.dest[len(batches[-1]) - 1]

    def release(self, obj: Any) -> None:
        return None  # the destination buffers are reused until close()

    def contains(self, keys: list[Any]) -> int:
        found = self._wait(self.client.submit_batch_exists([k.to_string() for k in keys]))
        return next((i for i, hit in enumerate(found) if not hit), len(found))

    def close(self) -> None:
        for obj in self.dest:
            obj.ref_count_down()
        if hasattr(self.client, "close"):
            self.client.close()


def _release_all_but_last(objs: list[Any], previous: Any) -> Any:
    """Give a load batch's buffers back to the pool, keeping the last one for the check."""
    if previous is not None:
        previous.ref_count_down()
    for obj in objs[:-1]:
        obj.ref_count_down()
    return objs[-1]


PATHS = {"local_disk": LocalDisk, "fs_connector": FSConnectorPath, "native": Native}


class Worker:
    """Holds the current case and path between commands."""

    def __init__(self) -> None:
        self.lm = _lmcache()
        self.case: Case | None = None
        self.path: Any = None

    def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd["op"]
        if op == "hello":
            return {"lmcache": self.lm.version, "torch": torch.__version__,
                    "python": sys.version.split()[0], "paths": list(PATHS)}
        if op == "case":
            self.case = None  # free the previous pool first
            self.case = Case(self.lm, cmd["shape"], cmd["count"], cmd["seed"], cmd["dir"])
            return {"chunk_bytes": self.case.chunk_bytes, "load_batch": self.case.batch}
        assert self.case is not None, "send a 'case' command first"
        if op == "open":
            self.path = PATHS[cmd["path"]](self.case, cmd["dir"])
            return {}
        if op == "store":
            start = time.perf_counter()
            self.path.store()
            return {"seconds": time.perf_counter() - start}
        if op == "load":
            start = time.perf_counter()
            index, obj = self.path.load()
            seconds = time.perf_counter() - start
            try:
                self.case.check(index, obj.byte_array)
            finally:
                self.path.release(obj)
            return {"seconds": seconds}
        if op == "lookup":
            keys = [self.lm.CacheEngineKey(MODEL, 1, 0, h, chunkdata.DTYPE) for h in cmd["hashes"]]
            times, found = [], -1
            for _ in range(cmd["repeats"]):
                start = time.perf_counter()
                found = self.path.contains(keys)
                times.append(time.perf_counter() - start)
            return {"seconds": times, "found": found}
        if op == "close":
            self.path.close()
            self.path = None
            return {}
        raise ValueError(f"unknown op {op!r}")


def main() -> None:
    """Serve JSON commands until stdin closes or ``quit`` arrives."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # LMCache prints and logs: keep stdout for replies only
    worker = Worker()
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        try:
            reply = {"ok": True, **worker.handle(cmd)}
        except Exception as exc:  # reported to the caller, who decides; keep serving
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        replies.write(json.dumps(reply) + "\n")
    os._exit(0)  # LMCache's threads and loop never join; nothing is left to flush


if __name__ == "__main__":
    main()
