"""Which model a cache namespace belongs to, named the same on every node.

Used by the connector (the namespace of an engine's chunks) and by
``lmcache-fs pin --prompt`` (the namespace a prompt's chunks would be in), so
it lives in the library and needs nothing but the model folder or hub id.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterator

import xxhash

logger = logging.getLogger(__name__)


def model_identity(model: str, revision: str | None) -> str:
    """A model name that is the same on every node.

    A hub id is used as is. A local folder may be mounted at different paths
    on different nodes, so it is named by its folder name plus a hash of its
    config.json.
    """
    config = Path(model) / "config.json"
    if config.is_file():
        digest = hashlib.sha256(config.read_bytes()).hexdigest()[:12]
        return f"{Path(model).resolve().name}@{digest}"
    return f"{model}@{revision}" if revision else model


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_READ_BYTES = 16 << 20
_CACHE_VERSION = 1
_MAX_CACHE_FILE = 4 << 20  # a few hundred bytes per weights file


def weights_fingerprint(model: str) -> str:
    """A short hash of the weights of a local model folder: fine-tunes with one config differ.

    Fine-tunes and the checkpoints of one run share their config (and often
    their folder name), but not their weights. Every weights file contributes
    its name and a hash of ALL its bytes, so any change to any weight gives
    another namespace, and copies of one model on different nodes (any path,
    any mtime) give the same one. Hashing reads the weights once: the digest
    of each file is cached on this node by its identity and change stamps
    (device, inode, size, mtime_ns, ctime_ns; see :class:`_DigestCache`), so
    later starts only stat the files. Empty for a hub id, whose revision names
    its weights.
    """
    folder = Path(model)
    if not folder.is_dir():
        return ""
    paths = sorted(p for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    digest = hashlib.sha256()
    with _DigestCache.open() as cache:
        for path in paths:
            digest.update(f"{path.name}:{cache.digest(path)}:".encode())
    return digest.hexdigest()[:16]


def file_digest(path: Path) -> str:
    """xxh3-128 of a file's bytes (read at disk speed: vLLM reads these weights right after)."""
    hasher = xxhash.xxh3_128()
    buffer = bytearray(_READ_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as file:
        while n := file.readinto(buffer):
            hasher.update(view[:n])
    return hasher.hexdigest()


def _stamp(st: os.stat_result) -> list[int]:
    # ctime changes on every write and cannot be set back by users (unlike mtime):
    # an in-place edit that restores size and mtime still gives a new stamp.
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class _DigestCache:
    """Per-node cache of weights-file digests: ``$XDG_CACHE_HOME/lmcache-fs/weights.json``.

    An entry is used only while the file's stamp (device, inode, size,
    mtime_ns, ctime_ns) is unchanged. An ``flock`` on a lock file beside it
    makes the processes of one engine (scheduler, workers) hash a new model
    once between them, not once each. Where the cache cannot be written
    (a read-only home), every start hashes again, correctly but slower.
    """

    def __init__(self, path: Path | None, entries: dict[str, object]):
        self.path = path
        self.entries = entries
        self.changed = False

    @classmethod
    @contextlib.contextmanager
    def open(cls) -> Iterator["_DigestCache"]:
        try:
            base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
            path = Path(base) / "lmcache-fs" / "weights.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = open(path.with_suffix(".lock"), "a")
        except (OSError, RuntimeError):  # no home directory, or a read-only one
            yield cls(None, {})
            return
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            cache = cls(path, _read_entries(path))
            yield cache
            if cache.changed:
                cache.save()

    def digest(self, path: Path) -> str:
        """The digest of ``path``'s bytes, from the cache while its stamp is unchanged."""
        stamp = _stamp(path.stat())
        key = f"{stamp[0]}:{stamp[1]}"
        entry = self.entries.get(key)
        if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("digest"), str):
            return entry["digest"]
        start = time.monotonic()
        value = file_digest(path)
        logger.info("hashed the weights file %s (%.2f GB) in %.1f s for the cache namespace "
                    "(once: cached until it changes)", path, stamp[2] / 1e9,
                    time.monotonic() - start)
        if _stamp(path.stat()) == stamp:  # not rewritten while we read it
            self.entries[key] = {"stamp": stamp, "digest": value}
            self.changed = True
        return value

    def save(self) -> None:
        assert self.path is not None
        text = json.dumps({"version": _CACHE_VERSION, "files": self.entries})
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        try:
            tmp.write_text(text)
            os.replace(tmp, self.path)
        except OSError as exc:
            logger.warning("cannot cache weights digests in %s (%s): the next start hashes "
                           "the weights again", self.path, exc.strerror or exc)


def _read_entries(path: Path) -> dict[str, object]:
    """The cached entries, or none if the file is missing, too big or not ours."""
    try:
        with open(path, "rb") as file:
            text = file.read(_MAX_CACHE_FILE + 1)
        data = json.loads(text) if len(text) <= _MAX_CACHE_FILE else None
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION:
        return {}
    files = data.get("files")
    return files if isinstance(files, dict) else {}
