"""The CPU stack's test helpers on bad input: each failure says what is wrong and how to fix it.

Fast: nothing here builds an image or starts a stack (tests/test_compose_cpu.py does).
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
from base_image_standin import CA_BUNDLE_IN_IMAGE, derived_dockerfile, python_base_images
from compose_stack import (
    CPU_STACK,
    REPO,
    StackConfigError,
    check_ports_free,
    published_ports,
    read_env_file,
    stack_settings,
)
from docker_engine import DOCKERD, Dockerd, DockerError, DockerUnavailable


@pytest.fixture()
def checkout(tmp_path: Path) -> Path:
    """The compose files and .env of this checkout in a scratch directory."""
    for name in (*CPU_STACK, ".env"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    return tmp_path


def test_a_key_missing_from_dot_env_is_named_with_the_line_to_add(checkout: Path) -> None:
    # Without the check compose would publish the default port silently.
    env = checkout / ".env"
    env.write_text("".join(line + "\n" for line in env.read_text().splitlines()
                           if not line.startswith("ENGINE_B_PORT=")))
    with pytest.raises(StackConfigError, match=r"has no ENGINE_B_PORT.*add a line ENGINE_B_PORT="):
        stack_settings(CPU_STACK, {}, checkout / "stack.env", repo=checkout)


def test_a_missing_dot_env_says_how_to_restore_it(checkout: Path) -> None:
    (checkout / ".env").unlink()
    with pytest.raises(StackConfigError, match="git checkout .env"):
        stack_settings(CPU_STACK, {}, checkout / "stack.env", repo=checkout)


def test_overrides_win_over_dot_env_in_the_file_compose_reads(checkout: Path) -> None:
    settings = stack_settings(CPU_STACK, {"FRONTEND_PORT": "9999"}, checkout / "stack.env",
                              repo=checkout)
    assert read_env_file(checkout / "stack.env") == settings
    assert settings["FRONTEND_PORT"] == "9999" and settings["ENGINE_A_PORT"] == "8001"


def test_the_cpu_stack_publishes_the_four_engine_ports_and_the_page_from_dot_env() -> None:
    assert published_ports(CPU_STACK, read_env_file(REPO / ".env")) == {
        "ENGINE_A_PORT": 8001, "ENGINE_B_PORT": 8002, "ENGINE_C_PORT": 8003,
        "ENGINE_D_PORT": 8004, "FRONTEND_PORT": 8501}


def test_a_port_in_use_is_named_with_its_dot_env_key_and_the_fix() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(StackConfigError,
                           match=rf"port {port} \(FRONTEND_PORT in .env\) is in use.*set FRONTEND_PORT"):
            check_ports_free({"FRONTEND_PORT": port})


def test_a_port_that_is_not_a_number_says_so() -> None:
    with pytest.raises(StackConfigError, match="not a number"):
        published_ports(CPU_STACK, {**read_env_file(REPO / ".env"), "ENGINE_C_PORT": "80x"})


def test_no_dockerd_names_the_package_to_install(tmp_path: Path) -> None:
    with pytest.raises(DockerUnavailable, match="install Debian's docker.io"):
        Dockerd(tmp_path / "state", binary=tmp_path / "no-dockerd").start(tmp_path)


@pytest.mark.skipif(not DOCKERD.exists() or os.geteuid() != 0, reason="needs dockerd and root")
def test_a_dockerd_that_cannot_start_quotes_its_log_and_says_what_to_do(tmp_path: Path) -> None:
    # A data root that is a file: dockerd exits at once, before touching networks.
    state = tmp_path / "d"
    state.mkdir()
    (state / "data").write_text("not a directory")
    daemon = Dockerd(state)
    with pytest.raises(DockerError, match=r"(?s)dockerd exited with code \d+ at start-up.*"
                                          r"dockerd\.log.*data.*remove .* and retry"):
        daemon.start(tmp_path, timeout_s=60)
    assert daemon.proc is not None and daemon.proc.poll() is not None


def test_the_stand_ins_cover_every_python_base_the_dockerfile_names() -> None:
    assert python_base_images() == ["python:3.11-slim", "python:3.12-slim"]


def test_the_derived_image_carries_the_ca_bundle_the_wheels_and_drops_externally_managed(
        tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "torch-0-cp311-none-any.whl").write_bytes(b"wheel")
    context = tmp_path / "context"
    context.mkdir()
    dockerfile = derived_dockerfile(context, "rootfs:1", wheels).splitlines()
    assert dockerfile[0] == "FROM rootfs:1"
    assert dockerfile[1].endswith(f" {CA_BUNDLE_IN_IMAGE}")
    assert f"ENV PIP_FIND_LINKS={wheels}" in dockerfile
    assert (context / "files" / str(wheels).lstrip("/") / "torch-0-cp311-none-any.whl").read_bytes() == b"wheel"
    assert dockerfile[-1] == "RUN rm -f /usr/lib/python3*/EXTERNALLY-MANAGED"
    # Every file it copies is in the build context.
    for line in dockerfile:
        if line.startswith("COPY "):
            assert (context / line.split()[1]).exists(), line
