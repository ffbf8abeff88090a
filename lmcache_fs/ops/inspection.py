"""Read chunk headers for operators' tools, never through a symlink.

The loader reads whole chunks (:func:`lmcache_fs.storage.codec.read_chunk_file`);
tools such as ``lmcache-fs inspect`` and ``pin`` only need a header, and
follow ``parent_key`` links to find the chunks a prefix is made of.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from lmcache_fs.storage.codec import ALIGNMENT, ChunkFileError, ChunkHeader, parse_header
from lmcache_fs.storage.layout import BadKeyError, chunk_file_path
from lmcache_fs.storage.quarantine import QUARANTINE_DIR

_MAX_CHAIN = 100_000  # chunks in one prefix; a cycle in planted files must not loop forever


def read_header(path: str | os.PathLike[str]) -> ChunkHeader:
    """Parse a chunk file's header without following a symlink at ``path``.

    Raises:
        ChunkFileError: missing, a symlink or directory, or not an lmcache-fs chunk.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError as exc:
        raise ChunkFileError("missing") from exc
    except OSError as exc:
        raise ChunkFileError(f"cannot open: {exc.strerror}") from exc
    try:
        head = os.pread(fd, ALIGNMENT, 0)
        if len(head) >= 8:
            (hlen,) = struct.unpack_from("<Q", head)
            if len(head) < 8 + hlen <= 8 + (1 << 20):
                head = os.pread(fd, 8 + hlen, 0)
    except OSError as exc:
        raise ChunkFileError(f"read failed: {exc.strerror}") from exc
    finally:
        os.close(fd)
    return parse_header(head)


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
    parent = read_header(chunk_file_path(namespace_dir, key)).metadata.get("parent_key", "")
    while parent and len(keys) < _MAX_CHAIN:
        try:
            header = read_header(chunk_file_path(namespace_dir, parent))
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
