"""Read chunk files into GPU memory, several at a time, never loading unverified bytes.

Three read paths, chosen once per process by :func:`choose_read_backend`:

``kvikio-gds``
    kvikio with GPUDirect Storage: the file's data (4096-aligned, see
    :mod:`lmcache_fs.storage.codec`) is DMA'd straight into a cuFile-registered GPU
    staging slot.
``kvikio-posix``
    kvikio's compatibility mode: its own thread pool reads through pinned
    bounce buffers into the same GPU slot (what kvikio does where GDS is not
    supported: containers without ``/run/udev``, overlayfs, NFS over TCP).
``posix``
    one ``preadv`` into a pinned host slot (a plain host slot on a CPU
    device), then on CUDA a host-to-device copy (checked on the GPU where the file has a device
    checksum, else hashed on the host first). Always available; the fallback
    whenever kvikio or CUDA is missing.

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
header, size, namespace and key are still checked. The default verifies.

Every read starts from :meth:`ChunkStore.open_chunk` and ends with
:meth:`ChunkStore.finish` (kvikio reopens the open file through
``/proc/self/fd``, never the chunk's path).

Failure of any one chunk (missing, vanished mid-read, truncated, foreign,
corrupt, an I/O error) is reported as a :class:`ChunkFileError` for that chunk,
which callers treat as a miss; it never stops the other reads.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import os
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Iterator, Sequence

import torch

from lmcache_fs.gpu import device_checksum
from lmcache_fs.gpu.threads import device_thread_pool
from lmcache_fs.storage.codec import ChunkFileError, byte_view
from lmcache_fs.storage.store import ChunkStore, OpenChunk

logger = logging.getLogger(__name__)

USE_GDS_CHOICES = ("auto", "true", "false")
KVIKIO_THREADS_ENV = "KVIKIO_NTHREADS"  # kvikio's own variable: when set, we leave it alone
MAX_SLOTS = 16  # more reads in flight than this gains nothing on one disk or NIC


class ReadPath(str, enum.Enum):
    """How chunk data reaches GPU memory."""

    GDS = "kvikio-gds"
    KVIKIO_POSIX = "kvikio-posix"
    POSIX = "posix"


@dataclass(frozen=True)
class ReadBackend:
    """A read path and, for the kvikio paths, the imported kvikio module."""

    path: ReadPath
    kvikio: ModuleType | None = None


class GdsUnavailableError(RuntimeError):
    """``use_gds="true"`` was asked for, but GPUDirect Storage cannot be used here."""


def kvikio_threads() -> int:
    """Threads for kvikio's pool: enough to keep a fast disk busy (its default is 1)."""
    return min(16, max(4, os.cpu_count() or 4))


def probe_kvikio() -> tuple[ModuleType, bool]:
    """Import kvikio, size its thread pool, and say whether GDS is active.

    Raises:
        Exception: with the reason whenever kvikio cannot read into this GPU
            (no CUDA device, kvikio or libkvikio/libcufile not importable).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device")  # every kvikio read needs libcuda
    import kvikio
    import kvikio.defaults

    if KVIKIO_THREADS_ENV not in os.environ:
        kvikio.defaults.set("num_threads", kvikio_threads())
    return kvikio, not kvikio.defaults.is_compat_mode_preferred()


def kvikio_backend() -> ReadBackend:
    """kvikio on its best path here: GDS where cuFile works, else its POSIX mode.

    Raises:
        Exception: as :func:`probe_kvikio`, whenever kvikio cannot read into this GPU.
    """
    kvikio, gds = probe_kvikio()
    return ReadBackend(ReadPath.GDS if gds else ReadPath.KVIKIO_POSIX, kvikio)


@functools.lru_cache(maxsize=None)
def _probe_once() -> ReadBackend | str:
    try:
        return kvikio_backend()
    except Exception as exc:  # noqa: BLE001 - any failure means "no kvikio"
        return f"{type(exc).__name__}: {exc}"


@functools.lru_cache(maxsize=None)
def _log_once(level: int, message: str) -> None:
    logger.log(level, message)


def choose_read_backend(use_gds: str, device: torch.device) -> ReadBackend:
    """Pick the read path for ``device`` from the ``use_gds`` setting (probed once per process).

    ``"auto"``: GDS where kvikio reports it, kvikio's POSIX mode where kvikio
    loads without GDS, else the POSIX reader with one warning that names the
    reason. ``"false"``: always the POSIX reader. ``"true"``: GDS or an error.
    A CPU device always reads with POSIX (there is nothing to transfer).

    Raises:
        ValueError: ``use_gds`` is not one of ``auto``, ``true``, ``false``.
        GdsUnavailableError: ``use_gds="true"`` and GDS is not usable.
    """
    if use_gds not in USE_GDS_CHOICES:
        raise ValueError(f"use_gds must be one of {USE_GDS_CHOICES}, got {use_gds!r}")
    if device.type != "cuda":
        return ReadBackend(ReadPath.POSIX)
    if use_gds == "false":
        _log_once(logging.INFO, "chunk reads: POSIX into pinned host memory + async H2D copy "
                                "(use_gds=false)")
        return ReadBackend(ReadPath.POSIX)
    probed = _probe_once()
    if isinstance(probed, str):
        if use_gds == "true":
            raise GdsUnavailableError(f"use_gds=true but kvikio is unavailable ({probed}); "
                                      "install kvikio with libcufile, or set use_gds to auto")
        _log_once(logging.WARNING, f"chunk reads: kvikio unavailable ({probed}); using POSIX "
                                   "reads into pinned host memory + async H2D copies")
        return ReadBackend(ReadPath.POSIX)
    gds = probed.path is ReadPath.GDS
    if use_gds == "true" and not gds:
        raise GdsUnavailableError("use_gds=true but kvikio found no usable cuFile driver (it "
                                  "would run in POSIX compatibility mode); set use_gds to auto")
    kvikio = probed.kvikio
    assert kvikio is not None  # a kvikio path always carries the module
    _log_once(logging.INFO, f"chunk reads: kvikio {kvikio.__version__}, "
                            f"{'GPUDirect Storage' if gds else 'POSIX compatibility mode'}, "
                            f"{kvikio.defaults.get('num_threads')} threads")
    return probed


@contextlib.contextmanager
def _as_chunk_errors() -> Iterator[None]:
    """Turn the errors of opening and reading a chunk file into misses."""
    try:
        yield
    except FileNotFoundError as exc:
        raise ChunkFileError("missing") from exc
    except (OSError, RuntimeError) as exc:  # kvikio reports I/O errors as RuntimeError
        raise ChunkFileError(f"read failed: {exc}") from exc


@dataclass
class KvikioRead:
    """A chunk whose header passed its checks and whose data kvikio is reading into a slot."""

    chunk: OpenChunk
    file: Any  # kvikio.CuFile, open until wait()
    io: Any  # kvikio.IOFuture of the data read

    def wait(self) -> None:
        """Wait for the data and close kvikio's file (the chunk stays open).

        Raises:
            ChunkFileError: the read failed or fell short.
        """
        try:
            with _as_chunk_errors():
                got = self.io.get()
        finally:
            self.file.close()
        if got != self.chunk.header.nbytes:
            raise ChunkFileError(f"short read: {got} of {self.chunk.header.nbytes} data bytes")


class DeviceBytes:
    """A contiguous CUDA tensor's bytes as kvikio takes them, described once.

    torch builds ``__cuda_array_interface__`` anew in Python on every access;
    a staging slot's description never changes, so it is built here once and
    kept with the tensor (which it keeps alive).
    """

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.__cuda_array_interface__ = {
            "shape": (tensor.numel() * tensor.element_size(),), "typestr": "|u1",
            "data": (tensor.data_ptr(), False), "strides": None, "version": 3}


def start_read_kvikio(kvikio: ModuleType, chunk: OpenChunk, out: torch.Tensor,
                      target: object | None = None) -> KvikioRead:
    """Start reading an open chunk's data into ``out`` with kvikio; returns at once.

    kvikio opens files by name, so it is given ``/proc/self/fd/N``: the very
    file the store opened (no symlink or swapped directory can intervene).
    The data is read from its 4096-aligned offset by kvikio's own threads,
    without the GIL, while the caller goes on. ``target`` is what kvikio
    reads into (default: ``out``'s bytes), e.g. a :class:`DeviceBytes` of ``out``.

    Raises:
        ChunkFileError: kvikio could not open or start reading the file.
    """
    with _as_chunk_errors():
        f = kvikio.CuFile(chunk.proc_path, "r")
    try:
        with _as_chunk_errors():
            io = f.pread(out.view(-1).view(torch.uint8) if target is None else target,
                         chunk.header.nbytes, chunk.header.data_offset)
    except BaseException:
        f.close()
        raise
    return KvikioRead(chunk, f, io)


class _RunWhenAsked:
    """A step with the interface of a finished-on-demand future: it runs on the
    consumer's thread the first time its result is asked for."""

    def __init__(self, step: Callable[[], None]):
        self._step: Callable[[], None] | None = step
        self._error: Exception | None = None

    def exception(self) -> Exception | None:
        if self._step is not None:
            step, self._step = self._step, None
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - handed to the caller like a Future's
                self._error = exc
        return self._error

    def result(self) -> None:
        error = self.exception()
        if error is not None:
            raise error

    def cancel(self) -> bool:
        return False  # like a running Future: the read is already under way


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
                 staging_bytes: int = 256 << 20, verify: bool = True):
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

    def _open(self, key: str) -> OpenChunk:
        return self.store.open_chunk(key, self._device[0].dtype, self._device[0].shape)

    def _read_posix(self, key: str, slot: int, in_use: torch.cuda.Event | None) -> None:
        if in_use is not None:
            in_use.synchronize()  # the consumer's work on this slot has finished
        self._uploaded[slot] = False
        chunk = self._open(key)
        try:
            chunk.read_into(self._host[slot])
            self._uploaded[slot] = self._verify(slot, chunk, on_host=True)
        except ChunkFileError as exc:
            self.store.finish(chunk, exc)  # quarantine what is proven bad
            raise
        self.store.finish(chunk)  # mtime: recently used, for eviction on every node

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

    def _start(self, key: str, slot: int) -> Future[Any] | _RunWhenAsked:
        """Begin reading ``key`` into ``slot``; the future completes once it is there, verified."""
        in_use = self._in_use[slot]
        if self.backend.kvikio is None:
            return self._pool.submit(self._read_posix, key, slot, in_use)
        if in_use is not None:
            in_use.synchronize()  # kvikio writes into the slot as soon as the read starts
        chunk = None
        try:
            chunk = self._open(key)
            read = start_read_kvikio(self.backend.kvikio, chunk, self._device[slot],
                                     self._targets[slot])
        except ChunkFileError as exc:
            if chunk is not None:  # opened, but kvikio could not start: keep the store's books
                self.store.finish(chunk, exc)
            failed: Future[Any] = Future()
            failed.set_exception(exc)
            return failed
        if self.verify and not self._checks_on_device(chunk):
            return self._pool.submit(self._finish_kvikio, read, slot)
        return _RunWhenAsked(functools.partial(self._finish_kvikio, read, slot))

    def _finish_kvikio(self, read: KvikioRead, slot: int) -> None:
        """Wait for and verify a kvikio read; keep the store's books like a POSIX load does."""
        try:
            read.wait()
            if self.verify:
                # kvikio's get() returned after its copies finished: the kernel sees the data.
                self._verify(slot, read.chunk, on_host=False)
        except ChunkFileError as exc:
            self.store.finish(read.chunk, exc)  # quarantine what is proven bad
            raise
        self.store.finish(read.chunk)  # mtime: recently used, for eviction on every node

    def _to_device(self, slot: int) -> torch.Tensor:
        """The slot's chunk on the device (POSIX on CUDA: queue the H2D copy now, if not done)."""
        device = self._device[slot]
        if self.backend.kvikio is None and self._device_buffer.is_cuda and not self._uploaded[slot]:
            device.copy_(self._host[slot], non_blocking=True)
        return device

    def read(self, keys: Sequence[str]) -> Iterator[tuple[int, torch.Tensor | ChunkFileError]]:
        """Yield ``(i, chunk)`` for ``keys[i]`` in order, reading ahead as far as the slots allow.

        ``chunk`` is a ``[*chunk_shape]`` tensor on the device, or the
        :class:`ChunkFileError` that made ``keys[i]`` a miss. On CUDA it is
        ready in the current stream's order (the stream current when the
        iteration starts; keep it for the whole iteration); it stays valid
        until the generator is resumed, and work the caller queues on that
        stream before resuming (a scatter into the paged cache) finishes
        before the slot is reused. Stopping early is safe: reads already
        started are waited for.
        """
        pending: deque[Future[Any] | _RunWhenAsked] = deque()
        # Looked up once: torch's lookup costs tens of microseconds per chunk.
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        try:
            for i in range(min(self.slots, len(keys))):
                pending.append(self._start(keys[i], i))
            for i in range(len(keys)):
                slot = i % self.slots
                try:
                    pending.popleft().result()
                except ChunkFileError as exc:
                    yield i, exc
                except Exception as exc:  # noqa: BLE001 - a bug here must cost a miss, not the engine
                    logger.exception("chunk read failed unexpectedly")
                    yield i, ChunkFileError(f"internal error: {exc!r}")
                else:
                    yield i, self._to_device(slot)
                self._in_use[slot] = self._mark_in_use(stream)
                if i + self.slots < len(keys):
                    pending.append(self._start(keys[i + self.slots], slot))
        finally:
            for future in pending:
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
        """Stop the read threads and release the staging slots' cuFile registration."""
        self._pool.shutdown(wait=True)
        if self.backend.kvikio is not None and self.device.type == "cuda":
            self.backend.kvikio.memory_deregister(self._device_buffer)
