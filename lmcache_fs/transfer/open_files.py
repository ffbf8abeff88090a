"""The process's limit on open files, lifted once when a worker starts.

A layer-wise load keeps each chunk of a step open from its first layer to its
last (two descriptors each: the file and its fan-out directory), so a long
prompt loaded in one step can hold more than the common soft limit of 1024.
vLLM lifts the limit only in its API server, after the engine processes have
started.
"""

from __future__ import annotations

import logging
import resource

logger = logging.getLogger(__name__)

TARGET_OPEN_FILES = 65536
"""Descriptors enough for a step of 32k chunks; no more is asked of the hard limit."""


def raise_open_files_limit(target: int = TARGET_OPEN_FILES) -> int:
    """Lift this process's soft limit on open files towards ``target`` (at most the hard limit).

    Logs the change once at INFO (nothing when the limit is already there), or
    one WARNING when the system refuses it.

    Returns:
        The soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if soft >= wanted:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError) as exc:
        logger.warning("cannot raise the open files limit from %d to %d (%s): a step that "
                       "loads more chunks than that is partly recomputed", soft, wanted, exc)
        return soft
    logger.info("raised the open files limit from %d to %d: a layer-wise load keeps a step's "
                "chunks open", soft, wanted)
    return wanted
