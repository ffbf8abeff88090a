"""Worker side: moves bytes between chunk files and the paged KV cache.

Loads run before the forward pass (``start_load_kv``): a :class:`GpuChunkReader`
reads the step's chunks with several in flight (kvikio/GDS into GPU staging,
or POSIX into host memory), each fully verified, and the blocks are scattered
into the paged cache. A chunk that is missing, truncated, corrupt or foreign
marks its blocks (and the rest of that prompt's prefix) as failed, and vLLM
recomputes them. Saves run after the forward pass (``wait_for_save``): the
blocks are gathered into a fresh tensor at once (the engine may reuse its
blocks next step); on CUDA a side stream copies it to pinned memory; the
background writer publishes it, skipping rather than stalling when busy.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from lmcache_fs.block_copy import gather_blocks, scatter_blocks
from lmcache_fs.codec import ChunkFileError
from lmcache_fs.gpu_io import GpuChunkReader, choose_read_backend
from lmcache_fs.gpu_save import DeviceChunkSaver
from lmcache_fs.log import human_bytes
from lmcache_fs.space import FreeSpaceGuard
from lmcache_fs.store import ChunkStore
from lmcache_fs.writer import BackgroundWriter

from .metadata import LMCacheFSMetadata, SaveOp
from .stats import LMCacheFSStats

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReadOptions:
    """How chunks are read (lmcache-fs settings ``use_gds``, ``staging_buffer_mb``...)."""

    use_gds: str = "auto"
    staging_bytes: int = 256 << 20
    verify_device_reads: bool = True


class WorkerSide:
    """Chunk I/O for one worker (one TP rank)."""

    def __init__(self, store: ChunkStore, layer_names: Sequence[str], blocks_per_chunk: int,
                 block_size: int, save_queue_size: int, can_save: bool,
                 read_options: ReadOptions = ReadOptions(),
                 space_guard: FreeSpaceGuard | None = None):
        self.store = store
        self.layer_names = list(layer_names)
        self.blocks_per_chunk = blocks_per_chunk
        self.block_size = block_size
        self.read_options = read_options
        self.layers: list[torch.Tensor] = []
        self.reader: GpuChunkReader | None = None
        self.saver: DeviceChunkSaver | None = None
        self.writer = (BackgroundWriter(store, save_queue_size, space_guard=space_guard)
                       if can_save else None)
        self._chunk_shape: tuple[int, ...] = ()
        self._chunk_bytes = 0
        self._failed_blocks: set[int] = set()
        self.stats = LMCacheFSStats()
        self._writer_reported = (0, 0, 0)

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Keep the per-layer caches in namespace order; build the reader (and GPU saver)."""
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
        self._chunk_shape = (len(self.layers), self.blocks_per_chunk, *page_shape)
        self._chunk_bytes = first.element_size() * math.prod(self._chunk_shape)
        opts = self.read_options
        self.reader = GpuChunkReader(self.store, self._chunk_shape, first.dtype, first.device,
                                     choose_read_backend(opts.use_gds, first.device),
                                     staging_bytes=opts.staging_bytes,
                                     verify=opts.verify_device_reads)
        if self.writer is not None and first.device.type == "cuda":
            self.saver = DeviceChunkSaver(self.writer, first.device, max_pending=8,
                                          chunk_bytes=self._chunk_bytes)
        logger.info("registered %d layers, chunk of %d blocks = %s per file, device %s, "
                    "%d reads in flight", len(self.layers), self.blocks_per_chunk,
                    human_bytes(self._chunk_bytes), first.device, self.reader.slots)

    # -- loads --------------------------------------------------------------

    def load(self, meta: LMCacheFSMetadata) -> None:
        """Read this step's chunks into the paged cache; failed blocks are remembered."""
        if not meta.loads:
            return
        assert self.reader is not None, "register_kv_caches was not called"
        device = self.layers[0].device
        start = time.perf_counter()
        loaded_tokens: dict[str, int] = {op.req_id: 0 for op in meta.loads}
        loaded_bytes: dict[str, int] = dict.fromkeys(loaded_tokens, 0)
        broken: set[str] = set()
        for i, chunk in self.reader.read([op.key for op in meta.loads]):
            op = meta.loads[i]
            if op.req_id in broken:
                # vLLM recomputes everything after the first failed block:
                # loading the rest of this prefix would be wasted work.
                self._failed_blocks.update(op.block_ids)
                continue
            if isinstance(chunk, ChunkFileError):
                logger.warning("request %s: chunk %s unusable (%s): recomputing from there",
                               op.req_id, op.key[:16], chunk)
                self._failed_blocks.update(op.block_ids)
                self.stats.record_load_error()
                broken.add(op.req_id)
                continue
            ids = torch.tensor(op.block_ids, dtype=torch.int64, device=device)
            scatter_blocks(chunk[:, op.first_block:op.first_block + len(op.block_ids)],
                           self.layers, ids)
            loaded_tokens[op.req_id] += len(op.block_ids) * self.block_size
            loaded_bytes[op.req_id] += self._chunk_bytes
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # the log's timing is honest
        seconds = time.perf_counter() - start
        total_bytes = sum(loaded_bytes.values())
        self.stats.record_load(total_bytes, total_bytes // self._chunk_bytes, seconds)
        for req_id, tokens in loaded_tokens.items():
            hit = meta.hits.get(req_id)
            local = hit.local_tokens if hit else 0
            note = f" ({local} from local prefix cache)" if local else ""
            share = seconds * loaded_bytes[req_id] / total_bytes if total_bytes else seconds
            logger.info("request %s: hit %d/%d tokens%s, loaded %s in %.0f ms (%.1f GB/s)",
                        req_id, tokens + local, hit.total_tokens if hit else 0, note,
                        human_bytes(loaded_bytes[req_id]), share * 1e3,
                        loaded_bytes[req_id] / max(share, 1e-9) / 1e9)

    def take_failed_blocks(self) -> set[int]:
        """Block ids whose load failed since the last call."""
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    # -- saves --------------------------------------------------------------

    def save(self, meta: LMCacheFSMetadata) -> None:
        """Copy each completed chunk out of the paged cache and queue it for writing."""
        if self.writer is None or not meta.saves:
            return
        for op in meta.saves:
            self._save_one(op)

    def _save_one(self, op: SaveOp) -> None:
        assert self.writer is not None
        device = self.layers[0].device
        ids = torch.tensor(op.block_ids, dtype=torch.int64, device=device)
        chunk = torch.empty(self._chunk_shape, dtype=self.layers[0].dtype, device=device)
        gather_blocks(self.layers, ids, chunk)
        metadata = {"parent_key": op.parent_key, "chunk_index": str(op.chunk_index),
                    "num_tokens": str(len(op.block_ids) * self.block_size)}
        if self.saver is not None:
            self.saver.submit(op.key, chunk, metadata)
        else:
            self.writer.submit(op.key, chunk, metadata)  # CPU: already a fresh host tensor

    # -- stats --------------------------------------------------------------

    def take_stats(self) -> LMCacheFSStats | None:
        """Counters since the last call, writer counters included; None if nothing happened."""
        if self.writer is not None:
            w = self.writer.stats
            skipped = w.skipped_queue_full + w.skipped_low_space + (self.saver.skipped if self.saver else 0)
            now = (w.published, skipped, w.failed)
            self.stats.record_saves(*(a - b for a, b in zip(now, self._writer_reported)))
            self._writer_reported = now
        if self.stats.is_empty():
            return None
        stats, self.stats = self.stats, LMCacheFSStats()
        return stats

    def close(self) -> None:
        """Finish queued writes and stop the I/O threads."""
        if self.saver is not None:
            self.saver.close()
        if self.writer is not None:
            self.writer.close()
        if self.reader is not None:
            self.reader.close()
