"""Read whole chunk files into a ring of staging slots on one device, never loading unverified bytes.

Each slot holds one chunk; as many chunks are read at once as there are
slots, through the read path :mod:`lmcache_fs.transfer.read_paths` chose
(kvikio into GPU slots, see :mod:`lmcache_fs.transfer.kvikio_reads`, or POSIX
into pinned host slots), and the caller takes them in order.

Verification. The codec stores an xxh3-64 checksum of the data, which folds
its input in sequence and cannot be computed in parallel on a GPU. Writers
that hold the chunk on a GPU also store a device checksum
(:mod:`lmcache_fs.gpu.device_checksum`: exact sums of word mixes, one kernel
launch). Bytes that land on the GPU (``kvikio-*``) are verified there with it
when the file has one: a launch on the slot's side stream and 16 bytes back,
so the host never touches the data. Otherwise (files from CPU writers, no
kernels) they are copied back into a pinned host slot on the side stream and
hashed with xxh3 there, which bounds page-cache reads by host hashing (see
``bench/results/gpu_path.md``). Bytes that land on the host (``posix``) are
checked the same way after their copy to the GPU, or hashed on the host
before it. A store with an integrity key checks every chunk on the host
(xxh3 and the MAC; a GPU cannot compute the MAC). ``verify=False`` skips the
data check for the kvikio paths only, trusting the filesystem for the data;
header, size, namespace and key are still checked.

Every read is one :meth:`ChunkStore.reading` block (open, header check, and
finish: a hit marks the chunk used, a proven-bad file is quarantined); a
kvikio read's block spans its start and its wait.

Failure of any one chunk (missing, vanished mid-read, truncated, foreign,
corrupt, an I/O error) is reported as a :class:`ChunkFileError` for that chunk,
which callers treat as a miss; it never stops the other reads.

A call's reads may have a deadline (the directory's filesystem can hang). Past
it, every chunk not yet returned is a miss and the reader is abandoned
(:attr:`ChunkReader.abandoned`): reads still stuck in the kernel finish, some
day, into its slots, which nothing reads again (the caller builds a new
reader). With a deadline, every read runs on a pool thread, kvikio's too (its
open and header read otherwise run on the caller's thread).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Iterator, Sequence

import torch

from lmcache_fs.gpu import device_checksum
from lmcache_fs.gpu.threads import device_thread_pool
from lmcache_fs.storage.codec import ChunkFileError, byte_view
from lmcache_fs.storage.store import ChunkStore, OpenChunk
from lmcache_fs.transfer.no_answer import past_deadline
from lmcache_fs.transfer.kvikio_reads import DeviceBytes, KvikioRead, start_read_kvikio
from lmcache_fs.transfer.read_paths import ReadBackend, ReadPath
from lmcache_fs.transfer.run_when_asked import RunWhenAsked

logger = logging.getLogger(__name__)

MAX_SLOTS = 16  # more reads in flight than this gains nothing on one disk or NIC


class ChunkReader:
    """Reads whole chunk files into a ring of staging slots on one device.

    Built once per worker after the KV caches are known. ``staging_bytes``
    decides how many chunks are read at once (slots = staging_bytes //
    chunk bytes, at least 1, at most :data:`MAX_SLOTS`); the same number of
    pinned host slots back the POSIX path and the host checksum of kvikio
    reads from files without a device checksum.

    Threads: kvikio reads are started from the caller's thread (a header read
    and a non-blocking ``pread``; kvikio's C++ pool moves the bytes). A read
    checked on the GPU (or not at all) is finished on the caller's thread too,
    when its turn comes: the check is one launch and 16 bytes back, and no
    Python thread means no hand-off of the GIL per chunk (which cost more than
    the read itself for 2 MiB chunks on a 16-core host). A read that must be
    hashed on the host is waited for and hashed by a pool thread per slot.
    POSIX reads run whole in the pool threads (``preadv`` and the hash release
    the GIL).
    """

    def __init__(self, store: ChunkStore, chunk_shape: Sequence[int], dtype: torch.dtype,
                 device: torch.device | str, backend: ReadBackend, *,
                 staging_bytes: int, verify: bool):
        self.store = store
        self.device = torch.device(device)
        self.backend = backend
        self.verify = verify or backend.path is ReadPath.POSIX or store.mac_key is not None
        nbytes = dtype.itemsize
        for d in chunk_shape:
            nbytes *= d
        self.slots = max(1, min(MAX_SLOTS, staging_bytes // max(1, nbytes)))
        on_gpu = self.device.type == "cuda"
        host = (torch.empty((self.slots, nbytes), dtype=torch.uint8, pin_memory=on_gpu)
                if self.verify or not on_gpu else None)
        self._device_buffer = (torch.empty((self.slots, nbytes), dtype=torch.uint8,
                                           device=self.device) if on_gpu else host)
        self._device = [b.view(dtype).view(tuple(chunk_shape)) for b in self._device_buffer]
        self._host = ([b.view(dtype).view(tuple(chunk_shape)) for b in host]
                      if host is not None else [])
        self._targets = ([DeviceBytes(b) for b in self._device_buffer] if on_gpu
                         else [None] * self.slots)
        # Reads are checked on a side stream per slot (the device checksum; for
        # kvikio reads of files without one, the copy back to the host for
        # xxh3), so that the check never waits for (or delays) the engine.
        self._streams = ([torch.cuda.Stream(self.device) for _ in range(self.slots)]
                         if on_gpu else [])
        self._checkers = ([device_checksum.SlotChecker(stream) for stream in self._streams]
                          if self.verify and self._streams
                          and device_checksum.available_for(self._device[0]) else [])
        # POSIX on CUDA: whether the slot's chunk was already copied to the
        # device (to be checked there) by the read thread.
        self._uploaded = [False] * self.slots
        # An event per slot, recorded after the consumer queued its work on the
        # slot; a read into the slot waits for it (None: the slot is free).
        self._in_use: list[torch.cuda.Event | None] = [None] * self.slots
        if backend.kvikio is not None and on_gpu:
            backend.kvikio.memory_register(self._device_buffer)
        self._pool = device_thread_pool(self.slots, "lmcache-fs-read", self.device)
        self.abandoned = False
        """True once a read passed its deadline: the reader must not be used again."""

    def _reading(self, key: str) -> contextlib.AbstractContextManager[OpenChunk]:
        return self.store.reading(key, self._device[0].dtype, self._device[0].shape)

    def _read_posix(self, key: str, slot: int, in_use: torch.cuda.Event | None) -> None:
        if in_use is not None:
            in_use.synchronize()  # the consumer's work on this slot has finished
        self._uploaded[slot] = False
        with self._reading(key) as chunk:
            chunk.read_into(self._host[slot])
            self._uploaded[slot] = self._verify(slot, chunk, on_host=True)

    def _verify(self, slot: int, chunk: OpenChunk, *, on_host: bool) -> bool:
        """Check the data in ``slot`` (``on_host``: read into the host slot, else the device slot).

        On the GPU with the file's device checksum where the kernels can (a
        host slot is uploaded for it), else on the host with the store's data
        check (a device slot is copied back on the slot's side stream first).

        Returns:
            Whether a host slot's data is now on the device too.

        Raises:
            ChunkFileError: the data is corrupt (or fails the MAC).
        """
        uploaded = False
        if self._checks_on_device(chunk):
            expected = chunk.header.metadata[device_checksum.FIELD]
            got = self._checkers[slot].checksum_of(
                self._device[slot], upload_from=self._host[slot] if on_host else None)
            uploaded = on_host
            if got is not None:
                if got != expected:
                    raise ChunkFileError("device checksum mismatch: the data is corrupt")
                return uploaded
        if not on_host and self._streams:  # (a CPU device's slots are the host slots)
            with torch.cuda.stream(self._streams[slot]):
                self._host[slot].copy_(self._device[slot], non_blocking=True)
            self._streams[slot].synchronize()
        check = chunk.data_check()
        check.update(byte_view(self._host[slot]))
        check.verify()
        return uploaded

    def _checks_on_device(self, chunk: OpenChunk) -> bool:
        """Whether ``chunk``'s data is checked on the GPU: the kernels are here, the file has a
        device checksum, and no MAC (which only the host can compute) is due."""
        return (bool(self._checkers) and device_checksum.FIELD in chunk.header.metadata
                and not chunk.keyed)

    def _start(self, key: str, slot: int, bounded: bool = False) -> Future[Any] | RunWhenAsked:
        """Begin reading ``key`` into ``slot``; the future completes once it is there, verified.

        ``bounded``: the read has a deadline, so none of it may run on the caller's thread
        (a kvikio read's open and header read, done there otherwise, run on a pool thread).
        """
        in_use = self._in_use[slot]
        if self.backend.kvikio is None:
            return self._pool.submit(self._read_posix, key, slot, in_use)
        if bounded:
            return self._pool.submit(self._read_kvikio, key, slot, in_use)
        if in_use is not None:
            in_use.synchronize()  # kvikio writes into the slot as soon as the read starts
        try:
            with contextlib.ExitStack() as opened:
                chunk = opened.enter_context(self._reading(key))
                read = start_read_kvikio(self.backend.kvikio, chunk, self._device[slot],
                                         self._targets[slot])
                reading = opened.pop_all()  # the chunk's read ends in _finish_kvikio
        except ChunkFileError as exc:
            failed: Future[Any] = Future()
            failed.set_exception(exc)
            return failed
        if self.verify and not self._checks_on_device(chunk):
            return self._pool.submit(self._finish_kvikio, read, slot, reading)
        return RunWhenAsked(functools.partial(self._finish_kvikio, read, slot, reading))

    def _read_kvikio(self, key: str, slot: int, in_use: torch.cuda.Event | None) -> None:
        """A whole kvikio read, start to verified end, on one pool thread."""
        if in_use is not None:
            in_use.synchronize()
        with contextlib.ExitStack() as opened:
            chunk = opened.enter_context(self._reading(key))
            read = start_read_kvikio(self.backend.kvikio, chunk, self._device[slot],
                                     self._targets[slot])
            self._finish_kvikio(read, slot, opened.pop_all())

    def _finish_kvikio(self, read: KvikioRead, slot: int, reading: contextlib.ExitStack) -> None:
        """Wait for and verify a kvikio read, then end its chunk's read (``reading``)."""
        with reading:
            read.wait()
            if self.verify:
                # kvikio's get() returned after its copies finished: the kernel sees the data.
                self._verify(slot, read.chunk, on_host=False)

    def _to_device(self, slot: int) -> torch.Tensor:
        """The slot's chunk on the device (POSIX on CUDA: queue the H2D copy now, if not done)."""
        device = self._device[slot]
        if self.backend.kvikio is None and self._device_buffer.is_cuda and not self._uploaded[slot]:
            device.copy_(self._host[slot], non_blocking=True)
        return device

    def read(self, keys: Sequence[str], deadline_s: float | None = None
             ) -> Iterator[tuple[int, torch.Tensor | ChunkFileError]]:
        """Yield ``(i, chunk)`` for ``keys[i]`` in order, reading ahead as far as the slots allow.

        ``deadline_s``: seconds from now the reads may take; past it the rest are misses
        and the reader is :attr:`abandoned`.

        ``chunk`` is a ``[*chunk_shape]`` tensor on the device, or the
        :class:`ChunkFileError` that made ``keys[i]`` a miss. On CUDA it is
        ready in the current stream's order (the stream current when the
        iteration starts; keep it for the whole iteration); it stays valid
        until the generator is resumed, and work the caller queues on that
        stream before resuming (a scatter into the paged cache) finishes
        before the slot is reused. Stopping early is safe: reads already
        started are waited for.
        """
        assert not self.abandoned, "an abandoned reader's slots may still be written into"
        pending: deque[Future[Any] | RunWhenAsked] = deque()
        deadline = None if deadline_s is None else time.monotonic() + deadline_s
        # Looked up once: torch's lookup costs tens of microseconds per chunk.
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        try:
            bounded = deadline is not None
            for i in range(min(self.slots, len(keys))):
                pending.append(self._start(keys[i], i, bounded))
            for i in range(len(keys)):
                slot = i % self.slots
                try:
                    _wait(pending.popleft(), deadline)
                except FutureTimeout:
                    self.abandoned = True
                    for late in range(i, len(keys)):
                        yield late, past_deadline(deadline_s or 0.0)
                    return
                except ChunkFileError as exc:
                    yield i, exc
                except Exception as exc:  # noqa: BLE001 - a bug here must cost a miss, not the engine
                    logger.exception("chunk read failed unexpectedly")
                    yield i, ChunkFileError(f"internal error: {exc!r}")
                else:
                    yield i, self._to_device(slot)
                self._in_use[slot] = self._mark_in_use(stream)
                if i + self.slots < len(keys):
                    pending.append(self._start(keys[i + self.slots], slot, bounded))
        finally:
            for future in () if self.abandoned else pending:
                # A kvikio read is under way before its future runs (the future
                # only finishes it: waits, closes, verifies), so it is never cancelled.
                if self.backend.kvikio is not None or not future.cancel():
                    future.exception()  # wait: no read may outlive the call
            if keys:
                # The caller may stop at any yield: whatever it queued so far must
                # finish before the next call reuses any slot.
                self._in_use = [self._mark_in_use(stream)] * self.slots

    @staticmethod
    def _mark_in_use(stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
        if stream is None:
            return None  # CPU work is synchronous: done when the caller resumes
        event = torch.cuda.Event(blocking=True)  # waited for by read threads: sleep, not spin
        event.record(stream)
        return event

    def close(self) -> None:
        """Stop the read threads and release the staging slots' cuFile registration (an
        abandoned reader's threads may never return: they are left to the kernel)."""
        if self.abandoned:
            self._pool.shutdown(wait=False)
            return
        self._pool.shutdown(wait=True)
        if self.backend.kvikio is not None and self.device.type == "cuda":
            self.backend.kvikio.memory_deregister(self._device_buffer)


def _wait(pending: Future[Any] | RunWhenAsked, deadline: float | None) -> None:
    """The result of one read, within ``deadline`` (a monotonic time; None: no deadline).

    Raises:
        concurrent.futures.TimeoutError: a pool thread's read passed the deadline.
        ChunkFileError: what the read raised.
    """
    if isinstance(pending, RunWhenAsked):  # finishes on this thread: kvikio's wait is its own
        pending.result()
        return
    pending.result(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))

