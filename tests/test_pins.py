"""Pins: one file per pinned prefix, visible to every node, safe to make from many at once."""

import multiprocessing
import os

import pytest
from cachedir import make_store, prefix_keys, save_prefix

from lmcache_fs.ops import pins as pins_module
from lmcache_fs.ops.inspection import prefix_keys as stored_prefix
from lmcache_fs.ops.pins import PinStore
from lmcache_fs.storage.layout import PINS_DIR
from lmcache_fs.storage.layout import BadKeyError


@pytest.fixture
def pins(tmp_path):
    return PinStore(make_store(tmp_path).layout.directory)


def test_a_pin_protects_every_chunk_of_its_prefix(pins):
    keys = prefix_keys("p", 3)
    assert pins.pin(keys, note="faq bot") is True
    assert pins.pinned_keys() == set(keys)
    [pin] = pins.pins()
    assert pin.name == keys[-1] and pin.note == "faq bot" and pin.keys == tuple(keys)


def test_pinning_the_same_prefix_twice_keeps_one_pin(pins):
    keys = prefix_keys("p", 2)
    assert pins.pin(keys) is True
    assert pins.pin(keys) is False
    assert len(pins.pins()) == 1


def test_unpinning_one_prefix_keeps_the_chunks_another_pin_shares(pins):
    system = prefix_keys("system prompt", 2)
    longer = system + prefix_keys("question", 2)
    pins.pin(system)
    pins.pin(longer)
    assert pins.unpin(longer[-1]) is True
    assert pins.pinned_keys() == set(system)
    assert pins.unpin(longer[-1]) is False


def test_keys_that_are_not_hex_never_become_pin_file_names(pins):
    with pytest.raises(BadKeyError):
        pins.pin(["../../etc/passwd"])
    with pytest.raises(BadKeyError):
        pins.unpin("../" * 20)
    with pytest.raises(ValueError, match="at least one"):
        pins.pin([])


def test_an_unreadable_or_symlinked_pin_file_is_ignored(pins, tmp_path):
    keys = prefix_keys("p", 1)
    pins.pin(keys)
    (pins.directory / ("ab" * 32 + ".json")).write_text("{not json")
    outside = tmp_path / "outside.json"
    outside.write_text('{"keys": ["' + "cd" * 32 + '"]}')
    os.symlink(outside, pins.directory / ("cd" * 32 + ".json"))
    assert pins.pinned_keys() == set(keys)


def test_a_symlinked_pins_directory_is_ignored(tmp_path):
    store = make_store(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    PinStore(elsewhere).pin(prefix_keys("p", 1))  # real pins, outside the namespace
    os.symlink(elsewhere / PINS_DIR, store.layout.directory / PINS_DIR)
    assert PinStore(store.layout.directory).pins() == []


def test_a_pin_of_a_very_long_prompt_protects_every_chunk(pins):
    keys = prefix_keys("long", 15_000)  # a 1 MB pin file: 240k tokens at chunk_size 16
    assert pins.pin(keys)
    assert pins.pinned_keys() == set(keys)


def test_a_pin_too_large_to_be_read_back_is_refused(pins, monkeypatch):
    monkeypatch.setattr(pins_module, "_MAX_PIN_FILE", 1000)
    with pytest.raises(ValueError, match="pin a shorter prefix"):
        pins.pin(prefix_keys("long", 20))
    assert pins.pins() == []
    assert pins.pin(prefix_keys("short", 2))


def _pin_many(directory, i):
    PinStore(directory).pin(prefix_keys(f"prompt {i}", 3))


def test_pins_made_by_many_processes_at_once_are_all_kept(pins):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_pin_many, args=(pins.directory.parent, i)) for i in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert len(pins.pins()) == 8


def test_the_prefix_of_a_stored_chunk_is_found_through_its_parent_keys(tmp_path):
    store = make_store(tmp_path)
    keys = prefix_keys("p", 4)
    save_prefix(store, keys)
    assert stored_prefix(store.layout.directory, keys[2]) == (keys[:3], True)
    store.layout.chunk_path(keys[0]).unlink()  # evicted
    assert stored_prefix(store.layout.directory, keys[3]) == (keys[1:], False)
