"""Logging: through vLLM's own setup inside vLLM, a vLLM-style stderr handler elsewhere.

Inside vLLM (the connector) lmcache-fs records go to the handlers vLLM gave its
``vllm`` logger: the same format, stream (stdout by default) and level, and
whatever ``VLLM_LOGGING_CONFIG_PATH`` configures. A config that names the
``lmcache_fs`` logger itself is left as it is; with ``VLLM_CONFIGURE_LOGGING=0``
the records propagate to the application's root logger. The CLI and the gc
daemon have a handler of their own on stderr, tagged ``LMCache-FS``:

    LMCache-FS INFO 11-22 16:35:00 [exporter.py:160] serving /metrics and /health on ...

``LMCACHE_FS_LOG_LEVEL`` sets lmcache-fs' level in both cases (inside vLLM, a level
below ``VLLM_LOGGING_LEVEL`` also needs that one lowered: vLLM's handler filters too).

Sizes are written by :func:`human_bytes` in decimal units (``94.0 MB``, ``1.2 GB``), as
vLLM's logs and every bandwidth figure (GB/s) are: one convention for logs and CLI.
"""

from __future__ import annotations

import logging
import os

_FORMAT = "LMCache-FS %(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s"
LOG_LEVEL_ENV = "LMCACHE_FS_LOG_LEVEL"


class _ToVllm(logging.Handler):
    """Hands each record to the ``vllm`` logger's handlers, whatever they are at the time
    (vLLM may configure logging again after the connector was built)."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger("vllm").handle(record)


def _ours(handler: logging.Handler) -> bool:
    return isinstance(handler, _ToVllm) or getattr(handler, "_lmcache_fs", False)


def init_logging(inside_vllm: bool = False) -> logging.Logger:
    """Set up the ``lmcache_fs`` logger once per process (see the module docstring).

    Args:
        inside_vllm: True in the connector: use vLLM's logging setup.
    """
    root = logging.getLogger("lmcache_fs")
    if any(not _ours(h) for h in root.handlers):
        return root  # configured by the user (e.g. VLLM_LOGGING_CONFIG_PATH): theirs
    level = os.environ.get(LOG_LEVEL_ENV, "").upper()
    if inside_vllm:
        for handler in root.handlers:
            root.removeHandler(handler)
        vllm = logging.getLogger("vllm")
        if vllm.handlers:
            root.addHandler(_ToVllm())
            root.setLevel(level or vllm.getEffectiveLevel())
            root.propagate = False
        else:  # vLLM leaves logging to the application
            root.setLevel(level or logging.NOTSET)
            root.propagate = True
    elif not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%m-%d %H:%M:%S"))
        handler._lmcache_fs = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.setLevel(level or "INFO")
        root.propagate = False
    return root


def human_bytes(n: float) -> str:
    """``94.0 MB`` style sizes: decimal units (1 GB = 10**9 bytes), as GB/s figures use."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") or n >= 100 else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
