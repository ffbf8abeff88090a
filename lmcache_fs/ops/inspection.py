"""Open chunk files by path for operators' tools, never through a symlink.

Engines open chunks by key (:meth:`lmcache_fs.storage.store.ChunkStore.open_chunk`);
tools such as ``lmcache-fs inspect``, ``verify`` and ``pin`` start from a path
(also a quarantined file's) and go through the same open
(:func:`~lmcache_fs.storage.store.open_chunk_at`); ``pin`` follows
``parent_key`` links to find the chunks a prefix is made of.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import torch

from lmcache_fs.storage.codec import ChunkFileError, ChunkHeader
from lmcache_fs.storage.layout import QUARANTINE_DIR, BadKeyError, chunk_path
from lmcache_fs.storage.store import OpenChunk, open_chunk_at

_MAX_CHAIN = 100_000  # chunks in one prefix; a cycle in planted files must not loop forever


def open_chunk_path(path: str | os.PathLike[str], expect: Mapping[str, str] | None = None,
                    dtype: torch.dtype | None = None, shape: Sequence[int] | None = None,
                    mac_key: bytes | None = None) -> OpenChunk:
    """Open the chunk file at ``path`` (never through a symlink at ``path``), header checked.

    Close it with ``.close()``.

    Raises:
        ChunkFileError: as :func:`~lmcache_fs.storage.store.open_chunk_at`,
            or its directory cannot be opened.
    """
    path = Path(path)
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError as exc:
        raise ChunkFileError("missing") from exc
    except OSError as exc:
        raise ChunkFileError(f"cannot open its directory: {exc.strerror}") from exc
    try:
        return open_chunk_at(dir_fd, path.name, key=path.name.split(".", 1)[0], expect=expect,
                             dtype=dtype, shape=shape, mac_key=mac_key)
    except ChunkFileError:
        os.close(dir_fd)
        raise


def read_header(path: str | os.PathLike[str]) -> ChunkHeader:
    """Parse a chunk file's header without following a symlink at ``path``.

    Raises:
        ChunkFileError: missing, a symlink or directory, or not an lmcache-fs chunk.
    """
    chunk = open_chunk_path(path)
    chunk.close()
    return chunk.header


def prefix_keys(namespace_dir: str | os.PathLike[str], key: str) -> tuple[list[str], bool]:
    """The chunk keys of the prefix that ends with chunk ``key``, first chunk first.

    Follows each chunk's ``parent_key`` back to the first chunk of the prompt.

    Returns:
        ``(keys, complete)``: ``complete`` is False if an ancestor is missing
        or unreadable (``keys`` then starts at the oldest one found).

    Raises:
        ChunkFileError: chunk ``key`` itself is missing or unreadable.
        BadKeyError: ``key`` is not a chunk key.
    """
    keys = [key]
    parent = read_header(chunk_path(namespace_dir, key)).metadata.get("parent_key", "")
    while parent and len(keys) < _MAX_CHAIN:
        try:
            header = read_header(chunk_path(namespace_dir, parent))
        except (ChunkFileError, BadKeyError):
            return keys[::-1], False
        keys.append(parent)
        parent = header.metadata.get("parent_key", "")
    return keys[::-1], not parent


def namespace_of(path: str | os.PathLike[str]) -> Path:
    """The namespace directory of a chunk file path (``<namespace>/<fan-out>/<key>.safetensors``).

    A quarantined chunk (``quarantine/<namespace>__<fan-out>__<key>.safetensors.<time>.<random>``,
    named by :func:`lmcache_fs.storage.quarantine.quarantine`) belongs to the namespace its name
    starts with; split from the right, as a namespace name may itself hold ``__``.
    """
    path = Path(path).absolute()
    if path.parent.name == QUARANTINE_DIR:
        return path.parent.parent / path.name.rsplit("__", 2)[0]
    return path.parent.parent
