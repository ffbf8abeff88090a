"""Read and write the chunk files of one namespace: codec + layout + publish.

Example:
    >>> import torch, tempfile
    >>> from lmcache_fs.layout import ChunkLayout, Namespace
    >>> store = ChunkStore(ChunkLayout(tempfile.mkdtemp(), Namespace({"model": "m"})))
    >>> t = torch.ones(2, 4)
    >>> store.save("ab" * 8, t, {"chunk_index": "0"})
    True
    >>> out = torch.empty(2, 4)
    >>> _ = store.load("ab" * 8, out)
"""

from __future__ import annotations

from typing import Mapping

import torch

from lmcache_fs.codec import ChunkFileError, ChunkHeader, read_chunk_file, write_chunk_to_fd
from lmcache_fs.layout import BadKeyError, ChunkLayout
from lmcache_fs.publish import publish


class ChunkStore:
    """Chunk files of one namespace: publish atomically, load with full verification."""

    def __init__(self, layout: ChunkLayout, file_mode: int = 0o644):
        self.layout = layout
        self.file_mode = file_mode

    def identity(self, key: str) -> dict[str, str]:
        """Metadata every chunk file of ``key`` must carry to be loaded here."""
        return {"namespace": self.layout.namespace.name, "key": key}

    def save(self, key: str, data: torch.Tensor, metadata: Mapping[str, str]) -> bool:
        """Publish ``data`` as chunk ``key``; False if it already existed.

        Raises:
            OSError: the write failed (disk full, permissions...); nothing is left behind.
        """
        meta = {**metadata, **self.identity(key)}
        return publish(self.layout.chunk_path(key),
                       lambda fd: write_chunk_to_fd(fd, data, meta), self.file_mode)

    def load(self, key: str, out: torch.Tensor) -> ChunkHeader:
        """Fill ``out`` with chunk ``key``.

        Raises:
            ChunkFileError: missing, truncated, corrupt, foreign, or of another shape.
        """
        try:
            path = self.layout.chunk_path(key)
        except BadKeyError as exc:
            raise ChunkFileError(str(exc)) from exc
        return read_chunk_file(path, out, self.identity(key))
