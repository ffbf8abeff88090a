"""lmcache-fs counters in vLLM's KVConnectorStats form (logged and exported by vLLM)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

_COUNTERS = ("loaded_chunks", "loaded_bytes", "load_seconds", "load_errors",
             "stored_chunks", "skipped_stores", "failed_stores")


def _zero() -> dict[str, Any]:
    return {name: 0 for name in _COUNTERS}


@dataclass
class LMCacheFSStats(KVConnectorStats):
    """Sums over an interval; ``reduce`` adds the load bandwidth."""

    data: dict[str, Any] = field(default_factory=_zero)

    def record_load(self, nbytes: int, chunks: int, seconds: float) -> None:
        self.data["loaded_chunks"] += chunks
        self.data["loaded_bytes"] += nbytes
        self.data["load_seconds"] += seconds

    def record_load_error(self) -> None:
        self.data["load_errors"] += 1

    def record_saves(self, stored: int, skipped: int, failed: int) -> None:
        self.data["stored_chunks"] += stored
        self.data["skipped_stores"] += skipped
        self.data["failed_stores"] += failed

    def reset(self) -> None:
        self.data = _zero()

    def aggregate(self, other: KVConnectorStats) -> "LMCacheFSStats":
        for name in _COUNTERS:
            self.data[name] = self.data.get(name, 0) + other.data.get(name, 0)
        return self

    def reduce(self) -> dict[str, int | float]:
        seconds = self.data.get("load_seconds", 0)
        out = {name: self.data.get(name, 0) for name in _COUNTERS if name != "load_seconds"}
        out["load_GBps"] = round(self.data.get("loaded_bytes", 0) / seconds / 1e9, 2) if seconds else 0.0
        return out

    def is_empty(self) -> bool:
        return not any(self.data.get(name, 0) for name in _COUNTERS)
