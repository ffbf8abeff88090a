"""One KV cache group's I/O in a worker: moves bytes between its chunk files and the paged cache.

Each group has its own chunk files (its own namespace), store, reader and
writer, over its own layers; :class:`~lmcache_fs.connector.worker.WorkerSide`
holds one :class:`GroupWorker` per group and hands each its group's part of
every step.

Loads start with the step (``start_load_kv``). With layer-wise loads (the
default on CPU, ``layerwise_load: true`` on CUDA) a :class:`LayerwiseReader`
reads them layer by layer in the background, and each attention layer waits
only for its own layer (``wait_for_layer_load``). Otherwise a
:class:`ChunkReader` reads whole chunks with several in flight (kvikio/GDS
into GPU staging, or POSIX into host memory), each verified, and the blocks are
scattered into the cache before the forward pass. A chunk that is missing,
truncated, corrupt or foreign marks its blocks (and the rest of that prompt's
prefix) as failed at the end of the step, and vLLM recomputes them.

Saves run after the forward pass (``wait_for_save``), not layer by layer: the
blocks are gathered into a fresh tensor at once (the engine may reuse its
blocks next step); on CUDA a side stream copies it to pinned memory; the
background writer publishes it, skipping rather than stalling when busy. What
that leaves on the engine's thread is small (measured: a gather kernel and
about 120 us of host time per 32 MiB chunk on an H200; on CPU, page copies at
about 17 GB/s, 2 ms for the 34 MB of KV of 8k tokens of the test model against
its 2.2 s prefill), so splitting it per layer would only add calls.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from lmcache_fs.config import LMCacheFSConfig
from lmcache_fs.log import human_bytes
from lmcache_fs.storage.breaker import Breaker
from lmcache_fs.storage.codec import ChunkFileError
from lmcache_fs.storage.filesystem import is_local
from lmcache_fs.storage.space import StoreGuard
from lmcache_fs.storage.store import ChunkStore
from lmcache_fs.storage.writer import BackgroundWriter
from lmcache_fs.transfer.block_copy import block_ids_on, gather_blocks, scatter_blocks
from lmcache_fs.transfer.chunk_reader import ChunkReader
from lmcache_fs.transfer.device_saver import DeviceChunkSaver
from lmcache_fs.transfer.kernel_blocks import KernelBlockError, whole_block_view
from lmcache_fs.transfer.layer_reader import LayerLoadJob, LayerwiseLoad, LayerwiseReader
from lmcache_fs.transfer.no_answer import switched_off
from lmcache_fs.transfer.read_paths import choose_read_backend

from .metadata import LMCacheFSMetadata, SaveOp
from .ranks import this_rank_only
from .stats import LMCacheFSStats

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerContext:
    """What the groups' I/O of one worker process (one tensor-parallel rank) shares."""

    config: LMCacheFSConfig
    """The read settings and the save queue's size."""
    block_size: int
    """Tokens per block, the same in every group (``check_supported``)."""
    can_save: bool
    """The engine stores (``kv_both``, ``kv_producer``): each group gets a writer."""
    guards: Sequence[StoreGuard] = ()
    """Asked before each store; one set for all groups, whose writers share the budget's count."""
    any_rank: Callable[[Sequence[bool]], list[bool]] = this_rank_only
    """Per flag, True on every tensor-parallel rank if any of them passes True (a collective)."""
    breaker: Breaker | None = None
    """The directory's breaker in this process: loads wait at most their deadline, none is
    tried while it has the directory switched off, and stores are skipped then."""


@dataclass(frozen=True)
class GroupFiles:
    """One KV cache group as a worker moves it: its chunk files and its layers."""

    store: ChunkStore
    """The group's chunk files (its own namespace)."""
    layer_names: Sequence[str]
    held_blocks: int
    """Blocks of each chunk that the group's files hold (``GroupGeometry.held_blocks``)."""
    counts_tokens: bool = True
    """Its loads count as hit tokens in the stats (one group per engine, on one rank, does)."""
    holds_states: bool = False
    """Its layers keep linear-attention states (``connector/mamba_state.py``): vLLM registers
    one whole state page per block, never split into kernel blocks."""


@dataclass(frozen=True)
class _EndedLoads:
    """A step's loads as this rank ended them, until the ranks agree on which failed."""

    meta: LMCacheFSMetadata
    failed: list[bool]
    """Per load: unusable here (its chunk failed, or an earlier chunk of its request did)."""
    seconds: float
    note: str


def _usable_cores() -> int:
    """Cores this thread may run on (vLLM's CPU build pins its threads), else all of them."""
    if hasattr(os, "sched_getaffinity"):  # Linux; not macOS
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class GroupWorker:
    """Chunk I/O of one KV cache group on one worker (one TP rank)."""

    def __init__(self, files: GroupFiles, context: WorkerContext, async_loads: bool):
        """``async_loads``: the engine loads asynchronously (several KV cache groups, see
        ``connector/worker.py``): a failed load is reported per request
        (:meth:`take_failed_requests`) rather than per block, the request recomputes whole,
        and no save rests on its blocks."""
        self.store = files.store
        self.config = context.config
        self.async_loads = async_loads
        self.counts_tokens = files.counts_tokens
        self._failed_requests: set[str] = set()
        self.any_rank = context.any_rank
        self.layer_names = list(files.layer_names)
        self.holds_states = files.holds_states
        self.blocks_per_chunk = files.held_blocks
        self.block_size = context.block_size
        self.layers: list[torch.Tensor] = []
        self.reader: ChunkReader | None = None
        self.layer_reader: LayerwiseReader | None = None
        self._layer_index: dict[str, int] = {}
        self._layerwise: tuple[LMCacheFSMetadata, LayerwiseLoad] | None = None
        self.saver: DeviceChunkSaver | None = None
        save_queue_size = self.config.save_queue_size
        self.breaker = context.breaker
        self.writer = (BackgroundWriter(self.store, save_queue_size, context.guards,
                                        context.breaker)
                       if context.can_save else None)
        # Loads that may be abandoned at a deadline never read straight into vLLM's pages:
        # only a directory on a local filesystem, which no peer can leave hanging, is read
        # without one (see storage/filesystem.py).
        self._deadlines = self.breaker is not None and not is_local(self.store.layout.root)
        self._chunk_shape: tuple[int, ...] = ()
        self._chunk_bytes = 0
        self._failed_blocks: set[int] = set()
        self._ended: _EndedLoads | None = None  # this step's loads, until the ranks agree
        self._failed_load_steps = 0  # steps in which a load failed on some rank
        self._withheld_saves = 0  # saves dropped after a failed load (counted as skipped)
        # Chunks gathered in steps that may rest on a failed load: (failure number, op, copy).
        self._held: list[tuple[int, SaveOp, torch.Tensor]] = []
        self._max_held = save_queue_size
        self.stats = LMCacheFSStats()
        # (published, failed, skipped by reason) as last reported.
        self._writer_reported: tuple[int, int, Counter[str]] = (0, 0, Counter())

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Keep the per-layer caches in namespace order; build the reader (and GPU saver)."""
        missing = [n for n in self.layer_names if n not in kv_caches]
        if missing:
            raise ValueError(f"lmcache-fs: KV caches missing for layers {missing[:3]}...")
        if self.holds_states:  # [blocks, 1, 1, state bytes], one row per block already
            self.layers = [kv_caches[n] for n in self.layer_names]
        else:
            # vLLM may register kernel blocks (several rows per block): index whole blocks.
            self.layers = [whole_block_view(kv_caches[n], self.block_size)
                           for n in self.layer_names]
            self._check_page_shape(self.layers[0], kv_caches[self.layer_names[0]])
        first = self.layers[0]
        page_shape = tuple(first.shape[1:])
        for name, kv in zip(self.layer_names, self.layers):
            if tuple(kv.shape[1:]) != page_shape or kv.dtype != first.dtype:
                raise ValueError(f"lmcache-fs: layer {name} has pages {tuple(kv.shape[1:])} "
                                 f"{kv.dtype}, others {page_shape} {first.dtype}; hybrid "
                                 "KV layouts are not supported")
        self._chunk_shape = (len(self.layers), self.blocks_per_chunk, *page_shape)
        self._chunk_bytes = first.element_size() * math.prod(self._chunk_shape)
        cfg = self.config
        if cfg.layerwise_load.resolve(auto=first.device.type == "cpu"):
            self._layer_index = {name: i for i, name in enumerate(self.layer_names)}
            self._new_reader()
            assert self.layer_reader is not None
            into = "into the cache" if self.layer_reader.into_pages else "through staging"
            reads = f"layer by layer {into} (read threads: {self.layer_reader.threads})"
        else:
            self._new_reader()
            assert self.reader is not None
            reads = f"whole chunks ({self.reader.slots} reads in flight)"
        if self._deadlines:
            reads += ", each step's within its deadline"
        if self.writer is not None and first.device.type == "cuda":
            self.saver = DeviceChunkSaver(self.writer, first.device, max_pending=8,
                                          chunk_bytes=self._chunk_bytes)
        logger.info("registered %d layers, chunk of %d blocks = %s per file, device %s, "
                    "loads %s", len(self.layers), self.blocks_per_chunk,
                    human_bytes(self._chunk_bytes), first.device, reads)

    def _new_reader(self) -> None:
        """The reader of this group's loads (again after one was abandoned at a deadline:
        its stuck reads may still land in its buffers, which nothing reads again)."""
        cfg, first = self.config, self.layers[0]
        if self._layer_index:
            self.layer_reader = LayerwiseReader(self.store, self.layers, self.blocks_per_chunk,
                                                threads=min(8, _usable_cores()),
                                                staging_bytes=cfg.staging_bytes,
                                                into_pages=not self._deadlines)
        else:
            self.reader = ChunkReader(self.store, self._chunk_shape, first.dtype, first.device,
                                      choose_read_backend(cfg.use_gds, first.device),
                                      staging_bytes=cfg.staging_bytes,
                                      verify=cfg.verify_device_reads)

    def _deadline_s(self, meta: LMCacheFSMetadata) -> float | None:
        """Seconds this step's loads may take (None: a local directory, no deadline)."""
        return self.config.load_deadline(len(meta.loads) * self._chunk_bytes) \
            if self._deadlines else None

    def _check_page_shape(self, whole: torch.Tensor, registered: torch.Tensor) -> None:
        """Refuse views whose page differs from what the namespace was named for.

        The namespace (made before vLLM allocates its caches) names a kernel-block
        page (``page_shape``) where it predicts vLLM's HND split; a page that
        differs from the prediction would file chunks under another shape's name.
        """
        expected = self.store.layout.namespace.fields.get("page_shape")
        page = "x".join(map(str, whole.shape[1:]))
        split = whole.dim() == 4 and whole.shape[2] != self.block_size
        if (expected is not None or split) and page != expected:
            raise KernelBlockError(
                f"lmcache-fs: vLLM registered KV views {tuple(registered.shape)} "
                f"(strides {registered.stride()}), whole {self.block_size}-token blocks of pages "
                f"{page}, but the namespace was made for pages "
                f"{expected or f'[heads, {self.block_size}, C]'}, as predicted from the KV cache "
                f"spec. Start vLLM with --block-size {registered.shape[2]} or "
                "VLLM_KV_CACHE_LAYOUT=NHD, or remove the kv-transfer-config")

    # -- loads --------------------------------------------------------------

    def load(self, meta: LMCacheFSMetadata) -> None:
        """Start (layer-wise) or do (whole chunks) this step's loads into the paged cache."""
        self.finish_load()  # (vLLM ends every step first; never two steps' reads at once)
        if not meta.loads:
            return
        if self.breaker is not None and not self.breaker.available:
            self._account(meta, [switched_off(self.store.layout.root)] * len(meta.loads), 0.0)
            return
        if self.layer_reader is not None:
            jobs = [LayerLoadJob(op.key, op.first_block, op.block_ids) for op in meta.loads]
            self._layerwise = (meta, self.layer_reader.start(jobs, self._deadline_s(meta)))
            return
        assert self.reader is not None, "register_kv_caches was not called"
        start = time.perf_counter()
        errors = self._read_whole_chunks(meta)
        self._account(meta, errors, time.perf_counter() - start)

    def wait_for_layer(self, layer_name: str) -> None:
        """Block until the layer about to run has its loaded blocks (layer-wise loads only)."""
        index = self._layer_index.get(layer_name)  # None: a layer without KV, nothing to wait for
        if self._layerwise is not None and index is not None:
            self._layerwise[1].wait_layer(index)

    def finish_load(self) -> None:
        """Wait for the step's loads to end and count them, as the ranks agree (idempotent).

        The first call after a step's loads is a collective (:meth:`_settle_loads`):
        every rank makes the same calls in the same order (vLLM calls ``wait_for_save``,
        then asks for failed blocks and stats, on every worker).
        """
        self._end_layerwise_load()
        if self._ended is not None:
            self._settle_loads()

    def _end_layerwise_load(self) -> None:
        """Wait for the step's layer-wise reads to end and note this rank's failures."""
        if self._layerwise is None:
            return
        meta, running = self._layerwise
        self._layerwise = None
        errors = running.finish()
        if running.abandoned:
            self._abandoned(running.deadline_s or 0.0)
        self._account(meta, errors, running.read_seconds,
                      f", engine waited {running.waited_seconds * 1e3:.0f} ms for it")

    def _abandoned(self, deadline_s: float) -> None:
        """A step's loads passed their deadline: switch the directory off, and read the next
        steps with a new reader (reads stuck in the kernel may still land in the old one's).
        The old one's threads end once their stuck reads return, unwaited for."""
        assert self.breaker is not None
        self.breaker.note_timeout("load", deadline_s)
        if self.layer_reader is not None:
            self.layer_reader.close(wait=False)
        if self.reader is not None:
            self.reader.close()  # (abandoned: it waits for nothing)
        self._new_reader()

    def _read_whole_chunks(self, meta: LMCacheFSMetadata) -> list[ChunkFileError | None]:
        """Read each chunk whole (several in flight) and scatter it; returns per-load errors."""
        assert self.reader is not None
        device = self.layers[0].device
        errors: list[ChunkFileError | None] = [None] * len(meta.loads)
        deadline_s = self._deadline_s(meta)
        for i, chunk in self.reader.read([op.key for op in meta.loads], deadline_s):
            op = meta.loads[i]
            if isinstance(chunk, ChunkFileError):
                errors[i] = chunk
                continue
            ids = block_ids_on(op.block_ids, device)
            scatter_blocks(chunk[:, op.first_block:op.first_block + len(op.block_ids)],
                           self.layers, ids)
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # the log's timing is honest
        if self.reader.abandoned:
            self._abandoned(deadline_s or 0.0)
        return errors

    def _account(self, meta: LMCacheFSMetadata, errors: Sequence[ChunkFileError | None],
                 seconds: float, note: str = "") -> None:
        """This rank's failed blocks (a failed chunk and the rest of its prompt) and errors;
        what loaded is counted once the ranks agree (:meth:`_settle_loads`)."""
        broken: set[str] = set()
        failed = []
        for op, error in zip(meta.loads, errors):
            if error is not None and op.req_id not in broken:
                if self.breaker is not None and isinstance(error.__cause__, OSError):
                    self.breaker.note_error(error.__cause__, "load")  # ENOTCONN, EIO...
                logger.warning("request %s: chunk %s unusable (%s): recomputing from there",
                               op.req_id, op.key[:16], error)
                self.stats.record_load_error(error)
                broken.add(op.req_id)
                if self.async_loads:
                    self._failed_requests.add(op.req_id)
            if op.req_id in broken and not self.async_loads:
                # vLLM recomputes everything after the first failed block (asynchronous
                # loads: the whole request, reported as failed instead).
                self._failed_blocks.update(op.block_ids)
            failed.append(op.req_id in broken)
        self._ended = _EndedLoads(meta, failed, seconds, note)

    def _settle_loads(self) -> None:
        """Agree with the other ranks on which of the step's loads failed, then count what
        loaded (and a step whose load failed on any rank: see :meth:`save`).

        vLLM recomputes the blocks that failed on any rank, on every rank (it
        takes the union of their failed blocks), so a chunk that loaded here but
        failed on another rank is no hit: every rank logs, and the counting rank
        counts, the same tokens. Bytes count what this rank read.
        """
        ended, self._ended = self._ended, None
        assert ended is not None
        failed = self.any_rank(ended.failed)
        if any(failed) and not self.async_loads:
            self._failed_load_steps += 1
        tokens: dict[str, int] = {op.req_id: 0 for op in ended.meta.loads}
        nbytes: dict[str, int] = dict.fromkeys(tokens, 0)
        for op, failed_here, failed_anywhere in zip(ended.meta.loads, ended.failed, failed):
            if not failed_anywhere:
                tokens[op.req_id] += len(op.block_ids) * self.block_size
            if not failed_here:
                nbytes[op.req_id] += self._chunk_bytes
        total_bytes = sum(nbytes.values())
        self.stats.record_load(total_bytes, total_bytes // self._chunk_bytes,
                               sum(tokens.values()) if self.counts_tokens else 0, ended.seconds)
        for req_id, hit_tokens in tokens.items():
            hit = ended.meta.hits.get(req_id)
            local = hit.local_tokens if hit else 0
            from_local = f" ({local} from local prefix cache)" if local else ""
            share = (ended.seconds * nbytes[req_id] / total_bytes if total_bytes
                     else ended.seconds)
            # DEBUG: vLLM's periodic "KV Transfer metrics" line sums these up at INFO.
            logger.debug("request %s: hit %d/%d tokens%s, loaded %s in %.0f ms (%.1f GB/s)%s",
                         req_id, hit_tokens + local, hit.total_tokens if hit else 0, from_local,
                         human_bytes(nbytes[req_id]), share * 1e3,
                         nbytes[req_id] / max(share, 1e-9) / 1e9, ended.note)

    def take_failed_requests(self) -> set[str]:
        """Requests with a failed asynchronous load since the last call (every load of the
        step ended)."""
        self.finish_load()
        failed, self._failed_requests = self._failed_requests, set()
        return failed

    def take_failed_blocks(self) -> set[int]:
        """Block ids whose (synchronous) load failed since the last call."""
        self.finish_load()
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    # -- saves --------------------------------------------------------------

    def save(self, meta: LMCacheFSMetadata) -> None:
        """Copy each completed chunk out of the paged cache and queue it for writing.

        Not straight after a failed load: KV computed in that step (and, with
        async scheduling, in the next one, planned before the failure was
        known) may rest on blocks that hold no valid KV, on any request that
        uses them (prefix-cache sharing included), on any rank (layers past the
        first mix all heads). Until a step built after the scheduler heard of
        the failure, every save is gathered but held back; that step's metadata
        says which held chunks rest only on sound blocks (``released_saves``):
        those are published, the rest dropped (the scheduler plans the chunks
        of recomputed requests again). The chunk is copied when it is computed,
        so a request that finishes in a withheld step, whose blocks vLLM frees
        at once, still gets its chunks stored.
        """
        self.finish_load()  # the step is over: no read may still write into the cache
        if self.writer is None:
            return
        self._resolve_held(meta)
        if not meta.saves:
            return
        if meta.failed_load_steps < self._failed_load_steps:
            self._hold(meta.saves)
            return
        for op in meta.saves:
            self._submit(op, self._gather(op))

    def _hold(self, saves: Sequence[SaveOp]) -> None:
        """Gather chunks of a step that may rest on a failed load, until the scheduler's verdict."""
        room = max(0, self._max_held - len(self._held))
        for op in saves[:room]:
            self._held.append((self._failed_load_steps, op, self._gather(op)))
        self._withheld_saves += max(0, len(saves) - room)
        logger.info("holding back %d stores until the scheduler has heard of a failed load",
                    len(saves))

    def _resolve_held(self, meta: LMCacheFSMetadata) -> None:
        """Publish the held chunks ``meta`` releases, drop the others it has a verdict on."""
        if not self._held:
            return
        released = set(meta.released_saves)
        waiting = []
        for failure, op, chunk in self._held:
            if failure > meta.failed_load_steps:
                waiting.append((failure, op, chunk))  # no verdict yet
            elif op.key in released:
                self._submit(op, chunk)
            else:
                self._withheld_saves += 1
        self._held = waiting

    def _gather(self, op: SaveOp) -> torch.Tensor:
        """A fresh copy of the chunk's blocks (the engine may reuse them next step)."""
        device = self.layers[0].device
        chunk = torch.empty(self._chunk_shape, dtype=self.layers[0].dtype, device=device)
        gather_blocks(self.layers, block_ids_on(op.block_ids, device), chunk)
        return chunk

    def _submit(self, op: SaveOp, chunk: torch.Tensor) -> None:
        assert self.writer is not None
        metadata = {"parent_key": op.parent_key, "chunk_index": str(op.chunk_index),
                    "num_tokens": str(len(op.block_ids) * self.block_size)}
        if self.saver is not None:
            self.saver.submit(op.key, chunk, metadata)
        else:
            self.writer.submit(op.key, chunk, metadata)  # CPU: already a fresh host tensor

    # -- stats --------------------------------------------------------------

    def take_stats(self) -> LMCacheFSStats | None:
        """Counters since the last call, writer counters included; None if nothing happened."""
        self.finish_load()
        if self.writer is not None:
            w = self.writer.stats
            skipped = w.skipped + Counter(queue_full=self.saver.skipped if self.saver else 0,
                                          failed_load=self._withheld_saves)
            stored, failed = (w.published - self._writer_reported[0],
                              w.failed - self._writer_reported[1])
            self.stats.record_saves(stored, stored * self._chunk_bytes,
                                    dict(skipped - self._writer_reported[2]), failed)
            self._writer_reported = (w.published, w.failed, skipped)
        if self.stats.is_empty():
            return None
        stats, self.stats = self.stats, LMCacheFSStats()
        return stats

    def quiesce(self) -> None:
        """End every read into the KV cache and every copy out of it (before vLLM's sleep)."""
        self.finish_load()
        if self.saver is not None:
            self.saver.flush()

    def close(self) -> None:
        """Finish queued writes and stop the I/O threads."""
        self._end_layerwise_load()  # no collective at shutdown: the other ranks may be gone
        if self.layer_reader is not None:
            self.layer_reader.close()
        if self.saver is not None:
            self.saver.close()
        if self.writer is not None:  # (a directory that can hang may keep it from finishing)
            self.writer.close(self.config.startup_deadline_s if self._deadlines else None)
        if self.reader is not None:
            self.reader.close()
