"""Hand chunks gathered on the GPU to the background writer without blocking the engine.

The engine's stream only runs the gather kernel. The device checksum (one
launch, :mod:`lmcache_fs.gpu.device_checksum`) and the device-to-host copy into
pinned memory run on a side stream that waits for the gather on the GPU, not
on the host; a small thread waits for each copy's event and then submits the
host tensor, with the device checksum in its metadata, to
:class:`~lmcache_fs.storage.writer.BackgroundWriter`, which publishes the file. So a save costs the engine one kernel launch and a few microseconds
of Python, never a synchronization.

Memory: pinned buffers come from torch's caching host allocator and return to
it when the writer drops them, so at most ``max_pending`` (here) plus the
writer's queue length chunks are pinned at once. When ``max_pending`` copies
are still in flight a save is skipped and counted, like a full writer queue:
a future miss, never a stall.
"""

from __future__ import annotations

import logging
import threading
from typing import Mapping

import torch

from lmcache_fs.gpu import device_checksum
from lmcache_fs.gpu.threads import device_thread_pool
from lmcache_fs.storage.writer import BackgroundWriter

logger = logging.getLogger(__name__)


class DeviceChunkSaver:
    """Device chunk -> pinned host (side stream) -> background writer."""

    def __init__(self, writer: BackgroundWriter, device: torch.device | str, max_pending: int = 8,
                 chunk_bytes: int = 0):
        """``chunk_bytes`` > 0 pins ``max_pending`` buffers of that size now, at start-up.

        They are freed at once into torch's caching host allocator, which hands
        them out again to later saves: pinning memory (``cudaHostAlloc``) costs
        milliseconds, too much for the engine's thread in the middle of a step.
        """
        if chunk_bytes > 0:
            pinned = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=True)
                      for _ in range(max_pending)]
            pinned.clear()  # into the allocator's cache, still pinned
        self.writer = writer
        self.device = torch.device(device)
        self.skipped = 0
        """Saves dropped because ``max_pending`` copies were still in flight."""
        self._stream = torch.cuda.Stream(self.device)
        self._slots = threading.BoundedSemaphore(max_pending)
        # One thread, so chunks reach the writer in the order they were saved.
        self._handoff = device_thread_pool(1, "lmcache-fs-d2h", self.device)

    def submit(self, key: str, chunk: torch.Tensor, metadata: Mapping[str, str]) -> bool:
        """Queue a copy of ``chunk`` (on this device) to be written as chunk ``key``.

        Called on the engine's thread right after the gather was queued on the
        current stream; ``chunk`` may be freed by the caller at once (the copy
        keeps its memory alive in stream order). Returns False, counted in
        :attr:`skipped`, when too many copies are in flight.
        """
        if not self._slots.acquire(blocking=False):
            self.skipped += 1
            return False
        host = torch.empty(chunk.shape, dtype=chunk.dtype, pin_memory=True)
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        host_sums = None
        if device_checksum.available_for(chunk):
            host_sums = torch.empty(2, dtype=torch.int64, pin_memory=True)
            device_checksum.start_word_sums(chunk, host_out=host_sums, stream=self._stream)
        with torch.cuda.stream(self._stream):
            host.copy_(chunk, non_blocking=True)
            chunk.record_stream(self._stream)  # the allocator must not reuse it before the copy ends
            done = torch.cuda.Event(blocking=True)  # waited for by the hand-off thread: sleep
            done.record(self._stream)
        self._handoff.submit(self._hand_over, key, host, host_sums, metadata, done)
        return True

    def flush(self) -> None:
        """Block until every submitted chunk has reached the writer's queue (tests, shutdown)."""
        self._handoff.submit(lambda: None).result()

    def close(self) -> None:
        """Hand over what is in flight, then stop the thread (the writer is closed by its owner)."""
        self._handoff.shutdown(wait=True)

    def _hand_over(self, key: str, host: torch.Tensor, host_sums: torch.Tensor | None,
                   metadata: Mapping[str, str], done: torch.cuda.Event) -> None:
        try:
            done.synchronize()
            if host_sums is not None:
                metadata = {**metadata, device_checksum.FIELD: device_checksum.text_of(host_sums)}
            self.writer.submit(key, host, metadata)
        except Exception as exc:  # noqa: BLE001 - a lost save is a future miss, not a crash
            logger.warning("save of chunk %s dropped: copy to host failed (%s)", key[:16], exc)
        finally:
            self._slots.release()
