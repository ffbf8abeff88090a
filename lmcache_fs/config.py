"""lmcache-fs settings: one frozen dataclass, validated once at start-up.

Settings come from a YAML file named by ``LMCACHE_CONFIG_FILE`` (as LMCache
users do), overridden key by key by a mapping (vLLM's
``kv_connector_extra_config``). Each idea has exactly one name; an unknown key
is an error that names the known ones, never silently ignored.

Example:
    >>> cfg = load_config({"storage_path": "/tmp"})
    >>> cfg.chunk_size
    256
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

CONFIG_FILE_ENV = "LMCACHE_CONFIG_FILE"


class ConfigError(ValueError):
    """A setting is missing or wrong; the message names the key and the fix."""


_STORAGE_PATH_REQUIRED = (
    "storage_path is required: set it to the shared cache directory in the YAML file "
    f"named by {CONFIG_FILE_ENV} or in kv_connector_extra_config")

# Numeric settings checked by sign alone (the others have checks of their own).
_POSITIVE = ("chunk_size", "save_queue_size", "staging_buffer_mb", "eviction_interval_s")
_NON_NEGATIVE = {"max_disk_size_gb": " (0 = no limit)", "lookup_negative_ttl_s": "",
                 "min_free_disk_gb": " (0 = no guard)"}

# A writer's temporary lives from its open to its link: seconds, even for a large
# chunk on a slow mount. Its mtime comes from the file server's clock, which may be
# tens of seconds off this node's; below a minute, eviction could delete temporaries
# that writers on other nodes are still filling, failing their stores.
_MIN_TEMP_FILE_GRACE_S = 60.0


@dataclass(frozen=True)
class LMCacheFSConfig:
    """Validated lmcache-fs settings (see the README's configuration table)."""

    storage_path: str
    """The shared cache directory (required). Local disk, NFS or a parallel FS."""

    chunk_size: int = 256
    """Tokens per chunk file; a multiple of the engine's block size."""

    max_disk_size_gb: float = 0.0
    """Budget for the whole directory across all instances; 0 means no limit."""

    save_queue_size: int = 64
    """Chunks waiting for the background writer; when full, stores are skipped."""

    lookup_negative_ttl_s: float = 2.0
    """How long a chunk seen absent stays absent before its path is stat'ed again."""

    watch_events: bool = True
    """Watch the directory for files other local instances write (inotify)."""

    file_mode: int = 0o644
    """Permission bits of published chunk files (default: not world-writable)."""

    eviction_high_watermark: float = 0.95
    """Eviction starts when the directory holds more than this fraction of ``max_disk_size_gb``."""

    eviction_low_watermark: float = 0.85
    """Eviction removes least recently used chunks until the directory is below this fraction."""

    eviction_interval_s: float = 60.0
    """Seconds between eviction passes of the background evictor (engine or ``gc --daemon``)."""

    temp_file_grace_s: float = 600.0
    """Age after which a temporary file (a crashed writer's ``.tmp.*``) is removed."""

    min_free_disk_gb: float = 1.0
    """Stores stop (and serving continues) while the filesystem has less free space than this."""

    use_gds: str = "auto"
    """GPU reads: ``auto`` (kvikio, with GPUDirect Storage where cuFile works, else kvikio's
    POSIX mode; without kvikio or CUDA, POSIX reads plus a host-to-device copy, with one
    warning), ``true`` (GDS or a start-up error), ``false`` (POSIX plus host-to-device copy)."""

    staging_buffer_mb: int = 256
    """Per-worker read staging (and as much pinned host memory on CUDA); reads in
    flight = this // chunk bytes, 1 to 16."""

    verify_device_reads: bool = True
    """Checksum chunks read by kvikio straight to the GPU (a copy back to the host plus
    xxh3). False trusts the filesystem for their data bytes (header, size and identity are
    still checked); POSIX reads are always verified."""

    layerwise_load: str = "auto"
    """``true``: read chunk files layer by layer in the background while the forward pass
    runs, each attention layer waiting only for its own layer (POSIX reads, hashed as they
    land). ``false``: whole chunks, read and verified before the forward pass (on CUDA with
    kvikio/GDS). ``auto``: layer by layer on CPU engines, whole chunks on CUDA (layer-wise
    CUDA loads have not yet been measured on a GPU)."""

    integrity_key_file: str = ""
    """A file holding a secret (16+ random bytes, not world-readable): chunks carry a keyed
    MAC, and only chunks written by holders of the same key are loaded. Empty: no MAC."""

    def __post_init__(self) -> None:
        if not self.storage_path:
            raise ConfigError(_STORAGE_PATH_REQUIRED)
        for f in fields(self):
            # YAML's .inf and .nan pass every sign check below (NaN fails no comparison),
            # then crash int() or disable eviction later.
            if f.type in ("int", "float") and not math.isfinite(getattr(self, f.name)):
                raise ConfigError(f"{f.name} must be a finite number, got {getattr(self, f.name)}"
                                  + _NON_NEGATIVE.get(f.name, ""))
        for name in _POSITIVE:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name, zero_means in _NON_NEGATIVE.items():
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0{zero_means}, got {getattr(self, name)}")
        if self.temp_file_grace_s < _MIN_TEMP_FILE_GRACE_S:
            raise ConfigError(
                f"temp_file_grace_s must be at least {_MIN_TEMP_FILE_GRACE_S:.0f}, got "
                f"{self.temp_file_grace_s}: a shorter grace lets eviction delete temporaries "
                "that writers are still filling (the default is 600)")
        for name in ("use_gds", "layerwise_load"):
            if getattr(self, name) not in ("auto", "true", "false"):
                raise ConfigError(f"{name} must be auto, true or false, got {getattr(self, name)!r}")
        if not 0 <= self.file_mode <= 0o777:
            # A YAML or JSON number is decimal: `file_mode: 644` is 0o1204.
            raise ConfigError(
                f"file_mode {self.file_mode} ({oct(self.file_mode)}) is not a permission mode "
                "(at most 0o777): write it as a quoted octal string, e.g. \"0644\"")
        if self.file_mode & 0o600 != 0o600:
            raise ConfigError(
                f"file_mode {oct(self.file_mode)} does not let the owner read and write the "
                "chunk files: use e.g. \"0644\" or \"0664\" (a quoted octal string)")
        if self.file_mode & 0o002:
            raise ConfigError(f"file_mode {oct(self.file_mode)} is world-writable; use e.g. 0o644 or 0o664")
        if not 0 < self.eviction_low_watermark < self.eviction_high_watermark <= 1:
            raise ConfigError(
                "need 0 < eviction_low_watermark < eviction_high_watermark <= 1, got "
                f"{self.eviction_low_watermark} and {self.eviction_high_watermark}: e.g. 0.85 and 0.95")

    def check_block_size(self, block_size: int) -> None:
        """Raise unless whole chunks are whole engine blocks."""
        if self.chunk_size % block_size:
            raise ConfigError(
                f"chunk_size {self.chunk_size} is not a multiple of the engine's block size "
                f"{block_size}: set chunk_size to e.g. {max(1, round(self.chunk_size / block_size)) * block_size}")

    def integrity_key(self) -> bytes | None:
        """The MAC key from ``integrity_key_file``, or None without one.

        Raises:
            ConfigError: the file is unusable (the message names the fix).
        """
        if not self.integrity_key_file:
            return None
        from lmcache_fs.storage.integrity import IntegrityKeyError, read_key_file

        try:
            return read_key_file(self.integrity_key_file)
        except IntegrityKeyError as exc:
            raise ConfigError(str(exc)) from exc

    def check_storage_path(self, writable: bool = True) -> Path:
        """Create the directory if needed; raise a clear error if it cannot be used."""
        path = Path(self.storage_path)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"storage_path {path} cannot be created ({exc.strerror}): "
                              "create it or point storage_path at a writable directory") from exc
        if not path.is_dir():
            raise ConfigError(f"storage_path {path} is not a directory")
        if writable and not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"storage_path {path} is not writable by this process: fix its "
                              "permissions, or use kv_role 'kv_consumer' for a read-only replica")
        return path


def _coerce(name: str, kind: Any, value: Any) -> Any:
    """Convert YAML/JSON/env values to the field's type, naming the key on failure."""
    try:
        if name == "file_mode" and isinstance(value, str):
            # Permission bits are written in octal: "644", "0644" and "0o644" alike.
            return int(value.lower().removeprefix("0o"), 8)
        if kind in ("bool", bool):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if kind in ("int", int):
            if isinstance(value, str):
                return int(value, 0)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind in ("float", float):
            return float(value)
        if isinstance(value, bool):  # YAML's `use_gds: true` is a bool
            return "true" if value else "false"
        return str(value)
    except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: int(.inf)
        raise ConfigError(f"{name}: cannot read {value!r} as {kind}") from exc


def load_config(overrides: Mapping[str, Any] | None = None,
                config_file: str | None = None) -> LMCacheFSConfig:
    """Build the config from the YAML file (if any) and then ``overrides``.

    Args:
        overrides: keys that win over the file (vLLM's kv_connector_extra_config).
        config_file: YAML path; defaults to ``$LMCACHE_CONFIG_FILE``.

    Raises:
        ConfigError: unknown key, bad value, missing storage_path, unreadable file.
    """
    values: dict[str, Any] = {}
    path = config_file or os.environ.get(CONFIG_FILE_ENV)
    if path:
        import yaml

        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"{CONFIG_FILE_ENV}={path} cannot be read: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{path} is not valid YAML{where}: "
                              f"{getattr(exc, 'problem', None) or exc}: fix the file") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a YAML mapping of lmcache-fs settings")
        values.update(loaded)
    values.update(overrides or {})

    known = {f.name: f.type for f in fields(LMCacheFSConfig)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown lmcache-fs setting(s) {unknown}; known: {sorted(known)}")
    if values.get("storage_path") in (None, ""):  # YAML's `storage_path:` is None, not "None"
        raise ConfigError(_STORAGE_PATH_REQUIRED)
    return LMCacheFSConfig(**{k: _coerce(k, known[k], v) for k, v in values.items()})
