"""Fuzzing every parser of a file that others can write: thousands of mutated and truncated files.

Leases, the eviction pass's usage record, pins, namespace manifests and chunk
files all live in the shared directory, where anyone with write access can
plant any bytes. Starting from
valid files, hypothesis flips bits, truncates, inserts and overwrites bytes,
swaps JSON values for values of other types and nests them; each result must
read as a miss or a clean error:

- ``read_lease`` / ``read_usage`` / a pin store / ``read_manifest``: None /
  skipped, or a record of the right types (never an exception);
- ``ChunkStore.load`` (the engine's read path): ``ChunkFileError``, or the
  exact bytes that were stored (a mutation of header padding can leave a
  valid file), never other data; ``verify.check_chunk``: a finding or None.
  Keyed chunks also get their MAC field rewritten (stripped, other or unknown
  algorithm names, other salts and tags, odd text): a keyed load accepts only
  the MAC its writer made.

The settings file is not in the shared directory, but a mistyped or
half-copied one must still stop start-up with one line, not a traceback:
``load_config`` gives well-typed settings or one ``ConfigError``.

A bounded run is part of the tests (about 20 s here); ``make fuzz-long`` runs
``LMCACHE_FS_FUZZ_SCALE`` (default there 25) times as many examples.
"""

import json
import os
import struct
import tempfile

import pytest
import torch
import yaml
from cachedir import SHAPE, chunk, make_store
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmcache_fs.config import ConfigError, LMCacheFSConfig, TriState, load_config
from lmcache_fs.ops.lease import LeaseRecord, read_lease
from lmcache_fs.ops.pins import Pin, PinStore
from lmcache_fs.ops.verify import Finding, check_chunk
from lmcache_fs.storage import mac
from lmcache_fs.storage.codec import ChunkFileError
from lmcache_fs.storage.layout import MANIFEST_NAME, PINS_DIR, check_key
from lmcache_fs.storage.manifest import read_manifest
from lmcache_fs.storage.store import ChunkStore
from lmcache_fs.storage.usage import read_usage

SCALE = float(os.environ.get("LMCACHE_FS_FUZZ_SCALE", "1"))
COUNTS: dict[str, int] = {}  # examples run per target, printed at the end (-s)


def fuzz(examples: int):
    """Hypothesis settings for one target: ``examples`` times the scale, no deadline, no database."""
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


def _count(target: str) -> None:
    COUNTS[target] = COUNTS.get(target, 0) + 1


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """One directory for the module, reused by every example (examples share no fixture run)."""
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    print("\nfuzz examples run: " + ", ".join(f"{k} {v}" for k, v in sorted(COUNTS.items())))


# -- mutations ----------------------------------------------------------------------------

def _apply(data: bytes, ops: list) -> bytes:
    out = bytearray(data)
    for op, where, value in ops:
        at = where % (len(out) + 1)
        if op == "flip" and out:
            out[at % len(out)] ^= 1 << (value[0] % 8) if value else 1
        elif op == "truncate":
            del out[at:]
        elif op == "insert":
            out[at:at] = value
        elif op == "overwrite":
            out[at:at + len(value)] = value
    return bytes(out)


def mutated(valid: bytes, hot: int | None = None) -> st.SearchStrategy[bytes]:
    """``valid`` with up to four flips, truncations, insertions or overwrites.

    ``hot``: most positions fall in the first ``hot`` bytes (a chunk's header),
    where a mutation changes meaning rather than only data.
    """
    where = st.integers(0, len(valid))
    if hot is not None:
        where = st.one_of(st.integers(0, hot), where)
    op = st.tuples(st.sampled_from(["flip", "truncate", "insert", "overwrite"]), where,
                   st.binary(min_size=0, max_size=16))
    return st.lists(op, min_size=1, max_size=4).map(lambda ops: _apply(valid, ops))


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                    st.text(max_size=20))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20)


def _json_bytes(value: object) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


def fields_swapped(valid: dict) -> st.SearchStrategy[bytes]:
    """``valid`` with some of its values replaced by any JSON (wrong types, nesting, NaN)."""
    keys = sorted(valid)
    return st.dictionaries(st.sampled_from(keys), JSON_VALUES, max_size=len(keys)).map(
        lambda swap: _json_bytes({**valid, **swap}))


def deep(opener: str, closer: str, most: int = 200_000) -> st.SearchStrategy[bytes]:
    return st.integers(1, most).map(lambda n: (opener * n + closer * n).encode())


def planted(valid: bytes, fields: dict) -> st.SearchStrategy[bytes]:
    return st.one_of(mutated(valid), fields_swapped(fields), st.binary(max_size=512),
                     JSON_VALUES.map(_json_bytes), deep("[", "]"), deep('{"a":', "}"))


# -- leases -------------------------------------------------------------------------------

LEASE = {"host": "node-1", "pid": 4242, "token": "0123456789abcdef", "expires_at": 1.7e9}
LEASE_BYTES = json.dumps(LEASE).encode().ljust(256)


@fuzz(1500)
@given(content=planted(LEASE_BYTES, LEASE))
def test_a_planted_lease_file_is_no_lease_or_a_well_typed_one(scratch, content):
    _count("lease")
    path = scratch / "eviction.lease"
    path.write_bytes(content)
    record = read_lease(path)
    assert record is None or (isinstance(record, LeaseRecord) and isinstance(record.host, str)
                              and type(record.pid) is int and isinstance(record.token, str)
                              and isinstance(record.expires_at, float))


# -- the last eviction pass's measure -------------------------------------------------------

USAGE = {"directory_bytes": 47_815_065, "budget_bytes": 50_331_648, "measured_at": 1.7e9}


@fuzz(500)
@given(content=planted(json.dumps(USAGE).encode(), USAGE))
def test_a_planted_usage_file_is_no_measure_or_byte_counts(scratch, content):
    _count("usage")
    (scratch / "eviction.usage").write_bytes(content)
    usage = read_usage(scratch)
    assert usage is None or all(type(n) is int and n >= 0 for n in usage)


# -- pins ---------------------------------------------------------------------------------

PIN_KEYS = ["aa" * 32, "bb" * 32]
PIN = {"keys": PIN_KEYS, "note": "system prompt", "pinned_at": 1.7e9, "host": "node-1"}


@fuzz(1000)
@given(content=planted(json.dumps(PIN, indent=1).encode(), PIN))
def test_a_planted_pin_file_is_skipped_or_pins_valid_keys(scratch, content):
    _count("pin")
    namespace = scratch
    (namespace / PINS_DIR).mkdir(exist_ok=True)
    (namespace / PINS_DIR / f"{PIN_KEYS[-1]}.json").write_bytes(content)
    for pin in PinStore(namespace).pins():
        assert isinstance(pin, Pin) and all(check_key(k) == k for k in pin.keys)
        assert isinstance(pin.note, str) and isinstance(pin.pinned_at, float)


# -- manifests ----------------------------------------------------------------------------

MANIFEST = {"model": "tiny@0123456789ab", "num_layers": 2, "block_size": 16, "dtype": "bfloat16",
            "hash_algo": "sha256", "format_version": 1}


@fuzz(1000)
@given(content=planted(json.dumps(MANIFEST, indent=2).encode(), MANIFEST))
def test_a_planted_manifest_is_none_or_flat_fields(scratch, content):
    _count("manifest")
    namespace = scratch
    (namespace / MANIFEST_NAME).write_bytes(content)
    fields = read_manifest(namespace)
    assert fields is None or all(isinstance(v, (str, int, float, bool)) for v in fields.values())


# -- chunk files: through the engine's read path and through verify ----------------------

KEY = "cd" * 32
META = {"parent_key": "", "chunk_index": "0", "num_tokens": "16"}


def _store_with_one_chunk(root) -> ChunkStore:
    store = make_store(root)
    store.save(KEY, chunk(KEY), META)
    return store


with tempfile.TemporaryDirectory() as _tmp:  # the strategies start from a real chunk file
    VALID_CHUNK = _store_with_one_chunk(_tmp).layout.chunk_path(KEY).read_bytes()


@pytest.fixture(scope="module")
def chunk_store(tmp_path_factory):
    return _store_with_one_chunk(tmp_path_factory.mktemp("fuzz-chunks"))


def _header_fields(raw: bytes) -> dict:
    (length,) = struct.unpack_from("<Q", raw)
    return json.loads(raw[8:8 + length])


def header_swapped(raw: bytes) -> st.SearchStrategy[bytes]:
    """The chunk with its header JSON re-encoded after swapping values (nested ones too)."""
    header = _header_fields(raw)
    (length,) = struct.unpack_from("<Q", raw)
    data = raw[8 + length:]

    def rebuild(swap):
        tensor, meta = dict(header["kv"]), dict(header["__metadata__"])
        tensor.update(swap.get("kv", {}))
        meta.update(swap.get("meta", {}))
        text = _json_bytes({"__metadata__": meta, "kv": tensor, **swap.get("top", {})})
        return struct.pack("<Q", len(text)) + text + data

    return st.fixed_dictionaries({}, optional={
        "kv": st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets"]), JSON_VALUES),
        "meta": st.dictionaries(st.sampled_from(sorted(header["__metadata__"])), JSON_VALUES),
        "top": st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=2)}).map(rebuild)


def chunk_contents(raw: bytes) -> st.SearchStrategy[bytes]:
    (length,) = struct.unpack_from("<Q", raw)
    return st.one_of(mutated(raw, hot=8 + length), header_swapped(raw),
                     st.integers(0, len(raw)).map(lambda n: raw[:n]))


@fuzz(1500)
@given(content=chunk_contents(VALID_CHUNK))
def test_a_planted_chunk_file_is_a_clean_miss_or_the_stored_bytes(chunk_store, content):
    _count("chunk load")
    _plant(chunk_store.layout.chunk_path(KEY), content)
    out = torch.empty(SHAPE, dtype=torch.bfloat16)
    try:
        chunk_store.load(KEY, out)
    except ChunkFileError:
        return  # a miss: the engine recomputes
    assert torch.equal(out.view(torch.uint8), chunk(KEY).view(torch.uint8))  # never other data


@fuzz(1000)
@given(content=chunk_contents(VALID_CHUNK))
def test_verify_reports_a_planted_chunk_file_or_accepts_the_stored_bytes(chunk_store, content):
    _count("chunk verify")
    path = chunk_store.layout.chunk_path(KEY)
    _plant(path, content)
    finding = check_chunk(path, chunk_store.layout.namespace.name, KEY)
    assert finding is None or isinstance(finding, Finding)


# -- keyed chunk files: the MAC field's algorithm name, salt and tag ----------------------

MAC_KEY = bytes(range(32))


def _keyed_store_with_one_chunk(root) -> ChunkStore:
    store = ChunkStore(make_store(root).layout, mac_key=MAC_KEY)
    store.save(KEY, chunk(KEY), META)
    return store


with tempfile.TemporaryDirectory() as _tmp:
    VALID_KEYED_CHUNK = _keyed_store_with_one_chunk(_tmp).layout.chunk_path(KEY).read_bytes()
VALID_MAC = _header_fields(VALID_KEYED_CHUNK)["__metadata__"]["mac"]


@pytest.fixture(scope="module")
def keyed_store(tmp_path_factory):
    return _keyed_store_with_one_chunk(tmp_path_factory.mktemp("fuzz-keyed"))


def mac_claims(raw: bytes) -> st.SearchStrategy[bytes]:
    """The keyed chunk with its MAC field removed or replaced by another ``name:salt:tag``
    or ``name:tag`` claim."""
    header = _header_fields(raw)
    (length,) = struct.unpack_from("<Q", raw)
    meta = header["__metadata__"]
    _, salt, tag = meta["mac"].split(":")
    checksum = meta["checksum"].split(":")[1]
    names = st.one_of(st.sampled_from([*mac.ACCEPTED, "", "none", "xxh3_64", "GMAC-AES256",
                                       "gmac-aes256 ", "gmac-aes128", "blake3", "sha256"]),
                      st.text(max_size=12))
    hex_of = st.integers(1, 40).flatmap(lambda n: st.binary(min_size=n, max_size=n).map(bytes.hex))
    salts = st.one_of(st.sampled_from([salt, tag, "", salt.upper(), salt[:-1], salt + "0"]),
                      st.text(max_size=70), hex_of)
    tags = st.one_of(st.sampled_from([tag, salt, checksum, "", tag.upper(), tag[:-1], tag + tag]),
                     st.text(max_size=70), hex_of)
    claims = st.one_of(st.none(), st.builds("{}:{}:{}".format, names, salts, tags),
                       st.builds("{}:{}".format, names, tags), st.text(max_size=120))

    def rebuild(claim):
        fields = {k: v for k, v in meta.items() if k != "mac"}
        if claim is not None:
            fields["mac"] = claim
        text = _json_bytes({"__metadata__": fields, "kv": header["kv"]})
        return struct.pack("<Q", len(text)) + text + raw[8 + length:]
    return claims.map(rebuild)


@fuzz(1000)
@given(content=st.one_of(chunk_contents(VALID_KEYED_CHUNK), mac_claims(VALID_KEYED_CHUNK)))
def test_a_planted_keyed_chunk_is_a_clean_miss_or_what_the_key_holder_wrote(keyed_store, content):
    _count("keyed chunk load+verify")
    path = keyed_store.layout.chunk_path(KEY)
    _plant(path, content)
    finding = check_chunk(path, keyed_store.layout.namespace.name, KEY, mac_key=MAC_KEY)
    assert finding is None or isinstance(finding, Finding)
    out = torch.empty(SHAPE, dtype=torch.bfloat16)
    try:
        keyed_store.load(KEY, out)
    except ChunkFileError:
        return
    assert _header_fields(content)["__metadata__"]["mac"] == VALID_MAC  # no other claim passes
    assert torch.equal(out.view(torch.uint8), chunk(KEY).view(torch.uint8))


def _plant(path, content: bytes) -> None:
    """Put ``content`` at the chunk's name (a load may have quarantined the last one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".fuzz")
    tmp.write_bytes(content)
    os.replace(tmp, path)




# -- planted entries: any kind, at any place of the on-disk map ---------------------------

PLACES = ("root", "namespace", "fanout", "the chunk's fanout", "pins", "quarantine")
NAMES = ("namespace.json", "eviction.lease", "eviction.usage", "quarantine", "pins", "ab",
         "hashseed-0123456789ab", ".tmp.h.1.x.f", "stray", "ab" * 32 + ".safetensors",
         "ab" * 32 + ".json", "a\nb")
KINDS = ("file", "empty", "dir", "dir with a file", "link outside", "link to a chunk", "fifo",
         "sparse", "unreadable dir")


def _plant_entry(root, store, outside, place: str, name: str, kind: str) -> None:
    parent = {"root": root, "namespace": store.layout.directory,
              "fanout": store.layout.directory / "ab",
              "the chunk's fanout": store.layout.chunk_path(KEY).parent,
              "pins": store.layout.directory / PINS_DIR, "quarantine": root / "quarantine"}[place]
    if os.path.islink(parent) or (parent.exists() and not parent.is_dir()):
        return  # an earlier entry of this example took the parent's name
    parent.mkdir(parents=True, exist_ok=True)
    path = parent / name
    if os.path.lexists(path):
        return
    if kind in ("file", "empty", "sparse"):
        with open(path, "wb") as f:
            f.write(b"" if kind == "empty" else b"planted" * 50)
            if kind == "sparse":
                f.truncate(8 << 30)
    elif kind in ("dir", "dir with a file", "unreadable dir"):
        path.mkdir()
        if kind != "dir":
            (path / "inside").write_bytes(b"x" * 100)
        if kind == "unreadable dir":
            path.chmod(0)
    elif kind == "link outside":
        path.symlink_to(outside)
    elif kind == "link to a chunk":
        path.symlink_to(store.layout.chunk_path(KEY))
    elif kind == "fifo":
        os.mkfifo(path)


@fuzz(200)
@given(planted=st.lists(st.tuples(st.sampled_from(PLACES), st.sampled_from(NAMES),
                                  st.sampled_from(KINDS)), min_size=1, max_size=6))
def test_planted_entries_never_reach_outside_never_hang_and_never_remove_a_good_chunk(
        scratch, planted):
    from lmcache_fs.ops.cli import main
    from lmcache_fs.ops.eviction import Evictor
    from lmcache_fs.ops.inventory import scan_directory
    from lmcache_fs.ops.verify import verify_namespace

    _count("planted entries")
    with tempfile.TemporaryDirectory(dir=scratch) as work:
        root, outside = os.path.join(work, "kv"), os.path.join(work, "outside")
        os.mkdir(outside)
        with open(os.path.join(outside, "victim"), "w") as f:
            f.write("precious")
        from pathlib import Path

        store = make_store(Path(root))
        store.save(KEY, chunk(KEY), {})
        for place, name, kind in planted:
            _plant_entry(Path(root), store, Path(outside), place, name, kind)
        contents = scan_directory(root)
        assert KEY in {c.key for c in contents.chunks}
        report = Evictor(root, max_bytes=10**12).run_pass()  # far under budget: removes no chunk
        assert report.evicted_chunks == 0
        assert not [f for f in verify_namespace(store.layout.directory)
                    if f.path == str(store.layout.chunk_path(KEY))]
        out = torch.empty(SHAPE, dtype=torch.bfloat16)
        store.load(KEY, out)  # the good chunk is still there and loads
        with open(os.devnull, "w") as quiet:
            import contextlib

            with contextlib.redirect_stdout(quiet):
                main(["clear", "--all", "--yes", "--storage-path", root, "--json"])
                main(["gc", "--remove-foreign", "--storage-path", root, "--json"])
        assert sorted(os.listdir(outside)) == ["victim"]
        with open(os.path.join(outside, "victim")) as f:
            assert f.read() == "precious"
        for dirpath, dirnames, _ in os.walk(work):  # let TemporaryDirectory clean up
            for d in dirnames:
                os.chmod(os.path.join(dirpath, d), 0o755)

# -- the settings file and vLLM's kv_connector_extra_config -------------------------------

SETTINGS = {"storage_path": "/mnt/shared/kv", "chunk_size": 256, "max_disk_size_gb": 500,
            "watch_events": True, "file_mode": "0644", "eviction_interval_s": 60,
            "use_gds": "auto", "layerwise_load": False, "integrity_key_file": ""}
SETTINGS_BYTES = yaml.safe_dump(SETTINGS).encode()
# What YAML can say that JSON cannot: anchors and aliases, tags, dates, complex keys, merges.
YAML_FRAGMENTS = st.sampled_from([
    b"&a ", b"*a", b"!!binary ", b"!!set ", b"!!python/object:os.system ", b"2024-13-45",
    b"2024-01-01", b"? [a, b]\n: c\n", b"<<: {chunk_size: 1}\n", b"\t", b"\x00", b"\xff\xfe",
    b"0x10", b"0o777", b"1_000", b".inf", b"-.nan", b"1:30", b"~", b"'", b'"', b"[", b"{"])
SETTING_VALUES = st.one_of(JSON_VALUES, st.dates(), st.binary(max_size=8))


def settings_file() -> st.SearchStrategy[bytes]:
    inserted = st.lists(st.tuples(st.just("insert"), st.integers(0, len(SETTINGS_BYTES)),
                                  YAML_FRAGMENTS), min_size=1, max_size=4)
    swapped = st.dictionaries(st.one_of(st.sampled_from(sorted(SETTINGS)), st.text(max_size=6)),
                              SETTING_VALUES, max_size=4)
    return st.one_of(mutated(SETTINGS_BYTES),
                     inserted.map(lambda ops: _apply(SETTINGS_BYTES, ops)),
                     swapped.map(lambda swap: yaml.safe_dump({**SETTINGS, **swap}).encode()),
                     st.binary(max_size=512),
                     # Around the loader's depth cap: yaml's scanner spends about 0.1 s on any
                     # run of a thousand brackets (tests/test_config.py reads one).
                     deep("[", "]", most=32).map(b"chunk_size: ".__add__))


EXTRA_CONFIG = st.one_of(st.none(), st.dictionaries(
    st.one_of(st.sampled_from(sorted(SETTINGS)), st.text(max_size=6), st.integers()),
    JSON_VALUES, max_size=4))


@fuzz(1000)
@given(content=settings_file(), overrides=EXTRA_CONFIG)
def test_settings_are_well_typed_or_one_config_error(scratch, content, overrides):
    _count("settings")
    path = scratch / "lmcache.yaml"
    path.write_bytes(content)
    try:
        cfg = load_config(overrides, config_file=str(path))
    except ConfigError as exc:
        assert "\n" not in str(exc)  # one line, whatever the value
        return
    assert isinstance(cfg, LMCacheFSConfig) and os.path.isabs(cfg.storage_path)
    for name, kind in {"chunk_size": int, "file_mode": int, "max_disk_size_gb": float,
                       "watch_events": bool, "use_gds": TriState, "integrity_key_file": str}.items():
        assert type(getattr(cfg, name)) is kind, (name, getattr(cfg, name))
