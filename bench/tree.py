"""Directories of many empty chunk files, made once and kept for later runs.

The index only looks at file names, so empty files named as the layout names
them are enough to measure lookups and scans at a million chunks. A tree is
reused when its completion marker says it holds the same number of files.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from bench.common import progress
from lmcache_fs.storage.layout import ChunkLayout, Namespace
from lmcache_fs.storage.manifest import write_manifest

_PROGRESS_EVERY = 100_000


def chunk_key(i: int) -> str:
    """Key number ``i`` of every tree: sha256 hex, the shape of vLLM's block hashes."""
    return hashlib.sha256(f"bench-tree-{i}".encode()).hexdigest()


def tree_layout(root: Path, files: int) -> ChunkLayout:
    """The layout of the tree with ``files`` chunk files under ``root``."""
    return ChunkLayout(root / f"files-{files}", Namespace({"model": "bench/lookup", "files": files}))


def ensure_tree(root: Path, files: int) -> ChunkLayout:
    """A namespace holding exactly ``chunk_key(0..files-1)`` as empty files; built if missing."""
    layout = tree_layout(root, files)
    marker = layout.root / ".complete"
    if marker.exists() and marker.read_text().strip() == str(files):
        return layout
    progress(f"creating {files:,} empty chunk files under {layout.directory} (kept for later runs)")
    write_manifest(layout)
    for fan in range(256):
        (layout.directory / f"{fan:02x}").mkdir(exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT
    for i in range(files):
        os.close(os.open(layout.chunk_path(chunk_key(i)), flags, 0o644))
        if (i + 1) % _PROGRESS_EVERY == 0:
            progress(f"  {i + 1:,} / {files:,} files")
    marker.write_text(f"{files}\n")
    return layout
