"""Read a step's chunk files layer by layer while the forward pass runs.

A chunk file's data is layer-major (``[layers, blocks, *page]``, see
:mod:`lmcache_fs.block_copy`), so layer ``l`` of a chunk is one contiguous run
of the file. :meth:`LayerwiseReader.start` reads layer 0 of every chunk of the
step, then layer 1, and so on, in background threads; the forward pass calls
:meth:`LayerwiseLoad.wait_layer` before each attention layer and waits only
until that layer has arrived. Each chunk and layer is one ``preadv``, hashed as
it lands: xxh3 streams, so a file's checksum is known once its last layer is
read.

Where the bytes go:

- contiguous CPU caches (vLLM's CPU layout): straight into the cache's own
  pages, no staging and no copy (:class:`_IntoPages`);
- anything else (CUDA, strided views): a ring of per-layer staging slots in
  host memory (pinned on CUDA); ``wait_layer`` queues the slot's
  host-to-device copy and a scatter into that layer's blocks on the current
  stream, so the engine's stream, not its thread, waits for the bytes
  (:class:`_ThroughStaging`). A slot is read into again only once the copy
  out of it has finished.

So a layer may be computed on before its chunk's checksum is known. That is
safe because of what vLLM does with a failed load (vLLM 0.32's scheduler,
``_update_requests_with_invalid_blocks``): the blocks of a chunk that fails are
reported at the end of the step, and vLLM discards that step's output for every
request using them and recomputes from the first failed block
(``kv_load_failure_policy=recompute``, which the connector sets), exactly as
for a chunk found bad before the step.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import xxhash

from lmcache_fs.block_copy import scatter_layer
from lmcache_fs.codec import (ChunkFileError, check_header, checksum_text, new_checksum,
                              open_chunk_file, read_header_fd)
from lmcache_fs.store import ChunkStore

logger = logging.getLogger(__name__)

# Files one read thread keeps open from its first layer to its last; any more
# chunks (a huge step) are opened again for each layer (their checksum still
# covers every layer, so a file replaced in between is a miss, never mixed).
MAX_OPEN_PER_THREAD = 256


@dataclass(frozen=True)
class LayerLoadJob:
    """Chunk ``key``'s blocks ``first_block ..`` go to cache blocks ``block_ids``."""

    key: str
    first_block: int
    block_ids: Sequence[int]


@dataclass
class _OpenChunk:
    """One chunk being read: its file, where its data starts, its running checksum."""

    index: int
    path: Path
    fd: int | None  # None: opened again for each layer
    data_offset: int
    expected: str
    hasher: xxhash.xxh3_64 = field(default_factory=new_checksum)


def _byte_view(t: torch.Tensor) -> memoryview:
    """A flat byte view of a contiguous CPU tensor (no copy)."""
    return memoryview(t.view(-1).view(torch.uint8).numpy())


class _IntoPages:
    """Destination of one step: the pages of contiguous CPU caches themselves."""

    def __init__(self, layers: Sequence[torch.Tensor], page_bytes: int):
        self.page_bytes = page_bytes
        # One flat byte view per layer: page b is [b * page_bytes, (b + 1) * page_bytes).
        self._layer_bytes = [_byte_view(kv) for kv in layers]

    def buffers(self, layer: int, index: int, job: LayerLoadJob,
                pages: list[memoryview]) -> list[memoryview]:
        """Where the chunk's pages of ``layer`` go: ``pages`` (scratch) but for loaded blocks."""
        page = self.page_bytes
        cache = self._layer_bytes[layer]
        pages = list(pages)
        for pos, block in enumerate(job.block_ids):
            pages[job.first_block + pos] = cache[block * page:(block + 1) * page]
        return pages

    def before_reading(self, layer: int) -> None:
        return  # nothing to wait for: each block's page is its own

    def commit(self, layer: int) -> None:
        return  # the bytes are already where the forward pass reads them


class _ThroughStaging:
    """Destination of one step: a ring of per-layer host slots, copied and scattered on demand.

    A slot holds one layer of every loaded block of the step, in job order.
    ``commit(l)`` (the engine's thread) queues slot ``l % ring``'s copy to the
    device and the scatter into layer ``l``'s blocks, then records an event;
    ``before_reading(l)`` (a read thread) waits until layer ``l - ring`` was
    committed and that event has passed, so that the slot may be overwritten.
    """

    def __init__(self, layers: Sequence[torch.Tensor], jobs: Sequence[LayerLoadJob],
                 page_bytes: int, ring_bytes: int):
        self.layers = layers
        self.page_bytes = page_bytes
        device = layers[0].device
        on_gpu = device.type == "cuda"
        self._offsets = []  # per job: position of its first loaded block in a slot
        ids: list[int] = []
        for job in jobs:
            self._offsets.append(len(ids))
            ids.extend(job.block_ids)
        self._ids = torch.tensor(ids, dtype=torch.int64, device=device)
        slot_bytes = max(1, len(ids)) * page_bytes
        self.ring = max(2, min(len(layers), ring_bytes // slot_bytes))
        self._host = torch.empty((self.ring, slot_bytes), dtype=torch.uint8, pin_memory=on_gpu)
        self._host_bytes = [_byte_view(slot) for slot in self._host]
        self._device = (torch.empty_like(self._host, device=device) if on_gpu else self._host)
        self._page_shape = tuple(layers[0].shape[1:])
        self._committed = 0  # layers 0 .. committed-1 are queued for the device
        self._copied: list[torch.cuda.Event | None] = [None] * self.ring
        self._cond = threading.Condition()

    def buffers(self, layer: int, index: int, job: LayerLoadJob,
                pages: list[memoryview]) -> list[memoryview]:
        page = self.page_bytes
        slot = self._host_bytes[layer % self.ring]
        start = self._offsets[index]
        pages = list(pages)
        for pos in range(len(job.block_ids)):
            at = (start + pos) * page
            pages[job.first_block + pos] = slot[at:at + page]
        return pages

    def before_reading(self, layer: int) -> None:
        if layer < self.ring:
            return
        with self._cond:
            self._cond.wait_for(lambda: self._committed > layer - self.ring)
            copied = self._copied[layer % self.ring]
        if copied is not None:
            copied.synchronize()  # the device copy out of this slot has finished

    def commit(self, layer: int) -> None:
        r = layer % self.ring
        if self._ids.numel():
            src = self._device[r]
            if src.is_cuda:
                src.copy_(self._host[r], non_blocking=True)
            n = self._ids.numel()
            src = src[:n * self.page_bytes].view(self.layers[layer].dtype)
            src = src.view(n, *self._page_shape)
            scatter_layer(src, self.layers[layer], self._ids)
        event = None
        if self._device.is_cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self._device.device))
        with self._cond:
            self._copied[r] = event
            self._committed = layer + 1
            self._cond.notify_all()


def _direct(layers: Sequence[torch.Tensor]) -> bool:
    return all(kv.device.type == "cpu" and kv.is_contiguous() for kv in layers)


class LayerwiseReader:
    """Reads chunk files layer by layer into per-layer caches (any device, any strides).

    ``threads`` background threads share a step's chunks (each reads its
    chunks' layers in order, as the streaming checksum needs).
    ``staging_bytes`` bounds the staging ring where bytes cannot go straight
    into the cache (at least two layers' worth is always used).
    """

    def __init__(self, store: ChunkStore, layers: Sequence[torch.Tensor], blocks_per_chunk: int,
                 threads: int, staging_bytes: int = 256 << 20):
        if not layers:
            raise ValueError("LayerwiseReader needs at least one layer")
        self.store = store
        self.layers = list(layers)
        self.blocks_per_chunk = blocks_per_chunk
        self.chunk_shape = (len(layers), blocks_per_chunk, *layers[0].shape[1:])
        self.dtype = layers[0].dtype
        self.page_bytes = layers[0].element_size() * math.prod(layers[0].shape[1:])
        self.staging_bytes = staging_bytes
        self.into_pages = _direct(self.layers)
        """True: bytes land in the cache's pages; False: through a staging ring."""
        self._into_pages = _IntoPages(self.layers, self.page_bytes) if self.into_pages else None
        self.threads = max(1, threads)
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="lmcache-fs-layers")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def start(self, jobs: Sequence[LayerLoadJob]) -> "LayerwiseLoad":
        """Begin reading ``jobs``; returns at once."""
        destination = self._into_pages or _ThroughStaging(self.layers, jobs, self.page_bytes,
                                                          self.staging_bytes)
        return LayerwiseLoad(self, jobs, destination)

    def close(self) -> None:
        """Stop the threads (a load in progress finishes first)."""
        self.pool.shutdown(wait=True)

    # -- run in the pool threads ----------------------------------------------

    def open_chunk(self, index: int, path: Path, job: LayerLoadJob) -> _OpenChunk:
        """Open ``job``'s file and check its header: size, dtype, shape, namespace, key.

        Raises:
            ChunkFileError: the file is missing, truncated or foreign.
        """
        fd = open_chunk_file(path)
        try:
            header = read_header_fd(fd, path)
            check_header(header, os.fstat(fd).st_size, self.dtype, self.chunk_shape,
                         self.store.identity(job.key))
        except OSError as exc:
            os.close(fd)
            raise ChunkFileError(f"read failed: {exc.strerror}") from exc
        except BaseException:
            os.close(fd)
            raise
        return _OpenChunk(index, path, fd, header.data_offset,
                          header.metadata.get("checksum", ""))

    def read_layer(self, chunk: _OpenChunk, layer: int, buffers: list[memoryview]) -> None:
        """Read layer ``layer`` of ``chunk`` into ``buffers`` (one per block) and hash it.

        Raises:
            ChunkFileError: the read failed or fell short.
        """
        expected = self.blocks_per_chunk * self.page_bytes
        offset = chunk.data_offset + layer * expected
        fd = chunk.fd if chunk.fd is not None else open_chunk_file(chunk.path)
        try:
            got = os.preadv(fd, buffers, offset)
        except OSError as exc:  # ESTALE/EIO on NFS, a file deleted mid-read
            raise ChunkFileError(f"read failed: {exc.strerror}") from exc
        finally:
            if chunk.fd is None:
                os.close(fd)
        if got != expected:
            raise ChunkFileError(f"short read: {got} of {expected} bytes of layer {layer}")
        for buffer in buffers:
            chunk.hasher.update(buffer)


class LayerwiseLoad:
    """One step's loads in progress: wait for a layer, or for all of them."""

    def __init__(self, reader: LayerwiseReader, jobs: Sequence[LayerLoadJob],
                 destination: _IntoPages | _ThroughStaging):
        self.reader = reader
        self.jobs = list(jobs)
        self.destination = destination
        self.errors: list[ChunkFileError | None] = [None] * len(self.jobs)
        """Per job, once :meth:`finish` returned: None, or why the chunk is a miss."""
        self.started = time.perf_counter()
        self.read_seconds = 0.0
        """From :meth:`LayerwiseReader.start` to the last byte read (set by :meth:`finish`)."""
        self.waited_seconds = 0.0
        """How long :meth:`wait_layer` and :meth:`finish` blocked their caller in all."""
        threads = min(reader.threads, len(self.jobs)) or 1
        self._layers_read = [0] * threads  # per thread: layers read for all its chunks
        self._ended = [0.0] * threads
        self._read = threading.Condition()
        self._committed = 0  # layers handed to the destination (engine's thread only)
        self._futures: list[Future[None]] = [
            reader.pool.submit(self._run, t, list(range(t, len(self.jobs), threads)))
            for t in range(threads)]

    def wait_layer(self, layer: int) -> None:
        """Return once layer ``layer`` of every chunk is in the cache (or its chunk failed).

        On CUDA "in the cache" means queued on the current stream before
        anything the caller queues next.
        """
        start = time.perf_counter()
        while self._committed <= layer:  # in order: the staging ring relies on it
            with self._read:
                self._read.wait_for(lambda: min(self._layers_read) > self._committed)
            self.destination.commit(self._committed)
            self._committed += 1
        self.waited_seconds += time.perf_counter() - start

    def finish(self) -> list[ChunkFileError | None]:
        """Wait for every layer, read and checksum; returns :attr:`errors`."""
        self.wait_layer(self.reader.num_layers - 1)
        start = time.perf_counter()
        for future in self._futures:
            future.result()  # _run catches everything: this only waits
        self.waited_seconds += time.perf_counter() - start
        self.read_seconds = max(self._ended) - self.started
        return self.errors

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
            self._layer_read(thread, self.reader.num_layers)

    def _read_chunks(self, thread: int, indices: list[int]) -> None:
        reader = self.reader
        chunks: list[_OpenChunk] = []
        try:
            for i in indices:
                path = None
                try:
                    path = reader.store.path_for_read(self.jobs[i].key)
                    chunk = reader.open_chunk(i, path, self.jobs[i])
                except ChunkFileError as exc:
                    self._failed(i, path, exc)
                    continue
                if len(chunks) >= MAX_OPEN_PER_THREAD and chunk.fd is not None:
                    os.close(chunk.fd)
                    chunk.fd = None
                chunks.append(chunk)
            # Pages of a chunk that are not loaded (before first_block, after the
            # last block id) are read here, only to be hashed.
            page = reader.page_bytes
            scratch = _byte_view(torch.empty(reader.blocks_per_chunk * page, dtype=torch.uint8))
            scratch_pages = [scratch[b * page:(b + 1) * page]
                             for b in range(reader.blocks_per_chunk)]
            for layer in range(reader.num_layers):
                self.destination.before_reading(layer)
                for chunk in chunks:
                    if self.errors[chunk.index] is not None:
                        continue
                    job = self.jobs[chunk.index]
                    buffers = self.destination.buffers(layer, chunk.index, job, scratch_pages)
                    try:
                        reader.read_layer(chunk, layer, buffers)
                    except ChunkFileError as exc:
                        self._failed(chunk.index, chunk.path, exc)
                self._layer_read(thread, layer + 1)
            for chunk in chunks:
                if self.errors[chunk.index] is not None:
                    continue
                if checksum_text(chunk.hasher) != chunk.expected:
                    self._failed(chunk.index, chunk.path,
                                 ChunkFileError("checksum mismatch: the data is corrupt"))
                else:
                    reader.store.loaded(self.jobs[chunk.index].key, chunk.path)
        finally:
            for chunk in chunks:
                if chunk.fd is not None:
                    os.close(chunk.fd)

    def _failed(self, index: int, path: Path | None, exc: ChunkFileError) -> None:
        self.errors[index] = exc
        if path is not None:
            self.reader.store.load_failed(path, exc)  # quarantine what is proven bad

    def _layer_read(self, thread: int, layers: int) -> None:
        with self._read:
            self._layers_read[thread] = max(self._layers_read[thread], layers)
            self._read.notify_all()
