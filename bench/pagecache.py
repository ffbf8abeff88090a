"""Evict files from the page cache, so that a read measures the disk, not RAM.

Eviction is per file with ``posix_fadvise(POSIX_FADV_DONTNEED)`` after an
``fsync``: dirty pages cannot be dropped, so they are written first. Unlike
``echo 1 > /proc/sys/vm/drop_caches`` it needs no privilege and leaves other
processes' caches alone (other engineers run engines on this machine).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Iterable

METHOD = "per-file posix_fadvise(POSIX_FADV_DONTNEED) after fsync"


def write_back(paths: Iterable[str | os.PathLike[str]]) -> None:
    """fsync each file: its pages stay cached but clean, so no writeback runs later."""
    _each_fd(paths, os.fsync)


def evict(paths: Iterable[str | os.PathLike[str]]) -> None:
    """Write back and drop the cached pages of each file."""
    def drop(fd: int) -> None:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    _each_fd(paths, drop)


def _each_fd(paths: Iterable[str | os.PathLike[str]], action: Callable[[int], None]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            action(fd)
        finally:
            os.close(fd)


def files_under(directory: str | os.PathLike[str]) -> list[Path]:
    """Every regular file below ``directory`` (the files a backend wrote)."""
    return [Path(root) / name for root, _, names in os.walk(directory) for name in names]


def resident_fraction(path: str | os.PathLike[str]) -> float | None:
    """Fraction of ``path``'s pages in the page cache (util-linux ``fincore``), or None."""
    if shutil.which("fincore") is None:
        return None
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES,SIZE",
                          str(path)], capture_output=True, text=True, check=False).stdout.split()
    if len(out) != 2 or not out[1].isdigit() or int(out[1]) == 0:
        return None
    return int(out[0]) / int(out[1])
