"""The on-disk map of a cache directory: every entry's name, and the rules names obey.

This module is the only code that turns a key, a namespace or a record into a
name under ``storage_path``, or a name back into what it stands for. It does
no I/O beyond the walk of the chunk names (:func:`iter_chunk_files`)::

    <storage_path>/
        <namespace>/                            one per set of KV-compatible engines
            namespace.json                      its fields, readable (storage/manifest.py)
            hashseed-<12 hex>                   the prefix-hash seeds of its engines
            <key[:2]>/<key>.safetensors         a chunk: 256 fan-out directories
            pins/<key>.json                     a pinned prefix (ops/pins.py)
        quarantine/<namespace>__<fan-out>__<name>.<time>.<random>   bad entries
        eviction.lease                          who runs eviction passes (ops/lease.py)
        eviction.usage                          what the last pass measured (storage/usage.py)
    .<name>.tmp-<host>-<pid>-<random>           a writer's temporary, beside <name>

The namespace name is a readable model slug plus a short hash of the
sorted-JSON fields that make KV bytes incompatible (model, geometry, dtypes,
block size, layout/ISA, TP size and rank, hash algorithm, format version), so
engines that differ in any of them never read each other's chunks. One level of
256 fan-out directories keeps a million chunks at about 4k entries each, and a
recursive inotify watch at 257 watches.

Anyone who can write the directory can plant any of these names: the rules
below are full matches (``\\Z``, so no trailing newline passes), and every name
they accept is safe as one path component.

Example:
    >>> ns = Namespace({"model": "org/My-Model", "num_layers": 2})
    >>> m = ChunkLayout("/cache", ns)
    >>> str(m.chunk_path("ab" * 32)).startswith("/cache/my-model-")
    True
    >>> key_of("ab" * 32 + ".safetensors", "ab") == "ab" * 32
    True
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple, Sequence, Union

FORMAT_VERSION = 1
"""The chunk file format's version: a namespace field and each header's ``format_version``."""

# -- names of every entry ------------------------------------------------------

CHUNK_SUFFIX = ".safetensors"
MANIFEST_NAME = "namespace.json"
HASH_SEED_MARKER_PREFIX = "hashseed-"
PINS_DIR = "pins"
PIN_SUFFIX = ".json"
QUARANTINE_DIR = "quarantine"
LEASE_NAME = "eviction.lease"
USAGE_NAME = "eviction.usage"
TEMP_PREFIX = ".tmp."
"""How temporaries were named before (``.tmp.<host>.<pid>.<random>.<name>``): still
recognised, so that eviction removes those that crashed writers of before left."""
TEMP_MARK = ".tmp-"

# The most bytes each record the cache keeps about itself may hold. A file at a record's
# name that is larger was planted: readers ignore it, and the budget counts it as foreign.
MAX_MANIFEST_BYTES = 64 << 10  # a manifest is a few hundred bytes
MAX_PIN_BYTES = 16 << 20  # a key takes 69 bytes of a pin file: about 240k keys
MAX_LEASE_BYTES = 4096  # a page: more than any lease record, and what a renewal reads
MAX_USAGE_BYTES = 4096
MAX_SEED_MARKER_BYTES = 0  # markers are empty files

# -- the rules names obey ------------------------------------------------------

_KEY_RE = re.compile(r"[0-9a-f]{16,128}")
_NAMESPACE_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,80}-[0-9a-f]{16}")
_FANOUT_RE = re.compile(r"[0-9a-f]{2}")
_SEED_MARKER_RE = re.compile(rf"{HASH_SEED_MARKER_PREFIX}([0-9a-f]{{12}})")
_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32] or "host"
_TEMP_RE = re.compile(r"\..+\.tmp-[A-Za-z0-9_]+-[0-9]+-[0-9a-f]+")

FieldValue = Union[str, int, float, bool]


class BadKeyError(ValueError):
    """A string that is not a chunk key was about to become a path."""


def is_key(name: str) -> bool:
    """True if ``name`` is a chunk key: 16-128 lowercase hex digits, nothing else."""
    return isinstance(name, str) and _KEY_RE.fullmatch(name) is not None


def check_key(key: str) -> str:
    """Return ``key`` if it is a chunk key, else raise.

    The gate between key strings and file names: nothing that could hold
    ``/``, ``..``, a NUL or a newline ever reaches the filesystem.
    """
    if not is_key(key):
        raise BadKeyError(f"not a chunk key (16-128 lowercase hex digits): {key!r}")
    return key


def is_namespace_name(name: str) -> bool:
    """True if ``name`` has the shape of a namespace directory name."""
    return _NAMESPACE_RE.fullmatch(name) is not None


def is_temporary(name: str) -> bool:
    """True if ``name`` is a writer's temporary (see :func:`temp_name`), or one of before."""
    return name.startswith(TEMP_PREFIX) or _TEMP_RE.fullmatch(name) is not None


def temp_name(final_name: str) -> str:
    """A temporary name beside ``final_name`` that no other process can choose.

    Shaped as rsync's (``.<name>.<suffix>``, no dot in the suffix), which GlusterFS's
    distribute layer places by ``<name>``: the data then lands on the brick where the
    final name will be, instead of a pointer there and the data on another brick, which
    would make every such chunk need two bricks alive.
    """
    return f".{final_name}{TEMP_MARK}{_HOST}-{os.getpid()}-{secrets.token_hex(6)}"


# -- chunks --------------------------------------------------------------------

class ChunkLocation(NamedTuple):
    """Where a chunk lives in its namespace directory."""

    fanout: str
    """The fan-out directory: the key's first two hex digits."""
    name: str
    """The file name: the key and :data:`CHUNK_SUFFIX`."""

    def under(self, namespace_dir: str) -> str:
        """The chunk's path below ``namespace_dir``, as a string (a stat per lookup)."""
        return f"{namespace_dir}/{self.fanout}/{self.name}"


def chunk_location(key: str) -> ChunkLocation:
    """The one place a key becomes names (validated: raises :class:`BadKeyError`)."""
    check_key(key)
    return ChunkLocation(key[:2], key + CHUNK_SUFFIX)


def key_of(name: str, fanout: str | None = None) -> str | None:
    """The key that file ``name`` holds, or None if it is no chunk's name.

    ``fanout``: the directory it was found in; a chunk filed under another
    key's fan-out directory is no chunk.
    """
    key = name.removesuffix(CHUNK_SUFFIX)
    if key == name or not is_key(key) or (fanout is not None and key[:2] != fanout):
        return None
    return key


def is_fanout_name(name: str) -> bool:
    """True if ``name`` can be a fan-out directory (two lowercase hex digits)."""
    return _FANOUT_RE.fullmatch(name) is not None


def chunk_path(namespace_dir: str | os.PathLike[str], key: str) -> Path:
    """The file that holds chunk ``key`` in namespace directory ``namespace_dir``."""
    return Path(chunk_location(key).under(os.fspath(namespace_dir)))


def iter_chunk_files(namespace_dir: str | os.PathLike[str]) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """Yield ``(key, entry)`` for every chunk-named entry of a namespace directory.

    Only real fan-out directories are entered (a symlinked one is skipped), and
    only names that are a valid key under the right fan-out are yielded;
    temporaries and stray names are not. An entry may still be a symlink or a
    directory: callers that read it check (the loader opens with O_NOFOLLOW).
    """
    try:
        fanout = list(os.scandir(namespace_dir))
    except FileNotFoundError:
        return
    for sub in fanout:
        if not is_fanout_name(sub.name) or not sub.is_dir(follow_symlinks=False):
            continue
        try:
            entries = list(os.scandir(sub.path))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            key = key_of(entry.name, sub.name)
            if key is not None:
                yield key, entry


# -- the other entries ---------------------------------------------------------

def seed_marker_name(fingerprint: str) -> str:
    """The marker a namespace directory holds for engines whose hash seed has ``fingerprint``."""
    return f"{HASH_SEED_MARKER_PREFIX}{fingerprint}"


def seed_of_marker(name: str) -> str | None:
    """The seed fingerprint a marker's name holds, or None if ``name`` is no seed marker."""
    match = _SEED_MARKER_RE.fullmatch(name)
    return match.group(1) if match else None


def pins_dir(namespace_dir: str | os.PathLike[str]) -> Path:
    """Where the pins of a namespace live."""
    return Path(namespace_dir) / PINS_DIR


def pin_file_name(last_key: str) -> str:
    """The file of the pin named by its prefix's last chunk key (validated)."""
    return f"{check_key(last_key)}{PIN_SUFFIX}"


def key_of_pin(name: str) -> str | None:
    """The last chunk key a pin file's name holds, or None if ``name`` is no pin's."""
    key = name.removesuffix(PIN_SUFFIX)
    return key if key != name and is_key(key) else None


def quarantine_dir(root: str | os.PathLike[str]) -> Path:
    """Where quarantined entries of the cache at ``root`` go."""
    return Path(root) / QUARANTINE_DIR


def quarantined_name(parts: Sequence[str], unix_time: int) -> str:
    """The name in the quarantine of the entry at ``parts`` below the root (never reused)."""
    return f"{'__'.join(parts)}.{unix_time}.{secrets.token_hex(4)}"


def lease_path(root: str | os.PathLike[str]) -> Path:
    """The eviction lease of the cache at ``root``."""
    return Path(root) / LEASE_NAME


def usage_path(root: str | os.PathLike[str]) -> Path:
    """The last eviction pass's usage record of the cache at ``root``."""
    return Path(root) / USAGE_NAME


# -- namespaces ----------------------------------------------------------------

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
    """One namespace's directory under a storage root, and its chunks' paths."""

    def __init__(self, root: str | os.PathLike[str], namespace: Namespace):
        self.root = Path(root)
        self.namespace = namespace
        self.directory = self.root / namespace.name
        self._directory_str = str(self.directory)

    def chunk_path(self, key: str) -> Path:
        """The file that holds chunk ``key`` (validated hex; never leaves the root)."""
        return Path(chunk_location(key).under(self._directory_str))

    def iter_chunk_files(self) -> Iterator[tuple[str, os.DirEntry[str]]]:
        """Yield ``(key, entry)`` for every published chunk file (temporaries skipped)."""
        return iter_chunk_files(self.directory)
