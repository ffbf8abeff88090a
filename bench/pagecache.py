"""Evict files from the page cache, so that a read measures the disk, not RAM.

Eviction is per file with ``posix_fadvise(POSIX_FADV_DONTNEED)`` after an
``fsync``: dirty pages cannot be dropped, so they are written first. Unlike
``echo 1 > /proc/sys/vm/drop_caches`` it needs no privilege and leaves other
processes' caches alone (other engineers run engines on this machine).

On a VM that hands free pages back to its host (virtio-balloon free page
reporting), the first touch of a page costs a host fault: 0.2-0.3 GB/s was
seen here, slower than the disk, so new page-cache pages would time the
hypervisor rather than the code. :func:`back_free_memory` touches and frees
memory just before a timed phase, so the page cache reuses backed pages.
"""

from __future__ import annotations

import mmap
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


def back_free_memory(nbytes: int) -> None:
    """Touch ``nbytes`` of fresh memory once, then free it (see the module docstring)."""
    page = mmap.PAGESIZE
    buf = bytearray(nbytes)  # calloc: untouched zero pages until written
    buf[::page] = b"\1" * len(range(0, nbytes, page))
    del buf


def page_reporting_order() -> int | None:
    """The order of free blocks this kernel reports to the host, or None if it does not."""
    try:
        return int(Path("/sys/module/page_reporting/parameters/page_reporting_order").read_text())
    except (OSError, ValueError):
        return None


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
