"""Pins: prefixes that eviction never removes until they are unpinned.

A pin is one small JSON file per pinned prefix, in the namespace directory it
belongs to (so every node sees it), named by the prefix's last chunk key and
listing all of the prefix's chunk keys:

    <namespace>/pins/<last key>.json   {"keys": [...], "note": ..., "pinned_at": ..., "host": ...}

One file per prefix, not one shared list: pins made on many nodes never race
on a read-modify-write, each is published atomically, and two pinned prefixes
that share a beginning (a common system prompt) both protect it, so unpinning
one leaves the shared chunks pinned by the other.

Example:
    >>> import tempfile
    >>> pins = PinStore(tempfile.mkdtemp())
    >>> pins.pin(["aa" * 8, "bb" * 8], note="system prompt")
    True
    >>> sorted(pins.pinned_keys()) == ["aa" * 8, "bb" * 8]
    True
    >>> pins.unpin("bb" * 8)
    True
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from lmcache_fs.log import human_bytes
from lmcache_fs.storage.layout import (MAX_PIN_BYTES, PINS_DIR, BadKeyError, check_key,
                                       key_of_pin, pin_file_name, pins_dir)
from lmcache_fs.storage.publish import publish_at
from lmcache_fs.storage.untrusted import parse_json_object, read_capped

logger = logging.getLogger(__name__)

# A key takes 69 bytes of a pin file, so 16 MiB is about 240k keys: a prompt of
# 3.9M tokens at chunk_size 16. pin() refuses more, so no pin is written that
# eviction would not read.
_MAX_PIN_FILE = MAX_PIN_BYTES


@dataclass(frozen=True)
class Pin:
    """One pinned prefix: its chunk keys in prompt order (the last one names the pin)."""

    keys: tuple[str, ...]
    note: str
    pinned_at: float
    host: str

    @property
    def name(self) -> str:
        """The pin's name: the key of the prefix's last chunk."""
        return self.keys[-1]


class PinStore:
    """The pins of one namespace directory."""

    def __init__(self, namespace_dir: str | os.PathLike[str], mode: int = 0o644):
        self.directory = pins_dir(namespace_dir)
        self.mode = mode

    def pin(self, keys: Sequence[str], note: str = "") -> bool:
        """Pin the prefix made of ``keys`` (chunk keys in prompt order).

        Returns:
            True if pinned now, False if a pin with the same last key existed.

        Raises:
            BadKeyError: a key is not a chunk key.
            ValueError: ``keys`` is empty, or so long that its pin file would
                exceed the size pins are read up to.
        """
        if not keys:
            raise ValueError("a pin needs at least one chunk key")
        for key in keys:
            check_key(key)
        record = {"keys": list(keys), "note": note, "pinned_at": time.time(),
                  "host": socket.gethostname()}
        text = json.dumps(record, indent=1).encode()
        if len(text) > _MAX_PIN_FILE:
            raise ValueError(f"a pin of {len(keys)} chunk keys takes {human_bytes(len(text))}, "
                             f"over the {human_bytes(_MAX_PIN_FILE)} a pin file may hold: pin a "
                             "shorter prefix of it")
        dir_fd = self._open_directory(create=True)
        try:
            return publish_at(dir_fd, pin_file_name(keys[-1]), lambda fd: os.write(fd, text),
                              self.mode)
        finally:
            os.close(dir_fd)

    def unpin(self, name: str) -> bool:
        """Remove the pin named ``name``; False if there was none."""
        file_name = pin_file_name(name)
        try:
            dir_fd = self._open_directory(create=False)
        except FileNotFoundError:
            return False
        try:
            os.unlink(file_name, dir_fd=dir_fd)
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(dir_fd)

    def _open_directory(self, create: bool) -> int:
        """The pins directory, opened without following a link planted at its name.

        Raises:
            FileNotFoundError: it does not exist (``create`` False).
            OSError: ELOOP or ENOTDIR: something else than a directory holds its name.
        """
        if create:
            self.directory.parent.mkdir(parents=True, exist_ok=True)
        parent_fd = os.open(self.directory.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if create:
                try:
                    os.mkdir(PINS_DIR, dir_fd=parent_fd)
                except FileExistsError:
                    pass
            return os.open(PINS_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
        finally:
            os.close(parent_fd)

    def pins(self) -> list[Pin]:
        """Every readable pin of the namespace (unreadable pin files are logged and skipped)."""
        try:
            if not stat.S_ISDIR(os.lstat(self.directory).st_mode):
                logger.warning("%s is not a real directory: its pins are ignored", self.directory)
                return []
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            if key_of_pin(name) is None:  # a temporary, a stray name
                continue
            pin = _read_pin(self.directory / name)
            if pin is None:
                logger.warning("unreadable pin file %s ignored", self.directory / name)
            else:
                found.append(pin)
        return found

    def pinned_keys(self) -> set[str]:
        """Every chunk key that some pin protects."""
        return {key for pin in self.pins() for key in pin.keys}

    def pins_holding(self, key: str) -> list[Pin]:
        """The pins whose prefix contains ``key``."""
        return [pin for pin in self.pins() if key in pin.keys]


def _read_pin(path: Path) -> Pin | None:
    """The pin in ``path``, or None if it is not a well-formed pin file of that name.

    Pin files are writable by anyone who can write the cache directory: read
    without following a symlink, capped in size and nesting, typed strictly.
    """
    data = read_capped(path, _MAX_PIN_FILE)  # pin() writes none bigger: planted or damaged
    record = None if data is None else parse_json_object(data, _MAX_PIN_FILE, max_depth=2)
    if record is None:
        return None
    keys, note = record.get("keys"), record.get("note", "")
    pinned_at, host = record.get("pinned_at", 0.0), record.get("host", "")
    if not (isinstance(keys, list) and keys and isinstance(note, str) and isinstance(host, str)
            and type(pinned_at) in (int, float)):
        return None
    try:
        checked = tuple(check_key(k) for k in keys)
    except BadKeyError:
        return None
    if key_of_pin(path.name) != checked[-1]:
        return None
    return Pin(checked, note, float(pinned_at), host)
