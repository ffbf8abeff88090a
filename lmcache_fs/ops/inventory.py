"""What a cache directory holds, entry by entry, as the on-disk map names them.

Read-only scans shared by eviction, the CLI, the exporter and tests. Nothing here
imports torch or reads chunk contents. Anyone who can write the directory can
plant any entry, so the walk is by descriptor: every directory is opened
relative to its parent with ``O_NOFOLLOW``, so a symlink is never entered (it
is an entry like any other, counted by its own size), and sizes come from
``fstatat`` without following links. An entry this user cannot read is
skipped and listed in ``unreadable``, never fatal to a scan. Entries that
vanish mid-scan are skipped: a scan of a directory other processes change is a
snapshot.

Every file under the root is counted, in one of these kinds (see
:mod:`lmcache_fs.storage.layout` for the names), by its size or, where it is
sparse, by the blocks it really occupies (``st_blocks``): a 64 GiB sparse file
counts what it uses. Directories themselves are not counted (at most 257
blocks per namespace), what they hold is:

- chunks: published chunk files (regular files at a chunk's name);
- temporaries: writers' ``.<name>.tmp-*`` files (``.tmp.*`` of earlier releases), in any directory of the map;
- quarantined: the quarantine's entries, directories with all they hold;
- records: ``namespace.json``, hash-seed markers, pins, ``eviction.lease``,
  ``eviction.usage``: files the cache keeps about itself, each within the size
  the map allows it (a larger file at a record's name is foreign). No pass
  removes them; all but the pass's own lease and usage record count against
  the budget (a neighbour can plant any number of pins or namespaces);
- foreign: anything else (a file or directory at a name the map does not give,
  a symlink, FIFO, socket or device anywhere, a directory at a chunk's name).
  Foreign entries are counted and reported, never removed unless asked
  (``lmcache-fs gc --remove-foreign``).

Example:
    >>> import tempfile
    >>> summarize(tempfile.mkdtemp())
    []
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from lmcache_fs.ops.pins import PinStore
from lmcache_fs.storage.breaker import OUTAGE_ERRNOS
from lmcache_fs.storage.layout import (
    LEASE_NAME,
    MANIFEST_NAME,
    MAX_LEASE_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_PIN_BYTES,
    MAX_SEED_MARKER_BYTES,
    MAX_USAGE_BYTES,
    PINS_DIR,
    QUARANTINE_DIR,
    USAGE_NAME,
    Namespace,
    is_fanout_name,
    is_namespace_name,
    is_temporary,
    key_of,
    key_of_pin,
    seed_of_marker,
)
from lmcache_fs.storage.manifest import read_manifest

RANK_FIELDS = ("tp_rank", "pp_rank")
"""Manifest fields that tell one engine's ranks apart: each tensor- or pipeline-parallel
rank stores its own shard of every chunk, under the same key, in a namespace of its own
(the connector's ``rank_namespace``); a chunk is whole only with every rank's file."""

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
# Errors that make an entry unreadable for this user or right now (not gone, not planted).
_UNREADABLE = (errno.EACCES, errno.EPERM, errno.EIO, errno.ESTALE, errno.ENOTCONN, errno.ETIMEDOUT)


@dataclass(frozen=True)
class FileEntry:
    """An entry seen by a scan (a directory with everything below it)."""

    path: str
    size: int
    """Bytes it counts for the budget (see :func:`_counted`); a directory: what it holds."""
    mtime: float
    parts: tuple[str, ...] = ()
    """Its path below the root, for removal by descriptor."""


@dataclass(frozen=True)
class ChunkEntry(FileEntry):
    """A published chunk file."""

    namespace: str = ""
    key: str = ""


@dataclass(frozen=True)
class UnreadableEntry(FileEntry):
    """An entry this user could not read now, and why."""

    errno: int = 0


@dataclass(frozen=True)
class NamespaceSummary:
    """One line of ``lmcache-fs ls``."""

    name: str
    model: str
    chunks: int
    bytes: int
    last_used: float | None
    pins: int


def _counted(st: os.stat_result, ours: bool) -> int:
    """The bytes a file counts: its size, or the blocks it occupies where that is less.

    A filesystem that reports no blocks at all (some FUSE ones) gives 0 for every
    file: there the cache's own files (``ours``: chunks, quarantined entries,
    records) count their size, so the budget still holds. Temporaries and foreign
    entries never count more than the blocks they occupy: a planted sparse file
    of a terabyte that occupies nothing must not make eviction remove good chunks.
    """
    if stat.S_ISDIR(st.st_mode):
        return 0
    occupied = st.st_blocks * 512
    if ours and not st.st_blocks:
        return st.st_size
    return min(st.st_size, occupied)


class _Walk:
    """One scan of a directory tree by descriptor; fills the lists as it goes."""

    def __init__(self, root: Path, on_chunk: Callable[[], object] = lambda: None,
                 keep_going: Callable[[], bool] = lambda: True):
        self.root = root
        self._root_str = str(root)
        self.on_chunk = on_chunk
        self.keep_going = keep_going
        self.unreadable: list[FileEntry] = []

    def open_dir(self, parent_fd: int | None, name: str, parts: tuple[str, ...]) -> int | None:
        """A descriptor of directory ``name`` of ``parent_fd`` (the root itself if None)."""
        try:
            if parent_fd is None:  # the configured root may itself be a link: followed
                return os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
            return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in _UNREADABLE:
                self._unreadable(parts, exc)
            return None  # ELOOP / ENOTDIR: swapped for a link or a file since it was listed

    def entries(self, fd: int, parts: tuple[str, ...]) -> list[os.DirEntry[str]]:
        try:
            return list(os.scandir(fd))
        except OSError as exc:
            if exc.errno in _UNREADABLE:
                self._unreadable(parts, exc)
            return []

    def _unreadable(self, parts: tuple[str, ...], exc: OSError) -> None:
        self.unreadable.append(UnreadableEntry(self.path(parts), 0, 0.0, parts,
                                               exc.errno or 0))

    def path(self, parts: tuple[str, ...]) -> str:
        return "/".join((self._root_str, *parts))  # (a Path per chunk costs a scan seconds)

    def entry(self, entry: os.DirEntry[str], parts: tuple[str, ...],
              dir_fd: int | None = None, ours: bool = True) -> FileEntry | None:
        """The entry with its size (a real directory: its whole tree, when ``dir_fd``, its
        parent, is given); None if it vanished."""
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._unreadable(parts, exc)
            return None
        size = _counted(st, ours)
        if stat.S_ISDIR(st.st_mode) and dir_fd is not None:
            size += self.tree_size(dir_fd, entry.name, parts, ours)
        return FileEntry(self.path(parts), size, st.st_mtime, parts)

    def tree_size(self, parent_fd: int, name: str, parts: tuple[str, ...], ours: bool) -> int:
        """Bytes below directory ``name`` (never through a link)."""
        fd = self.open_dir(parent_fd, name, parts)
        if fd is None:
            return 0
        try:
            total = 0
            for sub in self.entries(fd, parts):
                found = self.entry(sub, (*parts, sub.name), fd, ours)
                total += found.size if found else 0
            return total
        finally:
            os.close(fd)


@dataclass
class DirectoryContents:
    """Everything under a cache directory, by kind; every byte is in one of them."""

    chunks: list[ChunkEntry] = field(default_factory=list)
    temporaries: list[FileEntry] = field(default_factory=list)
    quarantined: list[FileEntry] = field(default_factory=list)
    records: list[FileEntry] = field(default_factory=list)
    foreign: list[FileEntry] = field(default_factory=list)
    unreadable: list[UnreadableEntry] = field(default_factory=list)
    namespaces: list[NamespaceSummary] = field(default_factory=list)

    @property
    def outage(self) -> bool:
        """Some entry failed as a filesystem in trouble fails (EIO, ENOTCONN, ESTALE...):
        the listing may be short, so no entry missing from it may be taken as gone."""
        return any(e.errno in OUTAGE_ERRNOS for e in self.unreadable)

    @property
    def budgeted_records(self) -> list[FileEntry]:
        """The records the budget counts: all but the eviction pass's own lease and usage
        record (one of each, 4 KiB at most, rewritten by the pass that measures). Pins and
        namespaces' records count: each is small, but a neighbour can plant any number."""
        return [e for e in self.records if len(e.parts) > 1]

    @property
    def bytes(self) -> int:
        """What an eviction pass holds to the budget: every byte but the pass's own two records."""
        return sum(total_size(kind) for kind in (self.chunks, self.temporaries, self.quarantined,
                                                 self.budgeted_records, self.foreign))


class _ScanStopped(Exception):
    """``on_chunk`` asked the scan to stop."""


def scan_directory(root: str | os.PathLike[str],
                   on_chunk: Callable[[], object] = lambda: None,
                   summaries: bool = True) -> DirectoryContents:
    """Walk the whole directory; ``on_chunk`` is called for each chunk seen (progress)."""
    contents = _scan(Path(root), on_chunk, lambda: True)
    if summaries:
        contents.namespaces = _summaries(Path(root), contents.chunks)
    return contents


def scan_or_stop(root: str | os.PathLike[str],
                 keep_going: Callable[[], bool]) -> DirectoryContents | None:
    """:func:`scan_directory` without summaries that stops, returning None, once
    ``keep_going()`` is False (asked at each chunk: an eviction pass renewing its lease)."""
    try:
        return _scan(Path(root), lambda: None, keep_going)
    except _ScanStopped:
        return None


def _scan(root: Path, on_chunk: Callable[[], object],
          keep_going: Callable[[], bool]) -> DirectoryContents:
    walk = _Walk(root, on_chunk, keep_going)
    contents = DirectoryContents()
    fd = walk.open_dir(None, "", ())
    if fd is not None:
        try:
            for entry in walk.entries(fd, ()):
                _root_entry(walk, fd, entry, contents)
        finally:
            os.close(fd)
    contents.unreadable = walk.unreadable
    return contents


def _root_entry(walk: _Walk, root_fd: int, entry: os.DirEntry[str],
                contents: DirectoryContents) -> None:
    name, parts = entry.name, (entry.name,)
    real_dir = entry.is_dir(follow_symlinks=False)
    if real_dir and is_namespace_name(name):
        fd = walk.open_dir(root_fd, name, parts)
        if fd is not None:
            try:
                _namespace(walk, fd, name, contents)
            finally:
                os.close(fd)
        return
    if real_dir and name == QUARANTINE_DIR:
        fd = walk.open_dir(root_fd, name, parts)
        if fd is not None:
            try:
                for sub in walk.entries(fd, parts):
                    _add(contents.quarantined, walk.entry(sub, (*parts, sub.name), fd))
            finally:
                os.close(fd)
        return
    cap = {LEASE_NAME: MAX_LEASE_BYTES, USAGE_NAME: MAX_USAGE_BYTES}.get(name)
    if cap is not None:
        _record(walk, contents, entry, parts, cap, root_fd)
    else:
        _add(contents.temporaries if is_temporary(name) else contents.foreign,
             walk.entry(entry, parts, root_fd, ours=False))


def _namespace(walk: _Walk, ns_fd: int, ns_name: str, contents: DirectoryContents) -> None:
    for entry in walk.entries(ns_fd, (ns_name,)):
        name, parts = entry.name, (ns_name, entry.name)
        real_dir = entry.is_dir(follow_symlinks=False)
        if real_dir and (is_fanout_name(name) or name == PINS_DIR):
            fd = walk.open_dir(ns_fd, name, parts)
            if fd is None:
                continue
            try:
                for sub in walk.entries(fd, parts):
                    _in_subdir(walk, fd, sub, parts, contents)
            finally:
                os.close(fd)
            continue
        if name == MANIFEST_NAME or seed_of_marker(name):
            _record(walk, contents, entry, parts,
                    MAX_MANIFEST_BYTES if name == MANIFEST_NAME else MAX_SEED_MARKER_BYTES, ns_fd)
        else:
            _add(contents.temporaries if is_temporary(name) else contents.foreign,
                 walk.entry(entry, parts, ns_fd, ours=False))


def _in_subdir(walk: _Walk, dir_fd: int, entry: os.DirEntry[str], parent: tuple[str, ...],
               contents: DirectoryContents) -> None:
    """An entry of a fan-out or pins directory."""
    ns_name, sub_name = parent
    name, parts = entry.name, (*parent, entry.name)
    regular = entry.is_file(follow_symlinks=False)
    if is_temporary(name):
        _add(contents.temporaries, walk.entry(entry, parts, dir_fd, ours=False))
    elif sub_name == PINS_DIR:
        if key_of_pin(name) is not None:
            _record(walk, contents, entry, parts, MAX_PIN_BYTES, dir_fd)
        else:
            _add(contents.foreign, walk.entry(entry, parts, dir_fd, ours=False))
    elif regular and (key := key_of(name, sub_name)) is not None:
        found = walk.entry(entry, parts)
        if found is not None:
            contents.chunks.append(ChunkEntry(found.path, found.size, found.mtime, parts,
                                              ns_name, key))
            walk.on_chunk()
            if not walk.keep_going():
                raise _ScanStopped
    else:  # a FIFO, symlink, directory or stray name where chunks live
        _add(contents.foreign, walk.entry(entry, parts, dir_fd, ours=False))


def _record(walk: _Walk, contents: DirectoryContents, entry: os.DirEntry[str],
            parts: tuple[str, ...], cap: int, dir_fd: int) -> None:
    """A record if it is a regular file within ``cap`` bytes, else foreign."""
    found = walk.entry(entry, parts, dir_fd, ours=False)
    if found is not None:
        record = entry.is_file(follow_symlinks=False) and found.size <= cap
        (contents.records if record else contents.foreign).append(found)


def _add(kind: list[FileEntry], entry: FileEntry | None) -> None:
    if entry is not None:
        kind.append(entry)


def _summaries(root: Path, chunks: Iterable[ChunkEntry]) -> list[NamespaceSummary]:
    by_namespace: dict[str, list[ChunkEntry]] = {d.name: [] for d in namespace_dirs(root)}
    for chunk in chunks:
        by_namespace.setdefault(chunk.namespace, []).append(chunk)
    return [_summary(root / name, found) for name, found in sorted(by_namespace.items())]


def _summary(namespace_dir: Path, chunks: list[ChunkEntry]) -> NamespaceSummary:
    manifest = read_manifest(namespace_dir) or {}
    newest = max((c.mtime for c in chunks), default=None)
    return NamespaceSummary(namespace_dir.name, str(manifest.get("model", "?")), len(chunks),
                            total_size(chunks), newest, len(PinStore(namespace_dir).pins()))


# -- one namespace, or a listing ----------------------------------------------

def namespace_dirs(root: str | os.PathLike[str]) -> list[Path]:
    """The namespace directories under ``root`` (real directories only, sorted by name)."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    return sorted(Path(e.path) for e in entries
                  if is_namespace_name(e.name) and e.is_dir(follow_symlinks=False))


def rank_sets(namespaces: Iterable[Path]) -> dict[str, str]:
    """For each namespace's name, a name it shares with the other ranks of its engine.

    The namespaces of one engine's ranks have the same manifest but for
    :data:`RANK_FIELDS`. A namespace without a manifest whose fields give its own
    name (none, or a planted one) is a set of its own.
    """
    sets = {}
    for ns in namespaces:
        manifest = read_manifest(ns)
        if manifest is None or Namespace(manifest).name != ns.name:
            sets[ns.name] = ns.name
            continue
        shared = {k: v for k, v in manifest.items() if k not in RANK_FIELDS}
        sets[ns.name] = json.dumps(shared, sort_keys=True)
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


def scan_namespace(namespace_dir: str | os.PathLike[str]) -> DirectoryContents:
    """The contents of one namespace directory (its chunks, records, temporaries, foreign)."""
    directory = Path(namespace_dir)
    walk = _Walk(directory.parent)
    contents = DirectoryContents()
    fd = walk.open_dir(None, "", ())
    if fd is not None:
        try:
            ns_fd = walk.open_dir(fd, directory.name, (directory.name,))
        finally:
            os.close(fd)
        if ns_fd is not None:
            try:
                _namespace(walk, ns_fd, directory.name, contents)
            finally:
                os.close(ns_fd)
    contents.unreadable = walk.unreadable
    return contents


def scan_chunks(namespace_dir: str | os.PathLike[str]) -> Iterator[ChunkEntry]:
    """Every published chunk file of a namespace that is a regular file."""
    yield from scan_namespace(namespace_dir).chunks


def scan_irregular(namespace_dir: str | os.PathLike[str]) -> Iterator[FileEntry]:
    """Foreign entries of a namespace: no loader reads through them; ``verify`` reports them."""
    yield from scan_namespace(namespace_dir).foreign


def scan_temporaries(root: str | os.PathLike[str]) -> Iterator[FileEntry]:
    """Writers' temporary files anywhere the cache creates them."""
    yield from scan_directory(root, summaries=False).temporaries


def scan_quarantine(root: str | os.PathLike[str]) -> Iterator[FileEntry]:
    """Quarantined entries (see :mod:`lmcache_fs.storage.quarantine`)."""
    yield from scan_directory(root, summaries=False).quarantined


def summarize_namespace(namespace_dir: str | os.PathLike[str]) -> NamespaceSummary:
    """Chunk count, bytes and last use (newest chunk mtime) of one namespace."""
    return _summary(Path(namespace_dir), scan_namespace(namespace_dir).chunks)


def summarize(root: str | os.PathLike[str],
              on_chunk: Callable[[], object] = lambda: None) -> list[NamespaceSummary]:
    """:func:`summarize_namespace` for every namespace under ``root``."""
    return scan_directory(root, on_chunk).namespaces


def total_size(entries: Iterable[FileEntry]) -> int:
    """Sum of the entries' sizes."""
    return sum(e.size for e in entries)


# -- removal ------------------------------------------------------------------

def remove_entry(root: str | os.PathLike[str], parts: Iterable[str]) -> bool:
    """Remove the entry at ``parts`` below ``root`` (a directory with all it holds).

    By descriptor: each directory on the way is opened with ``O_NOFOLLOW``, so
    nothing outside the root is ever removed, and a symlink is removed itself,
    never its target. False if it was already gone or the way to it is not real
    directories any more.
    """
    *dirs, name = tuple(parts)
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        for sub in dirs:
            next_fd = os.open(sub, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        if stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
            shutil.rmtree(name, dir_fd=fd)  # never follows a link (avoids_symlink_attacks)
        else:
            os.unlink(name, dir_fd=fd)
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return False
        raise
    finally:
        os.close(fd)


def parts_below(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> tuple[str, ...]:
    """``path``'s components below ``root`` (ValueError if it is not below it)."""
    return Path(os.path.abspath(path)).relative_to(os.path.abspath(root)).parts
