"""Log lines in the style vLLM users know, tagged ``LMCache-FS``.

    LMCache-FS INFO 11-22 16:35:00 [worker.py:120] hit 768/1002 tokens, loaded 94 MB in 8 ms (11.7 GB/s)
"""

from __future__ import annotations

import logging
import os

_FORMAT = "LMCache-FS %(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s"
LOG_LEVEL_ENV = "LMCACHE_FS_LOG_LEVEL"


def init_logging() -> logging.Logger:
    """Give the ``lmcache_fs`` logger its own handler once (level from $LMCACHE_FS_LOG_LEVEL)."""
    root = logging.getLogger("lmcache_fs")
    if not any(getattr(h, "_lmcache_fs", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%m-%d %H:%M:%S"))
        handler._lmcache_fs = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.setLevel(os.environ.get(LOG_LEVEL_ENV, "INFO").upper())
        root.propagate = False
    return root


def human_bytes(n: float) -> str:
    """``94 MB`` style sizes (decimal units, as bandwidth figures use)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") or n >= 100 else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
