"""The integrity key: who may publish chunks that engines holding the same key will load.

xxh3 and the device checksum catch accidents (torn writes, bit rot, stale or
foreign files), not someone who can write the shared directory: such a writer
can publish a file with a valid key, namespace and checksum but arbitrary KV.
With ``integrity_key_file`` set, every chunk carries a MAC over its metadata
and data (AES-256-GMAC; HMAC-SHA256 in files written before, see
:mod:`lmcache_fs.storage.mac` and :class:`lmcache_fs.storage.codec.DataCheck`):
only holders of the key can write chunks the others load, and a file with a
missing, unknown or wrong MAC is a miss and is quarantined. The key's id is
part of the namespace, so engines with different keys (or none) never share a
directory's chunks and never quarantine each other's files.

Keys: the integrity key is a 32-byte BLAKE2b of the secret (personalised, so it
is no other use's hash of it); the key's public id an 8-byte BLAKE2b of the
integrity key under another personalisation; HMAC-SHA256 uses the integrity key
itself and AES-256-GMAC a key per file, derived from it and the file's salt by
HKDF-Expand-SHA256 (:mod:`lmcache_fs.storage.mac`). None of them reveals another.
"""

from __future__ import annotations

import hashlib
import os
import stat

MIN_KEY_BYTES = 16
MAX_KEY_FILE_BYTES = 4096
_DERIVE_PERSON = b"lmcache-fs-key"
_ID_PERSON = b"lmcache-fs-kid"


class IntegrityKeyError(ValueError):
    """The key file is missing, too short, or readable by everyone."""


def read_key_file(path: str | os.PathLike[str]) -> bytes:
    """The 32-byte integrity key derived from the secret in ``path`` (surrounding whitespace ignored).

    Raises:
        IntegrityKeyError: unreadable, world-readable, shorter than 16 bytes or over 4 KiB,
            each with the fix.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise IntegrityKeyError(f"integrity_key_file {path} cannot be read ({exc.strerror}): "
                                "create it, e.g. `head -c 32 /dev/urandom | base64 > FILE; "
                                "chmod 600 FILE`") from exc
    try:
        if os.fstat(fd).st_mode & stat.S_IROTH:
            raise IntegrityKeyError(f"integrity_key_file {path} is readable by every user: "
                                    f"chmod o-r {path} (a key others can read protects nothing)")
        secret = os.read(fd, MAX_KEY_FILE_BYTES + 1).strip()
    finally:
        os.close(fd)
    if not MIN_KEY_BYTES <= len(secret) <= MAX_KEY_FILE_BYTES:
        raise IntegrityKeyError(f"integrity_key_file {path} holds {len(secret)} bytes; use "
                                f"{MIN_KEY_BYTES} to {MAX_KEY_FILE_BYTES} random bytes, e.g. "
                                "`head -c 32 /dev/urandom | base64`")
    return hashlib.blake2b(secret, digest_size=32, person=_DERIVE_PERSON).digest()


def key_id(key: bytes) -> str:
    """A short public name of ``key`` for the namespace (it reveals nothing of the key)."""
    return hashlib.blake2b(key, digest_size=8, person=_ID_PERSON).hexdigest()
