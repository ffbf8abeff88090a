"""Build and load the CUDA kernels (block copy, device checksum) once per process.

The kernel sources ship inside the package as ``lmcache_fs.cuda`` (the
repository's top-level ``cuda/`` directory, mapped by pyproject.toml), so a
wheel and an editable install find them the same way, through
:mod:`importlib.resources`.

Compiled kernels are cached per torch version and CUDA version, one directory
per GPU architecture or prebuilt set, each with a ``build.json`` that says what
it was built from and for::

    $LMCACHE_FS_CUDA_BUILD_DIR/torch-2.11.0+cu130-cuda-13.0/sm_90/     (built here)
    $LMCACHE_FS_CUDA_BUILD_DIR/torch-2.11.0+cu130-cuda-13.0/prebuilt/  (python -m lmcache_fs.gpu.kernels)

The first caller holding a CUDA tensor loads the first cached build whose
sources, torch, CUDA and architectures match (no compiler needed: the image
ships one built in its build stage), else compiles with
``torch.utils.cpp_extension.load`` for this GPU (torch locks the directory while
building, so several TP workers may start at once). Whatever happens is logged
once: where the kernels came from, or one warning naming the reason and the
torch fallback.

Environment:
    ``LMCACHE_FS_CUDA_BUILD_DIR``: the cache's root (default
    ``$XDG_CACHE_HOME/lmcache_fs/cuda-kernels``, i.e. under ``~/.cache``).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import json
import logging
import os
import time
from importlib import resources
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

BUILD_DIR_ENV = "LMCACHE_FS_CUDA_BUILD_DIR"
SOURCE_PACKAGE = "lmcache_fs.cuda"
SOURCES = ("bindings.cpp", "block_copy_kernels.cu", "word_sums_kernels.cu")
HEADERS = ("block_copy.h", "word_sums.h")
EXTENSION_NAME = "lmcache_fs_cuda"
PREBUILT = "prebuilt"
BUILD_INFO = "build.json"
CFLAGS = ("-O3",)
CUDA_CFLAGS = ("-O3", "-lineinfo")


def source_dir() -> Path:
    """The installed package's directory of kernel sources (site-packages, or the checkout if editable)."""
    try:
        return Path(str(resources.files(SOURCE_PACKAGE)))
    except ModuleNotFoundError:
        raise RuntimeError(f"the kernel sources ({SOURCE_PACKAGE}) are not installed: install "
                           "lmcache-fs (pip install . or pip install -e .); a checkout on "
                           "PYTHONPATH alone does not map cuda/ into the package") from None


def sources_digest(directory: Path) -> str:
    """A hash of the sources and compiler flags: a cached build is reused only if it matches."""
    digest = hashlib.sha256(json.dumps([CFLAGS, CUDA_CFLAGS]).encode())
    for name in (*SOURCES, *HEADERS):
        digest.update(name.encode() + b"\0" + (directory / name).read_bytes())
    return digest.hexdigest()[:16]


def build_root() -> Path:
    """Where builds are cached: ``LMCACHE_FS_CUDA_BUILD_DIR``, else under ``~/.cache``."""
    configured = os.environ.get(BUILD_DIR_ENV)
    if configured:
        return Path(configured)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "lmcache_fs" / "cuda-kernels"


def build_dir(arch: str) -> Path:
    """The cache directory of one build: this torch, this CUDA, ``arch`` (``sm_90`` or ``prebuilt``)."""
    return build_root() / f"torch-{torch.__version__}-cuda-{torch.version.cuda}" / arch


def _covers(arch_list: str, capability: tuple[int, int]) -> bool:
    """Whether code built for TORCH_CUDA_ARCH_LIST ``arch_list`` runs on ``capability``.

    Exact machine code (``9.0``), or PTX (``8.0+PTX``) from an older or equal
    architecture, which the driver compiles for newer GPUs.
    """
    for entry in arch_list.replace(";", " ").split():
        version, _, ptx = entry.partition("+")
        major, _, minor = version.partition(".")
        built = (int(major), int(minor or 0))
        if built == capability or (ptx == "PTX" and built <= capability):
            return True
    return False


def _import_built(directory: Path) -> ModuleType:
    path = directory / f"{EXTENSION_NAME}.so"
    spec = importlib.util.spec_from_file_location(EXTENSION_NAME, path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def find_cached(capability: tuple[int, int], digest: str) -> Path | None:
    """A cached build of these sources for this torch and CUDA that runs on ``capability``."""
    parent = build_dir(PREBUILT).parent
    candidates = [parent / f"sm_{capability[0]}{capability[1]}", parent / PREBUILT]
    for directory in candidates:
        try:
            info = json.loads((directory / BUILD_INFO).read_text())
        except (OSError, ValueError):
            continue
        if (info.get("sources") == digest and (directory / f"{EXTENSION_NAME}.so").is_file()
                and _covers(str(info.get("arch_list", "")), capability)):
            return directory
    return None


def compile_kernels(directory: Path, arch_list: str, sources: Path) -> ModuleType:
    """Compile the extension into ``directory`` for ``arch_list`` and record what it was built for.

    Needs nvcc (CUDA_HOME) and ninja, not a GPU: the image's build stage calls it
    with a list of architectures.
    """
    from torch.utils import cpp_extension

    missing = [name for name in (*SOURCES, *HEADERS) if not (sources / name).is_file()]
    if missing:
        raise RuntimeError(f"kernel sources {missing} not found in {sources} (the package "
                           f"{SOURCE_PACKAGE} is incomplete: reinstall lmcache-fs, or use an "
                           "editable install of the repository)")
    directory.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list  # what torch compiles for, read at build time
    try:
        module = cpp_extension.load(
            name=EXTENSION_NAME,
            sources=[str(sources / name) for name in SOURCES],
            extra_include_paths=[str(sources)],
            extra_cflags=list(CFLAGS),
            extra_cuda_cflags=list(CUDA_CFLAGS),
            build_directory=str(directory),
            verbose=False,
        )
    finally:
        if previous is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = previous
    info = {"sources": sources_digest(sources), "arch_list": arch_list,
            "torch": torch.__version__, "cuda": torch.version.cuda}
    (directory / BUILD_INFO).write_text(json.dumps(info, indent=1) + "\n")
    return module


def _load() -> tuple[ModuleType, str]:
    """The extension and where it came from; raises with the reason on any failure."""
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available to torch")
    sources = source_dir()
    capability = torch.cuda.get_device_capability()
    cached = find_cached(capability, sources_digest(sources)) if sources.is_dir() else None
    if cached is not None:
        return _import_built(cached), f"cached build {cached}"
    directory = build_dir(f"sm_{capability[0]}{capability[1]}")
    module = compile_kernels(directory, f"{capability[0]}.{capability[1]}", sources)
    return module, f"built from {sources} into {directory}"


@functools.cache
def load_cuda_kernels() -> ModuleType | None:
    """The compiled kernels, or None when they cannot be had (logged once either way).

    Called lazily by :mod:`lmcache_fs.transfer.block_copy` and
    :mod:`lmcache_fs.gpu.device_checksum` the first time they see a CUDA tensor, so
    CPU-only processes never compile anything. A failure (no CUDA, no sources,
    no compiler, a compile error) is never raised: the callers fall back, the
    block copy to the pure-torch copy (correct, but two copies per layer
    instead of one launch per chunk), reads to verifying on the host.
    """
    start = time.perf_counter()
    try:
        module, origin = _load()
    except Exception as exc:  # noqa: BLE001 - any build failure means "use the fallback"
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        logger.warning("CUDA kernels unavailable (%s); block copies use torch (one copy per "
                       "layer instead of one launch per chunk) and reads verify on the host",
                       reason)
        return None
    logger.info("CUDA kernels (block copy, device checksum): %s, ready in %.1f s",
                origin, time.perf_counter() - start)
    return module


def main(argv: list[str] | None = None) -> None:
    """Prebuild the kernels without a GPU (the image's build stage): ``python -m lmcache_fs.gpu.kernels``."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--arch-list", default=os.environ.get("TORCH_CUDA_ARCH_LIST"),
                        required="TORCH_CUDA_ARCH_LIST" not in os.environ,
                        help="GPU architectures, as TORCH_CUDA_ARCH_LIST (e.g. '8.0 9.0 10.0+PTX')")
    args = parser.parse_args(argv)
    directory = build_dir(PREBUILT)
    start = time.perf_counter()
    compile_kernels(directory, args.arch_list, source_dir())
    print(f"lmcache-fs CUDA kernels for {args.arch_list} built into {directory} "
          f"in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
