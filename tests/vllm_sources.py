"""The Python sources of a published vLLM release: downloaded once, never installed.

``pip download --no-deps vllm==X`` fetches the release's wheel (about 240-340 MB);
only its ``vllm/**/*.py`` files are kept, under ``.cache/vllm-sources/X/``, and the
wheel is deleted. The contract test reads them with ``ast``: nothing is imported.
"""

from __future__ import annotations

import ast
import functools
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "vllm-sources"
_COMPLETE = ".complete"  # written last: a half-unpacked release is unpacked again
# vLLM publishes one abi3 wheel per platform; the sources are the same in each, and naming one
# makes the download the same on every machine (an aarch64 CI host included).
_PLATFORM = "manylinux_2_28_x86_64"


def release_sources(version: str) -> Path:
    """The folder holding ``vllm/`` of release ``version``, downloaded and unpacked if needed.

    Raises:
        RuntimeError: pip could not download the wheel (pip's output included).
    """
    root = CACHE / version
    if (root / _COMPLETE).exists():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix=f".{version}.") as tmp:
        download = Path(tmp) / "wheel"
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--platform", _PLATFORM, "--quiet", f"vllm=={version}", "-d", str(download)],
            capture_output=True, text=True, timeout=1800)
        wheels = sorted(download.glob("vllm-*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"pip download vllm=={version} failed:\n{done.stdout}{done.stderr}")
        unpacked = Path(tmp) / "sources"
        with zipfile.ZipFile(wheels[0]) as wheel:
            for name in wheel.namelist():
                if name.startswith("vllm/") and name.endswith(".py"):
                    wheel.extract(name, unpacked)
        (unpacked / _COMPLETE).write_text(wheels[0].name + "\n")
        shutil.rmtree(root, ignore_errors=True)
        unpacked.rename(root)
    return root


class ReleaseSources:
    """One release's modules, parsed on demand."""

    def __init__(self, version: str, root: Path):
        self.version = version
        self.root = root

    def path_of(self, module: str) -> Path | None:
        """The file of dotted ``module`` (a package's ``__init__.py``), or None."""
        base = self.root.joinpath(*module.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    @functools.lru_cache(maxsize=None)
    def tree(self, module: str) -> ast.Module | None:
        path = self.path_of(module)
        return ast.parse(path.read_text(), str(path)) if path else None

    def source(self, module: str) -> str:
        path = self.path_of(module)
        assert path is not None, f"vLLM {self.version} has no module {module}"
        return path.read_text()
