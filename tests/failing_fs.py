"""A FUSE view of a directory whose every call fails with one errno while a switch file names it.

Run as its own process (``python failing_fs.py SOURCE MOUNTPOINT SWITCH``): while
``SWITCH`` holds an errno's name (``EIO``, ``ENOTCONN``...), every operation on
the mount fails with it, as on a filesystem whose disk or server is failing;
empty or absent, the view passes every call through to ``SOURCE``. Unlike a
killed FUSE daemon, the mount comes back: a test sees the engine hit again.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from typing import Any, Callable, TypeVar

import mfusepy as fuse


OpT = TypeVar("OpT", bound=Callable[..., Any])


def _switchable(op: OpT) -> OpT:
    """The operation, or the switch's errno while it names one."""
    @functools.wraps(op)
    def call(self: "FailingPassthrough", *args: Any) -> Any:
        failing = self.failing()
        if failing:
            raise fuse.FuseOSError(failing)
        return op(self, *args)
    return call  # type: ignore[return-value]


class FailingPassthrough(fuse.Operations):
    """``root`` passed through, or one errno for everything while ``switch`` names it
    (all but ``release``: the daemon's own descriptors are closed either way)."""

    use_ns = True  # utimens gets nanoseconds

    def __init__(self, root: str, switch: str):
        self.root = root
        self.switch = switch

    def failing(self) -> int:
        try:
            with open(self.switch) as f:
                name = f.read().strip()
        except FileNotFoundError:
            return 0
        return getattr(errno, name, errno.EIO) if name else 0

    def _real(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    @_switchable
    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        st = os.lstat(self._real(path))
        attrs = {key: getattr(st, key) for key in (
            "st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks", "st_ino")}
        return attrs | {key: getattr(st, key + "_ns") for key in ("st_atime", "st_mtime", "st_ctime")}

    @_switchable
    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._real(path))]

    @_switchable
    def readlink(self, path: str) -> str:
        return os.readlink(self._real(path))

    @_switchable
    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self._real(path))
        return {key: getattr(st, key) for key in (
            "f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files",
            "f_flag", "f_frsize", "f_namemax")}

    @_switchable
    def access(self, path: str, amode: int) -> None:
        if not os.access(self._real(path), amode):
            raise fuse.FuseOSError(errno.EACCES)

    @_switchable
    def mkdir(self, path: str, mode: int) -> None:
        os.mkdir(self._real(path), mode)

    @_switchable
    def rmdir(self, path: str) -> None:
        os.rmdir(self._real(path))

    @_switchable
    def unlink(self, path: str) -> None:
        os.unlink(self._real(path))

    @_switchable
    def rename(self, old: str, new: str) -> None:
        os.rename(self._real(old), self._real(new))

    @_switchable
    def link(self, target: str, source: str) -> None:
        os.link(self._real(source), self._real(target))

    @_switchable
    def symlink(self, target: str, source: str) -> None:
        os.symlink(source, self._real(target))

    @_switchable
    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._real(path), mode)

    @_switchable
    def chown(self, path: str, uid: int, gid: int) -> None:
        os.lchown(self._real(path), uid, gid)

    @_switchable
    def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
        if times is None:
            os.utime(self._real(path), follow_symlinks=False)
        else:
            os.utime(self._real(path), ns=times, follow_symlinks=False)

    @_switchable
    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        if fh is None:
            os.truncate(self._real(path), length)
        else:
            os.ftruncate(fh, length)

    @_switchable
    def open(self, path: str, flags: int) -> int:
        return os.open(self._real(path), flags)

    @_switchable
    def create(self, path: str, mode: int, flags: int) -> int:
        return os.open(self._real(path), flags | os.O_CREAT, mode)

    @_switchable
    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    @_switchable
    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        return os.pwrite(fh, data, offset)

    @_switchable
    def flush(self, path: str, fh: int) -> None:
        pass

    @_switchable
    def fsync(self, path: str, datasync: int, fh: int) -> None:
        (os.fdatasync if datasync else os.fsync)(fh)

    def release(self, path: str, fh: int) -> None:
        os.close(fh)


if __name__ == "__main__":
    source, mountpoint, switch = sys.argv[1:4]
    # No attribute, entry or page caching: while failing, every call reaches this process.
    fuse.FUSE(FailingPassthrough(source, switch), mountpoint, foreground=True, nothreads=False,
              attr_timeout=0, entry_timeout=0, negative_timeout=0, direct_io=True)
