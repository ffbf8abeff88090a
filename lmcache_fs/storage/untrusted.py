"""Reading small files that anyone with write access to the cache directory may have planted.

Leases, pins and namespace manifests are JSON files in the shared directory,
so their content is untrusted: a huge file, JSON nested deeply enough to
exhaust the parser's recursion (``RecursionError``, which is not a
``ValueError``), bytes that are not UTF-8, or the wrong types where numbers or
lists belong. Every such file must read as "no usable record", never raise
into a caller (a dead eviction thread, a crashed start-up).

Example:
    >>> parse_json_object(b'{"a": [1, 2]}', max_bytes=100, max_depth=3)
    {'a': [1, 2]}
    >>> parse_json_object(b"[" * 100_000, max_bytes=1 << 20, max_depth=3) is None
    True
"""

from __future__ import annotations

import json
import math
import os
import stat
from typing import Any

_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)


def read_capped(path: str | os.PathLike[str], max_bytes: int) -> bytes | None:
    """The bytes of the regular file at ``path``; None if missing, a symlink, or over ``max_bytes``.

    Opened with ``O_NOFOLLOW``: a planted symlink never makes us read another
    file (a FIFO, /dev/zero, a secret).
    """
    try:
        fd = os.open(path, os.O_RDONLY | _NO_FOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb", closefd=False) as file:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            data = file.read(max_bytes + 1)  # read(n) loops until n bytes or EOF
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if len(data) <= max_bytes else None


def parse_json_object(data: bytes, max_bytes: int, max_depth: int) -> dict[str, Any] | None:
    """A JSON object parsed from untrusted ``data``, or None if it is not one within the caps.

    Args:
        data: the raw bytes (must be UTF-8 JSON with an object at the top).
        max_bytes: longer input is refused before parsing.
        max_depth: the deepest nesting accepted (the top object is depth 1).

    NaN, Infinity and numbers beyond a float's range are refused too.
    """
    if len(data) > max_bytes:
        return None
    try:
        value = json.loads(data, parse_float=_finite_float, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    if not isinstance(value, dict) or _depth_exceeds(value, max_depth):
        return None
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as inf
        raise ValueError(f"number out of range: {text[:20]}")
    return value


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number a record may hold")


def _depth_exceeds(value: object, max_depth: int) -> bool:
    """True if containers nest deeper than ``max_depth`` (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: list[object] = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > max_depth:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False
