"""Worker side: moves bytes between chunk files and the paged KV cache.

Loads run synchronously before the forward pass (``start_load_kv``); a chunk
that is missing, truncated, corrupt or foreign marks its blocks as failed, and
vLLM recomputes them. Saves run after the forward pass (``wait_for_save``):
the blocks are gathered into a fresh host tensor at once (so the engine can
reuse its blocks next step) and handed to the background writer, which skips
rather than stalls when its queue is full.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Sequence

import torch

from lmcache_fs.block_copy import gather_blocks, scatter_blocks
from lmcache_fs.codec import ChunkFileError
from lmcache_fs.log import human_bytes
from lmcache_fs.store import ChunkStore
from lmcache_fs.writer import BackgroundWriter

from .metadata import LMCacheFSMetadata, LoadOp, SaveOp
from .stats import LMCacheFSStats

logger = logging.getLogger(__name__)


class WorkerSide:
    """Chunk I/O for one worker (one TP rank)."""

    def __init__(self, store: ChunkStore, layer_names: Sequence[str], blocks_per_chunk: int,
                 block_size: int, save_queue_size: int, can_save: bool):
        self.store = store
        self.layer_names = list(layer_names)
        self.blocks_per_chunk = blocks_per_chunk
        self.block_size = block_size
        self.layers: list[torch.Tensor] = []
        self._staging: torch.Tensor | None = None
        self.writer = BackgroundWriter(store, save_queue_size) if can_save else None
        self._failed_blocks: set[int] = set()
        self.stats = LMCacheFSStats()
        self._writer_reported = (0, 0, 0)

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Keep the per-layer caches in namespace order and size the read buffer."""
        missing = [n for n in self.layer_names if n not in kv_caches]
        if missing:
            raise ValueError(f"lmcache-fs: KV caches missing for layers {missing[:3]}...")
        self.layers = [kv_caches[n] for n in self.layer_names]
        first = self.layers[0]
        page_shape = tuple(first.shape[1:])
        for name, kv in zip(self.layer_names, self.layers):
            if tuple(kv.shape[1:]) != page_shape or kv.dtype != first.dtype:
                raise ValueError(f"lmcache-fs: layer {name} has pages {tuple(kv.shape[1:])} "
                                 f"{kv.dtype}, others {page_shape} {first.dtype}; hybrid "
                                 "KV layouts are not supported")
        shape = (len(self.layers), self.blocks_per_chunk, *page_shape)
        pin = first.device.type == "cuda"
        self._staging = torch.empty(shape, dtype=first.dtype, pin_memory=pin)
        logger.info("registered %d layers, chunk of %d blocks = %s per file, device %s",
                    len(self.layers), self.blocks_per_chunk,
                    human_bytes(self._staging.numel() * self._staging.element_size()),
                    first.device)

    # -- loads --------------------------------------------------------------

    def load(self, meta: LMCacheFSMetadata) -> None:
        """Read this step's chunks into the paged cache; failed blocks are remembered."""
        if not meta.loads:
            return
        assert self._staging is not None, "register_kv_caches was not called"
        per_request: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
        broken: set[str] = set()
        for op in meta.loads:
            if op.req_id in broken:
                # vLLM recomputes everything after the first failed block:
                # reading the rest of this prefix would be wasted I/O.
                self._failed_blocks.update(op.block_ids)
                continue
            start = time.perf_counter()
            ok = self._load_one(op)
            if not ok:
                broken.add(op.req_id)
            spent = time.perf_counter() - start
            nbytes = self._staging.numel() * self._staging.element_size() if ok else 0
            self.stats.record_load(nbytes, spent)
            acc = per_request[op.req_id]
            acc[0] += nbytes
            acc[1] += spent
            acc[2] += len(op.block_ids) * self.block_size if ok else 0
        for req_id, (nbytes, seconds, tokens) in per_request.items():
            hit = meta.hits.get(req_id)
            total = hit.total_tokens if hit else 0
            local = f" ({hit.local_tokens} from local prefix cache)" if hit and hit.local_tokens else ""
            logger.info("request %s: hit %d/%d tokens%s, loaded %s in %.0f ms (%.1f GB/s)",
                        req_id, int(tokens) + (hit.local_tokens if hit else 0), total, local,
                        human_bytes(nbytes), seconds * 1e3, nbytes / max(seconds, 1e-9) / 1e9)

    def _load_one(self, op: LoadOp) -> bool:
        assert self._staging is not None
        try:
            self.store.load(op.key, self._staging)
        except ChunkFileError as exc:
            logger.warning("request %s: chunk %s unusable (%s): recomputing from there",
                           op.req_id, op.key[:16], exc)
            self._failed_blocks.update(op.block_ids)
            self.stats.record_load_error()
            return False
        device = self.layers[0].device
        src = self._staging[:, op.first_block:op.first_block + len(op.block_ids)]
        src = src.to(device, non_blocking=True)
        ids = torch.tensor(op.block_ids, dtype=torch.int64, device=device)
        scatter_blocks(src, self.layers, ids)
        return True

    def take_failed_blocks(self) -> set[int]:
        """Block ids whose load failed since the last call."""
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    # -- saves --------------------------------------------------------------

    def save(self, meta: LMCacheFSMetadata) -> None:
        """Copy each completed chunk out of the paged cache and queue it for writing."""
        if self.writer is None or not meta.saves:
            return
        assert self._staging is not None
        for op in meta.saves:
            self._save_one(op)

    def _save_one(self, op: SaveOp) -> None:
        assert self._staging is not None and self.writer is not None
        device = self.layers[0].device
        ids = torch.tensor(op.block_ids, dtype=torch.int64, device=device)
        chunk = torch.empty(self._staging.shape, dtype=self._staging.dtype, device=device)
        gather_blocks(self.layers, ids, chunk)
        host = chunk.cpu() if device.type != "cpu" else chunk
        metadata = {"parent_key": op.parent_key, "chunk_index": str(op.chunk_index),
                    "num_tokens": str(len(op.block_ids) * self.block_size)}
        self.writer.submit(op.key, host, metadata)

    # -- stats --------------------------------------------------------------

    def take_stats(self) -> LMCacheFSStats | None:
        """Counters since the last call, writer counters included; None if nothing happened."""
        if self.writer is not None:
            w = self.writer.stats
            now = (w.published, w.skipped_queue_full, w.failed)
            self.stats.record_saves(*(a - b for a, b in zip(now, self._writer_reported)))
            self._writer_reported = now
        if self.stats.is_empty():
            return None
        stats, self.stats = self.stats, LMCacheFSStats()
        return stats

    def close(self) -> None:
        """Finish queued writes."""
        if self.writer is not None:
            self.writer.close()
