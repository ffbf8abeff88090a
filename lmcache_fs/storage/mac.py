"""Chunk MACs: the keyed hashes a chunk file may name, and the key each one is given.

A chunk written with an integrity key carries ``"mac": "<algorithm>:<hex tag>"``
in its header, a MAC over the header's other fields and the data (fed by
:class:`lmcache_fs.storage.codec.DataCheck`). Writers use :data:`WRITTEN`;
readers accept exactly the algorithms of :data:`ACCEPTED` and refuse anything
else: no MAC, an unknown name, a name without a tag.

Both accepted algorithms are full-strength MACs (256-bit key, 256-bit tag), so
the name in a header only picks which of two unforgeable checks the reader
makes. Without the key, editing the name gains nothing: the other algorithm's
tag cannot be forged either, and a name that would mean a weaker check (none,
a plain checksum) is not in the list.

- ``blake3``, keyed BLAKE3: what files are written with. 2.4 times HMAC-SHA256's
  speed per core here (4.2 against 1.8 GB per CPU-second, ``bench/results/integrity.md``). Its
  key comes from the integrity key through BLAKE3's key-derivation mode under a
  context string used for nothing else, so it is never the key of another
  algorithm (nor of the key's public id, see :mod:`lmcache_fs.storage.integrity`).
- ``hmac-sha256``: what keyed files carried before; keyed with the integrity
  key itself, exactly as then, so a directory written before still loads.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from typing import Protocol

import blake3

BLAKE3 = "blake3"
HMAC_SHA256 = "hmac-sha256"
WRITTEN = BLAKE3
ACCEPTED = (BLAKE3, HMAC_SHA256)
# BLAKE3's derive_key mode wants a hard-coded, globally unique context string.
_BLAKE3_CONTEXT = "lmcache-fs 2026-12-06 chunk file MAC, keyed BLAKE3"


class Mac(Protocol):
    """A MAC being computed: fed in pieces, then read as hex."""

    def update(self, data: bytes | memoryview, /) -> object: ...

    def hexdigest(self) -> str: ...


def new_mac(algorithm: str, key: bytes) -> Mac:
    """A fresh MAC of ``algorithm`` (one of :data:`ACCEPTED`) under the integrity key ``key``.

    Raises:
        ValueError: ``algorithm`` is not one of :data:`ACCEPTED`.
    """
    if algorithm == BLAKE3:
        # One thread: a CPU engine's forward pass runs on the other cores while layers load.
        # max_threads=2 took more CPU per byte here and starts a thread pool per hasher
        # (bench/results/integrity.md): what it saves in wall time it takes from the engine.
        return blake3.blake3(key=_blake3_key(key))
    if algorithm == HMAC_SHA256:
        return hmac.new(key, digestmod=hashlib.sha256)
    raise ValueError(f"unknown MAC algorithm {algorithm[:32]!r}; known: {', '.join(ACCEPTED)}")


@functools.lru_cache(maxsize=4)
def _blake3_key(key: bytes) -> bytes:
    """The keyed-BLAKE3 key of integrity key ``key`` (derived once per key and process)."""
    return blake3.blake3(key, derive_key_context=_BLAKE3_CONTEXT).digest()
