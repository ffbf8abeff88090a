"""Build and load the CUDA kernels (block copy, device checksum) once per process.

The kernel sources live in the repository's top-level ``cuda/`` directory
(beside this package, which is installed editable). The first caller that
holds a CUDA tensor builds them with ``torch.utils.cpp_extension.load`` into a
build directory that later processes reuse (torch rebuilds only when a source
or a flag changes, and locks the directory while building, so several TP
workers may start at once). Whatever happens is logged once: the kernels'
origin on success, or one warning naming the reason and the torch fallback.

Environment:
    ``LMCACHE_FS_CUDA_BUILD_DIR``: where builds are cached (default
    ``$XDG_CACHE_HOME/lmcache_fs/torch-<version>``, i.e. under ``~/.cache``).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

BUILD_DIR_ENV = "LMCACHE_FS_CUDA_BUILD_DIR"
SOURCE_DIR = Path(__file__).resolve().parents[2] / "cuda"
SOURCES = ("bindings.cpp", "block_copy_kernels.cu", "word_sums_kernels.cu")
HEADERS = ("block_copy.h", "word_sums.h")
EXTENSION_NAME = "lmcache_fs_cuda"


def build_dir() -> Path:
    """The directory that caches compiled kernels (one per torch version)."""
    configured = os.environ.get(BUILD_DIR_ENV)
    if configured:
        return Path(configured)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "lmcache_fs" / f"torch-{torch.__version__}"


def _build() -> ModuleType:
    """Compile (or reuse) the extension; raises with the reason on any failure."""
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available to torch")
    missing = [name for name in (*SOURCES, *HEADERS) if not (SOURCE_DIR / name).is_file()]
    if missing:
        raise RuntimeError(f"kernel sources {missing} not found in {SOURCE_DIR} (the package is "
                           "not an editable install of the repository)")
    from torch.utils import cpp_extension

    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=EXTENSION_NAME,
        sources=[str(SOURCE_DIR / name) for name in SOURCES],
        extra_include_paths=[str(SOURCE_DIR)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "-lineinfo"],
        build_directory=str(directory),
        verbose=False,
    )


@functools.lru_cache(maxsize=None)
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
        module = _build()
    except Exception as exc:  # noqa: BLE001 - any build failure means "use the fallback"
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        logger.warning("CUDA kernels unavailable (%s); block copies use torch (one copy per "
                       "layer instead of one launch per chunk) and reads verify on the host",
                       reason)
        return None
    logger.info("CUDA kernels (block copy, device checksum) from %s ready in %.1f s (build cache %s)",
                SOURCE_DIR, time.perf_counter() - start, build_dir())
    return module
