"""The demo's compose stacks driven through docker-compose: settings, start, health, clean-up.

Settings come from the checkout's ``.env`` as a user's do. A test gets a copy of it with its
own values on top (free ports, a scratch KV_STORE_DIR, a token) through ``--env-file``, and a
project name of its own, so nothing it starts meets a user's stack.

Checked before anything starts, each with the fix in its message: every variable the compose
files use is set in ``.env`` (:func:`stack_settings`), and every host port they publish is free
(:func:`check_ports_free`).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from docker_engine import Docker, DockerError

REPO = Path(__file__).resolve().parent.parent
CPU_STACK = ("docker-compose.yml", "docker/compose.cpu.yml")
HEALTH_POLL_S = 2.0


class StackConfigError(ValueError):
    """The stack's settings cannot work; the message names the setting and the fix."""


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=value`` lines of a compose ``.env`` file (a later line wins, as in compose)."""
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def compose_variables(files: Sequence[str], repo: Path = REPO) -> set[str]:
    """Every ``${NAME...}`` the compose files interpolate."""
    return {name for f in files for name in re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", (repo / f).read_text())}


def stack_settings(files: Sequence[str], overrides: Mapping[str, str], env_file: Path,
                   repo: Path = REPO) -> dict[str, str]:
    """``.env``'s settings with ``overrides`` on top, written to ``env_file`` for ``--env-file``.

    Raises:
        StackConfigError: ``.env`` lacks a variable the compose files use (a default would then
            apply silently, which is never what an edited ``.env`` meant).
    """
    source = repo / ".env"
    if not source.exists():
        raise StackConfigError(f"{source} is missing: restore it with `git checkout .env`")
    values = read_env_file(source)
    missing = sorted(compose_variables(files, repo) - set(values))
    if missing:
        raise StackConfigError(f"{source} has no {', '.join(missing)}, which "
                               f"{' and '.join(files)} use: add a line {missing[0]}=... for each "
                               "(`git show HEAD:.env` has every default)")
    values.update(overrides)
    env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return values


def published_ports(files: Sequence[str], settings: Mapping[str, str],
                    repo: Path = REPO) -> dict[str, int]:
    """Host port per ``.env`` key (``ENGINE_A_PORT`` ...) of every ``"${KEY...}:PORT"`` mapping."""
    keys = {key for f in files
            for key in re.findall(r'"\$\{([A-Z_]+_PORT)[^}]*\}:\d+"', (repo / f).read_text())}
    try:
        return {key: int(settings[key]) for key in sorted(keys)}
    except ValueError as exc:
        raise StackConfigError(f"a port in .env is not a number ({exc}): set it to a free TCP "
                               "port") from None


def check_ports_free(ports: Mapping[str, int]) -> None:
    """Raise :class:`StackConfigError` naming the first host port something already listens on."""
    for key, port in ports.items():
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                raise StackConfigError(f"port {port} ({key} in .env) is in use: stop what "
                                       f"listens there, or set {key} to a free port in .env") from None


class ComposeStack:
    """One docker-compose project of the given files, with its own name and settings file."""

    def __init__(self, docker: Docker, project: str, files: Sequence[str], env_file: Path,
                 repo: Path = REPO):
        self.docker = docker
        self.project = project
        self.files = files
        self.env_file = env_file
        self.repo = repo

    def _run(self, args: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
        cmd = ["docker-compose", "--project-directory", str(self.repo), "-p", self.project,
               "--env-file", str(self.env_file)]
        for f in self.files:
            cmd += ["-f", str(self.repo / f)]
        try:
            return subprocess.run([*cmd, *args], cwd=self.repo, env=self.docker.env(),
                                  capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise DockerError(f"docker-compose {' '.join(args)} did not finish in "
                              f"{timeout_s:.0f} s") from None

    def compose(self, *args: str, timeout_s: float = 300.0) -> str:
        """``docker-compose ARGS`` on this project; raises with its output's end on failure."""
        done = self._run(args, timeout_s)
        if done.returncode != 0:
            raise DockerError(f"docker-compose {' '.join(args)} failed ({done.returncode}):\n"
                              + (done.stderr + done.stdout)[-4000:])
        return done.stdout

    def container(self, service: str) -> str:
        """The id of the service's container (raises if it has none)."""
        ids = self.compose("ps", "-q", service, timeout_s=60).split()
        if not ids:
            raise DockerError(f"{service} has no container in project {self.project}")
        return ids[0]

    def inspect(self, service: str) -> dict:
        """``docker inspect`` of the service's container."""
        return json.loads(self.docker.run("inspect", self.container(service)).stdout)[0]

    def environment(self, service: str) -> dict[str, str]:
        """The environment the service's container was started with."""
        return dict(e.split("=", 1) for e in self.inspect(service)["Config"]["Env"])

    def wait_healthy(self, services: Sequence[str], timeout_s: float) -> float:
        """Seconds until every service's health check passed.

        Raises:
            DockerError: a container exited, restarted, went unhealthy, or time ran out; the
                message ends with that container's last log lines.
        """
        start = time.monotonic()
        waiting = list(services)
        while waiting:
            for service in list(waiting):
                container = self.inspect(service)
                state = container["State"]
                health = (state.get("Health") or {}).get("Status", "")
                if health == "healthy":
                    waiting.remove(service)
                elif (not state["Running"] or state.get("Restarting") or health == "unhealthy"
                      or container["RestartCount"]):  # `restart: unless-stopped` hides a crash
                    raise DockerError(f"{service} is {state['Status']} ({health or 'no health'}, "
                                      f"exit code {state['ExitCode']}, restarted "
                                      f"{container['RestartCount']} times):\n{self.log_tail(service)}")
            if waiting and time.monotonic() - start > timeout_s:
                raise DockerError(f"not healthy after {timeout_s:.0f} s: {', '.join(waiting)}\n"
                                  + self.log_tail(waiting[0]))
            if waiting:
                time.sleep(HEALTH_POLL_S)
        return time.monotonic() - start

    def log_tail(self, service: str, lines: int = 30) -> str:
        """The service's last log lines (for error messages: never raises)."""
        try:
            return self._run(["logs", "--no-color", "--tail", str(lines), service], 60).stdout[-6000:]
        except DockerError as exc:
            return f"(no logs: {exc})"

    def save_logs(self, path: Path) -> None:
        """Every service's whole log into ``path`` (kept as a test artifact)."""
        path.write_text(self.compose("logs", "--no-color", timeout_s=120))
