"""What a cache directory holds: namespaces, chunk files, temporaries, quarantine.

Read-only scans shared by eviction, the CLI and tests. Nothing here imports
torch or reads chunk contents; sizes and times come from ``lstat`` (never
following a symlink). A scan of a directory that other processes change
under it is a snapshot: entries that vanish mid-scan are skipped.

    <storage_path>/<namespace>/namespace.json          the namespace's fields (one per
                                                        tensor/pipeline-parallel rank)
    <storage_path>/<namespace>/<fan-out>/<key>.safetensors
    <storage_path>/<namespace>/pins/<key>.json          see lmcache_fs.ops.pins
    <storage_path>/quarantine/...                       see lmcache_fs.storage.quarantine
    <storage_path>/eviction.lease                       see lmcache_fs.ops.eviction
    .tmp.* in any of these directories                  writers' temporaries

Example:
    >>> import tempfile
    >>> summarize(tempfile.mkdtemp())
    []
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from lmcache_fs.ops.pins import PINS_DIR, PinStore
from lmcache_fs.storage.layout import (
    TEMP_PREFIX,
    is_namespace_name,
    iter_chunk_files,
    read_manifest,
)
from lmcache_fs.storage.quarantine import quarantine_dir


RANK_FIELDS = ("tp_rank", "pp_rank")
"""Manifest fields that tell one engine's ranks apart: each tensor- or pipeline-parallel
rank stores its own shard of every chunk, under the same key, in a namespace of its own
(the connector's ``rank_namespace``); a chunk is whole only with every rank's file."""


@dataclass(frozen=True)
class FileEntry:
    """A file (or other entry) seen by a scan."""

    path: str
    size: int
    mtime: float


@dataclass(frozen=True)
class ChunkEntry(FileEntry):
    """A published chunk file."""

    namespace: str
    key: str


@dataclass(frozen=True)
class NamespaceSummary:
    """One line of ``lmcache-fs ls``."""

    name: str
    model: str
    chunks: int
    bytes: int
    last_used: float | None
    pins: int


def namespace_dirs(root: str | os.PathLike[str]) -> list[Path]:
    """The namespace directories under ``root`` (real directories only, sorted by name)."""
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    return sorted(Path(e.path) for e in entries
                  if is_namespace_name(e.name) and e.is_dir(follow_symlinks=False))


def rank_sets(namespaces: Iterable[Path]) -> dict[str, str]:
    """For each namespace's name, a name it shares with the other ranks of its engine.

    The namespaces of one engine's ranks have the same manifest but for
    :data:`RANK_FIELDS`. A namespace without a readable manifest is a set of its own.
    """
    sets = {}
    for ns in namespaces:
        manifest = read_manifest(ns)
        shared = None if manifest is None else {
            k: v for k, v in manifest.items() if k not in RANK_FIELDS}
        sets[ns.name] = ns.name if shared is None else json.dumps(shared, sort_keys=True)
    return sets


class NamespaceNotFoundError(LookupError):
    """No namespace, or more than one, matches a name given by a user."""


def find_namespace(root: str | os.PathLike[str], name: str) -> Path:
    """The namespace directory called ``name``, or the only one whose name starts with it.

    Raises:
        NamespaceNotFoundError: no namespace, or several, match (the message lists them).
    """
    dirs = namespace_dirs(root)
    exact = [d for d in dirs if d.name == name]
    matches = exact or [d for d in dirs if d.name.startswith(name)]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(d.name for d in dirs) or "none"
    what = "several namespaces match" if matches else "no namespace matches"
    raise NamespaceNotFoundError(f"{what} {name!r} under {root}; namespaces: {known}")


def scan_chunks(namespace_dir: str | os.PathLike[str]) -> Iterator[ChunkEntry]:
    """Every published chunk file of a namespace that is a regular file."""
    name = Path(namespace_dir).name
    for key, entry in iter_chunk_files(namespace_dir):
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:  # evicted or quarantined mid-scan
            continue
        if stat.S_ISREG(st.st_mode):
            yield ChunkEntry(entry.path, st.st_size, st.st_mtime, name, key)


def scan_irregular(namespace_dir: str | os.PathLike[str]) -> Iterator[FileEntry]:
    """Entries where a chunk file or fan-out directory should be but something else is.

    Symlinks and directories with a chunk's name, and fan-out names that are
    symlinks or files: no loader reads through them, and ``verify`` reports them.
    """
    try:
        top = list(os.scandir(namespace_dir))
    except FileNotFoundError:
        return
    for sub in top:
        if len(sub.name) == 2 and not sub.is_dir(follow_symlinks=False):
            yield _entry(sub)
    for _, entry in iter_chunk_files(namespace_dir):
        if not entry.is_file(follow_symlinks=False):
            yield _entry(entry)


def scan_temporaries(root: str | os.PathLike[str]) -> Iterator[FileEntry]:
    """Writers' temporary files (``.tmp.*``) anywhere the cache creates them."""
    yield from _temporaries_in(root)
    for ns in namespace_dirs(root):
        yield from scan_namespace_temporaries(ns)


def scan_namespace_temporaries(namespace_dir: str | os.PathLike[str]) -> Iterator[FileEntry]:
    """Writers' temporary files in one namespace (its fan-out and pins directories included)."""
    yield from _temporaries_in(namespace_dir)
    for sub in _scandir(namespace_dir):  # never into a symlinked directory
        if (len(sub.name) == 2 or sub.name == PINS_DIR) and sub.is_dir(follow_symlinks=False):
            yield from _temporaries_in(sub.path)


def _temporaries_in(directory: str | os.PathLike[str]) -> Iterator[FileEntry]:
    for entry in _scandir(directory):
        if entry.name.startswith(TEMP_PREFIX):
            yield _entry(entry)


def scan_quarantine(root: str | os.PathLike[str]) -> Iterator[FileEntry]:
    """Quarantined entries (see :mod:`lmcache_fs.storage.quarantine`)."""
    for entry in _scandir(quarantine_dir(root)):
        yield _entry(entry)


def summarize_namespace(namespace_dir: str | os.PathLike[str],
                        on_chunk: Callable[[], None] = lambda: None) -> NamespaceSummary:
    """Chunk count, bytes and last use (newest chunk mtime) of one namespace.

    ``on_chunk`` is called for each chunk file seen (progress).
    """
    manifest = read_manifest(namespace_dir) or {}
    count = size = 0
    newest: float | None = None
    for chunk in scan_chunks(namespace_dir):
        on_chunk()
        count += 1
        size += chunk.size
        newest = chunk.mtime if newest is None else max(newest, chunk.mtime)
    return NamespaceSummary(Path(namespace_dir).name, str(manifest.get("model", "?")), count,
                            size, newest, len(PinStore(namespace_dir).pins()))


def summarize(root: str | os.PathLike[str],
              on_chunk: Callable[[], None] = lambda: None) -> list[NamespaceSummary]:
    """:func:`summarize_namespace` for every namespace under ``root``."""
    return [summarize_namespace(d, on_chunk) for d in namespace_dirs(root)]


def total_size(entries: Iterable[FileEntry]) -> int:
    """Sum of the entries' sizes."""
    return sum(e.size for e in entries)


@dataclass(frozen=True)
class DirectoryContents:
    """Everything a cache directory holds that counts against its budget."""

    namespaces: list[NamespaceSummary]
    temporaries: list[FileEntry]
    quarantined: list[FileEntry]

    @property
    def bytes(self) -> int:
        """Chunk files, temporaries and quarantine: what an eviction pass measures."""
        return (sum(n.bytes for n in self.namespaces) + total_size(self.temporaries)
                + total_size(self.quarantined))


def scan_directory(root: str | os.PathLike[str],
                   on_chunk: Callable[[], None] = lambda: None) -> DirectoryContents:
    """:func:`summarize` every namespace and list the temporaries and the quarantine."""
    return DirectoryContents(summarize(root, on_chunk), list(scan_temporaries(root)),
                             list(scan_quarantine(root)))


def expected_chunk_geometry(manifest: dict) -> tuple[tuple[int, ...], str] | None:
    """The shape and dtype name every chunk of a namespace must have, from its manifest.

    A chunk holds ``chunk_size / block_size`` whole blocks of every layer, each
    block in vLLM's per-layer page shape ``[num_kv_heads, block_size,
    2 * head_size]`` (the connector's staging buffer). None if the manifest
    lacks a field (a namespace not written by the vLLM connector).
    """
    try:
        block = int(manifest["block_size"])
        shape = (int(manifest["num_layers"]), int(manifest["chunk_size"]) // block,
                 int(manifest["num_kv_heads"]), block, 2 * int(manifest["head_size"]))
        return shape, str(manifest["kv_dtype"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def _scandir(directory: str | os.PathLike[str]) -> list[os.DirEntry[str]]:
    try:
        return list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _entry(entry: os.DirEntry[str]) -> FileEntry:
    try:
        st = entry.stat(follow_symlinks=False)
        return FileEntry(entry.path, st.st_size, st.st_mtime)
    except FileNotFoundError:
        return FileEntry(entry.path, 0, 0.0)
