"""Small filesystems for fault tests: a size-limited tmpfs, a read-only view, FUSE bind mounts.

Each is a context manager that skips the calling test, naming the reason,
where this machine does not allow it (not root, no mount permission, no FUSE).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
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


def _fuse_daemon(what: str, path: Path, *cmd: str) -> subprocess.Popen[bytes]:
    """A FUSE daemon run in the foreground, once its mount at ``path`` is up (else a skip)."""
    path.mkdir(parents=True, exist_ok=True)
    daemon = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not os.path.ismount(path):
        if daemon.poll() is not None or time.monotonic() > deadline:
            err = daemon.stderr.read().decode() if daemon.stderr else ""
            daemon.kill()
            pytest.skip(f"{what} did not mount {path}: {err.strip()}")
        time.sleep(0.05)
    return daemon


class FreezableView:
    """A FUSE view of a directory whose daemon a test can stop and start: a hung NFS server
    (SIGSTOP: every call on the mount blocks) or a dead one (SIGKILL: ENOTCONN at once)."""

    def __init__(self, source: Path, path: Path):
        if os.geteuid() != 0:
            pytest.skip("a FUSE view needs root to mount")
        if not os.path.exists("/dev/fuse") or shutil.which("bindfs") is None:
            pytest.skip("a FUSE view needs /dev/fuse and bindfs (Debian: apt-get install bindfs)")
        self.path = path
        # In the foreground (-f), so the daemon's pid is the child's; multithreaded as usual.
        self.daemon = _fuse_daemon("bindfs", path, "bindfs", "-f", str(source), str(path))

    def freeze(self) -> None:
        os.kill(self.daemon.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.daemon.poll() is None:  # (a killed daemon has nothing to thaw)
            os.kill(self.daemon.pid, signal.SIGCONT)

    def kill(self) -> None:
        """The daemon dies: every call on the mount fails with ENOTCONN until it is unmounted."""
        self.daemon.kill()
        self.daemon.wait(10)

    def close(self) -> None:
        if self.daemon.poll() is None:
            self.thaw()
            _unmount(self.path, fuse=True)
            self.daemon.wait(10)
        else:
            _run("fusermount", "-u", "-z", str(self.path))


class FailingView:
    """A FUSE view of a directory whose every call a test can make fail with one errno (a
    failing disk or server: EIO, ENOTCONN...) and then heal (see ``failing_fs.py``)."""

    def __init__(self, source: Path, path: Path):
        if os.geteuid() != 0:
            pytest.skip("a FUSE view needs root to mount")
        if not os.path.exists("/dev/fuse"):
            pytest.skip("a FUSE view needs /dev/fuse")
        try:
            import mfusepy  # noqa: F401  (the daemon's library: libfuse through ctypes)
        except (ImportError, OSError) as exc:  # OSError: no libfuse on this machine
            pytest.skip(f"a failing FUSE view needs mfusepy and libfuse (pip install mfusepy; "
                        f"Debian: apt-get install fuse3): {exc}")
        self.path = path
        self.switch = path.parent / f".{path.name}.failing"
        self.heal()
        self.daemon = _fuse_daemon("failing_fs.py", path, sys.executable,
                                   str(Path(__file__).with_name("failing_fs.py")), str(source),
                                   str(path), str(self.switch))

    def fail(self, code: int) -> None:
        """From now on every call on the mount fails with ``code`` (an errno)."""
        self.switch.write_text(errno.errorcode[code])

    def heal(self) -> None:
        self.switch.write_text("")

    def close(self) -> None:
        self.heal()
        _unmount(self.path, fuse=True)
        try:
            self.daemon.wait(10)
        except subprocess.TimeoutExpired:
            self.daemon.kill()


def failing_view(source: Path, path: Path) -> contextlib.closing[FailingView]:
    """``source`` through a FUSE mount at ``path`` whose calls the test can make fail."""
    return contextlib.closing(FailingView(source, path))


def freezable_view(source: Path, path: Path) -> contextlib.closing[FreezableView]:
    """``source`` through a FUSE mount at ``path`` that the test can freeze, thaw or kill."""
    return contextlib.closing(FreezableView(source, path))
