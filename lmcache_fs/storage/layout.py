"""Where chunk files live: the only code that turns a key into a path.

A cache directory holds one namespace directory per set of KV-compatible
engines. The namespace name is a readable model slug plus a short hash of the
sorted-JSON fields that make KV bytes incompatible (model, geometry, dtypes,
block size, layout/ISA, TP size and rank, hash algorithm, format version), so
two engines that differ in any of them never read each other's chunks. The
same fields are written once, readable, as ``namespace.json`` beside the data.

    <storage_path>/<model-slug>-<hash16>/namespace.json
    <storage_path>/<model-slug>-<hash16>/<key[:2]>/<key>.safetensors

One level of 256 fan-out directories keeps a million chunks at about 4k
entries per directory, and a recursive inotify watch at 257 watches.

Example:
    >>> ns = Namespace({"model": "org/My-Model", "num_layers": 2})
    >>> m = ChunkLayout("/cache", ns)
    >>> str(m.chunk_path("ab" * 32)).startswith("/cache/my-model-")
    True
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Iterator, Mapping, Union

from lmcache_fs.storage.untrusted import parse_json_object, read_capped

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""The chunk file format's version: a namespace field and each header's ``format_version``."""
CHUNK_SUFFIX = ".safetensors"
MANIFEST_NAME = "namespace.json"
TEMP_PREFIX = ".tmp."
MAX_MANIFEST_BYTES = 64 << 10  # a manifest is a few hundred bytes; larger ones were planted

_KEY_RE = re.compile(r"^[0-9a-f]{16,128}$")
_NAMESPACE_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,80}-[0-9a-f]{16}$")

FieldValue = Union[str, int, float, bool]


class BadKeyError(ValueError):
    """A string that is not a chunk key was about to become a path."""


def check_key(key: str) -> str:
    """Return ``key`` if it is a lowercase hex chunk key, else raise.

    This is the only gate between key strings and file names: nothing that
    could hold ``/``, ``..`` or a NUL ever reaches the filesystem.
    """
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise BadKeyError(f"not a chunk key (16-128 lowercase hex digits): {key!r}")
    return key


def is_namespace_name(name: str) -> bool:
    """True if ``name`` has the shape of a namespace directory name."""
    return bool(_NAMESPACE_RE.match(name))


def _slug(text: str) -> str:
    tail = text.rstrip("/").rsplit("/", 1)[-1].lower()
    return re.sub(r"[^a-z0-9._-]+", "-", tail).strip("-._")[:48] or "model"


class Namespace:
    """The fields that make KV bytes compatible, and the directory name they give."""

    def __init__(self, fields: Mapping[str, FieldValue]):
        if "model" not in fields:
            raise ValueError("a namespace needs a 'model' field")
        self.fields: dict[str, FieldValue] = {"format_version": FORMAT_VERSION, **fields}
        canonical = json.dumps(self.fields, sort_keys=True, separators=(",", ":"))
        self.digest = hashlib.sha256(canonical.encode()).hexdigest()[:16]
        self.name = f"{_slug(str(self.fields['model']))}-{self.digest}"

    def __repr__(self) -> str:
        return f"Namespace({self.name})"


class ChunkLayout:
    """Paths of one namespace's chunk files under a storage root."""

    def __init__(self, root: str | os.PathLike[str], namespace: Namespace):
        self.root = Path(root)
        self.namespace = namespace
        self.directory = self.root / namespace.name
        self._directory_str = str(self.directory)

    def chunk_path(self, key: str) -> Path:
        """The file that holds chunk ``key`` (validated hex; never leaves the root)."""
        return Path(self.chunk_file(key))

    def chunk_file(self, key: str) -> str:
        """:meth:`chunk_path` as a string, for hot paths (a stat per lookup: no Path objects)."""
        return chunk_file_name(self._directory_str, key)

    def write_manifest(self, mode: int = 0o644) -> None:
        """Create the namespace directory and its readable ``namespace.json`` once.

        Published like a chunk (a unique ``O_EXCL | O_NOFOLLOW`` temporary,
        then a link that fails if the name exists) into the namespace
        directory opened with ``O_NOFOLLOW``: a symlink planted at the
        manifest's name, a temporary's name or the namespace directory's name
        never redirects the write, and whatever holds the manifest's name
        already (first writer wins) stays.
        """
        from lmcache_fs.storage.publish import publish_at  # publish imports this module

        self.root.mkdir(parents=True, exist_ok=True)
        root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                os.mkdir(self.namespace.name, dir_fd=root_fd)
            except FileExistsError:
                pass
            try:
                dir_fd = os.open(self.namespace.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                                 dir_fd=root_fd)
            except OSError as exc:  # ELOOP, ENOTDIR: a symlink or a file planted at its name
                logger.warning("%s is not a real directory (%s): its namespace.json is not "
                               "written", self.directory, exc.strerror)
                return
        finally:
            os.close(root_fd)
        text = (json.dumps(self.namespace.fields, indent=2, sort_keys=True) + "\n").encode()
        try:
            try:  # written once: later starts (and read-only mounts) write nothing
                os.stat(MANIFEST_NAME, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                publish_at(dir_fd, MANIFEST_NAME, lambda fd: os.write(fd, text), mode)
        finally:
            os.close(dir_fd)

    def iter_chunk_files(self) -> Iterator[tuple[str, os.DirEntry[str]]]:
        """Yield ``(key, entry)`` for every published chunk file (temporaries skipped)."""
        return iter_chunk_files(self.directory)


def chunk_file_path(directory: str | os.PathLike[str], key: str) -> Path:
    """The file that holds chunk ``key`` in namespace directory ``directory`` (key checked)."""
    return Path(chunk_file_name(os.fspath(directory), key))


def chunk_file_name(directory: str, key: str) -> str:
    """The one place a key becomes a file name: ``<directory>/<key[:2]>/<key>.safetensors``."""
    check_key(key)
    return f"{directory}/{key[:2]}/{key}{CHUNK_SUFFIX}"


def iter_chunk_files(directory: str | os.PathLike[str]) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """Yield ``(key, entry)`` for every chunk-named entry of a namespace directory.

    Only real fan-out directories are entered (a symlinked one is skipped), and
    only names that are a valid key under the right fan-out are yielded;
    temporaries and stray names are not. An entry may still be a symlink or a
    directory: callers that read it check (the loader opens with O_NOFOLLOW).
    """
    try:
        fanout = list(os.scandir(directory))
    except FileNotFoundError:
        return
    for sub in fanout:
        if len(sub.name) != 2 or not sub.is_dir(follow_symlinks=False):
            continue
        try:
            entries = list(os.scandir(sub.path))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            name = entry.name
            if name.startswith(".") or not name.endswith(CHUNK_SUFFIX):
                continue
            key = name[: -len(CHUNK_SUFFIX)]
            if _KEY_RE.match(key) and key.startswith(sub.name):
                yield key, entry


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, FieldValue] | None:
    """The fields of a namespace directory, or None if it has no well-formed manifest.

    Anyone who can write the cache directory can plant ``namespace.json``: it
    is read without following a symlink, up to ``MAX_MANIFEST_BYTES``, and
    only a flat object of strings, numbers and booleans is a manifest.
    """
    data = read_capped(Path(directory) / MANIFEST_NAME, MAX_MANIFEST_BYTES)
    fields = None if data is None else parse_json_object(data, MAX_MANIFEST_BYTES, max_depth=1)
    if fields is None or not all(isinstance(v, (str, int, float, bool)) for v in fields.values()):
        return None
    return fields
