"""lmcache-fs settings: one frozen dataclass, validated once at start-up.

Settings come from a YAML file named by ``LMCACHE_CONFIG_FILE`` (as LMCache
users do), overridden key by key by a mapping (vLLM's
``kv_connector_extra_config``). Each idea has exactly one name; an unknown key
is an error that names the known ones, never silently ignored.

Every value is checked for its type before its range: a bool is not a number,
a path is a string (never a list, a date or bytes), and each error is one line
that names the key and the fix. The file is read safely: at most
:data:`MAX_FILE_BYTES`, UTF-8 only, and with no YAML anchors or aliases (a few
nested aliases expand to gigabytes).

Example:
    >>> cfg = load_config({"storage_path": "/tmp"})
    >>> cfg.chunk_size
    256
"""

from __future__ import annotations

import enum
import functools
import logging
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping

CONFIG_FILE_ENV = "LMCACHE_CONFIG_FILE"
MAX_FILE_BYTES = 1 << 20
"""A settings file holds a few hundred bytes; one larger than this is refused unread."""
_MAX_DEPTH = 8  # YAML nesting: the settings mapping holds single values (depth 2)

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A setting is missing or wrong; the message (one line) names the key and the fix."""


class TriState(str, enum.Enum):
    """A setting that is on, off, or chosen by lmcache-fs for the device (``auto``).

    YAML's ``true``/``false`` read as these too. A ``str`` enum: it compares
    equal to its spelling, and prints as it is written in the settings file.
    """

    AUTO = "auto"
    TRUE = "true"
    FALSE = "false"

    def resolve(self, auto: bool) -> bool:
        """True or False; ``auto`` stands for ``auto``, what lmcache-fs picks for the device."""
        return auto if self is TriState.AUTO else self is TriState.TRUE

    def __str__(self) -> str:
        return self.value


_STORAGE_PATH_REQUIRED = (
    "storage_path is required: set it to the shared cache directory in the YAML file "
    f"named by {CONFIG_FILE_ENV} or in kv_connector_extra_config")

# Numeric settings checked by sign alone (the others have checks of their own).
_POSITIVE = ("chunk_size", "save_queue_size", "staging_buffer_mb", "eviction_interval_s",
             "lookup_deadline_ms", "load_deadline_s", "load_deadline_min_mbps",
             "startup_deadline_s", "breaker_cooldown_s")
_NON_NEGATIVE = {"max_disk_size_gb": " (0 = no limit)", "lookup_negative_ttl_s": "",
                 "min_free_disk_gb": " (0 = no guard)"}

# A writer's temporary lives from its open to its link: seconds, even for a large
# chunk on a slow mount. Its mtime comes from the file server's clock, which may be
# tens of seconds off this node's; below a minute, eviction could delete temporaries
# that writers on other nodes are still filling, failing their stores.
_MIN_TEMP_FILE_GRACE_S = 60.0

# The evictor waits this long between passes on a thread (threading.TIMEOUT_MAX, about
# 292 years on Linux, overflows long before a float does), and its lease lasts three
# intervals: a pass less than once a day would leave a dead holder's budget unkept for days.
_MAX_INTERVAL_S = 86400.0

# Settings with an upper bound: (the bound, it in words, what waits that long).
_AT_MOST = {
    "load_deadline_s": (_MAX_INTERVAL_S, "a day", "a thread waits that long"),
    "startup_deadline_s": (_MAX_INTERVAL_S, "a day", "a thread waits that long"),
    "breaker_cooldown_s": (_MAX_INTERVAL_S, "a day", "a thread waits that long"),
    "lookup_deadline_ms": (60_000.0, "a minute",
                           "the scheduler waits that long for a lookup (the default is 200)"),
    "eviction_interval_s": (_MAX_INTERVAL_S, "a day",
                            "the evictor waits that long between passes (the default is 60)"),
}



@dataclass(frozen=True)
class LMCacheFSConfig:
    """Validated lmcache-fs settings (see the README's configuration table)."""

    storage_path: str
    """The shared cache directory (required). Local disk, NFS or a parallel FS. A relative
    path is made absolute against the working directory, with a warning."""

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
    """Seconds between eviction passes of the background evictor (engine or ``gc --daemon``),
    at most a day."""

    temp_file_grace_s: float = 600.0
    """Age after which a temporary file (a crashed writer's ``.<name>.tmp-*``) is removed."""

    min_free_disk_gb: float = 1.0
    """Stores stop (and serving continues) while the filesystem has less free space than this."""

    use_gds: TriState = TriState.AUTO
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

    layerwise_load: TriState = TriState.AUTO
    """``true``: read chunk files layer by layer in the background while the forward pass
    runs, each attention layer waiting only for its own layer (POSIX reads, hashed as they
    land). ``false``: whole chunks, read and verified before the forward pass (on CUDA with
    kvikio/GDS). ``auto``: layer by layer on CPU engines, whole chunks on CUDA (layer-wise
    CUDA loads have not yet been measured on a GPU)."""

    integrity_key_file: str = ""
    """A file holding a secret (16+ random bytes, not world-readable): chunks carry a keyed
    MAC, and only chunks written by holders of the same key are loaded. Empty: no MAC."""

    lookup_deadline_ms: float = 200.0
    """How long a lookup's stat of a chunk may take: past it the lookup is a miss and the
    directory is switched off for a while (a hung NFS server or FUSE daemon, a dead brick)."""

    load_deadline_s: float = 2.0
    """How long one step's loads may take, plus their bytes at ``load_deadline_min_mbps``:
    past it they are misses (recomputed) and the directory is switched off for a while."""

    load_deadline_min_mbps: float = 200.0
    """The slowest read rate (MB/s) a healthy directory is allowed (see ``load_deadline_s``)."""

    startup_deadline_s: float = 10.0
    """How long each start-up call to the directory may take (its check, namespace.json,
    the seed marker): past it the engine starts with the directory switched off."""

    breaker_cooldown_s: float = 5.0
    """After a timeout or an outage error (ENOTCONN, EIO, ESTALE...), how long the
    directory is left alone before one probe; doubles while the probes fail, up to 60 s."""

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
        for name, (bound, in_words, why) in _AT_MOST.items():
            if getattr(self, name) > bound:
                raise ConfigError(f"{name} must be at most {bound:.0f} ({in_words}), got "
                                  f"{getattr(self, name)}: {why}")
        if self.temp_file_grace_s < _MIN_TEMP_FILE_GRACE_S:
            raise ConfigError(
                f"temp_file_grace_s must be at least {_MIN_TEMP_FILE_GRACE_S:.0f}, got "
                f"{self.temp_file_grace_s}: a shorter grace lets eviction delete temporaries "
                "that writers are still filling (the default is 600)")
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

    def load_deadline(self, nbytes: int) -> float:
        """Seconds one step's loads of ``nbytes`` may take."""
        return self.load_deadline_s + nbytes / (self.load_deadline_min_mbps * 1e6)

    def breaker_settings(self) -> dict[str, float]:
        """The keyword arguments of :class:`lmcache_fs.storage.breaker.Breaker` these settings give."""
        return {"cooldown_s": self.breaker_cooldown_s,
                "max_cooldown_s": max(60.0, self.breaker_cooldown_s),
                "canary_deadline_s": self.startup_deadline_s}

    @property
    def staging_bytes(self) -> int:
        """``staging_buffer_mb`` in bytes: what each reader may stage."""
        return self.staging_buffer_mb << 20

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


# -- reading one value: the field's type, never a look-alike --------------------------------

def _shown(value: Any, limit: int = 60) -> str:
    """``value`` as an error message quotes it: its repr (one line), cut at ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _refuse(name: str, value: Any, wanted: str, example: str) -> ConfigError:
    return ConfigError(f"{name}: cannot read {_shown(value)} ({type(value).__name__}) as "
                       f"{wanted}: write e.g. {name}: {example}")


def _read_int(name: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():  # YAML's 256.0
        return int(value)
    if isinstance(value, str):  # kv_connector_extra_config as strings: "1024", "0x400"
        try:
            return int(value, 0)
        except ValueError:
            pass
    raise _refuse(name, value, "a whole number", "256")


def _read_file_mode(name: str, value: Any) -> int:
    if isinstance(value, str):
        # Permission bits are written in octal: "644", "0644" and "0o644" alike.
        try:
            return int(value.lower().removeprefix("0o"), 8)
        except ValueError:
            pass
    elif isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _refuse(name, value, "a permission mode", '"0644" (a quoted octal string)')


def _read_float(name: str, value: Any) -> float:
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            return float(value)
    except (ValueError, OverflowError):  # OverflowError: an int beyond a float's range
        pass
    raise _refuse(name, value, "a number", "60")


_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("0", "false", "no", "off")


def _read_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE_WORDS + _FALSE_WORDS:
        return value.lower() in _TRUE_WORDS
    raise _refuse(name, value, "true or false", "true")


def _read_tri_state(name: str, value: Any) -> TriState:
    if isinstance(value, bool):  # YAML's `use_gds: true` is a bool
        return TriState.TRUE if value else TriState.FALSE
    try:
        return TriState(value)
    except ValueError:
        pass
    raise ConfigError(f"{name} must be auto, true or false, got {_shown(value)}")


def _read_path(name: str, value: Any) -> str:
    """A path setting: a string without NUL, made absolute (a relative one is logged)."""
    if not isinstance(value, str):  # a YAML list, date, bool or !!binary would name a directory
        raise _refuse(name, value, "a path", "/mnt/shared/kv (a string; quote it in YAML if "
                                             "it looks like a number, date or boolean)")
    if "\0" in value:
        raise ConfigError(f"{name} {_shown(value)} contains a NUL byte, which no path may hold: "
                          "fix the value")
    if value and not os.path.isabs(value):
        absolute = os.path.abspath(value)
        logger.warning("%s %r is relative: using %s (relative to the working directory); give an "
                       "absolute path so that every engine and the gc sidecar use the same one",
                       name, value, absolute)
        return absolute
    return value


# By the field's annotation; every string setting is a path.
_READERS: dict[str, Callable[[str, Any], Any]] = {
    "int": _read_int, "float": _read_float, "bool": _read_bool, "TriState": _read_tri_state,
    "str": _read_path}


def _read_value(name: str, kind: str, value: Any) -> Any:
    """The value of setting ``name`` as its field's type ``kind``; ConfigError if it is not one."""
    return (_read_file_mode if name == "file_mode" else _READERS[kind])(name, value)


# -- reading the file ------------------------------------------------------------------------

def _read_file(path: str) -> dict[Any, Any]:
    """The settings mapping in YAML file ``path``.

    Raises:
        ConfigError: unreadable, larger than :data:`MAX_FILE_BYTES`, not UTF-8, not YAML,
            with anchors or aliases, or not a mapping.
    """
    import yaml

    try:
        with open(path, "rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{CONFIG_FILE_ENV}={path} cannot be read: {exc.strerror}") from exc
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{path} is larger than {MAX_FILE_BYTES >> 20} MiB, which no settings "
                          "file needs: point at the right file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:  # UTF-16 from some editors, Latin-1
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}): save it as UTF-8") from exc
    try:
        loaded = yaml.load(text, Loader=_settings_loader())  # noqa: S506 - a safe loader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}: "
                          f"{_one_line(exc.problem or exc)}: fix the file") from exc
    except (yaml.YAMLError, ValueError) as exc:
        # ReaderError (a control character), a date such as 2024-13-45, an integer of
        # thousands of digits.
        raise ConfigError(f"{path} is not valid YAML: {_one_line(exc)}: fix the file") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a YAML mapping of lmcache-fs settings")
    return loaded


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


@functools.lru_cache(maxsize=1)
def _settings_loader() -> type:
    """YAML's safe loader for a flat mapping of settings (made on first use, as yaml is imported).

    It refuses anchors and aliases, which a settings file never needs: nested
    aliases are the "billion laughs", a few lines that expand to gigabytes. It
    refuses values nested deeper than :data:`_MAX_DEPTH` as soon as it meets
    them: yaml's scanner takes time quadratic in the depth of what it reads
    ahead, and its composer recurses once per level.
    """
    import yaml

    class SettingsLoader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise yaml.composer.ComposerError(
                    None, None, "YAML anchors and aliases (&name, *name) are not allowed in a "
                    "settings file; write each value out", event.start_mark)
            if self.depth >= _MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"values nested more than {_MAX_DEPTH} deep; each setting is "
                    "one number, string or boolean", event.start_mark)
            self.depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return SettingsLoader


def load_config(overrides: Mapping[str, Any] | None = None,
                config_file: str | None = None) -> LMCacheFSConfig:
    """Build the config from the YAML file (if any) and then ``overrides``.

    Args:
        overrides: keys that win over the file (vLLM's kv_connector_extra_config).
        config_file: YAML path; defaults to ``$LMCACHE_CONFIG_FILE``.

    Raises:
        ConfigError: unknown key, bad value, missing storage_path, unreadable file.
    """
    values: dict[Any, Any] = {}
    path = config_file or os.environ.get(CONFIG_FILE_ENV)
    if path:
        values.update(_read_file(path))
    values.update(overrides or {})

    known = {f.name: str(f.type) for f in fields(LMCacheFSConfig)}
    unknown = sorted((k for k in values if k not in known), key=repr)  # keys of any type
    if unknown:
        raise ConfigError(f"unknown lmcache-fs setting(s) {_shown(unknown, 200)}; "
                          f"known: {sorted(known)}")
    if values.get("storage_path") in (None, ""):  # YAML's `storage_path:` is None, not "None"
        raise ConfigError(_STORAGE_PATH_REQUIRED)
    return LMCacheFSConfig(**{k: _read_value(k, known[k], v) for k, v in values.items()})
