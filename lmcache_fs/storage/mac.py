"""Chunk MACs: the header's ``mac`` field, the algorithms it may name, and their keys.

A chunk written with an integrity key carries a MAC over its header's other
fields and its data (fed by :class:`lmcache_fs.storage.codec.DataCheck`), in a
field that names its algorithm (:class:`MacField`, lower-case hex):

- ``gmac-aes256:<salt>:<tag>``, what files are written with (:data:`WRITTEN`):
  AES-256-GMAC, i.e. AES-256-GCM over no plaintext with the header and the
  data as associated data, a 128-bit tag, under a key of the file's own:
  ``HKDF-Expand-SHA256(integrity key, info=_GMAC_KEY_INFO + salt)``, the salt
  256 random bits in the field. GMAC's one rule is never to use a nonce twice
  under one key; a key used for one file cannot, so the GCM nonce is fixed.
  (Random nonces under one shared key would be the other way, but NIST caps
  those at 2^32 messages a key, a few years of a busy directory's stores; a
  256-bit salt never repeats.) The integrity key is already a uniform 32-byte
  key, so HKDF's extract step is left out: each file's key is HMAC-SHA256
  under the integrity key of an input starting ``lmcache-fs``, which no
  HMAC-SHA256 tag of before ever covered (those start ``[{``). A writer
  without the key can copy a salt, not the key it stands for: one tag under
  that key is all it has, and forging another message's tag from it means
  guessing GHASH's key (under 2^-100 a try for a 32 MiB chunk). The MAC also
  covers the field up to its tag, so the algorithm and the salt are signed
  like the rest of the header.
- ``hmac-sha256:<tag>``: what keyed files carried before; keyed with the
  integrity key itself and covering every field but this one, exactly as
  then, so a directory written before still loads.

Readers accept exactly :data:`ACCEPTED`, in exactly that form, and refuse
anything else (:class:`MacFieldError`): an unknown name, a salt or tag of
another length or not lower-case hex. Both are full-strength MACs (256-bit
keys; 128- and 256-bit tags), and no value one of them computes is ever the
other's tag or key, so the name in a header only picks which of two
unforgeable checks the reader makes; no accepted name means a weaker one.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from dataclasses import dataclass, replace
from typing import Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

GMAC_AES256 = "gmac-aes256"
HMAC_SHA256 = "hmac-sha256"
WRITTEN = GMAC_AES256
ACCEPTED = (GMAC_AES256, HMAC_SHA256)
SALT_BYTES = 32
_TAG_BYTES = {GMAC_AES256: 16, HMAC_SHA256: 32}
# HKDF's info, before the salt: a derived key is of this use only, no other algorithm's or version's.
_GMAC_KEY_INFO = b"lmcache-fs chunk file MAC: gmac-aes256, one key per file, salt "
_GCM_NONCE = bytes(12)  # fixed: every file has a key of its own (module docstring)


class MacFieldError(ValueError):
    """A header's ``mac`` field that no keyed reader accepts: the message says why."""


class Mac(Protocol):
    """A MAC being computed: fed in pieces, then read once as hex."""

    def update(self, data: bytes | memoryview, /) -> object: ...

    def hexdigest(self) -> str: ...


def _is_hex(text: str, nbytes: int) -> bool:
    return re.fullmatch(f"[0-9a-f]{{{2 * nbytes}}}", text) is not None


@dataclass(frozen=True)
class MacField:
    """What a header's ``mac`` field says: the algorithm, the file's salt and the tag.

    ``salt`` is hex, empty for HMAC-SHA256 (its files have none); ``tag`` is
    hex, empty while the writer computes it.
    """

    algorithm: str
    salt: str
    tag: str = ""

    @classmethod
    def fresh(cls, algorithm: str = WRITTEN) -> MacField:
        """The field of a file about to be written with ``algorithm`` (a new random salt for GMAC).

        Raises:
            ValueError: ``algorithm`` is not one of :data:`ACCEPTED`.
        """
        if algorithm not in ACCEPTED:
            raise ValueError(f"unknown MAC algorithm {algorithm!r}; known: {', '.join(ACCEPTED)}")
        return cls(algorithm, os.urandom(SALT_BYTES).hex() if algorithm == GMAC_AES256 else "")

    @classmethod
    def parse(cls, text: str) -> MacField:
        """The field ``text`` of a header (any text a writer planted), if a keyed reader accepts it.

        Raises:
            MacFieldError: unknown algorithm, or not exactly that algorithm's form.
        """
        algorithm, _, rest = text.partition(":")
        if algorithm not in ACCEPTED:
            raise MacFieldError(f"unknown MAC algorithm {algorithm[:32]!r}: this release "
                                f"accepts {', '.join(ACCEPTED)}")
        salt, _, tag = rest.rpartition(":") if algorithm == GMAC_AES256 else ("", "", rest)
        if algorithm == GMAC_AES256 and not _is_hex(salt, SALT_BYTES):
            raise MacFieldError(f"malformed MAC field: a {algorithm} salt is {2 * SALT_BYTES} "
                                "lower-case hex digits")
        if not _is_hex(tag, _TAG_BYTES[algorithm]):
            raise MacFieldError(f"malformed MAC field: a {algorithm} tag is "
                                f"{2 * _TAG_BYTES[algorithm]} lower-case hex digits")
        return cls(algorithm, salt, tag)

    def covered(self) -> str | None:
        """The field as its MAC covers it: all of it but the tag (None: HMAC-SHA256 covers none)."""
        return None if self.algorithm == HMAC_SHA256 else f"{self.algorithm}:{self.salt}"

    def signed(self, tag: str) -> MacField:
        """This field with its tag."""
        return replace(self, tag=tag)

    def new_mac(self, integrity_key: bytes) -> Mac:
        """A fresh MAC of this field's algorithm, under the key it takes from ``integrity_key``."""
        if self.algorithm == HMAC_SHA256:
            return hmac.new(integrity_key, digestmod=hashlib.sha256)
        return _Gmac(_gmac_key(integrity_key, bytes.fromhex(self.salt)))

    def __str__(self) -> str:
        return ":".join(part for part in (self.algorithm, self.salt, self.tag) if part)


def _gmac_key(integrity_key: bytes, salt: bytes) -> bytes:
    """One file's AES-256 key: HKDF-Expand-SHA256 of the integrity key, the file's salt in its info."""
    return HKDFExpand(hashes.SHA256(), 32, _GMAC_KEY_INFO + salt).derive(integrity_key)


class _Gmac:
    """AES-256-GMAC: AES-GCM over no plaintext, everything fed as associated data."""

    def __init__(self, key: bytes):
        self._gcm = Cipher(algorithms.AES(key), modes.GCM(_GCM_NONCE)).encryptor()

    def update(self, data: bytes | memoryview, /) -> None:
        # OpenSSL's GCM takes associated data in any number of pieces of any length and
        # reads each in place (tests/test_integrity.py: pieces give the one-shot tag).
        self._gcm.authenticate_additional_data(data)

    def hexdigest(self) -> str:
        self._gcm.finalize()
        return self._gcm.tag.hex()
