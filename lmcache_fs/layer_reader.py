"""Read a step's chunk files layer by layer, straight into the paged KV cache.

A chunk file's data is layer-major (``[layers, blocks, *page]``, see
:mod:`lmcache_fs.block_copy`), so layer ``l`` of a chunk is one contiguous run
of the file. :meth:`LayerwiseReader.start` reads layer 0 of every chunk of the
step, then layer 1, and so on, in background threads, while the engine's
forward pass runs; :meth:`LayerwiseLoad.wait_layer` blocks the forward pass
only until the layer it is about to compute has arrived. Each chunk and layer
is one ``preadv`` whose buffers are the cache's own pages (no staging buffer,
no copy), and the bytes are hashed as they land: xxh3 streams, so each file's
checksum is known once its last layer is read.

So a layer may be computed on before its chunk's checksum is known. That is
safe because of what vLLM does with a failed load (checked in vLLM 0.32's
scheduler, ``_update_requests_with_invalid_blocks``): the blocks of a chunk
that fails are reported at the end of the step, and vLLM then discards that
step's output for every request using them and recomputes from the first
failed block (``kv_load_failure_policy=recompute``, which the connector sets).
A chunk found bad before the step is handled the same way.

For CPU caches whose per-layer tensors are contiguous (vLLM's CPU layout);
other caches read whole chunks (:mod:`lmcache_fs.gpu_io`).
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

from lmcache_fs.codec import (ChunkFileError, check_header, checksum_text, new_checksum,
                              open_chunk_file, read_header_fd)
from lmcache_fs.store import ChunkStore

logger = logging.getLogger(__name__)

# Files one thread keeps open at once. A step loading more chunks than this
# reads them in waves; only the last wave overlaps the forward pass.
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
    fd: int
    data_offset: int
    expected: str
    hasher: object = field(default_factory=new_checksum)


def reads_layerwise(layers: Sequence[torch.Tensor]) -> bool:
    """Whether :class:`LayerwiseReader` can read into these caches (CPU, contiguous)."""
    return bool(layers) and all(kv.device.type == "cpu" and kv.is_contiguous() for kv in layers)


class LayerwiseReader:
    """Reads chunk files layer by layer into contiguous per-layer CPU caches.

    ``threads`` background threads share a step's chunks (each reads its
    chunks' layers in order, as the streaming checksum needs).
    """

    def __init__(self, store: ChunkStore, layers: Sequence[torch.Tensor], blocks_per_chunk: int,
                 threads: int):
        if not reads_layerwise(layers):
            raise ValueError("LayerwiseReader needs contiguous CPU caches")
        self.store = store
        self.blocks_per_chunk = blocks_per_chunk
        self.chunk_shape = (len(layers), blocks_per_chunk, *layers[0].shape[1:])
        self.dtype = layers[0].dtype
        self.page_bytes = layers[0].element_size() * math.prod(layers[0].shape[1:])
        # One flat byte view per layer: page b is [b * page_bytes, (b + 1) * page_bytes).
        self._layer_bytes = [memoryview(kv.view(-1).view(torch.uint8).numpy()) for kv in layers]
        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="lmcache-fs-layers")

    @property
    def num_layers(self) -> int:
        return len(self._layer_bytes)

    def start(self, jobs: Sequence[LayerLoadJob]) -> "LayerwiseLoad":
        """Begin reading ``jobs``; returns at once."""
        return LayerwiseLoad(self, jobs)

    def close(self) -> None:
        """Stop the threads (a load in progress finishes first)."""
        self._pool.shutdown(wait=True)

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

    def read_layer(self, chunk: _OpenChunk, job: LayerLoadJob, layer: int,
                   scratch: memoryview) -> None:
        """Read layer ``layer`` of ``chunk`` into the cache's pages and hash it.

        Blocks of the chunk that are not loaded (before ``first_block`` or after
        the last block id) are read into ``scratch`` only to be hashed.

        Raises:
            ChunkFileError: the read failed or fell short.
        """
        page = self.page_bytes
        pages = self._layer_bytes[layer]
        buffers = [scratch[b * page:(b + 1) * page] for b in range(self.blocks_per_chunk)]
        for pos, block in enumerate(job.block_ids):
            buffers[job.first_block + pos] = pages[block * page:(block + 1) * page]
        offset = chunk.data_offset + layer * self.blocks_per_chunk * page
        try:
            got = os.preadv(chunk.fd, buffers, offset)
        except OSError as exc:  # ESTALE/EIO on NFS, a file deleted mid-read
            raise ChunkFileError(f"read failed: {exc.strerror}") from exc
        if got != len(buffers) * page:
            raise ChunkFileError(f"short read: {got} of {len(buffers) * page} bytes of layer {layer}")
        for buffer in buffers:
            chunk.hasher.update(buffer)  # type: ignore[attr-defined]


class LayerwiseLoad:
    """One step's loads in progress: wait for a layer, or for all of them."""

    def __init__(self, reader: LayerwiseReader, jobs: Sequence[LayerLoadJob]):
        self.reader = reader
        self.jobs = list(jobs)
        self.errors: list[ChunkFileError | None] = [None] * len(self.jobs)
        """Per job, once :meth:`finish` returned: None, or why the chunk is a miss."""
        self.started = time.perf_counter()
        self.read_seconds = 0.0
        """From :meth:`LayerwiseReader.start` to the last byte read (set by :meth:`finish`)."""
        self.waited_seconds = 0.0
        """How long :meth:`wait_layer` blocked its callers (the forward pass) in all."""
        threads = min(reader.threads, len(self.jobs)) or 1
        self._layers_done = [0] * threads  # per thread: layers read for all its chunks
        self._ended = [0.0] * threads
        self._done = threading.Condition()
        self._futures: list[Future[None]] = [
            reader._pool.submit(self._run, t, list(range(t, len(self.jobs), threads)))
            for t in range(threads)]

    def wait_layer(self, layer: int) -> None:
        """Block until layer ``layer`` of every chunk is in the cache (or its chunk failed)."""
        start = time.perf_counter()
        with self._done:
            self._done.wait_for(lambda: min(self._layers_done) > layer)
        self.waited_seconds += time.perf_counter() - start

    def finish(self) -> list[ChunkFileError | None]:
        """Wait for every read and checksum; returns :attr:`errors`."""
        start = time.perf_counter()
        for future in self._futures:
            future.result()  # _run catches everything: this only waits
        self.waited_seconds += time.perf_counter() - start
        self.read_seconds = max(self._ended) - self.started
        return self.errors

    def _run(self, thread: int, indices: list[int]) -> None:
        try:
            for wave in range(0, len(indices), MAX_OPEN_PER_THREAD):
                last_wave = wave + MAX_OPEN_PER_THREAD >= len(indices)
                self._read_wave(thread, indices[wave:wave + MAX_OPEN_PER_THREAD], last_wave)
        except Exception as exc:  # noqa: BLE001 - a bug here must cost a miss, not the engine
            logger.exception("layer-wise read failed")
            for i in indices:
                if self.errors[i] is None:
                    self.errors[i] = ChunkFileError(f"internal error: {exc!r}")
        finally:
            self._ended[thread] = time.perf_counter()
            self._layers_done_up_to(thread, self.reader.num_layers)

    def _read_wave(self, thread: int, indices: list[int], last_wave: bool) -> None:
        reader = self.reader
        chunks: list[_OpenChunk] = []
        try:
            for i in indices:
                path = None
                try:
                    path = reader.store.path_for_read(self.jobs[i].key)
                    chunks.append(reader.open_chunk(i, path, self.jobs[i]))
                except ChunkFileError as exc:
                    self._failed(i, path, exc)
            scratch = memoryview(bytearray(reader.blocks_per_chunk * reader.page_bytes))
            for layer in range(reader.num_layers):
                for chunk in chunks:
                    if self.errors[chunk.index] is not None:
                        continue
                    try:
                        reader.read_layer(chunk, self.jobs[chunk.index], layer, scratch)
                    except ChunkFileError as exc:
                        self._failed(chunk.index, chunk.path, exc)
                if last_wave:
                    self._layers_done_up_to(thread, layer + 1)
            for chunk in chunks:
                if self.errors[chunk.index] is not None:
                    continue
                if checksum_text(chunk.hasher) != chunk.expected:  # type: ignore[arg-type]
                    self._failed(chunk.index, chunk.path,
                                 ChunkFileError("checksum mismatch: the data is corrupt"))
                else:
                    reader.store.loaded(self.jobs[chunk.index].key, chunk.path)
        finally:
            for chunk in chunks:
                os.close(chunk.fd)

    def _failed(self, index: int, path: Path | None, exc: ChunkFileError) -> None:
        self.errors[index] = exc
        if path is not None:
            self.reader.store.load_failed(path, exc)  # quarantine what is proven bad

    def _layers_done_up_to(self, thread: int, layers: int) -> None:
        with self._done:
            self._layers_done[thread] = max(self._layers_done[thread], layers)
            self._done.notify_all()
