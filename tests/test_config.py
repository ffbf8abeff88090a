"""Settings: YAML file, extra-config overrides, and errors that name the fix."""

import logging
import re

import pytest

from lmcache_fs.config import ConfigError, load_config


def test_yaml_file_is_read_and_extra_config_wins(tmp_path, monkeypatch):
    cfg_file = tmp_path / "lmcache.yaml"
    cfg_file.write_text(f"storage_path: {tmp_path}/kv\nchunk_size: 512\nmax_disk_size_gb: 3\n")
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", str(cfg_file))
    cfg = load_config({"chunk_size": "1024"})
    assert cfg.storage_path == f"{tmp_path}/kv"
    assert cfg.chunk_size == 1024
    assert cfg.max_disk_size_gb == 3.0


def test_missing_storage_path_names_the_key(monkeypatch):
    monkeypatch.delenv("LMCACHE_CONFIG_FILE", raising=False)
    with pytest.raises(ConfigError, match="storage_path is required"):
        load_config({})


def test_unknown_key_lists_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown lmcache-fs setting\(s\) \['chunksize'\].*chunk_size"):
        load_config({"storage_path": str(tmp_path), "chunksize": 256})


def test_bad_value_names_key_and_value(tmp_path):
    with pytest.raises(ConfigError, match="chunk_size: cannot read 'lots'"):
        load_config({"storage_path": str(tmp_path), "chunk_size": "lots"})


def test_chunk_size_must_be_whole_blocks(tmp_path):
    cfg = load_config({"storage_path": str(tmp_path), "chunk_size": 200})
    with pytest.raises(ConfigError, match="not a multiple of the engine's block size 128.*e.g. 256"):
        cfg.check_block_size(128)


def test_storage_path_that_is_a_file_is_rejected(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = load_config({"storage_path": str(blocker)})
    with pytest.raises(ConfigError, match="cannot be created|not a directory"):
        cfg.check_storage_path()


def test_world_writable_file_mode_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="world-writable"):
        load_config({"storage_path": str(tmp_path), "file_mode": "0o666"})


def test_unreadable_config_file_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="nope.yaml cannot be read"):
        load_config({"storage_path": str(tmp_path)})


def test_three_way_settings_take_yaml_booleans_and_refuse_anything_else(tmp_path):
    config = load_config({"storage_path": str(tmp_path), "layerwise_load": True, "use_gds": False})
    assert (config.layerwise_load, config.use_gds) == ("true", "false")
    with pytest.raises(ConfigError, match="layerwise_load must be auto, true or false, got 'sometimes'"):
        load_config({"storage_path": str(tmp_path), "layerwise_load": "sometimes"})


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    cfg_file = tmp_path / "lmcache.yaml"
    cfg_file.write_text(f"storage_path: {tmp_path}\n\tmax_disk_size_gb: 1\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(cfg_file))} is not valid YAML at line 2, column 1"):
        load_config(config_file=str(cfg_file))


@pytest.mark.parametrize("key,value", [("max_disk_size_gb", ".inf"), ("max_disk_size_gb", ".nan"),
                                       ("eviction_interval_s", ".nan"), ("min_free_disk_gb", ".inf")])
def test_infinite_and_nan_numbers_are_refused(tmp_path, key, value):
    cfg_file = tmp_path / "lmcache.yaml"
    cfg_file.write_text(f"storage_path: {tmp_path}\n{key}: {value}\n")
    with pytest.raises(ConfigError, match=f"{key} must be a finite number"):
        load_config(config_file=str(cfg_file))


@pytest.mark.parametrize("value", ["644", "0644", "0o644", 0o644])
def test_file_mode_strings_are_octal(tmp_path, value):
    assert load_config({"storage_path": str(tmp_path), "file_mode": value}).file_mode == 0o644


def test_a_decimal_file_mode_number_is_refused_with_the_octal_spelling(tmp_path):
    cfg_file = tmp_path / "lmcache.yaml"
    cfg_file.write_text(f"storage_path: {tmp_path}\nfile_mode: 644\n")  # YAML: decimal 644 = 0o1204
    with pytest.raises(ConfigError, match=r'file_mode 644 \(0o1204\) is not a permission mode.*"0644"'):
        load_config(config_file=str(cfg_file))


def test_a_file_mode_the_owner_cannot_read_and_write_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="0o444 does not let the owner read and write"):
        load_config({"storage_path": str(tmp_path), "file_mode": "0444"})


def test_an_empty_storage_path_in_yaml_is_missing_not_the_string_none(tmp_path):
    cfg_file = tmp_path / "lmcache.yaml"
    cfg_file.write_text("storage_path:\nchunk_size: 256\n")
    with pytest.raises(ConfigError, match="storage_path is required"):
        load_config(config_file=str(cfg_file))


def test_a_temp_file_grace_below_a_minute_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="temp_file_grace_s must be at least 60"):
        load_config({"storage_path": str(tmp_path), "temp_file_grace_s": 0})


# -- every key type-checked, bounded, and read from a file safely -------------------------

def _file(tmp_path, content: bytes | str) -> str:
    path = tmp_path / "lmcache.yaml"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return str(path)


def test_an_eviction_interval_longer_than_a_day_is_refused(tmp_path):
    # Guards against 1e10 being accepted and the evictor's thread dying of OverflowError.
    with pytest.raises(ConfigError, match=r"eviction_interval_s must be at most 86400 \(a day\), "
                                          r"got 10000000000.0.*the default is 60"):
        load_config({"storage_path": str(tmp_path), "eviction_interval_s": 1e10})
    assert load_config({"storage_path": str(tmp_path),
                        "eviction_interval_s": 86400}).eviction_interval_s == 86400


def test_unknown_keys_of_mixed_types_are_listed_not_a_type_error(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown lmcache-fs setting\(s\) \['x', 1\]"):
        load_config({"storage_path": str(tmp_path), 1: 2, "x": 3})


@pytest.mark.parametrize("encoding", ["utf-16", "latin-1"])
def test_a_settings_file_that_is_not_utf8_is_refused_with_the_fix(tmp_path, encoding):
    path = _file(tmp_path, f"storage_path: {tmp_path}/caché\n".encode(encoding))
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte \d+\): save it as UTF-8"):
        load_config(config_file=path)


def test_a_settings_file_over_a_mebibyte_is_refused_unread(tmp_path):
    path = _file(tmp_path, f"storage_path: {tmp_path}\n" + "#" * (1 << 20))
    with pytest.raises(ConfigError, match="is larger than 1 MiB"):
        load_config(config_file=path)


def test_yaml_aliases_are_refused_before_they_expand(tmp_path):
    # Guards against nine nested aliases of nine items (a few hundred bytes) growing to
    # 9**9 values: 29 s and 2.1 GB, then MemoryError.
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    path = _file(tmp_path, "\n".join(lines + ["chunk_size: *l8", f"storage_path: {tmp_path}"]))
    with pytest.raises(ConfigError, match="line 1, column 5: YAML anchors and aliases .* are not "
                                          "allowed in a settings file; write each value out"):
        load_config(config_file=path)


@pytest.mark.parametrize("content", [
    "storage_path: 2024-13-45\n",  # a date YAML cannot build: ValueError
    "chunk_size: " + "9" * 5000 + "\n",  # more digits than Python converts: ValueError
    "chunk_size: " + "[" * 5000 + "]" * 5000 + "\n",  # RecursionError in yaml's composer
    "storage_path: /kv\x07\n",  # a control character: yaml's ReaderError, on two lines
], ids=["bad-date", "huge-integer", "deep-nesting", "control-character"])
def test_yaml_the_parser_cannot_build_is_one_line_naming_the_file(tmp_path, content):
    path = _file(tmp_path, content)
    with pytest.raises(ConfigError, match=rf"^{re.escape(path)} is not valid YAML.*fix the file$") as err:
        load_config(config_file=path)
    assert "\n" not in str(err.value)


def test_a_nul_byte_in_storage_path_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="storage_path .* contains a NUL byte"):
        load_config({"storage_path": f"{tmp_path}/a\0b"})


@pytest.mark.parametrize("value,kind", [
    ("[a, b]", "list"), ("{a: 1}", "dict"), ("true", "bool"), ("2024-01-01", "date"),
    ("!!binary aGVsbG8=", "bytes"), ("123", "int")])
def test_a_storage_path_that_is_not_a_string_is_refused(tmp_path, monkeypatch, value, kind):
    # Guards against directories named "['a', 'b']", "True" or "2024-01-01" being created.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=rf"storage_path: cannot read .* \({kind}\) as a path: "
                                          "write e.g. storage_path: /mnt/shared/kv"):
        load_config(config_file=_file(tmp_path, f"storage_path: {value}\n"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lmcache.yaml"]


@pytest.mark.parametrize("key,value,wanted", [
    ("watch_events", "[]", "true or false"), ("watch_events", "1", "true or false"),
    ("chunk_size", "true", "a whole number"), ("max_disk_size_gb", "false", "a number"),
    ("file_mode", "true", "a permission mode"), ("integrity_key_file", "[k]", "a path")])
def test_a_bool_is_not_a_number_and_a_list_is_not_a_bool(tmp_path, key, value, wanted):
    path = _file(tmp_path, f"storage_path: {tmp_path}\n{key}: {value}\n")
    with pytest.raises(ConfigError, match=rf"^{key}: cannot read .* as {wanted}: write e.g. {key}: "):
        load_config(config_file=path)


def test_use_gds_names_its_three_choices(tmp_path):
    with pytest.raises(ConfigError, match="use_gds must be auto, true or false, got 'yes'"):
        load_config({"storage_path": str(tmp_path), "use_gds": "yes"})


def test_a_relative_storage_path_is_made_absolute_and_logged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = seen.append  # this module's records only, whatever handles them elsewhere
    logging.getLogger("lmcache_fs.config").addHandler(handler)
    try:
        cfg = load_config({"storage_path": "kv", "integrity_key_file": "keys/k"})
    finally:
        logging.getLogger("lmcache_fs.config").removeHandler(handler)
    assert (cfg.storage_path, cfg.integrity_key_file) == (str(tmp_path / "kv"), str(tmp_path / "keys/k"))
    assert [r.getMessage() for r in seen] == [
        f"storage_path 'kv' is relative: using {tmp_path / 'kv'} (relative to the working "
        "directory); give an absolute path so that every engine and the gc sidecar use the same one",
        f"integrity_key_file 'keys/k' is relative: using {tmp_path / 'keys/k'} (relative to the "
        "working directory); give an absolute path so that every engine and the gc sidecar use "
        "the same one"]
