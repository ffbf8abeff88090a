"""One chunk's data read by kvikio into GPU memory: started at once, waited for later.

kvikio opens files by name, so it is given ``/proc/self/fd/N`` of the chunk
the store opened: the very file whose header passed its checks (no symlink or
swapped directory can intervene). The data is read from its 4096-aligned
offset by kvikio's own threads, without the GIL, while the caller goes on.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Iterator

import torch

from lmcache_fs.storage.codec import ChunkFileError
from lmcache_fs.storage.store import OpenChunk


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

    ``target`` is what kvikio reads into (default: ``out``'s bytes), e.g. a
    :class:`DeviceBytes` of ``out``.

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
