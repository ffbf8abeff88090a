"""Small filesystems for fault tests: a size-limited tmpfs, a read-only view, FUSE bind mounts.

Each is a context manager that skips the calling test, naming the reason,
where this machine does not allow it (not root, no mount permission, no FUSE).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def _mount_or_skip(what: str, *cmd: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root to mount")
    if shutil.which(cmd[0]) is None:
        pytest.skip(f"{what} needs {cmd[0]}, which is not installed")
    done = _run(*cmd)
    if done.returncode != 0:
        pytest.skip(f"{what}: {' '.join(cmd)} failed: {done.stderr.strip()}")


def _unmount(path: Path, fuse: bool = False) -> None:
    for attempt in range(50):  # a just-closed file can keep the mount busy for a moment
        if _run(*(["fusermount", "-u", str(path)] if fuse else ["umount", str(path)])).returncode == 0:
            return
        time.sleep(0.1)
    _run("umount", "-l", str(path))


@contextlib.contextmanager
def _mounted(what: str, path: Path, *cmd: str, fuse: bool = False) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    _mount_or_skip(what, *cmd)
    try:
        yield path
    finally:
        _unmount(path, fuse)


def tmpfs(path: Path, size: str = "8m") -> contextlib.AbstractContextManager[Path]:
    """A tmpfs of ``size`` at ``path``: a filesystem that fills up quickly."""
    return _mounted("a small filesystem", path, "mount", "-t", "tmpfs", "-o", f"size={size}",
                    "tmpfs", str(path))


@contextlib.contextmanager
def read_only_view(source: Path, path: Path) -> Iterator[Path]:
    """``source`` seen read-only at ``path`` (a read-only bind mount: EROFS even for root)."""
    with _mounted("a read-only view", path, "mount", "--bind", str(source), str(path)):
        done = _run("mount", "-o", "remount,bind,ro", str(path))
        if done.returncode != 0:
            pytest.skip(f"cannot make a bind mount read-only: {done.stderr.strip()}")
        yield path


def bindfs_view(source: Path, path: Path) -> contextlib.AbstractContextManager[Path]:
    """``source`` through its own FUSE mount: like one NFS client, it sees no other mount's events."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("FUSE is unavailable (/dev/fuse missing): cannot emulate two NFS clients")
    return _mounted("a FUSE view (two-node test)", path, "bindfs", str(source), str(path), fuse=True)
