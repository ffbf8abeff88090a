"""Worker side of an engine with several KV cache groups (hybrid attention).

Each group has its own chunk files (its own namespace), so each gets its own
:class:`WorkerSide` (store, reader, writer) over its own layers; this class
hands each one its group's loads and saves.

vLLM 0.32 cannot map failed block ids back to requests when there are several
groups (``Scheduler._handle_invalid_blocks`` refuses them), so these engines
load asynchronously: the scheduler side answers hits with ``load_kv_async``,
the reads run in the step that starts them (overlapping other requests'
forward pass), and this class reports each request as received, or as failed
(vLLM then recomputes it from its first token) in the same step. Blocks
being loaded belong to their request alone until it is received, so no other
request computes over a failed load, and saves are never held back.
"""

from __future__ import annotations

from typing import Sequence

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults

from .metadata import LMCacheFSMetadata
from .stats import LMCacheFSStats
from .worker import WorkerSide


class GroupedWorkers:
    """One :class:`WorkerSide` per KV cache group, loading asynchronously."""

    def __init__(self, workers: Sequence[WorkerSide]):
        self.workers = list(workers)
        self._received: set[str] = set()  # requests whose loads ran this step

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        for worker in self.workers:
            worker.register_kv_caches(kv_caches)

    def _part(self, meta: LMCacheFSMetadata, group: int) -> LMCacheFSMetadata:
        return LMCacheFSMetadata(
            loads=[op for op in meta.loads if op.group == group],
            saves=[op for op in meta.saves if op.group == group], hits=meta.hits,
            failed_load_steps=meta.failed_load_steps, released_saves=meta.released_saves)

    def load(self, meta: LMCacheFSMetadata) -> None:
        """Start every group's reads (they end by the end of the step, see :meth:`save`)."""
        self._received.update(meta.async_loads)
        for group, worker in enumerate(self.workers):
            worker.load(self._part(meta, group))

    def save(self, meta: LMCacheFSMetadata) -> None:
        """End the step's reads, then store each group's chunks of this step."""
        for group, worker in enumerate(self.workers):
            worker.save(self._part(meta, group))

    def transfer_results(self) -> KVConnectorTransferResults:
        """Requests whose loads ended this step, and those of them that failed (any group)."""
        failed: set[str] = set()
        for worker in self.workers:
            failed |= worker.take_failed_requests()
            worker.take_failed_blocks()  # (reported per request instead)
        received, self._received = self._received, set()
        return KVConnectorTransferResults(finished_recving=received, failed_recving=failed)

    def take_stats(self) -> LMCacheFSStats | None:
        stats = [s for s in (worker.take_stats() for worker in self.workers) if s is not None]
        if not stats:
            return None
        for more in stats[1:]:
            stats[0].aggregate(more)
        return stats[0]

    def quiesce(self) -> None:
        for worker in self.workers:
            worker.quiesce()

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
