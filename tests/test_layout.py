"""Keys become paths only through a strict check; namespaces separate incompatible engines."""

import pytest

from lmcache_fs.storage.layout import (BadKeyError, ChunkLayout, Namespace, check_key,
                                       chunk_location, is_namespace_name, key_of, key_of_pin,
                                       seed_marker_name, seed_of_marker)
from lmcache_fs.storage.manifest import read_manifest, write_manifest

FIELDS = {"model": "org/Model-7B", "num_layers": 32, "num_kv_heads": 8, "head_size": 128,
          "dtype": "bfloat16", "block_size": 16, "kv_layout": "cuda-logical", "tp_size": 1,
          "tp_rank": 0, "hash_algo": "sha256", "chunk_size": 256}


@pytest.mark.parametrize("bad", ["", "../../etc/passwd", "AB" * 16, "ab/cd" * 4, "ab" * 4,
                                 "zz" * 16, "ab" * 65, "ab" * 16 + "\x00", "ab" * 16 + "\n",
                                 "\nab" * 8, None])
def test_anything_but_lowercase_hex_is_not_a_key(bad):
    with pytest.raises(BadKeyError):
        check_key(bad)


def test_chunk_path_stays_under_its_namespace(tmp_path):
    layout = ChunkLayout(tmp_path, Namespace(FIELDS))
    key = "0f" * 32
    path = layout.chunk_path(key)
    assert path.parent.parent == layout.directory
    assert path.parent.name == "0f" and path.name == key + ".safetensors"
    assert layout.directory.name.startswith("model-7b-")


@pytest.mark.parametrize("field,value", [("model", "other"), ("num_layers", 31), ("dtype", "float16"),
                                         ("block_size", 32), ("kv_layout", "cpu-amx"), ("tp_rank", 1),
                                         ("hash_algo", "xxhash"), ("chunk_size", 512)])
def test_any_incompatible_field_gives_another_namespace(field, value):
    assert Namespace({**FIELDS, field: value}).name != Namespace(FIELDS).name


def test_namespace_name_is_stable_and_order_independent():
    reordered = dict(reversed(list(FIELDS.items())))
    assert Namespace(reordered).name == Namespace(FIELDS).name


def test_manifest_holds_the_readable_fields(tmp_path):
    layout = ChunkLayout(tmp_path, Namespace(FIELDS))
    write_manifest(layout)
    manifest = read_manifest(layout.directory)
    assert manifest is not None and manifest["model"] == "org/Model-7B" and manifest["format_version"] == 1


def test_scan_lists_published_chunks_only(tmp_path):
    layout = ChunkLayout(tmp_path, Namespace(FIELDS))
    good = "ab" * 32
    layout.chunk_path(good).parent.mkdir(parents=True)
    layout.chunk_path(good).write_bytes(b"x")
    (layout.chunk_path(good).parent / (".tmp.host.1.abc." + good + ".safetensors")).write_bytes(b"x")
    (layout.chunk_path(good).parent / "notes.txt").write_bytes(b"x")
    (layout.directory / "cd").mkdir()
    (layout.directory / "cd" / ("ab" * 32 + ".safetensors")).write_bytes(b"x")  # wrong fan-out dir
    assert [key for key, _ in layout.iter_chunk_files()] == [good]


def test_a_trailing_newline_makes_no_namespace_name_and_no_chunk_name():
    # "$" matches before a final newline; the rules are full matches.
    name = Namespace(FIELDS).name
    assert is_namespace_name(name) and not is_namespace_name(name + "\n")
    key = "cd" * 32
    assert key_of(f"{key}.safetensors", "cd") == key
    assert key_of(f"{key}\n.safetensors", "cd") is None
    assert seed_of_marker(seed_marker_name("0123456789ab")) == "0123456789ab"
    assert seed_of_marker(seed_marker_name("0123456789ab") + "\n") is None
    assert key_of_pin(key + ".json") == key and key_of_pin(key + "\n.json") is None


def test_a_name_maps_back_to_its_key_only_under_its_own_fan_out_directory():
    key = "0f" * 32
    where = chunk_location(key)
    assert (where.fanout, where.name) == ("0f", key + ".safetensors")
    assert key_of(where.name, where.fanout) == key
    assert key_of(where.name, "1e") is None  # filed under another key's directory
    for stray in (".tmp.host.1.abcd." + where.name, key + ".json", key, "namespace.json"):
        assert key_of(stray) is None


def test_temporaries_are_named_as_rsync_names_them_and_those_of_before_are_still_known():
    from lmcache_fs.storage.layout import is_temporary, temp_name

    final = "ab" * 32 + ".safetensors"
    name = temp_name(final)
    # GlusterFS's distribute layer hashes ".NAME.suffix" as NAME (its rsync-hash-regex
    # ^\.(.+)\.[^.]+$): the temporary's data lands on the final name's brick.
    assert name.startswith(f".{final}.") and "." not in name.rsplit(".", 1)[1]
    assert is_temporary(name) and key_of(name) is None and temp_name(final) != name
    assert is_temporary(".tmp.host.1.abcdef." + final)  # a crashed writer's of before
    assert not is_temporary(".hidden") and not is_temporary(final)
