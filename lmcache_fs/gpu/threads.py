"""Thread pools whose threads work on the caller's GPU, and never hold up the process's exit."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable

import torch


class DaemonThreadPool:
    """A fixed pool of daemon threads with :class:`~concurrent.futures.ThreadPoolExecutor`'s
    ``submit`` and ``shutdown``.

    The standard pool's threads are joined when the interpreter exits: one stuck in the
    kernel (a read of a hung NFS mount, abandoned at its deadline) would keep the
    engine's process from ever exiting. Daemon threads are left to the kernel.
    """

    def __init__(self, workers: int, name: str,
                 initializer: Callable[..., object] | None = None, initargs: tuple[Any, ...] = ()):
        self._tasks: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple, dict] | None] = \
            queue.SimpleQueue()
        self._closed = False
        self._threads = [threading.Thread(target=self._serve, args=(initializer, initargs),
                                          name=f"{name}_{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if self._closed:
            raise RuntimeError("cannot submit to a pool that was shut down")
        future: Future[Any] = Future()
        self._tasks.put((future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True) -> None:
        """Let the threads finish what was submitted, then stop (``wait``: join them)."""
        self._closed = True
        for _ in self._threads:
            self._tasks.put(None)
        if wait:
            for thread in self._threads:
                thread.join()

    def _serve(self, initializer: Callable[..., object] | None, initargs: tuple[Any, ...]) -> None:
        if initializer is not None:
            initializer(*initargs)
        while (task := self._tasks.get()) is not None:
            future, fn, args, kwargs = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to the future's owner
                future.set_exception(exc)


def device_thread_pool(workers: int, name: str, device: torch.device) -> DaemonThreadPool:
    """A pool of ``workers`` threads that make their CUDA calls on ``device``.

    A new thread starts on GPU 0, whatever device the engine's thread set: in
    the worker of tensor-parallel rank 3, a stream switch or an event wait in a
    pool thread would create a CUDA context on GPU 0 (hundreds of MiB taken from
    rank 0's memory budget). So each thread first sets the device of the caller.
    """
    if device.type != "cuda":
        return DaemonThreadPool(workers, name)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return DaemonThreadPool(workers, name, initializer=torch.cuda.set_device, initargs=(index,))
