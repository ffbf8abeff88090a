"""LMCache 0.5.6 in a virtualenv of its own, created on first use.

LMCache pins numpy<=2.2.6 and pulls CuPy, so it cannot share lmcache-fs's
virtualenv. The venv lives at ``.bench-venv-lmcache/`` in the repository
(git-ignored). If it cannot be installed (no network, no wheel), the
benchmarks skip LMCache and say why in their results.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.common import REPO, WORK_DIR, progress

VENV = REPO / ".bench-venv-lmcache"
LMCACHE_VERSION = "0.5.6"
# The CPU torch that vLLM's CPU build uses too; pip finds a local wheel first where one exists.
TORCH_PIN = "torch==2.13.0"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
_CHECK = f"import lmcache, lmcache.lmcache_fs; assert lmcache.__version__ == '{LMCACHE_VERSION}'"


def venv_python() -> Path:
    """The LMCache venv's interpreter (it may not exist yet)."""
    return VENV / "bin" / "python"


def lmcache_installed() -> bool:
    """True if the LMCache venv exists and imports the pinned version."""
    python = venv_python()
    return python.exists() and subprocess.run([str(python), "-c", _CHECK], capture_output=True,
                                              check=False).returncode == 0


def ensure_lmcache() -> tuple[Path | None, str]:
    """Return (python, "") for a working LMCache venv, installing it if needed.

    Returns:
        ``(None, reason)`` if LMCache cannot be installed here; the reason
        names the log file with pip's output.
    """
    if lmcache_installed():
        return venv_python(), ""
    log = WORK_DIR / "lmcache-install.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    progress(f"installing LMCache {LMCACHE_VERSION} into {VENV} (a few minutes; log: {log})")
    pip = [str(venv_python()), "-m", "pip", "install", "-q", f"lmcache=={LMCACHE_VERSION}", TORCH_PIN]
    with log.open("w") as out:
        steps = [[sys.executable, "-m", "venv", str(VENV)], pip,
                 pip + ["--extra-index-url", TORCH_CPU_INDEX]]
        if subprocess.run(steps[0], stdout=out, stderr=subprocess.STDOUT, check=False).returncode:
            return None, f"could not create {VENV} (see {log})"
        # The first try uses pip's own configuration; the second adds PyTorch's CPU wheels.
        for attempt in steps[1:]:
            if subprocess.run(attempt, stdout=out, stderr=subprocess.STDOUT,
                              check=False).returncode == 0 and lmcache_installed():
                return venv_python(), ""
    return None, f"pip could not install lmcache=={LMCACHE_VERSION} with {TORCH_PIN} (see {log})"
