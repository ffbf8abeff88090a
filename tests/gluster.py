"""A GlusterFS volume on this machine: bricks standing for nodes' own disks, FUSE clients.

Debian's ``glusterfs-server`` runs on loopback: one ``glusterd``, a volume of
bricks in local directories, each client a FUSE mount of the volume (as each
node mounts it). A test can kill a brick (``kill -9`` of its ``glusterfsd``,
as a node that dies) and start it again. Skips the calling test, naming the
packages, where this machine cannot (not root, no FUSE, no GlusterFS).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from xml.etree import ElementTree

import pytest

PACKAGES = "glusterfs-server glusterfs-client"


def _gluster(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["gluster", "--mode=script", *args], capture_output=True, text=True,
                          timeout=120)
    if check and done.returncode != 0:
        raise RuntimeError(f"gluster {' '.join(args)}: {done.stdout}{done.stderr}")
    return done


class GlusterVolume:
    """A volume of ``bricks`` bricks (``distribute``, or ``replica 2``) and ``clients`` mounts."""

    def __init__(self, workdir: Path, name: str, bricks: int = 2, clients: int = 2,
                 replica: bool = False, ping_timeout_s: int = 2):
        if os.geteuid() != 0:
            pytest.skip("a GlusterFS volume needs root (glusterd, FUSE mounts)")
        if not os.path.exists("/dev/fuse"):
            pytest.skip("a GlusterFS volume needs FUSE (/dev/fuse)")
        for tool in ("glusterd", "gluster", "mount.glusterfs"):
            if shutil.which(tool) is None:
                pytest.skip(f"{tool} is not installed (Debian: apt-get install {PACKAGES})")
        self.name = name
        self.host = socket.gethostname()
        self._started_glusterd = self._ensure_glusterd()
        self.bricks = [workdir / f"brick{i}" for i in range(bricks)]
        self.clients = [workdir / f"client{i}" for i in range(clients)]
        for path in self.bricks + self.clients:
            path.mkdir(parents=True, exist_ok=True)
        kind = ["replica", str(bricks)] if replica else []
        _gluster("volume", "create", name, *kind,
                 *[f"{self.host}:{brick}" for brick in self.bricks], "force")
        # A stopped brick blocks every call for up to 2 x ping-timeout (default 42 s).
        _gluster("volume", "set", name, "network.ping-timeout", str(ping_timeout_s))
        _gluster("volume", "start", name)
        for client in self.clients:
            done = subprocess.run(["mount", "-t", "glusterfs", f"{self.host}:/{name}", str(client)],
                                  capture_output=True, text=True, timeout=60)
            if done.returncode != 0:
                self.close()
                pytest.skip(f"cannot mount the GlusterFS volume: {done.stderr.strip()}")

    @staticmethod
    def _ensure_glusterd() -> bool:
        if _gluster("volume", "list", check=False).returncode == 0:
            return False
        subprocess.run(["glusterd"], check=True, timeout=60)
        deadline = time.monotonic() + 30
        while _gluster("volume", "list", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("glusterd did not answer within 30 s")
            time.sleep(0.5)
        return True

    def brick_pids(self) -> dict[Path, int | None]:
        """Each brick's glusterfsd pid, None where it is not online."""
        status = ElementTree.fromstring(_gluster("volume", "status", self.name, "--xml").stdout)
        online = {node.findtext("path"): int(node.findtext("pid") or 0)
                  for node in status.iter("node") if node.findtext("status") == "1"}
        return {brick: online.get(str(brick)) or None for brick in self.bricks}

    def kill_brick(self, index: int) -> None:
        """The node holding brick ``index`` dies (its files answer ENOENT or ENOTCONN)."""
        pid = self.brick_pids()[self.bricks[index]]
        assert pid is not None, f"brick {index} is not online"
        os.kill(pid, signal.SIGKILL)

    def restart_bricks(self, timeout_s: float = 60) -> None:
        """Start every brick that is down again (``start force`` may say success without
        starting one: it is asked again until all are online)."""
        deadline = time.monotonic() + timeout_s
        while None in self.brick_pids().values():
            if time.monotonic() > deadline:
                raise RuntimeError(f"bricks still down after {timeout_s} s: {self.brick_pids()}")
            _gluster("volume", "start", self.name, "force", check=False)
            time.sleep(1.0)

    def close(self) -> None:
        for client in self.clients:
            subprocess.run(["umount", "-l", str(client)], capture_output=True, timeout=60)
        _gluster("volume", "stop", self.name, "force", check=False)
        _gluster("volume", "delete", self.name, check=False)
        if self._started_glusterd:
            subprocess.run(["pkill", "-x", "glusterd"], capture_output=True, timeout=30)
            subprocess.run(["pkill", "-x", "glusterfsd"], capture_output=True, timeout=30)


def dht_pointers(brick: Path) -> list[Path]:
    """Files on ``brick`` that are only DHT pointers to data on another brick (link-to files:
    empty, mode ``---------T``)."""
    found = []
    for path in brick.rglob("*"):
        if ".glusterfs" in path.parts:
            continue
        st = path.lstat()
        if path.is_file() and st.st_size == 0 and st.st_mode & 0o7777 == 0o1000:
            found.append(path)
    return found
