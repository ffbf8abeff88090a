"""Settings: YAML file, extra-config overrides, and errors that name the fix."""

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
