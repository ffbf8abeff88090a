"""Thread pools whose threads work on the caller's GPU."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch


def device_thread_pool(workers: int, name: str, device: torch.device) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads that make their CUDA calls on ``device``.

    A new thread starts on GPU 0, whatever device the engine's thread set: in
    the worker of tensor-parallel rank 3, a stream switch or an event wait in a
    pool thread would create a CUDA context on GPU 0 (hundreds of MiB taken from
    rank 0's memory budget). So each thread first sets the device of the caller.
    """
    if device.type != "cuda":
        return ThreadPoolExecutor(workers, thread_name_prefix=name)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return ThreadPoolExecutor(workers, thread_name_prefix=name,
                              initializer=torch.cuda.set_device, initargs=(index,))
