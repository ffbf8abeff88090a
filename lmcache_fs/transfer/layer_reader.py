"""Read a step's chunk files layer by layer while the forward pass runs.

A chunk file's data is layer-major (``[layers, blocks, *page]``, see
:mod:`lmcache_fs.transfer.block_copy`), so layer ``l`` of a chunk is one contiguous run
of the file. :meth:`LayerwiseReader.start` reads layer 0 of every chunk of the
step, then layer 1, and so on, in background threads; the forward pass calls
:meth:`LayerwiseLoad.wait_layer` before each attention layer and waits only
until that layer has arrived. Each chunk and layer is one ``preadv``, fed to
the chunk's data check as it lands (xxh3, and the MAC where the store is
keyed, both stream), so a file's check is known once its last layer is read.
Every chunk is read inside one :meth:`ChunkStore.reading` block (header
checked before any byte moves; finished as a hit, or with its error, when the
thread's chunks are done).

Where the bytes go:

- contiguous CPU caches (vLLM's CPU layout) on a local filesystem: straight
  into the cache's own pages, no staging and no copy (:class:`_IntoPages`);
- anything else (CUDA, strided views): a ring of staging slots in host
  memory (pinned on CUDA), each holding one layer of the step's chunks, or of
  a group of them where one layer of the whole step would take more than half
  of ``staging_bytes`` (a long prompt); ``wait_layer`` queues each slot's
  host-to-device copy and a scatter into that layer's blocks on the current
  stream, so the engine's stream, not its thread, waits for the bytes
  (:class:`_ThroughStaging`). A slot is read into again only once the copy
  out of it has finished. CPU caches go this way too where the directory is on
  a filesystem that can hang on a peer (NFS, FUSE: see
  :mod:`lmcache_fs.storage.filesystem`).

A step's loads may have a deadline (the directory's filesystem can hang): a
wait past it abandons the step's loads. Every chunk not complete by then is a
miss (:class:`~lmcache_fs.storage.breaker.DirectoryUnavailable` as its cause:
never quarantined), nothing more is handed to the cache, and the reader is
done with: reads still stuck in the kernel finish, some day, into its staging
slots, which nothing reads again (the caller builds a new reader). That is why
a load that may be abandoned never reads straight into pages.

Reads and hand-overs go in *units*: a unit is one layer of one group of
chunks (one group, so one unit per layer, unless staging is split), layer by
layer and group by group within a layer.

So a layer may be computed on before its chunk's checksum is known. That is
safe because of what vLLM does with a failed load (vLLM 0.32's scheduler,
``_update_requests_with_invalid_blocks``): the blocks of a chunk that fails are
reported at the end of the step, and vLLM discards that step's output for every
request using them and recomputes from the first failed block
(``kv_load_failure_policy=recompute``, which the connector sets), exactly as
for a chunk found bad before the step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Sequence

import torch

from lmcache_fs.gpu.threads import device_thread_pool
from lmcache_fs.storage.codec import ChunkFileError, DataCheck, byte_view
from lmcache_fs.storage.store import ChunkStore, OpenChunk
from lmcache_fs.transfer.no_answer import past_deadline
from lmcache_fs.transfer.block_copy import block_ids_on, scatter_layer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerLoadJob:
    """Chunk ``key``'s blocks ``first_block ..`` go to cache blocks ``block_ids``."""

    key: str
    first_block: int
    block_ids: Sequence[int]


@dataclass
class _Reading:
    """One chunk being read: the open file and its data check, fed layer by layer."""

    index: int
    chunk: OpenChunk
    check: DataCheck


class _IntoPages:
    """Destination of one step: the pages of contiguous CPU caches themselves."""

    units_per_layer = 1  # every chunk's layer goes to its own pages: no need to split a layer

    def __init__(self, layers: Sequence[torch.Tensor], page_bytes: int):
        self.page_bytes = page_bytes
        # One flat byte view per layer: page b is [b * page_bytes, (b + 1) * page_bytes).
        self._layer_bytes = [byte_view(kv) for kv in layers]

    def group_of(self, index: int) -> int:
        return 0

    def buffers(self, unit: int, index: int, job: LayerLoadJob,
                pages: list[memoryview]) -> list[memoryview]:
        """Where the chunk's pages of layer ``unit`` go: ``pages`` (scratch) but for loaded blocks."""
        page = self.page_bytes
        cache = self._layer_bytes[unit]  # one unit per layer
        pages = list(pages)
        for pos, block in enumerate(job.block_ids):
            pages[job.first_block + pos] = cache[block * page:(block + 1) * page]
        return pages

    def before_reading(self, unit: int) -> None:
        return  # nothing to wait for: each block's page is its own

    def commit(self, unit: int) -> None:
        return  # the bytes are already where the forward pass reads them

    def abandon(self) -> None:
        return  # (never abandoned: see LayerwiseReader.start)


class _ThroughStaging:
    """Destination of one step: a ring of host slots, copied and scattered on demand.

    The step's jobs are split into groups of at most half of ``ring_bytes``
    per layer (one group unless the step is that large; a group has at least
    one job), so that the ring has room for two slots or more whatever the
    prompt length. A slot holds one layer of every loaded block of one group,
    in job order: unit ``u`` is layer ``u // groups``, group ``u % groups``.
    ``commit(u)`` (the engine's thread) queues slot ``u % ring``'s copy to the
    device and the scatter into the layer's blocks, then records an event;
    ``before_reading(u)`` (a read thread) waits until unit ``u - ring`` was
    committed and that event has passed, so that the slot may be overwritten.
    """

    def __init__(self, layers: Sequence[torch.Tensor], jobs: Sequence[LayerLoadJob],
                 page_bytes: int, ring_bytes: int):
        self.layers = layers
        self.page_bytes = page_bytes
        device = layers[0].device
        on_gpu = device.type == "cuda"
        group_blocks = max(1, ring_bytes // 2 // page_bytes)
        self._group: list[int] = []  # per job: its group
        self._offsets: list[int] = []  # per job: position of its first loaded block in a slot
        group_ids: list[list[int]] = [[]]
        for job in jobs:
            if group_ids[-1] and len(group_ids[-1]) + len(job.block_ids) > group_blocks:
                group_ids.append([])
            self._group.append(len(group_ids) - 1)
            self._offsets.append(len(group_ids[-1]))
            group_ids[-1].extend(job.block_ids)
        self.units_per_layer = len(group_ids)
        self._ids = [block_ids_on(ids, device) for ids in group_ids]
        slot_bytes = max(1, max(len(ids) for ids in group_ids)) * page_bytes
        units = len(layers) * self.units_per_layer
        self.ring = max(2, min(units, ring_bytes // slot_bytes))
        self._host = torch.empty((self.ring, slot_bytes), dtype=torch.uint8, pin_memory=on_gpu)
        self._host_bytes = [byte_view(slot) for slot in self._host]
        self._device = (torch.empty_like(self._host, device=device) if on_gpu else self._host)
        self._page_shape = tuple(layers[0].shape[1:])
        self._committed = 0  # units 0 .. committed-1 are queued for the device
        self._copied: list[torch.cuda.Event | None] = [None] * self.ring
        self._cond = threading.Condition()
        self._abandoned = False

    def group_of(self, index: int) -> int:
        return self._group[index]

    def buffers(self, unit: int, index: int, job: LayerLoadJob,
                pages: list[memoryview]) -> list[memoryview]:
        page = self.page_bytes
        slot = self._host_bytes[unit % self.ring]
        start = self._offsets[index]
        pages = list(pages)
        for pos in range(len(job.block_ids)):
            at = (start + pos) * page
            pages[job.first_block + pos] = slot[at:at + page]
        return pages

    def before_reading(self, unit: int) -> None:
        if unit < self.ring:
            return
        with self._cond:
            self._cond.wait_for(lambda: self._abandoned or self._committed > unit - self.ring)
            if self._abandoned:
                return
            copied = self._copied[unit % self.ring]
        if copied is not None:
            copied.synchronize()  # the device copy out of this slot has finished

    def commit(self, unit: int) -> None:
        r = unit % self.ring
        layer, group = divmod(unit, self.units_per_layer)
        ids = self._ids[group]
        if ids.numel():
            nbytes = ids.numel() * self.page_bytes
            src = self._device[r, :nbytes]
            if src.is_cuda:
                src.copy_(self._host[r, :nbytes], non_blocking=True)
            src = src.view(self.layers[layer].dtype).view(ids.numel(), *self._page_shape)
            scatter_layer(src, self.layers[layer], ids)
        event = None
        if self._device.is_cuda:
            event = torch.cuda.Event(blocking=True)  # waited for by read threads: sleep, not spin
            event.record(torch.cuda.current_stream(self._device.device))
        with self._cond:
            self._copied[r] = event
            self._committed = unit + 1
            self._cond.notify_all()

    def abandon(self) -> None:
        """No slot is committed again: wake the read threads waiting for one to free."""
        with self._cond:
            self._abandoned = True
            self._cond.notify_all()


def _direct(layers: Sequence[torch.Tensor]) -> bool:
    return all(kv.device.type == "cpu" and kv.is_contiguous() for kv in layers)


class LayerwiseReader:
    """Reads chunk files layer by layer into per-layer caches (any device, any strides).

    ``threads`` background threads share a step's chunks (each reads its
    chunks' layers in order, as the streaming checksum needs).
    ``staging_bytes`` bounds the staging ring where bytes cannot go straight
    into the cache (at least two layers' worth is always used).

    A step's chunks stay open from their first layer to their last (two
    descriptors each): the worker's start-up lifts the open-files limit for
    them (:func:`lmcache_fs.transfer.open_files.raise_open_files_limit`).
    """

    def __init__(self, store: ChunkStore, layers: Sequence[torch.Tensor], blocks_per_chunk: int,
                 threads: int, staging_bytes: int, into_pages: bool = True):
        """``into_pages``: CPU caches may be read into straight (False: through staging, for
        loads that may be abandoned at a deadline)."""
        if not layers:
            raise ValueError("LayerwiseReader needs at least one layer")
        self.store = store
        self.layers = list(layers)
        self.blocks_per_chunk = blocks_per_chunk
        self.chunk_shape = (len(layers), blocks_per_chunk, *layers[0].shape[1:])
        self.dtype = layers[0].dtype
        self.page_bytes = layers[0].element_size() * math.prod(layers[0].shape[1:])
        self.staging_bytes = staging_bytes
        self.into_pages = into_pages and _direct(self.layers)
        """True: bytes land in the cache's pages; False: through a staging ring."""
        self._into_pages = _IntoPages(self.layers, self.page_bytes) if self.into_pages else None
        self.threads = max(1, threads)
        self.pool = device_thread_pool(self.threads, "lmcache-fs-layers", layers[0].device)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def start(self, jobs: Sequence[LayerLoadJob],
              deadline_s: float | None = None) -> "LayerwiseLoad":
        """Begin reading ``jobs``; returns at once. ``deadline_s``: seconds from now the loads
        may take before they are abandoned (None: no deadline, only without ``into_pages``:
        an abandoned read must never land in the cache's own pages)."""
        assert deadline_s is None or not self.into_pages, "abandoned reads would land in pages"
        destination = self._into_pages or _ThroughStaging(self.layers, jobs, self.page_bytes,
                                                          self.staging_bytes)
        return LayerwiseLoad(self, jobs, destination, deadline_s)

    def close(self, wait: bool = True) -> None:
        """Stop the threads once they finish what they were given (``wait``: a load in
        progress finishes first; False, for a reader whose reads are stuck past a deadline)."""
        self.pool.shutdown(wait=wait)

    # -- run in the pool threads ----------------------------------------------

    def read_layer(self, reading: _Reading, layer: int, buffers: list[memoryview]) -> None:
        """Read layer ``layer`` of a chunk into ``buffers`` (one per block) and check it.

        Raises:
            ChunkFileError: the read failed or fell short.
        """
        layer_bytes = self.blocks_per_chunk * self.page_bytes
        reading.chunk.read_at(buffers, layer * layer_bytes)
        for buffer in buffers:
            reading.check.update(buffer)


class LayerwiseLoad:
    """One step's loads in progress: wait for a layer, or for all of them."""

    def __init__(self, reader: LayerwiseReader, jobs: Sequence[LayerLoadJob],
                 destination: _IntoPages | _ThroughStaging, deadline_s: float | None = None):
        self.reader = reader
        self.jobs = list(jobs)
        self.destination = destination
        self.deadline_s = deadline_s
        self._deadline = None if deadline_s is None else time.monotonic() + deadline_s
        self.abandoned = False
        """True once a wait passed the deadline: the reader must not be used again."""
        self.errors: list[ChunkFileError | None] = [None] * len(self.jobs)
        """Per job, once :meth:`finish` returned: None, or why the chunk is a miss."""
        self.started = time.perf_counter()
        self.read_seconds = 0.0
        """From :meth:`LayerwiseReader.start` to the last byte read (set by :meth:`finish`)."""
        self.waited_seconds = 0.0
        """How long :meth:`wait_layer` and :meth:`finish` blocked their caller in all."""
        threads = min(reader.threads, len(self.jobs)) or 1
        self._units = reader.num_layers * destination.units_per_layer
        self._units_read = [0] * threads  # per thread: units read for all its chunks
        self._ended = [0.0] * threads
        self._read = threading.Condition()
        self._committed = 0  # units handed to the destination (engine's thread only)
        self._futures: list[Future[None]] = [
            reader.pool.submit(self._run, t, list(range(t, len(self.jobs), threads)))
            for t in range(threads)]

    def wait_layer(self, layer: int) -> None:
        """Return once layer ``layer`` of every chunk is in the cache (or its chunk failed).

        On CUDA "in the cache" means queued on the current stream before
        anything the caller queues next.
        """
        start = time.perf_counter()
        last_unit = (layer + 1) * self.destination.units_per_layer - 1
        while self._committed <= last_unit and not self.abandoned:  # in order: the ring needs it
            with self._read:
                arrived = self._read.wait_for(lambda: min(self._units_read) > self._committed,
                                              timeout=self._remaining())
            if not arrived:
                self._abandon()
                break
            self.destination.commit(self._committed)
            self._committed += 1
        self.waited_seconds += time.perf_counter() - start

    def _remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def _abandon(self) -> None:
        """The deadline passed: every chunk not yet complete is a miss; nothing more goes to
        the cache, and the read threads stop at their next layer."""
        with self._read:
            self.abandoned = True
            for i, error in enumerate(self.errors):
                if error is None:
                    self.errors[i] = past_deadline(self.deadline_s or 0.0)
            self._read.notify_all()
        self.destination.abandon()

    def finish(self) -> list[ChunkFileError | None]:
        """Wait for every layer, read and checksum; returns :attr:`errors`."""
        self.wait_layer(self.reader.num_layers - 1)
        start = time.perf_counter()
        for future in self._futures:
            if self.abandoned:
                break
            try:
                future.result(timeout=self._remaining())  # _run catches everything: this waits
            except FutureTimeout:
                self._abandon()
        self.waited_seconds += time.perf_counter() - start
        self.read_seconds = (time.perf_counter() if self.abandoned else max(self._ended)) - self.started
        return list(self.errors)

    def _run(self, thread: int, indices: list[int]) -> None:
        try:
            self._read_chunks(thread, indices)
        except Exception as exc:  # noqa: BLE001 - a bug here must cost a miss, not the engine
            logger.exception("layer-wise read failed")
            for i in indices:
                if self.errors[i] is None:
                    self.errors[i] = ChunkFileError(f"internal error: {exc!r}")
        finally:
            self._ended[thread] = time.perf_counter()
            self._unit_read(thread, self._units)

    def _read_chunks(self, thread: int, indices: list[int]) -> None:
        reader = self.reader
        readings: list[_Reading] = []
        # Each chunk is finished on leaving the block: a hit marks it used, a failure
        # recorded in its ``error`` quarantines what is proven bad.
        with contextlib.ExitStack() as open_chunks:
            for i in indices:
                try:
                    chunk = open_chunks.enter_context(
                        reader.store.reading(self.jobs[i].key, reader.dtype, reader.chunk_shape))
                except ChunkFileError as exc:  # the store quarantined what is proven bad
                    with self._read:
                        if not self.abandoned:
                            self.errors[i] = exc
                    continue
                readings.append(_Reading(i, chunk, chunk.data_check()))
            # Pages of a chunk that are not loaded (before first_block, after the
            # last block id) are read here, only to be checked.
            page = reader.page_bytes
            scratch = byte_view(torch.empty(reader.blocks_per_chunk * page, dtype=torch.uint8))
            scratch_pages = [scratch[b * page:(b + 1) * page]
                             for b in range(reader.blocks_per_chunk)]
            destination = self.destination
            groups: list[list[_Reading]] = [[] for _ in range(destination.units_per_layer)]
            for reading in readings:
                groups[destination.group_of(reading.index)].append(reading)
            for unit in range(self._units):
                layer, group = divmod(unit, destination.units_per_layer)
                destination.before_reading(unit)
                if self.abandoned:
                    break
                for reading in groups[group]:
                    if reading.chunk.error is not None:
                        continue
                    job = self.jobs[reading.index]
                    buffers = destination.buffers(unit, reading.index, job, scratch_pages)
                    try:
                        reader.read_layer(reading, layer, buffers)
                    except ChunkFileError as exc:
                        reading.chunk.error = exc
                self._unit_read(thread, unit + 1)
            for reading in readings:
                if reading.chunk.error is None and not self.abandoned:
                    try:
                        reading.check.verify()
                    except ChunkFileError as exc:
                        reading.chunk.error = exc
            with self._read:  # once abandoned, errors are the abandonment's, for good
                for reading in readings:
                    if self.abandoned:  # incomplete, not bad: finished as not proven bad
                        reading.chunk.error = self.errors[reading.index]
                    else:
                        self.errors[reading.index] = reading.chunk.error

    def _unit_read(self, thread: int, units: int) -> None:
        with self._read:
            self._units_read[thread] = max(self._units_read[thread], units)
            self._read.notify_all()
