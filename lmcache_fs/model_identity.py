"""Which model a cache namespace belongs to, named the same on every node.

Used by the connector (the namespace of an engine's chunks) and by
``lmcache-fs pin --prompt`` (the namespace a prompt's chunks would be in), so
it lives in the library and needs nothing but the model folder or hub id.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def model_identity(model: str, revision: str | None) -> str:
    """A model name that is the same on every node.

    A hub id is used as is. A local folder may be mounted at different paths
    on different nodes, so it is named by its folder name plus a hash of its
    config.json.
    """
    config = Path(model) / "config.json"
    if config.is_file():
        digest = hashlib.sha256(config.read_bytes()).hexdigest()[:12]
        return f"{Path(model).resolve().name}@{digest}"
    return f"{model}@{revision}" if revision else model


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_SAMPLE_BYTES = 64 << 10


def weights_fingerprint(model: str) -> str:
    """A short hash that tells apart the weights of local model folders with one config.json.

    Fine-tunes and the checkpoints of one run share their config (and often
    their folder name), but not their weights: each weights file contributes
    its name, size and three 64 KiB samples (start, middle, end), a few reads
    whatever the model's size. Empty for a hub id, whose revision names its
    weights.
    """
    folder = Path(model)
    if not folder.is_dir():
        return ""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES)):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}:".encode())
        with open(path, "rb") as f:
            for offset in sorted({0, max(0, size // 2 - _SAMPLE_BYTES // 2),
                                  max(0, size - _SAMPLE_BYTES)}):
                digest.update(os.pread(f.fileno(), _SAMPLE_BYTES, offset))
    return digest.hexdigest()[:16]
