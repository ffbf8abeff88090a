"""A Docker engine for the tests: the one that already answers, else a dockerd of the checkout's own.

The tests use Debian's ``docker.io`` (dockerd and CLI 20.10) and ``docker-compose`` 1.29,
which ``make test`` installs. A dockerd started here keeps everything under
``.cache/docker/`` of the checkout (data root, exec root, its own unix socket, its log), so
images and build caches survive between runs where a machine keeps ``.cache/``, and it is
stopped when the tests are done.

Example:
    >>> with docker_engine() as docker:  # doctest: +SKIP
    ...     docker.run("version")
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STATE_DIR = REPO / ".cache" / "docker"
DEFAULT_HOST = "unix:///var/run/docker.sock"
# Debian's docker.io CLI builds with BuildKit by itself; a newer CLI found first on PATH (such as
# a static Docker 2x in /usr/local/bin) refuses DOCKER_BUILDKIT=1 without its buildx plugin, and
# the Dockerfile's stages need BuildKit (the legacy builder would build the GPU stages too).
DOCKER_CLI = Path("/usr/bin/docker")
DOCKERD = Path("/usr/sbin/dockerd")
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 60.0
_UNIX_PATH_MAX = 107  # sun_path: dockerd's containerd socket lies under the exec root


class DockerError(RuntimeError):
    """Docker could not be reached or started; the message says what to do."""


class DockerUnavailable(DockerError):
    """This machine cannot run Docker for the tests (not installed, not root): a reason to skip."""


@dataclass(frozen=True)
class Docker:
    """One Docker engine, reached through ``DOCKER_HOST``, and the CLI that builds for it."""

    host: str
    cli_dir: Path
    """A folder whose ``docker`` is :data:`DOCKER_CLI`, put first on the children's PATH."""

    def env(self) -> dict[str, str]:
        """The environment for docker and docker-compose: this engine, BuildKit, the right CLI."""
        return {**os.environ, "DOCKER_HOST": self.host, "DOCKER_BUILDKIT": "1",
                "COMPOSE_DOCKER_CLI_BUILD": "1",
                "PATH": f"{self.cli_dir}{os.pathsep}{os.environ.get('PATH', '')}"}

    def run(self, *args: str, timeout_s: float = 120.0,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """``docker ARGS``; with ``check`` a failure raises with the command's last output."""
        done = subprocess.run([str(DOCKER_CLI), *args], env=self.env(), capture_output=True,
                              timeout=timeout_s, text=True)
        if check and done.returncode != 0:
            raise DockerError(f"docker {' '.join(args[:3])} ... failed ({done.returncode}):\n"
                              + (done.stderr or done.stdout)[-3000:])
        return done


def _cli_dir() -> Path:
    if not DOCKER_CLI.exists():
        raise DockerUnavailable(f"no Docker CLI at {DOCKER_CLI}: install Debian's docker.io "
                          "(apt-get install docker.io docker-compose, or run `make system-deps` as root)")
    folder = STATE_DIR / "bin"
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "docker"
    if not (link.is_symlink() and os.readlink(link) == str(DOCKER_CLI)):
        link.unlink(missing_ok=True)
        link.symlink_to(DOCKER_CLI)
    return folder


def answers(host: str, cli_dir: Path) -> bool:
    """Whether a Docker engine answers at ``host`` (within a few seconds)."""
    try:
        return Docker(host, cli_dir).run("version", "--format", "{{.Server.Version}}",
                                         timeout_s=15, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


class Dockerd:
    """A dockerd of this checkout: its data and exec roots and its socket under ``state_dir``."""

    def __init__(self, state_dir: Path = STATE_DIR, binary: Path = DOCKERD):
        self.state_dir = state_dir
        self.binary = binary
        self.socket = state_dir / "docker.sock"
        self.log_path = state_dir / "dockerd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def start(self, cli_dir: Path, timeout_s: float = START_TIMEOUT_S) -> Docker:
        """Start dockerd and wait until it answers.

        Raises:
            DockerError: not installed, not root, a path too long for a unix socket, or the
                daemon exited or stayed silent (the message quotes its log).
        """
        if not self.binary.exists():
            raise DockerUnavailable(f"no dockerd at {self.binary}: install Debian's docker.io "
                              "(apt-get install docker.io, or run `make system-deps` as root)")
        if os.geteuid() != 0:
            raise DockerUnavailable("dockerd needs root: run the tests as root, or start Docker "
                              "yourself and set DOCKER_HOST")
        exec_root = self.state_dir / "exec"
        containerd_socket = exec_root / "containerd" / "containerd.sock"
        if len(str(containerd_socket)) > _UNIX_PATH_MAX:
            raise DockerError(f"the checkout's path is too long for dockerd's sockets "
                              f"({containerd_socket}): clone it into a shorter path, or start "
                              "Docker yourself and set DOCKER_HOST")
        if answers(self.host, cli_dir):
            raise DockerError(f"a dockerd of this checkout already answers on {self.socket} (pid "
                              f"in {self.state_dir / 'dockerd.pid'}): stop it, or use it with "
                              f"DOCKER_HOST={self.host}")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)  # left by a daemon that was killed
        with open(self.log_path, "wb") as log:
            # --ip: published ports listen on loopback only; this daemon serves the tests alone.
            self.proc = subprocess.Popen(
                [str(self.binary), "--data-root", str(self.state_dir / "data"),
                 "--exec-root", str(exec_root), "-H", self.host,
                 "--pidfile", str(self.state_dir / "dockerd.pid"), "--ip", "127.0.0.1"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not answers(self.host, cli_dir):
            if self.proc.poll() is not None:
                raise DockerError(f"dockerd exited with code {self.proc.returncode} at start-up; "
                                  f"the end of {self.log_path}:\n{self.log_tail()}\n"
                                  "Fix what it names (another dockerd holding docker0 or the "
                                  f"socket, a full disk), or remove {self.state_dir} and retry.")
            if time.monotonic() > deadline:
                self.stop()
                raise DockerError(f"dockerd did not answer on {self.socket} within "
                                  f"{timeout_s:.0f} s; the end of {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.5)
        return Docker(self.host, cli_dir)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """TERM the daemon (it stops its containers and containerd), KILL it if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@contextlib.contextmanager
def docker_engine() -> Iterator[Docker]:
    """The Docker engine at ``$DOCKER_HOST`` (or the default socket) if one answers there, else a
    :class:`Dockerd` of this checkout, started for the block and stopped after it."""
    cli_dir = _cli_dir()
    if shutil.which("docker-compose") is None:
        raise DockerUnavailable("docker-compose is not installed (apt-get install docker-compose, "
                          "or run `make system-deps` as root)")
    existing = os.environ.get("DOCKER_HOST", DEFAULT_HOST)
    if answers(existing, cli_dir):
        yield Docker(existing, cli_dir)
        return
    daemon = Dockerd()
    try:
        yield daemon.start(cli_dir)
    finally:
        daemon.stop()
