"""``namespace.json``: a namespace's fields, written once and readable, read as untrusted.

The manifest lets operators (``lmcache-fs ls``, ``verify``, the page) tell what a
namespace directory holds without an engine. Engines never trust it: the
namespace name is a hash of the fields, and every chunk's header names its
namespace, so a planted manifest misleads a listing at most.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from lmcache_fs.storage.layout import MANIFEST_NAME, MAX_MANIFEST_BYTES, ChunkLayout, FieldValue
from lmcache_fs.storage.publish import publish_at
from lmcache_fs.storage.untrusted import parse_json_object, read_capped

logger = logging.getLogger(__name__)


def write_manifest(layout: ChunkLayout, mode: int = 0o644) -> None:
    """Create the namespace directory and its readable ``namespace.json`` once.

    Published like a chunk (a unique ``O_EXCL | O_NOFOLLOW`` temporary,
    then a link that fails if the name exists) into the namespace
    directory opened with ``O_NOFOLLOW``: a symlink planted at the
    manifest's name, a temporary's name or the namespace directory's name
    never redirects the write, and whatever holds the manifest's name
    already (first writer wins) stays. The manifest only informs operators:
    a write that fails (a full disk) is logged and the engine starts without it.
    (``layout.root`` must exist or be creatable: the config's start-up check of
    ``storage_path`` names the fix where it is not.)

    """
    name = layout.namespace.name
    layout.root.mkdir(parents=True, exist_ok=True)
    root_fd = os.open(layout.root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            os.mkdir(name, dir_fd=root_fd)
        except FileExistsError:
            pass
        except OSError as exc:  # ENOSPC: the writer creates it with its first store
            logger.warning("cannot create %s (%s): its namespace.json is not written",
                           layout.directory, exc.strerror)
            return
        try:
            dir_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root_fd)
        except OSError as exc:  # ELOOP, ENOTDIR: a symlink or a file planted at its name
            logger.warning("%s is not a real directory (%s): its namespace.json is not "
                           "written", layout.directory, exc.strerror)
            return
    finally:
        os.close(root_fd)
    text = (json.dumps(layout.namespace.fields, indent=2, sort_keys=True) + "\n").encode()
    try:
        try:  # written once: later starts (and read-only mounts) write nothing
            os.stat(MANIFEST_NAME, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            publish_at(dir_fd, MANIFEST_NAME, lambda fd: os.write(fd, text), mode)
    except OSError as exc:  # ENOSPC, EDQUOT, EIO: chunks are what matter, and stores pause
        logger.warning("cannot write %s/%s (%s): `lmcache-fs ls` will not name its model until "
                       "an engine starts with room to write it", layout.directory, MANIFEST_NAME,
                       exc.strerror or exc)
    finally:
        os.close(dir_fd)


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, FieldValue] | None:
    """The fields of a namespace directory, or None if it has no well-formed manifest.

    Anyone who can write the cache directory can plant ``namespace.json``: it
    is read without following a symlink, up to ``MAX_MANIFEST_BYTES``, and
    only a flat object of strings, numbers and booleans is a manifest.
    """
    data = read_capped(Path(directory) / MANIFEST_NAME, MAX_MANIFEST_BYTES)
    fields = None if data is None else parse_json_object(data, MAX_MANIFEST_BYTES, max_depth=1)
    if fields is None or not all(isinstance(v, (str, int, float, bool)) for v in fields.values()):
        return None
    return fields
