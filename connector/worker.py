"""Worker side: the connector's worker role, for an engine of one KV cache group or several.

One :class:`WorkerSide` per worker process (one tensor-parallel rank). It
holds a :class:`~lmcache_fs.connector.group_worker.GroupWorker` per KV cache
group (one for a plain full-attention model; hybrid models have one per kind
of attention, each with its own chunk files), hands each its group's loads and
saves of every step, and answers vLLM's worker hooks.

How a failed load is reported depends on how the engine loads
(:func:`~lmcache_fs.connector.groups.loads_asynchronously`, decided by the
number of groups):

- synchronously (one group): the step's reads end before its forward pass
  needs them (layer by layer, or whole chunks before it), and the failed
  blocks are reported (``get_block_ids_with_load_errors``); vLLM recomputes
  from the first of them.
- asynchronously (several groups: vLLM 0.32 cannot map failed block ids back
  to requests then, ``Scheduler._handle_invalid_blocks`` refuses them): the
  scheduler side answers hits with ``load_kv_async``, the reads run in the step
  that starts them (overlapping other requests' forward pass), and each request
  is reported received, or failed (vLLM then recomputes it from its first
  token), in the same step (``get_transfer_results``). Blocks being loaded
  belong to their request alone until it is received, so no other request
  computes over a failed load, and saves are never held back.
"""

from __future__ import annotations

from typing import Sequence

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults

from .group_worker import GroupFiles, GroupWorker, WorkerContext
from .groups import loads_asynchronously
from .metadata import LMCacheFSMetadata
from .stats import DirectoryReport, LMCacheFSStats


class WorkerSide:
    """Chunk I/O for one worker: one :class:`GroupWorker` per KV cache group."""

    def __init__(self, context: WorkerContext, groups: Sequence[GroupFiles]):
        self.async_loads = loads_asynchronously(len(groups))
        self.groups = [GroupWorker(files, context, self.async_loads) for files in groups]
        # The process's breaker, reported once (its groups share it).
        self._directory = DirectoryReport(context.breaker) if context.breaker is not None else None
        self._received: set[str] = set()  # requests whose asynchronous loads ran this step

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        for group in self.groups:
            group.register_kv_caches(kv_caches)

    def _part(self, meta: LMCacheFSMetadata, group: int) -> LMCacheFSMetadata:
        return LMCacheFSMetadata(
            loads=[op for op in meta.loads if op.group == group],
            saves=[op for op in meta.saves if op.group == group], hits=meta.hits,
            failed_load_steps=meta.failed_load_steps, released_saves=meta.released_saves)

    def load(self, meta: LMCacheFSMetadata) -> None:
        """Start (layer-wise) or do (whole chunks) every group's loads of this step."""
        self._received.update(meta.async_loads)
        for g, group in enumerate(self.groups):
            group.load(self._part(meta, g))

    def wait_for_layer(self, layer_name: str) -> None:
        """Block until the layer about to run has its loaded blocks (synchronous loads only:
        the requests of asynchronous loads are not in this step's batch)."""
        if self.async_loads:
            return
        for group in self.groups:
            group.wait_for_layer(layer_name)

    def save(self, meta: LMCacheFSMetadata) -> None:
        """End the step's reads, then store each group's chunks of this step."""
        for g, group in enumerate(self.groups):
            group.save(self._part(meta, g))

    def take_failed_blocks(self) -> set[int]:
        """Block ids whose synchronous load failed since the last call (none when loading
        asynchronously: failures are reported per request, by :meth:`transfer_results`)."""
        return set().union(*(group.take_failed_blocks() for group in self.groups))

    def transfer_results(self) -> KVConnectorTransferResults:
        """Requests whose asynchronous loads ended this step, and those that failed (any group)."""
        failed = set().union(*(group.take_failed_requests() for group in self.groups))
        received, self._received = self._received, set()
        return KVConnectorTransferResults(finished_recving=received, failed_recving=failed)

    def take_stats(self) -> LMCacheFSStats | None:
        """Every group's counters since the last call, summed; None if nothing happened."""
        stats = [s for s in (group.take_stats() for group in self.groups) if s is not None]
        if self._directory is not None:
            directory = LMCacheFSStats()
            self._directory.take(directory)
            stats += [] if directory.is_empty() else [directory]
        if not stats:
            return None
        for more in stats[1:]:
            stats[0].aggregate(more)
        return stats[0]

    def quiesce(self) -> None:
        """End every read into the KV cache and every copy out of it (before vLLM's sleep)."""
        for group in self.groups:
            group.quiesce()

    def close(self) -> None:
        """Finish queued writes and stop the I/O threads."""
        for group in self.groups:
            group.close()
