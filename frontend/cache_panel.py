"""What the shared cache directory holds: namespaces, chunk files and bytes.

Counts through :mod:`lmcache_fs.ops.inventory`, the API the ``lmcache-fs`` CLI
uses, so the panel shows exactly what ``lmcache-fs ls`` would (published chunk
files; temporaries and stray files are not counted).

Example:
    >>> summarize_cache("/nonexistent").visible
    False
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from lmcache_fs.ops.inventory import NamespaceSummary, namespace_dirs, summarize_namespace
from lmcache_fs.storage.layout import Namespace
from lmcache_fs.storage.manifest import read_manifest


@dataclass(frozen=True)
class PanelRow:
    """One namespace directory as the panel shows it: ``lmcache-fs ls``'s line plus a note."""

    summary: NamespaceSummary
    note: str = ""
    """Why the chunks were not counted (unreadable or mismatched manifest), else empty."""


@dataclass(frozen=True)
class CacheSummary:
    root: str
    visible: bool
    namespaces: tuple[PanelRow, ...] = ()

    @property
    def chunks(self) -> int:
        return sum(row.summary.chunks for row in self.namespaces)

    @property
    def bytes(self) -> int:
        return sum(row.summary.bytes for row in self.namespaces)


def _summarize_namespace(directory: Path) -> PanelRow:
    fields = read_manifest(directory)
    if fields is None:
        return PanelRow(NamespaceSummary(directory.name, "?", 0, 0, None, 0),
                        "no readable namespace.json")
    if Namespace(fields).name != directory.name:
        return PanelRow(NamespaceSummary(directory.name, str(fields.get("model", "?")), 0, 0, None, 0),
                        "namespace.json does not match the directory name")
    return PanelRow(summarize_namespace(directory))  # the same count as `lmcache-fs ls`


def summarize_cache(root: str | os.PathLike[str]) -> CacheSummary:
    """Count chunk files and bytes per namespace under ``root`` (never raises on a bad tree)."""
    path = Path(root)
    try:
        if not path.is_dir():
            return CacheSummary(str(path), False)
        return CacheSummary(str(path), True,
                            tuple(_summarize_namespace(d) for d in namespace_dirs(path)))
    except OSError:
        return CacheSummary(str(path), False)


def wait_for_new_chunks(root: str | os.PathLike[str], before: int, timeout_s: float = 30.0,
                        settle_s: float = 1.0) -> int:
    """Wait until chunk files stop appearing under ``root`` (a writer finished publishing).

    Returns how many chunk files are new since the count ``before`` (0 after
    ``timeout_s`` if none appeared).
    """
    deadline = time.monotonic() + timeout_s
    count, stable_since = before, time.monotonic()
    while time.monotonic() < deadline:
        now = summarize_cache(root).chunks
        if now != count:
            count, stable_since = now, time.monotonic()
        elif count > before and time.monotonic() - stable_since >= settle_s:
            break
        time.sleep(0.2)
    return count - before
