"""How chunk data reaches GPU memory: the read paths, and the one choice between them.

Three read paths, chosen once per process by :func:`choose_read_backend`:

``kvikio-gds``
    kvikio with GPUDirect Storage: the file's data (4096-aligned, see
    :mod:`lmcache_fs.storage.codec`) is DMA'd straight into a cuFile-registered GPU
    staging slot.
``kvikio-posix``
    kvikio's compatibility mode: its own thread pool reads through pinned
    bounce buffers into the same GPU slot (what kvikio does where GDS is not
    supported: containers without ``/run/udev``, overlayfs, NFS over TCP).
``posix``
    one ``preadv`` into a pinned host slot (a plain host slot on a CPU
    device), then on CUDA a host-to-device copy. Always available; the fallback
    whenever kvikio or CUDA is missing.

kvikio is probed once per process; a failed probe under ``use_gds: auto``
falls back to ``posix`` with one warning that names the reason.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
from dataclasses import dataclass
from types import ModuleType

import torch

from lmcache_fs.config import TriState

logger = logging.getLogger(__name__)

KVIKIO_THREADS_ENV = "KVIKIO_NTHREADS"  # kvikio's own variable: when set, we leave it alone


class ReadPath(str, enum.Enum):
    """How chunk data reaches GPU memory."""

    GDS = "kvikio-gds"
    KVIKIO_POSIX = "kvikio-posix"
    POSIX = "posix"


@dataclass(frozen=True)
class ReadBackend:
    """A read path and, for the kvikio paths, the imported kvikio module."""

    path: ReadPath
    kvikio: ModuleType | None = None


class GdsUnavailableError(RuntimeError):
    """``use_gds: true`` was asked for, but GPUDirect Storage cannot be used here."""


def kvikio_threads() -> int:
    """Threads for kvikio's pool: enough to keep a fast disk busy (its default is 1)."""
    return min(16, max(4, os.cpu_count() or 4))


def probe_kvikio() -> tuple[ModuleType, bool]:
    """Import kvikio, size its thread pool, and say whether GDS is active.

    Raises:
        Exception: with the reason whenever kvikio cannot read into this GPU
            (no CUDA device, kvikio or libkvikio/libcufile not importable).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device")  # every kvikio read needs libcuda
    import kvikio
    import kvikio.defaults

    if KVIKIO_THREADS_ENV not in os.environ:
        kvikio.defaults.set("num_threads", kvikio_threads())
    return kvikio, not kvikio.defaults.is_compat_mode_preferred()


def kvikio_backend() -> ReadBackend:
    """kvikio on its best path here: GDS where cuFile works, else its POSIX mode.

    Raises:
        Exception: as :func:`probe_kvikio`, whenever kvikio cannot read into this GPU.
    """
    kvikio, gds = probe_kvikio()
    return ReadBackend(ReadPath.GDS if gds else ReadPath.KVIKIO_POSIX, kvikio)


@functools.lru_cache(maxsize=None)
def _probe_once() -> ReadBackend | str:
    try:
        return kvikio_backend()
    except Exception as exc:  # noqa: BLE001 - any failure means "no kvikio"
        return f"{type(exc).__name__}: {exc}"


@functools.lru_cache(maxsize=None)
def _log_once(level: int, message: str) -> None:
    logger.log(level, message)


def choose_read_backend(use_gds: TriState, device: torch.device) -> ReadBackend:
    """Pick the read path for ``device`` from the ``use_gds`` setting (probed once per process).

    ``auto``: GDS where kvikio reports it, kvikio's POSIX mode where kvikio
    loads without GDS, else the POSIX reader with one warning that names the
    reason. ``false``: always the POSIX reader. ``true``: GDS or an error.
    A CPU device always reads with POSIX (there is nothing to transfer).

    Raises:
        GdsUnavailableError: ``use_gds`` is ``true`` and GDS is not usable.
    """
    if device.type != "cuda":
        return ReadBackend(ReadPath.POSIX)
    if use_gds is TriState.FALSE:
        _log_once(logging.INFO, "chunk reads: POSIX into pinned host memory + async H2D copy "
                                "(use_gds=false)")
        return ReadBackend(ReadPath.POSIX)
    probed = _probe_once()
    if isinstance(probed, str):
        if use_gds is TriState.TRUE:
            raise GdsUnavailableError(f"use_gds=true but kvikio is unavailable ({probed}); "
                                      "install kvikio with libcufile, or set use_gds to auto")
        _log_once(logging.WARNING, f"chunk reads: kvikio unavailable ({probed}); using POSIX "
                                   "reads into pinned host memory + async H2D copies")
        return ReadBackend(ReadPath.POSIX)
    gds = probed.path is ReadPath.GDS
    if use_gds is TriState.TRUE and not gds:
        raise GdsUnavailableError("use_gds=true but kvikio found no usable cuFile driver (it "
                                  "would run in POSIX compatibility mode); set use_gds to auto")
    kvikio = probed.kvikio
    assert kvikio is not None  # a kvikio path always carries the module
    _log_once(logging.INFO, f"chunk reads: kvikio {kvikio.__version__}, "
                            f"{'GPUDirect Storage' if gds else 'POSIX compatibility mode'}, "
                            f"{kvikio.defaults.get('num_threads')} threads")
    return probed
